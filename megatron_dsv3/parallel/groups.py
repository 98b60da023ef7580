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
    return ParallelLayout(tensor, pipeline, expert, data)


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
