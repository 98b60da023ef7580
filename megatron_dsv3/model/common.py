"""Pieces shared by every block: RMSNorm, tensor-parallel linears, the SwiGLU feed-forward, and
the helper of selective recomputation. Every linear of the model is a `Linear`
(`weight_grad_store.py`): an nn.Linear whose weight gradient DualPipe's W can defer.

Parameters carry their sharding as attributes, read by checkpointing and weight conversion:
`tensor_parallel_dim` (dim split over tensor-parallel ranks, absent = replicated) and
`expert_parallel` (dim 0 split over expert-parallel ranks).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_dsv3.parallel import groups
from megatron_dsv3.parallel.collectives import copy_to_group, reduce_from_group
from megatron_dsv3.weight_grad_store import Linear


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in FP32 (kept out of FP8, report section 3.3.1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def recomputed(enabled: bool, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor):
    """fn(*inputs). When `enabled` (selective recomputation, report section 3.2.3) only `inputs`
    are kept for backward: fn's intermediate activations are freed and fn reruns in backward."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *inputs, use_reentrant=False)
    return fn(*inputs)


def column_parallel_linear(in_features: int, out_features: int, tp_size: int) -> Linear:
    """Output features split over tensor-parallel ranks."""
    linear = Linear(in_features, out_features // tp_size, bias=False)
    linear.weight.tensor_parallel_dim = 0
    return linear


def row_parallel_linear(in_features: int, out_features: int, tp_size: int) -> Linear:
    """Input features split over tensor-parallel ranks; the caller sums the partial outputs."""
    linear = Linear(in_features // tp_size, out_features, bias=False)
    linear.weight.tensor_parallel_dim = 1
    return linear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN of the first layers and the shared experts."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.tp_group = groups.tp_group()
        tp = groups.size(self.tp_group)
        self.gate_proj = column_parallel_linear(hidden_size, ffn_hidden_size, tp)
        self.up_proj = column_parallel_linear(hidden_size, ffn_hidden_size, tp)
        self.down_proj = row_parallel_linear(ffn_hidden_size, hidden_size, tp)
        self.selective_recompute = False  # keep the SwiGLU inputs, recompute its output in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_group(x, self.tp_group)
        partial = recomputed(self.selective_recompute, lambda gate, up: self.down_proj(F.silu(gate) * up),
                             self.gate_proj(x), self.up_proj(x))
        return reduce_from_group(partial, self.tp_group)
