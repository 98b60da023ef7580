"""A pipeline schedule as one object: the `Schedule` descriptor.

Everything that depends on the schedule reads its descriptor and none matches its name:
dsv3-train (the chunks a rank builds, the mirror group, the executor), the plan (`plan.py`: the
micro-batch rule, the stage cut), the memory estimate (`memory.py`: copies of the model,
activations held), the launcher (`launch/presets.py`) and dsv3-schedule (the operation lists and
the report's bubble formula). A descriptor is registered as registry kind "schedule" under its
name, which `parallel.schedule` chooses:

    from megatron_dsv3.pipeline import Schedule, register_schedule
    register_schedule(Schedule("mine", executor=make_my_forward_backward, build_ops=my_op_lists))

Here: the descriptor, and the two schedules of one stage per rank: Megatron-Core's 1F1B and ZB1P
(zero-bubble ZB-H1, simulated only). DualPipe and DualPipeV (report section 3.2.1): `dualpipe.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron_dsv3 import registry
from megatron_dsv3.parallel.layout import stage_cut
from megatron_dsv3.pipeline import simulate
from megatron_dsv3.pipeline.megatron_hook import megatron_choice

# Megatron-Core's forward_backward_func: called with keywords only (forward_step_func,
# data_iterator, model, num_microbatches, seq_length, micro_batch_size, decoder_seq_length,
# forward_only, collect_non_loss_data, first_val_step, adjust_tensor_shapes_fn, p2p_communicator,
# pg_collection, force_all_reduce in 0.16-0.19); returns what the last stage's loss_func reported.
ForwardBackward = Callable[..., list]


class ScheduleRefused(ValueError):
    """A run a schedule cannot make; the message names the rule and the numbers."""


def one_stage_per_rank(pipeline: int, rank: int) -> tuple[int, ...]:
    """Pipeline rank r holds model stage r."""
    return (rank,)


def any_micro_batches(pipeline: int, micro_batches: int) -> None:
    """No rule: any number of micro-batches on any pipeline."""


@dataclass(frozen=True)
class Schedule:
    """One pipeline schedule's facts.

    - name: the `parallel.schedule` value that chooses it.
    - executor: makes its forward/backward function, which is called as the result of
      Megatron-Core's `get_forward_backward_func()` is, with `model` this rank's chunks in
      `rank_stages` order. None: simulated only (dsv3-train, the plan and `install` refuse it).
    - build_ops: (pipeline ranks, micro-batches) -> each rank's operation list (`simulate.py`,
      written as the phases of its figure), after `micro_batch_rule`; None: not simulated.
    - stages_per_rank: model chunks each pipeline rank holds.
    - model_copies: how many times the ranks together hold the model. 2 (DualPipe): pipeline ranks
      r and PP-1-r hold the same stages, and their gradients are summed over `groups.mirror_group()`.
    - rank_stages: (pipeline, rank) -> the model stages that rank holds, in its chunk order.
    - micro_batch_rule: (pipeline ranks, micro-batches per step) -> None, or ScheduleRefused
      naming the rule and the numbers.
    - forward_only: its executor runs `forward_only=True` (evaluation).
    - side_streams: it overlaps communication with compute on CUDA streams of its own, which
      needs more hardware queues (the launcher's CUDA_DEVICE_MAX_CONNECTIONS).
    - report_bubble: (stages, costs) -> the DeepSeek-V3 report's bubble formula over `stages`
      pipeline stages (its table's PP), printed by dsv3-schedule beside the simulated bubble.
    """

    name: str
    executor: Optional[Callable[[], ForwardBackward]]
    build_ops: Optional[Callable[[int, int], simulate.OpLists]] = None
    stages_per_rank: int = 1
    model_copies: int = 1
    rank_stages: Callable[[int, int], tuple[int, ...]] = one_stage_per_rank
    micro_batch_rule: Callable[[int, int], None] = any_micro_batches
    forward_only: bool = False
    side_streams: bool = False
    report_bubble: Optional[Callable[[int, simulate.Costs], float]] = None

    def __post_init__(self) -> None:
        if self.model_copies not in (1, 2) or self.stages_per_rank < 1 or self.stages_per_rank % self.model_copies:
            raise ValueError(f"schedule {self.name!r}: model_copies must be 1 or 2 (the mirror group pairs ranks) "
                             f"and divide stages_per_rank, got {self.model_copies} and {self.stages_per_rank}")
        if self.stages_per_rank > 1 and self.rank_stages is one_stage_per_rank:
            raise ValueError(f"schedule {self.name!r} holds {self.stages_per_rank} stages per rank: give its "
                             "rank_stages")

    def num_stages(self, pipeline: int) -> int:
        """Model stages it cuts the model in on `pipeline` ranks."""
        return pipeline * self.stages_per_rank // self.model_copies

    def stage_cut(self, num_layers: int, pipeline: int) -> tuple[range, ...]:
        """Decoder layers of each model stage: the cut dsv3-train builds, the plan checks and the
        memory estimate counts."""
        return stage_cut(num_layers, self.num_stages(pipeline))

    def check(self, pipeline: int, micro_batches: int) -> None:
        """Refuse (ScheduleRefused) what it cannot train: anything without an executor, else a
        pipeline or micro-batch count its rule refuses."""
        if self.executor is None:
            raise self._simulated_only()
        self.micro_batch_rule(pipeline, micro_batches)

    def forward_backward_func(self) -> ForwardBackward:
        """A new forward/backward function from its executor."""
        if self.executor is None:
            raise self._simulated_only()
        return self.executor()

    def op_lists(self, pipeline: int, micro_batches: int) -> simulate.OpLists:
        """Each of `pipeline` ranks' operations for one step of `micro_batches`."""
        if self.build_ops is None:
            raise ScheduleRefused(f"{self.name} has no operation lists to simulate")
        self.micro_batch_rule(pipeline, micro_batches)
        return self.build_ops(pipeline, micro_batches)

    def pipeline_for_stages(self, stages: int) -> int:
        """The pipeline ranks that run it over `stages` model stages (the report's table counts stages)."""
        ranks, rest = divmod(stages * self.model_copies, self.stages_per_rank)
        if rest or not ranks:
            raise ScheduleRefused(f"{self.name} holds {self.stages_per_rank} stage(s) per rank and the model "
                                  f"{self.model_copies} time(s): {stages} stages do not fill whole ranks")
        return ranks

    def micro_batches_held(self, pipeline: int, micro_batches: int) -> int:
        """The most micro-batches' activations of one stage that one rank holds at once: the peak
        over its operation lists; without them, every micro-batch on each of the rank's stages."""
        if self.build_ops is None:
            return micro_batches * self.stages_per_rank
        return max(simulate.peak_activations(ops) for ops in self.op_lists(pipeline, micro_batches).ranks)

    def _simulated_only(self) -> ScheduleRefused:
        trainable = [name for name in registry.names("schedule") if get(name).executor is not None]
        return ScheduleRefused(f"parallel.schedule={self.name!r} is simulated only (dsv3-schedule compares it); "
                               f"it has no executor to train with: choose one of {', '.join(trainable)}")


def register(schedule: Schedule, overwrite: bool = False) -> Schedule:
    """Register `schedule` under its name (registry kind "schedule")."""
    return registry.register("schedule", schedule.name, schedule, overwrite=overwrite)


def get(name: str) -> Schedule:
    """The descriptor registered as schedule `name`."""
    entry = registry.get("schedule", name)
    if not isinstance(entry, Schedule) or entry.name != name:
        raise TypeError(f"schedule {name!r} is registered as {entry!r}; register a "
                        f"megatron_dsv3.pipeline.Schedule named {name!r}")
    return entry


# Megatron-Core's own choice: 1F1B across pipeline stages, a plain micro-batch loop without.
ONE_F_ONE_B = register(Schedule(
    "1f1b", executor=megatron_choice, build_ops=simulate.one_f_one_b, forward_only=True,
    report_bubble=lambda stages, c: (stages - 1) * (c.f + c.b)))

# Zero-bubble ZB-H1: 1F1B's order and memory with the backward split in B and W.
ZB1P = register(Schedule(
    "zb1p", executor=None, build_ops=simulate.zb1p,
    report_bubble=lambda stages, c: (stages - 1) * (c.f + c.b - 2 * c.w)))
