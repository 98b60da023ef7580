"""Preflight: the run's plan (`megatron_dsv3.plan`, the one dsv3-train executes) on the job's
nodes, and a per-GPU memory estimate, checked before anything is submitted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_dsv3.launch.presets import gpu_memory_gib, load_preset
from megatron_dsv3.launch.run import tasks_per_node, world_size
from megatron_dsv3.memory import GIB, MemoryEstimate
from megatron_dsv3.plan import PlanError, RunPlan, make_plan
from megatron_dsv3.run_config import RunConfig

PreflightError = PlanError  # the plan's refusals, and the launcher's own, name what to change


@dataclass(frozen=True)
class PreflightReport:
    plan: RunPlan
    nodes: int
    tasks_per_node: int
    memory: Optional[MemoryEstimate]
    capacity_gib: Optional[float]
    gpu: Optional[str]

    def lines(self) -> list[str]:
        unit = "tasks" if self.plan.device == "cpu" else "GPUs"
        out = [f"job: {self.nodes} nodes x {self.tasks_per_node} {unit}; plan: {self.plan.describe()}"]
        if self.memory is not None:
            out.append(f"memory estimate: {self.memory.describe(self.capacity_gib)} on {self.gpu}")
        return out


def preflight(run: RunConfig, check_memory: bool = True) -> PreflightReport:
    """The plan on `launch.nodes` x tasks per node (PlanError at the first rule broken), then the
    per-GPU memory estimate: always reported, refused only with `check_memory`."""
    launch, tasks = run.launch, tasks_per_node(run)
    if not launch.cpu and tasks > launch.gpus_per_node:
        raise PreflightError(f"launch.tasks_per_node={tasks} exceeds gpus_per_node={launch.gpus_per_node}")
    plan = make_plan(run, world_size(run), tasks, cuda=not launch.cpu)
    preset = load_preset(launch.env_preset)
    capacity = None if launch.cpu else gpu_memory_gib(preset)
    memory = None
    if capacity is not None:
        memory = plan.memory(float(preset.get("reserve_gib", 0)))
        if check_memory and memory.total > capacity * GIB:
            raise PreflightError(
                f"memory estimate {memory.total / GIB:.1f} GiB per GPU exceeds the {capacity:g} GiB capacity of "
                f"{preset['gpu']['model']} ({memory.describe()}); add pipeline/expert parallel ranks, "
                "train.recompute: selective or full, train.fp8: tile, or train.bf16_adam_moments: true")
    return PreflightReport(plan=plan, nodes=launch.nodes, tasks_per_node=tasks, memory=memory, capacity_gib=capacity,
                           gpu=(preset.get("gpu") or {}).get("model"))
