"""Rehearse one rank of a run at full size on a CPU: its step on the meta device under torch's fake
process group of the configured world size.

    report = rehearse(run, rank=0, world=2048, ranks_per_node=8, routing="balanced")
    print(report.table()); report.to_dict()

The rank is built and stepped by dsv3-train's own code (`step.measure_step`); collectives and
point-to-point transfers are answered by the fake group with tensors of the right shape, and
Megatron-Core's and torch's CUDA-only calls land on meta (`compat.meta_device`). The step fails,
naming the operation, where it creates or reads a tensor on the CPU (`RehearsalError`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist
from megatron.core import parallel_state
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_dsv3.compat.meta_device import meta_shims
from megatron_dsv3.memory import GIB, MemoryEstimate
from megatron_dsv3.parallel import comm
from megatron_dsv3.plan import PlanError, make_plan
from megatron_dsv3.rehearse.routing import parse_routing
from megatron_dsv3.rehearse.step import RankPlace, measure_step
from megatron_dsv3.rehearse.tracker import KINDS, MemoryReport
from megatron_dsv3.run_config import RunConfig


@dataclass
class Rehearsal:
    """One rank's rehearsed step beside the plan's analytic estimate and the GPU's memory."""

    rank: int
    world: int
    routing: str
    schedule: str
    micro_batches: int
    place: RankPlace
    memory: MemoryReport
    estimate: Optional[MemoryEstimate]
    capacity_gib: Optional[float]
    reserve_gib: float
    wall_s: float

    @property
    def needed_bytes(self) -> int:
        """The step's peak of tensors plus the preset's reserve (CUDA context, NCCL, fragmentation)."""
        return self.memory.peak_bytes + int(self.reserve_gib * GIB)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.capacity_gib is None else self.needed_bytes <= self.capacity_gib * GIB

    def refusal(self) -> str:
        """Why it does not fit: the operation at the peak and the kinds that fill it."""
        kinds = ", ".join(f"{kind} {b / GIB:.1f}" for kind, b in _by_size(self.memory.peak_by_kind))
        where = self.memory.peak_where.describe() if self.memory.peak_where else "?"
        return (f"rank {self.rank} (pipeline rank {self.place.pipeline_rank}) peaks at {self.memory.peak_bytes / GIB:.1f} "
                f"GiB + {self.reserve_gib:g} GiB reserve, over the {self.capacity_gib:g} GiB of the GPU, at {where}; "
                f"filled by {kinds} GiB")

    def table(self) -> str:
        est = self.estimate
        estimated = {"parameters": est.params, "gradients": est.grads, "optimizer": est.optimizer,
                     "activations": est.activations, "other": est.transient} if est else {}
        peak, start = self.memory.peak_by_kind, self.memory.start_by_kind
        most = self.memory.max_by_kind
        lines = [f"rehearsal of rank {self.rank}/{self.world} (pipeline rank {self.place.pipeline_rank}, stages "
                 f"{list(self.place.stages)}, {len(self.place.layers)} decoder layers; expert rank "
                 f"{self.place.expert_rank}, data rank {self.place.data_rank}): {self.schedule} over "
                 f"{self.micro_batches} micro-batches, routing {self.routing}; {self.wall_s / 60:.1f} min",
                 f"{'GiB':<15}{'at peak':>10}{'step start':>12}{'own max':>10}{'estimate':>10}"]
        for kind in KINDS:
            shown = f"{estimated[kind] / GIB:>10.2f}" if kind in estimated else f"{'':>10}"
            lines.append(f"{kind:<15}{peak[kind] / GIB:>10.2f}{start.get(kind, 0) / GIB:>12.2f}"
                         f"{most.get(kind, 0) / GIB:>10.2f}{shown}")
        total_est = f"{(est.total - est.reserve) / GIB:>10.2f}" if est else ""
        lines.append(f"{'total':<15}{self.memory.peak_bytes / GIB:>10.2f}{sum(start.values()) / GIB:>12.2f}"
                     f"{'':>10}{total_est}")
        if self.memory.peak_where:
            lines.append(f"peak at {self.memory.peak_where.describe()}")
        if self.capacity_gib is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"{verdict}: {self.memory.peak_bytes / GIB:.1f} GiB + {self.reserve_gib:g} GiB reserve of "
                         f"{self.capacity_gib:g} GiB")
        held = list(self.memory.peak_origins.items())[:8]
        if held:
            lines.append("largest holders near the peak: " + "; ".join(f"{o} {b / GIB:.2f}" for o, b in held))
        reads = sum(self.memory.host_reads.values())
        if reads:
            lines.append(f"host reads of device values in the step: {reads} ("
                         + "; ".join(f"{n} at {where}" for where, n in list(self.memory.host_reads.items())[:4]) + ")")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        est = self.estimate
        return {"rank": self.rank, "world": self.world, "routing": self.routing, "schedule": self.schedule,
                "micro_batches": self.micro_batches, "place": dataclasses.asdict(self.place),
                "memory": self.memory.to_dict(),
                "estimate": None if est is None else {"parameters": est.params, "gradients": est.grads,
                                                      "optimizer": est.optimizer, "activations": est.activations,
                                                      "transient": est.transient, "reserve": est.reserve,
                                                      "total": est.total},
                "capacity_gib": self.capacity_gib, "reserve_gib": self.reserve_gib, "fits": self.fits,
                "wall_s": self.wall_s}


def _by_size(by_kind: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(((k, b) for k, b in by_kind.items() if b), key=lambda item: -item[1])


def rehearse(run: RunConfig, rank: int, world: int, ranks_per_node: int, routing: str = "balanced",
             capacity_gib: Optional[float] = None, reserve_gib: float = 0.0) -> Rehearsal:
    """Rank `rank` of `world` (`ranks_per_node` to a node) rehearsed on meta: one training step with
    dsv3-train's code, the dispatchers' counts from `routing` ("balanced" or "maxvio=X")."""
    plan = make_plan(run, world, ranks_per_node, cuda=not run.launch.cpu)
    plan = dataclasses.replace(plan, device="meta")  # meta stands for the run's device
    assumption = parse_routing(routing, plan.model.num_experts_per_token)
    if not 0 <= rank < world:
        raise PlanError(f"--rank {rank} is not a rank of the world of {world} ranks")
    start = time.perf_counter()
    dist.init_process_group(comm.REHEARSAL_BACKEND, store=FakeStore(), rank=rank, world_size=world)
    try:
        with meta_shims():
            memory, place = measure_step(run, plan, assumption, refuse_cpu=True)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    estimate = plan.memory(reserve_gib, pipeline_rank=place.pipeline_rank)
    return Rehearsal(rank=rank, world=world, routing=assumption.name, schedule=plan.schedule.name,
                     micro_batches=plan.micro_batches, place=place, memory=memory, estimate=estimate,
                     capacity_gib=capacity_gib, reserve_gib=reserve_gib, wall_s=time.perf_counter() - start)
