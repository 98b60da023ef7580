"""The DeepSeekMoE layer: shared experts + routed experts (report section 2.1.2, eq. 12-16).

  h' = u + sum_shared FFN_s(u) + sum_{i in top-k} g_i FFN_i(u)          eq. 12
(the residual `u +` is added by the decoder layer). `forward` runs its steps in order: `route`
(affinities, top-k and gates, eq. 13-16, then the sort by expert), `dispatch` (all-to-all to the
experts' ranks), the `shared` and `routed` experts, `combine` (all-to-all back) and `merge`
(unsort, gate, sum). DualPipe's overlapped step calls the same steps one at a time
(`pipeline/pieces.py`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.fp8 import fp8_batched_matmul
from megatron_dsv3.model.common import SwiGLU
from megatron_dsv3.model.moe.dispatch import Exchange, Permutation, TokenDispatcher
from megatron_dsv3.model.moe.experts import RoutedExperts, bf16_batched_matmul
from megatron_dsv3.model.moe.router import Router
from megatron_dsv3.parallel import groups


class BalanceLossAttach(torch.autograd.Function):
    """Returns `output` unchanged; in backward, feeds gradient `scale` to the balance loss.

    This lets a balance loss computed inside any pipeline stage reach the optimizer without
    being threaded through the stage outputs. The scale is the factor the schedule applies to
    the main loss (1 / micro-batches), passed to the model's forward as `balance_loss_scale`.
    """

    @staticmethod
    def forward(ctx, output, balance_loss, scale: float):
        ctx.save_for_backward(balance_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad):
        (balance_loss,) = ctx.saved_tensors
        return grad, torch.full_like(balance_loss, ctx.scale), None


class DeepSeekMoE(nn.Module):
    def __init__(self, config: DSV3Config, layer_number: int = 0):
        super().__init__()
        self.layer_number = layer_number
        ep_group = groups.ep_group()
        ep = groups.size(ep_group)
        self.router = Router(config)
        matmul = fp8_batched_matmul if config.fp8 == "tile" else bf16_batched_matmul
        self.experts = RoutedExperts(config.num_routed_experts // ep, config.hidden_size,
                                     config.moe_ffn_hidden_size, matmul)
        self.shared_experts = (SwiGLU(config.hidden_size, config.num_shared_experts * config.moe_ffn_hidden_size)
                               if config.num_shared_experts else None)
        self.dispatcher = TokenDispatcher(config.num_routed_experts, ep_group, groups.tp_group())
        self.last_balance_loss = None  # detached, for logging
        self.balance_loss_scale = 1.0  # set by the model's forward from its argument

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        """Eq. 12 less its residual: sum_s FFN_s(u) + sum_{i in top-k} g_i FFN_i(u). x [batch, seq, hidden]."""
        x_sorted, permutation, gates_TK, balance_loss = self.route(x_BSH)  # eq. 13-16
        received, exchange = self.dispatch(x_sorted, permutation)
        shared_BSH = self.shared(x_BSH)
        out = self.routed(received, exchange)
        out_sorted = self.combine(out, exchange)
        return self.merge(x_BSH, out_sorted, shared_BSH, permutation, gates_TK, balance_loss)

    def route(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, Permutation, torch.Tensor, Optional[torch.Tensor]]:
        """Eq. 13-16 (and the balance loss of eq. 17-20): this rank's (token, slot) pairs' inputs
        sorted by expert [pairs, hidden], where they came from, the gates [tokens, top_k] and the loss."""
        routing = self.router(x_BSH)
        x_sorted, permutation = self.dispatcher.permute(x_BSH.flatten(0, 1), routing.expert_ids)
        return x_sorted, permutation, routing.gates, routing.balance_loss

    def dispatch(self, x_sorted: torch.Tensor, permutation: Permutation) -> tuple[torch.Tensor, Exchange]:
        """The all-to-all to the experts' ranks: the rows of this rank's experts, grouped by expert."""
        return self.dispatcher.dispatch(x_sorted, permutation)

    def shared(self, x_BSH: torch.Tensor) -> Optional[torch.Tensor]:
        """sum_s FFN_s(u) [batch, seq, hidden] (None without shared experts)."""
        return self.shared_experts(x_BSH) if self.shared_experts is not None else None

    def routed(self, received: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        """FFN_i of every received row, by its expert i (unweighted)."""
        return self.experts(received, exchange.tokens_per_expert, rows_per_expert=exchange.rows_per_expert)

    def combine(self, out: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        """The all-to-all back: the expert outputs of this rank's pairs, in `route`'s sorted order."""
        return self.dispatcher.combine(out, exchange)

    def merge(self, x_BSH: torch.Tensor, out_sorted: torch.Tensor, shared_BSH: Optional[torch.Tensor],
              permutation: Permutation, gates_TK: torch.Tensor, balance_loss: Optional[torch.Tensor]) -> torch.Tensor:
        """Unsort, weight by the gates and sum over the top-k, add the shared experts (eq. 12);
        attach the balance loss's gradient."""
        per_slot_TKH = self.dispatcher.unpermute(out_sorted, permutation)
        # CUDA's autocast sums in FP32: back to the input's dtype, or the residual stream turns FP32
        out = (per_slot_TKH * gates_TK.unsqueeze(-1).to(x_BSH.dtype)).sum(dim=1).to(x_BSH.dtype).view_as(x_BSH)
        if shared_BSH is not None:
            out = out + shared_BSH
        if balance_loss is not None:
            self.last_balance_loss = balance_loss.detach()
            out = BalanceLossAttach.apply(out, balance_loss, self.balance_loss_scale)
        return out
