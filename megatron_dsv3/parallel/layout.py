"""Where a run's pieces sit: the parallel sizes, the decoder layers of each pipeline stage, and how
many nodes a token's experts can live on. Pure arithmetic, shared by dsv3-train and dsv3-launch's
preflight; process groups are made from it in `groups.py`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes of one run; data parallel = world / (tensor * pipeline). Experts are not
    tensor-parallel (Megatron-Core's expert_tensor_parallel_size = 1), so each expert has
    world / (expert * pipeline) replicas."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def expert_data(self) -> int:
        return self.world_size // (self.expert * self.pipeline)


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """Decoder layers of pipeline `stage`: contiguous and as even as possible. The first
    `num_layers % stages` stages take one extra layer, since the last stage also carries the head
    and MTP. DeepSeek-V3's 61 layers on 16 stages: 13 stages of 4 layers, then 3 of 3."""
    if not 0 <= stage < stages <= num_layers:
        raise ValueError(f"stage {stage} of {stages} cannot hold layers of a {num_layers}-layer model")
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def num_stages(schedule: str, pipeline: int) -> int:
    """Model stages of a schedule on `pipeline` ranks: DualPipeV cuts the model in 2 x PP stages
    (the V), 1F1B and DualPipe in PP (DualPipe holds two of them per rank)."""
    return 2 * pipeline if schedule == "dualpipev" else pipeline


def rank_stages(schedule: str, pipeline: int, rank: int) -> tuple[int, ...]:
    """The model stages pipeline rank `rank` holds, in the order of its model chunks. 1F1B: stage
    r. DualPipe (report section 3.2.1): stage r and stage PP-1-r (the mirrored direction), so every
    stage lives on two ranks. DualPipeV: stage r and stage 2PP-1-r of the V, no copies."""
    if schedule == "dualpipe":
        return (rank, pipeline - 1 - rank)
    if schedule == "dualpipev":
        return (rank, 2 * pipeline - 1 - rank)
    return (rank,)


def stage_cut(schedule: str, num_layers: int, pipeline: int) -> tuple[range, ...]:
    """Decoder layers of every model stage of `schedule` on `pipeline` ranks: the one cut used by
    dsv3-train, the plan and the memory estimate. Stage 0 also holds the embedding, the last stage
    the norm, head and MTP (which reads the embedding: under DualPipe and DualPipeV both ends sit
    on rank 0, which holds one embedding for both)."""
    stages = num_stages(schedule, pipeline)
    return tuple(stage_layers(num_layers, stages, s) for s in range(stages))
