"""How each parameter is split over ranks, and conversions between full and sharded tensors.

A parameter is split along `tensor_parallel_dim` over the tensor-parallel group, or along dim 0
over the expert-parallel group when `expert_parallel` is set; anything else is replicated.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_dsv3.parallel import comm, groups


def split_of(param: torch.Tensor) -> tuple[Optional[int], Optional[dist.ProcessGroup]]:
    """(dim, group) along which `param` is split, or (None, None) when replicated."""
    if getattr(param, "expert_parallel", False):
        return 0, groups.ep_group()
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is not None:
        return dim, groups.tp_group()
    return None, None


def replica_id(tensor: torch.Tensor) -> tuple[int, ...]:
    """Which copy of its shard this rank holds: all zeros on exactly one rank per shard, the one
    that writes it to checkpoints and counts it in the gradient norm. Copies come from data
    parallelism, from tensor parallelism (unsplit tensors) and from the pipeline (`pipeline_copy`,
    the last stage's embedding for MTP)."""
    if getattr(tensor, "expert_parallel", False):
        return (groups.rank(groups.expert_dp_group()),)
    dim, _ = split_of(tensor)
    dp_rank = groups.rank(groups.dp_group())
    if dim is not None:
        return (dp_rank,)
    return (int(getattr(tensor, "pipeline_copy", 0)), groups.rank(groups.tp_group()), dp_rank)


def is_primary(tensor: torch.Tensor) -> bool:
    return not any(replica_id(tensor))


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (parameters keep their attributes)."""
    tensors = dict(model.named_parameters())
    for name, value in model.state_dict(keep_vars=True).items():
        tensors.setdefault(name, value)
    return tensors


@torch.no_grad()
def gather_full(model: nn.Module, use_grad: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) as the full, unsharded tensor, on every rank."""
    tensors = named_tensors(model)
    values = {name: t.grad if use_grad else t for name, t in tensors.items()}
    return gather_like(tensors, {name: v for name, v in values.items() if v is not None})


@torch.no_grad()
def gather_like(tensors: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each of `values` (shaped like this rank's shard of `tensors[name]`: a gradient, an Adam
    moment) made whole over that tensor's split, on every rank."""
    full = {}
    for name, value in values.items():
        tensor = tensors[name]
        dim, group = split_of(tensor)
        if dim is not None and groups.size(group) > 1:
            value = torch.cat(comm.all_gather(value, group), dim=dim)
        full[name] = value.detach().clone()
    return full


@torch.no_grad()
def load_full(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of each full tensor into the model."""
    tensors = named_tensors(model)
    missing = sorted(set(tensors) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, tensor in tensors.items():
        value = full[name]
        dim, group = split_of(tensor)
        if dim is not None and groups.size(group) > 1:
            value = value.chunk(groups.size(group), dim=dim)[groups.rank(group)]
        if value.shape != tensor.shape:
            raise ValueError(f"{name}: expected shape {tuple(tensor.shape)} for this rank, got {tuple(value.shape)}")
        tensor.copy_(value)
