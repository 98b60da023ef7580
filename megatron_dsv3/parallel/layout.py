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


def stage_cut(num_layers: int, stages: int) -> tuple[range, ...]:
    """Decoder layers of each of `stages` model stages (a schedule's `Schedule.stage_cut` gives its
    stage count). Stage 0 also holds the embedding, the last stage the norm, head and MTP (which
    reads the embedding: under DualPipe and DualPipeV both ends sit on rank 0, which holds one
    embedding for both)."""
    return tuple(stage_layers(num_layers, stages, s) for s in range(stages))
