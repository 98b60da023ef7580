"""Pipeline schedules as per-rank operation lists, and a discrete-event simulation of them.

A micro-batch passes through `stages` model stages in order; what one operation computes for one
micro-batch on one stage is a `MicroStage`, (micro_batch, stage). Each rank runs its list of
operations in order:

- "F"   forward of one micro-stage (cost F)
- "B"   input gradient only (cost B - W), its weight gradient deferred to a later "W" (cost W)
- "BW"  full backward, input and weight gradient together (cost B)
- "F&B" the forward of one micro-stage overlapped with the full backward of another (cost F&B)

F, B, W and F&B are the DeepSeek-V3 report's symbols (B is the full backward). The builders
(`one_f_one_b`, `zb1p`, `dualpipe`, `dualpipev`) write each schedule as the phases of its figure
and need nothing but Python, so a real forward/backward function can walk the same lists. They
assume a shape their schedule can run: each schedule's descriptor (`schedule.Schedule`, whose
`op_lists` calls them) checks its micro-batch rule first. `simulate` times the lists under the
data dependencies; `summarize` reads off the bubble, the peak of micro-batches' activations held
and the parameter footprint.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

MicroStage = tuple[int, int]  # (micro_batch, stage)


@dataclass(frozen=True)
class Op:
    """One operation of a rank; `micro_stages` is (one,) or, for "F&B", (forward's, backward's)."""

    kind: str
    micro_stages: tuple[MicroStage, ...]

    @property
    def forward(self) -> MicroStage | None:
        return self.micro_stages[0] if self.kind in ("F", "F&B") else None

    @property
    def backward(self) -> MicroStage | None:
        """The micro-stage whose input gradient this op computes."""
        return {"B": self.micro_stages[0], "BW": self.micro_stages[0], "F&B": self.micro_stages[-1]}.get(self.kind)

    @property
    def weight_grad(self) -> MicroStage | None:
        """The micro-stage whose weight gradient this op computes."""
        return {"W": self.micro_stages[0], "BW": self.micro_stages[0], "F&B": self.micro_stages[-1]}.get(self.kind)


@dataclass(frozen=True)
class Costs:
    """Times of F, the full backward B, its weight-gradient part W, an overlapped F&B pair, and
    the point-to-point latency between ranks. The defaults are the figures' F = W = B/2, with
    F&B = F + B (an overlap that hides communication only)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float = 3.0
    p2p: float = 0.0

    def __post_init__(self) -> None:
        if min(self.f, self.b, self.w, self.fb, self.p2p) < 0 or self.w > self.b:
            raise ValueError(f"costs must be >= 0 with W <= B: {self}")

    def of(self, op: Op) -> float:
        return {"F": self.f, "B": self.b - self.w, "W": self.w, "BW": self.b, "F&B": self.fb}[op.kind]


@dataclass(frozen=True)
class OpLists:
    """Per-rank operation lists of one training step over `stages` model stages."""

    micro_batches: int
    stages: int
    ranks: tuple[tuple[Op, ...], ...]

    @property
    def stages_per_rank(self) -> int:
        """The most model stages one rank works on."""
        return max(len({stage for op in ops for _, stage in op.micro_stages}) for ops in self.ranks)

    @property
    def model_copies(self) -> int:
        """How many times the ranks together hold the whole model (DualPipe: each stage on two ranks)."""
        held = sum(len({stage for op in ops for _, stage in op.micro_stages}) for ops in self.ranks)
        return held // self.stages


class _RankProgram:
    """Appends a rank's ops, taking each phase's micro-batches in order and queueing deferred W."""

    def __init__(self, phases: dict[str, tuple[list[int], int]]):
        self.next_forward = {p: deque((mb, stage) for mb in mbs) for p, (mbs, stage) in phases.items()}
        self.next_backward = {p: deque(q) for p, q in self.next_forward.items()}
        self.deferred_w: deque[MicroStage] = deque()
        self.ops: list[Op] = []

    def f(self, phase: str) -> None:
        self.ops.append(Op("F", (self.next_forward[phase].popleft(),)))

    def b(self, phase: str, split: bool) -> None:
        micro_stage = self.next_backward[phase].popleft()
        self.ops.append(Op("B" if split else "BW", (micro_stage,)))
        if split:
            self.deferred_w.append(micro_stage)

    def w(self) -> None:
        self.ops.append(Op("W", (self.deferred_w.popleft(),)))

    def f_and_b(self, forward_phase: str, backward_phase: str) -> None:
        pair = (self.next_forward[forward_phase].popleft(), self.next_backward[backward_phase].popleft())
        self.ops.append(Op("F&B", pair))

    def finish(self) -> tuple[Op, ...]:
        left = [q for q in (*self.next_forward.values(), *self.next_backward.values(), self.deferred_w) if q]
        assert not left, f"phases left work unscheduled: {left}"
        return tuple(self.ops)


def one_f_one_b(pp: int, micro_batches: int) -> OpLists:
    """1F1B: rank r runs PP-1-r warm-up forwards, then alternates forward and full backward, then
    drains the remaining backwards."""
    ranks = []
    for r in range(pp):
        prog = _RankProgram({"down": (list(range(micro_batches)), r)})
        warmup = min(pp - 1 - r, micro_batches)
        for _ in range(warmup):
            prog.f("down")
        for _ in range(micro_batches - warmup):
            prog.f("down")
            prog.b("down", split=False)
        for _ in range(warmup):
            prog.b("down", split=False)
        ranks.append(prog.finish())
    return OpLists(micro_batches, pp, tuple(ranks))


def zb1p(pp: int, micro_batches: int) -> OpLists:
    """ZB1P (zero-bubble ZB-H1): 1F1B's order and memory with the backward split in B and W; rank r
    holds back r weight gradients in the steady state, which fill the cool-down's waits."""
    ranks = []
    for r in range(pp):
        prog = _RankProgram({"down": (list(range(micro_batches)), r)})
        warmup = min(pp - 1 - r, micro_batches)
        for _ in range(warmup):
            prog.f("down")
        for _ in range(micro_batches - warmup):
            prog.f("down")
            prog.b("down", split=True)
            if len(prog.deferred_w) > r:
                prog.w()
        for _ in range(warmup):
            prog.b("down", split=True)
            prog.w()
        while prog.deferred_w:
            prog.w()
        ranks.append(prog.finish())
    return OpLists(micro_batches, pp, tuple(ranks))


def _dual_rank(h: int, half: int, near: list[int], far: list[int]) -> tuple[Op, ...]:
    """One rank of DualPipe/DualPipeV: `h` ranks from its end of the pipe, `half` ranks per half.

    "near" is stage h of the micro-batches `near`, "far" is stage 2*half-1-h of `far`. The phases
    as the report's figure reads from left to right."""
    prog = _RankProgram({"near": (near, h), "far": (far, 2 * half - 1 - h)})
    middle = h == half - 1
    for _ in range(2 * (half - h - 1)):              # 1. warm-up: near forwards only
        prog.f("near")
    for _ in range(h + 1):                           # 2. near and far forwards alternate
        prog.f("near")
        prog.f("far")
    for _ in range(half - h - 1):                    # 3. far backward (W right after), far forward
        prog.b("far", split=True)
        prog.w()
        prog.f("far")
    for i in range(len(near) - 2 * half + h + 1):    # 4. steady state: overlapped pairs both ways
        if i == 0 and middle:                        # the turn of the pipe: not overlapped
            prog.f("near")
            prog.b("far", split=False)
        else:
            prog.f_and_b("near", "far")
        prog.f_and_b("far", "near")
    for _ in range(half - h - 1):                    # 5. far backward, far forward with near backward
        prog.b("far", split=False)
        prog.f_and_b("far", "near")
    backwards = 2 * (h + 1)                          # 6. backwards both ways; the last h+1 defer W
    for j in range(backwards):
        prog.b("far" if j % 2 == 0 else "near", split=j >= backwards - (h + 1))
    for _ in range(half - h - 1):                    # 7. a deferred W, then a near backward
        prog.w()
        prog.b("near", split=True)
    while prog.deferred_w:                           # 8. the remaining deferred W
        prog.w()
    return prog.finish()


def dualpipe(pp: int, micro_batches: int) -> OpLists:
    """DualPipe on PP ranks: micro-batches 0..M/2-1 enter at rank 0, M/2..M-1 at rank PP-1; rank r
    holds stage r of the first direction and stage PP-1-r of the second (two copies of the model).
    Needs PP even and M even, M >= 2 PP."""
    half = pp // 2
    down, up = list(range(micro_batches // 2)), list(range(micro_batches // 2, micro_batches))
    ranks = tuple(_dual_rank(r, half, down, up) if r < half else _dual_rank(pp - 1 - r, half, up, down)
                  for r in range(pp))
    return OpLists(micro_batches, pp, ranks)


def dualpipev(stages: int, micro_batches: int) -> OpLists:
    """DualPipeV: DualPipe cut in half, `stages` (the table's PP) on stages/2 ranks; rank r holds
    stage r and stage stages-1-r, and every micro-batch goes down the V and back up.
    Needs stages even and M >= stages."""
    half = stages // 2
    every = list(range(micro_batches))
    ranks = tuple(_dual_rank(r, half, every, every) for r in range(half))
    return OpLists(micro_batches, stages, ranks)


def forwards(op_lists: OpLists) -> OpLists:
    """The forward-only pass (evaluation) of `op_lists`: each rank's forwards, in their order.

    It cannot deadlock where `op_lists` does not: a forward waits only for the forward before it
    on the previous stage, and every forward that precedes it on its own rank also preceded it in
    `op_lists`, where it completed; dropping the backwards and W only removes waits (`simulate`
    checks it for every size in tests/test_dualpipe.py)."""
    ranks = tuple(tuple(Op("F", (op.forward,)) for op in ops if op.forward is not None) for ops in op_lists.ranks)
    return OpLists(op_lists.micro_batches, op_lists.stages, ranks)


def without_overlap(op_lists: OpLists) -> OpLists:
    """`op_lists` as the runtime runs it on CPU: each F&B pair as its forward, then its full
    backward, each starting when its own input has arrived."""
    def split(op: Op) -> tuple[Op, ...]:
        return (Op("F", op.micro_stages[:1]), Op("BW", op.micro_stages[1:])) if op.kind == "F&B" else (op,)

    ranks = tuple(tuple(part for op in ops for part in split(op)) for ops in op_lists.ranks)
    return OpLists(op_lists.micro_batches, op_lists.stages, ranks)


def requirements(op: Op, stages: int) -> list[tuple[str, MicroStage]]:
    """The results ("F" or "B" of a micro-stage, or "B" for a W) this op waits for."""
    needs = []
    if op.forward is not None and op.forward[1] > 0:
        needs.append(("F", (op.forward[0], op.forward[1] - 1)))
    if op.backward is not None:
        mb, stage = op.backward
        needs.append(("F", op.backward))
        if stage < stages - 1:
            needs.append(("B", (mb, stage + 1)))
    if op.kind == "W":
        needs.append(("B", op.micro_stages[0]))
    return needs


def results(op: Op) -> Iterable[tuple[str, MicroStage]]:
    """What the op computes: ("F" | "B" | "W", micro-stage) for forward, input and weight gradient."""
    for key, micro_stage in (("F", op.forward), ("B", op.backward), ("W", op.weight_grad)):
        if micro_stage is not None:
            yield key, micro_stage


class ScheduleError(ValueError):
    """Operation lists that cannot run: an op repeated, missing, or waiting on one that never comes."""


def validate(op_lists: OpLists) -> None:
    """Every micro-stage gets exactly one forward, input gradient and weight gradient, all on one
    rank (only the forward in lists without any backward: `forwards`)."""
    where: dict[tuple[str, MicroStage], int] = {}
    for rank, ops in enumerate(op_lists.ranks):
        for op in ops:
            for key, (mb, stage) in results(op):
                if (key, (mb, stage)) in where:
                    raise ScheduleError(f"{key} of micro-batch {mb} on stage {stage} scheduled twice")
                where[key, (mb, stage)] = rank
    computed = "FBW" if any(key != "F" for key, _ in where) else "F"
    for mb in range(op_lists.micro_batches):
        for stage in range(op_lists.stages):
            ranks = {where.get((key, (mb, stage))) for key in computed}
            if None in ranks or len(ranks) != 1:
                raise ScheduleError(f"micro-batch {mb} on stage {stage} has F/B/W on ranks {ranks}")


@dataclass(frozen=True)
class Slot:
    rank: int
    start: float
    end: float
    op: Op


def simulate(op_lists: OpLists, costs: Costs) -> list[Slot]:
    """Times every op: it starts when its rank is free and the results it needs have arrived (a
    result from another rank arrives p2p after it was computed). Raises ScheduleError on deadlock."""
    validate(op_lists)
    finished: dict[tuple[str, MicroStage], tuple[float, int]] = {}
    position = [0] * len(op_lists.ranks)
    clock = [0.0] * len(op_lists.ranks)
    slots: list[Slot] = []
    progressed = True
    while progressed:
        progressed = False
        for rank, ops in enumerate(op_lists.ranks):
            while position[rank] < len(ops):
                op = ops[position[rank]]
                needs = requirements(op, op_lists.stages)
                if any(need not in finished for need in needs):
                    break
                start = max([clock[rank]] + [finished[n][0] + (costs.p2p if finished[n][1] != rank else 0.0)
                                             for n in needs])
                clock[rank] = start + costs.of(op)
                slots.append(Slot(rank, start, clock[rank], op))
                for key in results(op):
                    finished[key] = (clock[rank], rank)
                position[rank] += 1
                progressed = True
    stuck = {r: ops[position[r]] for r, ops in enumerate(op_lists.ranks) if position[r] < len(ops)}
    if stuck:
        raise ScheduleError(f"the schedule deadlocks; waiting ops by rank: {stuck}")
    return slots


def peak_activations(ops: Iterable[Op]) -> int:
    """Most micro-stages whose forward ran and whose input gradient has not. An F&B pair holds its
    forward's activations while its backward runs (both are live in the overlapped step, and the
    runtime runs the forward first), so it counts before the backward frees one."""
    held = peak = 0
    for op in ops:
        held += op.forward is not None
        peak = max(peak, held)
        held -= op.backward is not None
    return peak


def summarize(op_lists: OpLists, costs: Costs) -> dict:
    """The step time, each rank's bubble (step time minus its busy time; the largest is the
    schedule's), the peak activations per rank and the parameter footprint."""
    slots = simulate(op_lists, costs)
    step_time = max(s.end for s in slots)
    busy = [0.0] * len(op_lists.ranks)
    for s in slots:
        busy[s.rank] += s.end - s.start
    bubbles = [step_time - b for b in busy]
    peaks = [peak_activations(ops) for ops in op_lists.ranks]
    return {
        "ranks": len(op_lists.ranks),
        "stages": op_lists.stages,
        "micro_batches": op_lists.micro_batches,
        "step_time": step_time,
        "bubble": max(bubbles),
        "bubble_per_rank": bubbles,
        "peak_activations": max(peaks),
        "peak_activations_per_rank": peaks,
        "stages_per_rank": op_lists.stages_per_rank,
        "model_copies": op_lists.model_copies,
    }

