"""Every collective the plugin runs, each on the device its group's backend serves.

NCCL moves only CUDA tensors and gloo is used here for host tensors, so a collective is correct
by construction when its tensor is where the group's backend works: CUDA for an NCCL group, the
CPU otherwise. These wrappers put it there (a no-op on the hot path, where the tensor already
is: expert all-to-all and tensor-parallel sums under NCCL, everything under gloo) and copy the
result back into a tensor that lives elsewhere, such as a host-side flag or loss on a GPU run.

Why a helper rather than a process group with a backend per device type (`cpu:gloo,cuda:nccl`):
Megatron-Core creates its groups with the backend it chooses, so the trainer could not guarantee
that every group it uses has both, and a CPU-only machine cannot create a CUDA backend to test it.
A single place for collectives can be checked on any machine: `tests/test_structure.py` fails on
a `torch.distributed` collective called anywhere else in the package.

Object collectives (`all_gather_object`, `broadcast_object_list`) pickle through the current CUDA
device under NCCL themselves, and are here so that the package has one entry point.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]
# torch's fake process group, answering every collective without communicating, for CPU and meta
# tensors: a rehearsal's (megatron_dsv3/rehearse), where meta stands for the GPU.
REHEARSAL_BACKEND = "cpu:fake,meta:fake"


def device_of(group: Group) -> torch.device:
    """Where the backend of `group` (None: the default group) moves tensors."""
    backend = dist.get_backend(group)
    if backend == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("meta") if backend == REHEARSAL_BACKEND else torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group: Group = None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over `group`; returns `tensor`."""
    target = device_of(group)
    if tensor.device == target:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(target)
    dist.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)


def all_gather(tensor: torch.Tensor, group: Group = None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), on `tensor`'s device, in rank order."""
    target = device_of(group)
    moved = tensor.contiguous().to(target)
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, moved, group=group)
    return [part.to(tensor.device) for part in parts]


def all_to_all_single(out: torch.Tensor, x: torch.Tensor, output_splits: Optional[Sequence[int]] = None,
                      input_splits: Optional[Sequence[int]] = None, group: Group = None) -> torch.Tensor:
    """Rows of `x` split by `input_splits` to the ranks (equal parts when None); theirs into `out`
    by `output_splits`."""
    target = device_of(group)
    splits = (None if output_splits is None else list(output_splits),
              None if input_splits is None else list(input_splits))
    if x.device == target and out.device == target:
        dist.all_to_all_single(out, x.contiguous(), *splits, group=group)
        return out
    moved = out.to(target)
    dist.all_to_all_single(moved, x.contiguous().to(target), *splits, group=group)
    return out.copy_(moved)


def barrier(group: Group = None) -> None:
    dist.barrier(group=group)


def all_gather_object(obj: Any, group: Group = None) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj: Any, src: int = 0, group: Group = None) -> Any:
    """`obj` of global rank `src` on every rank of `group`."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
