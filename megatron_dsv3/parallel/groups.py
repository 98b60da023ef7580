"""Megatron-Core's process groups, seen through one small interface.

`initialize_parallel` creates them with `megatron.core.parallel_state`; the model asks this
module for its groups, and gets `None` (a single process) when nothing was initialised, so the
same model code runs in a notebook and under torchrun.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dsv3.parallel import comm
from megatron_dsv3.parallel.layout import ParallelLayout


class ParallelConfigError(ValueError):
    """Parallel sizes that cannot be laid out on the world; the message names them."""


def initialize_parallel(tensor: int = 1, pipeline: int = 1, expert: int = 1,
                        timeout_s: float = 600.0) -> ParallelLayout:
    """Create Megatron-Core's groups on an initialised torch.distributed world, every one (and
    `world_group()`) bounded by `timeout_s`: a collective waiting longer fails the rank."""
    global _world
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (tensor * pipeline) != 0:
        raise ParallelConfigError(
            f"tensor={tensor} x pipeline={pipeline} does not divide the world size {world}")
    data = world // (tensor * pipeline)
    if (tensor * data) % expert != 0:
        raise ParallelConfigError(
            f"expert={expert} must divide tensor x data = {tensor * data} (world {world}, pipeline {pipeline})")
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
            expert_model_parallel_size=expert, expert_tensor_parallel_size=1,
            distributed_timeout_minutes=timeout_s / 60)
        _world = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        initialize_mirror_groups(pipeline, datetime.timedelta(seconds=timeout_s))
    return ParallelLayout(tensor, pipeline, expert, data)


def initialize_mirror_groups(pipeline: int, timeout: datetime.timedelta) -> None:
    """DualPipe's groups (report section 3.2.1; made for every even pipeline, so a schedule can
    be chosen after the groups): pipeline rank p and PP-1-p of one pipeline hold the same two
    stages, and form a 2-rank "mirror" group that sums their gradients; "dp_mirror" is the
    data-parallel group of both, over which the routing load of those stages is summed. Created
    with the default backend (gloo on CPU, NCCL on GPU; `comm` places tensors for either)."""
    global _mirror, _dp_mirror
    _mirror = _dp_mirror = None
    if pipeline < 2 or pipeline % 2:
        return
    me = (dist.get_process_group_ranks(pp_group()), dist.get_process_group_ranks(dp_group()))
    every = comm.all_gather_object(me)
    mirror_of = {ranks[p]: ranks[pipeline - 1 - p] for ranks, _ in every for p in range(pipeline)}
    dp_of = {g: dp for g, (_, dp) in enumerate(every)}
    pairs = sorted({tuple(sorted((g, m))) for g, m in mirror_of.items()})
    unions = sorted({tuple(sorted(set(dp_of[g]) | set(dp_of[m]))) for g, m in mirror_of.items()})
    rank = dist.get_rank()
    for members in pairs:  # every rank creates every group, in one order
        group = dist.new_group(list(members), timeout=timeout)
        _mirror = group if rank in members else _mirror
    for members in unions:
        group = dist.new_group(list(members), timeout=timeout)
        _dp_mirror = group if rank in members else _dp_mirror


_mirror: Optional[dist.ProcessGroup] = None
_dp_mirror: Optional[dist.ProcessGroup] = None


def mirror_group() -> Optional[dist.ProcessGroup]:
    """This rank and the one holding the same two DualPipe stages (pipeline rank PP-1-p); None
    without an even pipeline."""
    return _mirror if _initialized() else None


def dp_mirror_group() -> Optional[dist.ProcessGroup]:
    """The data-parallel ranks of this rank and of its DualPipe mirror: every token that passed
    through this rank's stages, in either direction."""
    return _dp_mirror if _initialized() else None


_world: Optional[dist.ProcessGroup] = None


def world_group() -> Optional[dist.ProcessGroup]:
    """Every rank, over gloo, bounded like the model groups: for the step's host-side scalars
    (the preemption flag, the gradient norm). The default group's longer bound is for saves."""
    return _world if _initialized() else None


def _initialized() -> bool:
    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def layout() -> ParallelLayout:
    if not _initialized():
        return ParallelLayout()
    return ParallelLayout(parallel_state.get_tensor_model_parallel_world_size(),
                          parallel_state.get_pipeline_model_parallel_world_size(),
                          parallel_state.get_expert_model_parallel_world_size(),
                          parallel_state.get_data_parallel_world_size())


def tp_group() -> Optional[dist.ProcessGroup]:
    return parallel_state.get_tensor_model_parallel_group() if _initialized() else None


def ep_group() -> Optional[dist.ProcessGroup]:
    return parallel_state.get_expert_model_parallel_group() if _initialized() else None


def dp_group() -> Optional[dist.ProcessGroup]:
    """Ranks holding different tokens of the same model replica slice (used for global load)."""
    return parallel_state.get_data_parallel_group() if _initialized() else None


def expert_dp_group() -> Optional[dist.ProcessGroup]:
    """Ranks holding copies of the same experts (expert gradients are averaged here)."""
    return parallel_state.get_expert_data_parallel_group() if _initialized() else None


def pp_group() -> Optional[dist.ProcessGroup]:
    return parallel_state.get_pipeline_model_parallel_group() if _initialized() else None


def embedding_group() -> Optional[dist.ProcessGroup]:
    """The first and last pipeline stages of one pipeline (both hold the embedding when MTP is on)."""
    return parallel_state.get_embedding_group() if _initialized() else None


def size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)
