"""Fine-grained routed experts computed as one batched SwiGLU over all local experts.

Tokens arrive sorted by expert. They are packed into a zero-padded [experts, capacity, hidden]
block where capacity is the largest count, so no token is dropped and the experts run as two
batched matmuls instead of a Python loop (report section 2.1.2: no token dropping).

A batched matmul with a `grouped(x, w, rows_per_expert)` method and a `row_multiple` (the FP8
one) gets instead each expert's rows padded only to that multiple (128), so every expert's FP8
GEMM is kernel-sized and no expert pays for the largest one's rows.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dsv3.model.common import recomputed

BatchedMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bf16_batched_matmul(x_ECK: torch.Tensor, w_ENK: torch.Tensor) -> torch.Tensor:
    """x @ w^T per expert: [E, C, K] x [E, N, K] -> [E, C, N]."""
    return torch.bmm(x_ECK, w_ENK.transpose(1, 2))


class RoutedExperts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 batched_matmul: BatchedMatmul = bf16_batched_matmul):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.batched_matmul = batched_matmul
        # Layouts match Hugging Face's fused experts: gate rows first, then up rows.
        self.gate_up_weight = nn.Parameter(torch.empty(num_local_experts, 2 * ffn_hidden_size, hidden_size))
        self.down_weight = nn.Parameter(torch.empty(num_local_experts, hidden_size, ffn_hidden_size))
        self.gate_up_weight.expert_parallel = True
        self.down_weight.expert_parallel = True
        self.selective_recompute = False  # keep the SwiGLU inputs, recompute its output in backward

    def forward(self, x_NH: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [tokens sorted by local expert, hidden], counts [local experts] -> [tokens, hidden]."""
        if x_NH.shape[0] == 0:  # keep every parameter in the graph so gradients stay defined
            return x_NH + 0 * (self.gate_up_weight.sum() + self.down_weight.sum())
        if hasattr(self.batched_matmul, "grouped"):
            return self._forward_grouped(x_NH, tokens_per_expert)
        capacity = int(tokens_per_expert.max())
        expert_of_token = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=x_NH.device), tokens_per_expert)
        first_of_expert = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        slot = expert_of_token * capacity + (torch.arange(x_NH.shape[0], device=x_NH.device)
                                             - first_of_expert[expert_of_token])
        padded = x_NH.new_zeros(self.num_local_experts * capacity, x_NH.shape[1]).index_copy(0, slot, x_NH)
        gate, up = self.batched_matmul(padded.view(self.num_local_experts, capacity, -1),
                                       self.gate_up_weight).chunk(2, dim=-1)
        out_ECH = recomputed(self.selective_recompute,
                             lambda g, u: self.batched_matmul(F.silu(g) * u, self.down_weight), gate, up)
        return out_ECH.flatten(0, 1).index_select(0, slot)

    def _forward_grouped(self, x_NH: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Each expert's rows zero-padded to a multiple of `row_multiple`, one GEMM per expert."""
        multiple = self.batched_matmul.row_multiple
        counts_E = tokens_per_expert.tolist()  # the GEMM sizes: one host sync per layer, as `capacity` above
        padded_E = [-(-n // multiple) * multiple for n in counts_E]
        padded_counts = torch.tensor(padded_E, device=x_NH.device)
        expert_of_token = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=x_NH.device), tokens_per_expert)
        first_of_expert = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        first_padded_row = torch.cumsum(padded_counts, 0) - padded_counts
        row = first_padded_row[expert_of_token] + (torch.arange(x_NH.shape[0], device=x_NH.device)
                                                   - first_of_expert[expert_of_token])
        padded_MH = x_NH.new_zeros(sum(padded_E), x_NH.shape[1]).index_copy(0, row, x_NH)
        gate, up = self.batched_matmul.grouped(padded_MH, self.gate_up_weight, padded_E,
                                               label="routed experts gate_up").chunk(2, dim=-1)
        out_MH = recomputed(self.selective_recompute,
                            lambda g, u: self.batched_matmul.grouped(F.silu(g) * u, self.down_weight, padded_E,
                                                                     label="routed experts down"), gate, up)
        return out_MH.index_select(0, row)
