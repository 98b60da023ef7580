"""Differentiable collectives for tensor and expert parallelism (identity on one process)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dsv3.parallel import comm


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the group (enter a parallel region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        comm.all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: sum over the group. Backward: identity (leave a parallel region)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        comm.all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        comm.all_to_all_single(out, x, output_splits, input_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def copy_to_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None or dist.get_world_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None or dist.get_world_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
               group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)
