"""Preflight: refuse a run before it is submitted, with a message that says what to change."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_dsv3.config import ConfigError, DSV3Config
from megatron_dsv3.launch.memory import GIB, RECOMPUTE, MemoryEstimate, estimate_memory
from megatron_dsv3.launch.presets import gpu_memory_gib, load_preset
from megatron_dsv3.launch.run import Layout, layout as run_layout


class PreflightError(ValueError):
    """A layout that cannot run; the message names the rule and the numbers."""


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
    Raises PreflightError when the groups do not map onto nodes.
    """
    span = expert_parallel * expert_tensor_parallel
    if span <= ranks_per_node:
        if ranks_per_node % span:
            raise PreflightError(f"expert-parallel groups of EP{expert_parallel} x ETP{expert_tensor_parallel} = {span} ranks "
                                 f"straddle nodes of {ranks_per_node} ranks; use a divisor of {ranks_per_node}")
        return 1
    if span % ranks_per_node:
        raise PreflightError(f"EP{expert_parallel} x ETP{expert_tensor_parallel} = {span} ranks is not a whole number of "
                             f"{ranks_per_node}-rank nodes; node-limited routing needs EP groups made of whole nodes")
    ep_nodes = span // ranks_per_node
    if num_groups % ep_nodes:
        hint = (" (the model has a single routing group: keep EP x ETP within one node)" if num_groups == 1 else
                f"; use EP x ETP <= {ranks_per_node * num_groups} with {num_groups} dividing by the node count")
        raise PreflightError(
            f"node-limited routing broken: EP{expert_parallel} spans {ep_nodes} nodes of {num_experts // ep_nodes} "
            f"experts, but the {num_groups} routing groups of {num_experts // num_groups} experts do not each fit in "
            f"one node (num_expert_groups must be a multiple of {ep_nodes}){hint}")
    return min(num_limited_groups, ep_nodes)


def check_schedule(schedule: str, pipeline: int, micro_batches: int) -> None:
    """DualPipe: PP even, micro-batches even and >= 2*PP. DualPipeV: micro-batches >= 2*PP."""
    if schedule == "1f1b":
        return
    if pipeline < 2:
        raise PreflightError(f"{schedule} needs at least 2 pipeline ranks, got parallel.pipeline={pipeline}")
    if schedule == "dualpipe" and pipeline % 2:
        raise PreflightError(f"dualpipe needs an even pipeline size, got parallel.pipeline={pipeline}")
    if micro_batches < 2 * pipeline:
        raise PreflightError(f"{schedule} needs at least 2 x PP = {2 * pipeline} micro-batches per step, got "
                             f"{micro_batches} (global_batch_size / (micro_batch_size x DP))")
    if schedule == "dualpipe" and micro_batches % 2:
        raise PreflightError(f"dualpipe needs an even number of micro-batches per step, got {micro_batches}")


@dataclass(frozen=True)
class PreflightReport:
    layout: Layout
    micro_batches: int
    nodes_per_token: int
    memory: Optional[MemoryEstimate]
    capacity_gib: Optional[float]
    gpu: Optional[str]

    def lines(self) -> list[str]:
        out = [f"layout: {self.layout.describe()}; {self.micro_batches} micro-batches per step; "
               f"a token's experts on <= {self.nodes_per_token} node(s)"]
        if self.memory is not None:
            out.append(f"memory estimate: {self.memory.describe(self.capacity_gib)} on {self.gpu}")
        return out


def model_config(run: dict[str, Any]) -> DSV3Config:
    model = run.get("model") or {}
    try:
        return DSV3Config.preset(model.get("preset", "tiny"), **(model.get("overrides") or {}))
    except (ConfigError, TypeError) as error:
        raise PreflightError(f"model: {error}") from error


def preflight(run: dict[str, Any], check_memory: bool = True) -> PreflightReport:
    """All checks, in order: layout fits the nodes, model/parallel sizes, node-limited routing,
    pipeline schedule, per-GPU memory (estimated always, refused only with check_memory).
    Raises PreflightError at the first violation."""
    lay = run_layout(run)
    launch, train = run["launch"], run["train"]
    if not lay.cpu and lay.tasks_per_node > lay.gpus_per_node:
        raise PreflightError(f"launch.tasks_per_node={lay.tasks_per_node} exceeds gpus_per_node={lay.gpus_per_node}")
    if lay.world % (lay.tensor * lay.pipeline):
        raise PreflightError(f"TP{lay.tensor} x PP{lay.pipeline} = {lay.tensor * lay.pipeline} does not divide the "
                             f"{lay.world} ranks of {lay.nodes} nodes x {lay.tasks_per_node}")
    if lay.tensor > lay.tasks_per_node or lay.tasks_per_node % lay.tensor:
        raise PreflightError(f"tensor parallel TP{lay.tensor} must stay inside a node of {lay.tasks_per_node} ranks")
    if lay.data % lay.expert:
        raise PreflightError(f"EP{lay.expert} does not divide the data-parallel size DP{lay.data} "
                             f"({lay.world} ranks / (TP{lay.tensor} x PP{lay.pipeline}))")
    config = model_config(run)
    try:
        config.validate(lay.tensor, lay.expert)
    except ConfigError as error:
        raise PreflightError(f"model {run['model'].get('preset')}: {error}") from error
    stages = lay.pipeline * (2 if lay.schedule == "dualpipev" else 1)
    if config.num_layers + config.mtp_num_modules < stages:
        raise PreflightError(f"{config.num_layers} layers (+{config.mtp_num_modules} MTP) cannot fill {stages} "
                             "pipeline stages")
    micro, batch = int(train["micro_batch_size"]), int(train["global_batch_size"])
    if batch % (micro * lay.data):
        raise PreflightError(f"train.global_batch_size={batch} is not a multiple of micro_batch_size x DP = "
                             f"{micro} x {lay.data}")
    micro_batches = batch // (micro * lay.data)
    reach = nodes_per_token(config.num_routed_experts, config.num_expert_groups, config.num_limited_groups,
                            lay.expert, 1, lay.tasks_per_node)  # dsv3-train: expert tensor parallel = 1
    check_schedule(lay.schedule, lay.pipeline, micro_batches)
    if train.get("recompute", "none") not in RECOMPUTE:
        raise PreflightError(f"train.recompute={train.get('recompute')!r} is not one of {RECOMPUTE}")
    preset = load_preset(launch["env_preset"])
    capacity = None if lay.cpu else gpu_memory_gib(preset)
    memory = None
    if capacity is not None:
        distributed = run["parallel"].get("distributed_optimizer", "auto") in (True, "auto")  # auto: on GPU
        memory = estimate_memory(config, lay, train, float(preset.get("reserve_gib", 0)), distributed)
        if check_memory and memory.total > capacity * GIB:
            raise PreflightError(
                f"memory estimate {memory.total / GIB:.1f} GiB per GPU exceeds the {capacity:g} GiB capacity of "
                f"{preset['gpu']['model']} ({memory.describe()}); add pipeline/expert parallel ranks, "
                "train.recompute: selective or full, train.fp8: tile, or train.bf16_adam_moments: true")
    return PreflightReport(layout=lay, micro_batches=micro_batches, nodes_per_token=reach, memory=memory,
                           capacity_gib=capacity, gpu=(preset.get("gpu") or {}).get("model"))
