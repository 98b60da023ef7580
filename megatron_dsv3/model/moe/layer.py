"""The DeepSeekMoE layer: shared experts + routed experts (report section 2.1.2, eq. 12).

  h' = u + sum_shared FFN_s(u) + sum_{i in top-k} g_i FFN_i(u)
(the residual `u +` is added by the decoder layer).
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.common import SwiGLU
from megatron_dsv3.model.moe.dispatch import TokenDispatcher
from megatron_dsv3.model.moe.experts import RoutedExperts, bf16_batched_matmul
from megatron_dsv3.model.moe.router import Router
from megatron_dsv3.model.pieces import COMM, COMPUTE, Piece, run_in_order
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
        matmul = bf16_batched_matmul
        if config.fp8 == "tile":
            from megatron_dsv3.fp8 import fp8_batched_matmul as matmul
        self.experts = RoutedExperts(config.num_routed_experts // ep, config.hidden_size,
                                     config.moe_ffn_hidden_size, matmul)
        self.shared_experts = (SwiGLU(config.hidden_size, config.num_shared_experts * config.moe_ffn_hidden_size)
                               if config.num_shared_experts else None)
        self.dispatcher = TokenDispatcher(config.num_routed_experts, ep_group, groups.tp_group())
        self.last_balance_loss = None  # detached, for logging
        self.balance_loss_scale = 1.0  # set by the model's forward from its argument

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, hidden] -> [batch, seq, hidden]."""
        return run_in_order(self.pieces(), {"mlp_input": x})["mlp_output"]

    def pieces(self) -> list[Piece]:
        """The layer as route / dispatch / experts / combine / merge (`model/pieces.py`), from the
        state's "mlp_input" [batch, seq, hidden] to its "mlp_output"; its other keys start "moe_"."""
        exchanging = COMM if self.dispatcher.ep_size > 1 else COMPUTE

        def route(state):
            x = state["mlp_input"]
            routing = self.router(x)
            x_sorted, permutation = self.dispatcher.permute(x.flatten(0, 1), routing.expert_ids)
            return {"moe_sorted": x_sorted, "moe_permutation": permutation, "moe_gates": routing.gates,
                    "moe_balance_loss": routing.balance_loss}

        def dispatch(state):
            received, exchange = self.dispatcher.dispatch(state["moe_sorted"], state["moe_permutation"])
            return {"moe_received": received, "moe_exchange": exchange}

        def experts(state):
            shared = self.shared_experts(state["mlp_input"]) if self.shared_experts is not None else None
            return {"moe_expert_out": self.experts(state["moe_received"], state["moe_exchange"].tokens_per_expert),
                    "moe_shared": shared}

        def combine(state):
            return {"moe_combined": self.dispatcher.combine(state["moe_expert_out"], state["moe_exchange"])}

        def merge(state):
            x, gates, balance_loss = state["mlp_input"], state["moe_gates"], state["moe_balance_loss"]
            per_slot_TKH = self.dispatcher.unpermute(state["moe_combined"], state["moe_permutation"])
            out = (per_slot_TKH * gates.unsqueeze(-1).to(x.dtype)).sum(dim=1).view_as(x)
            if state["moe_shared"] is not None:
                out = out + state["moe_shared"]
            if balance_loss is not None:
                self.last_balance_loss = balance_loss.detach()
                out = BalanceLossAttach.apply(out, balance_loss, self.balance_loss_scale)
            return {"mlp_output": out}

        return [Piece("route", COMPUTE, route), Piece("dispatch", exchanging, dispatch),
                Piece("experts", COMPUTE, experts), Piece("combine", exchanging, combine),
                Piece("merge", COMPUTE, merge)]
