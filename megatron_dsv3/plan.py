"""The plan of a run: everything dsv3-train will do that follows from the run config and the world
it starts in, derived and checked in one place. `dsv3-train` executes it; `dsv3-launch`'s
preflight prints and checks the same plan (with its own memory estimate) before submitting.

    plan = make_plan(run, world=16, ranks_per_node=8, cuda=True)
    plan.layout, plan.micro_batches, plan.stage_layers, plan.nodes_per_token, plan.optimizer
    print(plan.describe()); plan.memory(reserve_gib=4).total

`PlanError` names the rule broken and the numbers, before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_dsv3.config import ConfigError, DSV3Config
from megatron_dsv3.memory import MemoryEstimate, estimate_memory
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.pipeline.schedule import Schedule, ScheduleRefused, get as get_schedule
from megatron_dsv3.run_config import RunConfig


MAX_MICRO_BATCHES = 2**16  # per data-parallel rank and step


class PlanError(ValueError):
    """A run that cannot be laid out or scheduled; the message names the settings and numbers."""


def nodes_per_token(num_experts: int, num_groups: int, num_limited_groups: int,
                    expert_parallel: int, expert_tensor_parallel: int, ranks_per_node: int) -> int:
    """Node-limited routing (report section 2.1.2 / 3.2.2): the most nodes one token's experts live on.

    Megatron-Core orders expert ranks tp-ep-dp-pp with the experts' own tensor parallelism
    (ETP; dsv3-train uses ETP = 1 whatever the attention TP), so one EP group covers
    span = EP * ETP consecutive ranks and EP rank i holds experts [i*E/EP, (i+1)*E/EP).
    - span <= ranks_per_node: the group must sit inside one node (span divides ranks_per_node);
      every token then stays on 1 node.
    - span > ranks_per_node: the group must cover whole nodes, ep_nodes = span / ranks_per_node,
      each holding E / ep_nodes consecutive experts. Routing groups are E / G consecutive experts,
      so each group lies inside one node iff G is a multiple of ep_nodes. A token then picks at
      most `num_limited_groups` groups and so reaches at most min(M, ep_nodes) nodes.
      DeepSeek-V3: 256 experts, EP64 on 8-GPU nodes -> 8 nodes of 32 experts, 8 groups of 32:
      group == node, M = 4.
    """
    span = expert_parallel * expert_tensor_parallel
    if span <= ranks_per_node:
        if ranks_per_node % span:
            raise PlanError(f"expert-parallel groups of EP{expert_parallel} x ETP{expert_tensor_parallel} = {span} ranks "
                            f"straddle nodes of {ranks_per_node} ranks; use a divisor of {ranks_per_node}")
        return 1
    if span % ranks_per_node:
        raise PlanError(f"EP{expert_parallel} x ETP{expert_tensor_parallel} = {span} ranks is not a whole number of "
                        f"{ranks_per_node}-rank nodes; node-limited routing needs EP groups made of whole nodes")
    ep_nodes = span // ranks_per_node
    if num_groups % ep_nodes:
        hint = (" (the model has a single routing group: keep EP x ETP within one node)" if num_groups == 1 else
                f"; use EP x ETP <= {ranks_per_node * num_groups} with {num_groups} dividing by the node count")
        raise PlanError(
            f"node-limited routing broken: EP{expert_parallel} spans {ep_nodes} nodes of {num_experts // ep_nodes} "
            f"experts, but the {num_groups} routing groups of {num_experts // num_groups} experts do not each fit in "
            f"one node (num_expert_groups must be a multiple of {ep_nodes}){hint}")
    return min(num_limited_groups, ep_nodes)


def check_schedule(schedule: Schedule, pipeline: int, micro_batches: int, num_layers: Optional[int] = None) -> None:
    """The schedule's own rule (`Schedule.check`: an executor to train with, its pipeline and
    micro-batch rule), then every model stage of its cut gets a decoder layer."""
    try:
        schedule.check(pipeline, micro_batches)
    except ScheduleRefused as error:
        numbers = (f" (parallel.pipeline={pipeline}; {micro_batches} micro-batches per step = train.global_batch_size"
                   " / (train.micro_batch_size x data-parallel size))" if schedule.executor is not None else "")
        raise PlanError(f"{error}{numbers}") from None
    if num_layers is not None:
        check_stages_hold_layers(schedule, pipeline, num_layers)


def check_stages_hold_layers(schedule: Schedule, pipeline: int, num_layers: int) -> None:
    """Every model stage of `schedule.stage_cut` needs a decoder layer."""
    stages = schedule.num_stages(pipeline)
    if num_layers < stages:
        raise PlanError(f"model.num_layers={num_layers} does not split into the {stages} stages of {schedule.name} "
                        f"on parallel.pipeline={pipeline}: every stage needs a decoder layer")


@dataclass(frozen=True)
class RunPlan:
    run: RunConfig
    model: DSV3Config
    schedule: Schedule  # the descriptor `parallel.schedule` names
    layout: ParallelLayout
    ranks_per_node: int
    micro_batches: int  # per data-parallel rank and step
    stage_layers: tuple[range, ...]  # decoder layers of each model stage (`Schedule.stage_cut`)
    nodes_per_token: int
    device: str  # "cuda" or "cpu"
    optimizer: str  # "zero1" (Megatron's distributed optimizer) or "local"

    def memory(self, reserve_gib: float = 0.0, pipeline_rank: Optional[int] = None) -> MemoryEstimate:
        """Per-GPU memory estimate (`memory.py`) of `pipeline_rank`, else of the most loaded one."""
        return estimate_memory(self.model, self.layout, self.schedule, self.run.train, reserve_gib,
                               distributed_optimizer=self.optimizer == "zero1", pipeline_rank=pipeline_rank)

    def describe(self) -> str:
        layout, train = self.layout, self.run.train
        optimizer = (f"Megatron DistributedOptimizer (ZeRO-1 over DP{layout.data}"
                     + (", BF16 weights with FP32 master slices)" if train.param_dtype == "bfloat16" else ")")
                     if self.optimizer == "zero1" else "AdamW, state on every data-parallel rank")
        cut = ", ".join(f"{len(r)}" for r in self.stage_layers)
        return (f"world {layout.world_size} = TP{layout.tensor} x PP{layout.pipeline} x DP{layout.data} "
                f"(EP{layout.expert}); {self.schedule.name} over {self.micro_batches} micro-batches of "
                f"{train.micro_batch_size}x{train.seq_length} per rank; decoder layers per stage [{cut}]; a token's experts on <= "
                f"{self.nodes_per_token} node(s); device {self.device}; {optimizer}")


def choose_device(run: RunConfig, cuda: bool) -> str:
    """"cuda" when a GPU is visible and `train.device` allows it; refused when it asks for one that is not."""
    if run.train.device == "cuda" and not cuda:
        raise PlanError("train.device=cuda, but no CUDA device is visible")
    return "cuda" if cuda and run.train.device != "cpu" else "cpu"


def make_plan(run: RunConfig, world: int, ranks_per_node: int, cuda: bool) -> RunPlan:
    """The plan of `run` on `world` ranks, `ranks_per_node` to a node; `cuda`: a GPU is visible."""
    par, train = run.parallel, run.train
    tp, pp, ep = par.tensor, par.pipeline, par.expert
    if world % (tp * pp):
        raise PlanError(f"tensor={tp} x pipeline={pp} does not divide the world size {world}")
    data = world // (tp * pp)
    if (tp * data) % ep:
        raise PlanError(f"expert={ep} must divide tensor x data = {tp * data} (world {world}, pipeline {pp})")
    if tp > ranks_per_node or ranks_per_node % tp:
        raise PlanError(f"tensor parallel TP{tp} must stay inside a node of {ranks_per_node} ranks")
    model, schedule = run.model_config(), get_schedule(par.schedule)
    if schedule.stages_per_rank > 1:  # its own message first: the stages are not parallel.pipeline
        check_stages_hold_layers(schedule, pp, model.num_layers)
    try:
        model.validate(tensor_parallel_size=tp, expert_parallel_size=ep,
                       pipeline_parallel_size=schedule.num_stages(pp))
    except ConfigError as error:
        raise PlanError(f"model {run.model.preset}: {error}") from None
    if train.global_batch_size % (train.micro_batch_size * data):
        raise PlanError(f"train.global_batch_size={train.global_batch_size} is not a multiple of "
                        f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {data}")
    micro_batches = train.global_batch_size // (train.micro_batch_size * data)
    if micro_batches > MAX_MICRO_BATCHES:
        raise PlanError(f"train.global_batch_size={train.global_batch_size} makes {micro_batches} micro-batches per rank "
                        f"and step, above {MAX_MICRO_BATCHES} (Megatron-Core keeps every micro-batch's losses until "
                        "the step ends; DeepSeek-V3's recipe runs 120): raise train.micro_batch_size or lower the batch")
    check_schedule(schedule, pp, micro_batches, model.num_layers)
    reach = nodes_per_token(model.num_routed_experts, model.num_expert_groups, model.num_limited_groups, ep, 1,
                            ranks_per_node)
    device = choose_device(run, cuda)
    zero1 = par.distributed_optimizer is True or (par.distributed_optimizer == "auto" and device == "cuda")
    if train.param_dtype == "bfloat16" and not zero1:
        raise PlanError("train.param_dtype=bfloat16 keeps the FP32 master weights in Megatron's distributed "
                        "optimizer, which parallel.distributed_optimizer=auto picks only on GPU: set it to true")
    return RunPlan(run=run, model=model, schedule=schedule, layout=ParallelLayout(tp, pp, ep, data),
                   ranks_per_node=ranks_per_node, micro_batches=micro_batches,
                   stage_layers=schedule.stage_cut(model.num_layers, pp),
                   nodes_per_token=reach, device=device, optimizer="zero1" if zero1 else "local")
