"""dsv3-schedule: simulate every registered pipeline schedule for one pipeline and compare them.

    dsv3-schedule --pp 16 --micro-batches 120                 # a table
    dsv3-schedule --pp 8 --micro-batches 16 --png step.png    # and the timelines, one band per schedule
    dsv3-schedule --pp 8 --micro-batches 16 --json            # the same figures as JSON

--pp counts pipeline stages, as the report's table does: DualPipeV runs them on PP/2 ranks.
Costs are in any time unit; F&B defaults to F + B (the overlap hides communication, not compute).
Each registered schedule with operation lists (its `pipeline.Schedule` descriptor's `build_ops`)
is simulated: 1F1B, ZB1P, DualPipe, DualPipeV, and any other registered with them.
Bounds (the simulation's work grows with PP x micro-batches): --pp <= 256, --micro-batches <=
16384, PP x micro-batches <= 32768 (about 10 s); --png only up to PP 64 and 8192; costs finite.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import zlib
from dataclasses import asdict
from typing import Optional

from megatron_dsv3 import registry
from megatron_dsv3.cli.guard import entry_point
from megatron_dsv3.pipeline.schedule import Schedule, ScheduleRefused, get as get_schedule
from megatron_dsv3.pipeline.simulate import Costs, OpLists, Slot, simulate, summarize

COLORS = {"F": (86, 140, 214), "B": (96, 178, 104), "W": (236, 168, 64), "BW": (60, 140, 130)}
SECOND_DIRECTION = 0.62  # DualPipe's micro-batches entering at the last rank are drawn darker
IDLE, BACKGROUND, INK = (236, 236, 236), (255, 255, 255), (20, 20, 20)
DIGITS = ("111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111")
ROW, GAP, MAX_WIDTH = 26, 14, 2400
MAX_PP, MAX_MICRO_BATCHES, MAX_WORK = 256, 16384, 32768  # the table; PP x micro-batches
MAX_PNG_PP, MAX_PNG_WORK = 64, 8192  # the timelines, drawn pixel by pixel
MAX_COST = 1e12


def simulated() -> list[Schedule]:
    """The registered schedules that have operation lists."""
    return [s for s in map(get_schedule, registry.names("schedule")) if s.build_ops is not None]


def op_lists(schedule: Schedule, stages: int, micro_batches: int) -> OpLists:
    """`schedule`'s operation lists over `stages` pipeline stages (the table's PP)."""
    return schedule.op_lists(schedule.pipeline_for_stages(stages), micro_batches)


def compare(pp: int, micro_batches: int, costs: Costs) -> list[dict]:
    """One summary per schedule, with the report's formula where it has one; a schedule that
    refuses this shape (DualPipe needs M >= 2 PP) gets an "error" instead."""
    rows = []
    for schedule in simulated():
        try:
            row = {"schedule": schedule.name, **summarize(op_lists(schedule, pp, micro_batches), costs)}
        except ScheduleRefused as err:
            rows.append({"schedule": schedule.name, "error": str(err)})
            continue
        if schedule.report_bubble is not None:
            row["table_bubble"] = schedule.report_bubble(pp, costs)
        rows.append(row)
    return rows


def format_table(rows: list[dict], costs: Costs) -> str:
    lines = [f"costs: F={costs.f:g} B={costs.b:g} W={costs.w:g} F&B={costs.fb:g} p2p={costs.p2p:g}",
             f"{'schedule':<10} {'ranks':>5} {'step':>9} {'bubble':>9} {'table':>9} {'bubble%':>8} "
             f"{'peak act':>8} {'params/rank':>11} {'model copies':>12}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['schedule']:<10} {r['error']}")
            continue
        table = f"{r['table_bubble']:>9.4g}" if "table_bubble" in r else f"{'-':>9}"
        lines.append(f"{r['schedule']:<10} {r['ranks']:>5} {r['step_time']:>9.4g} {r['bubble']:>9.4g} "
                     f"{table} {100 * r['bubble'] / r['step_time']:>7.1f}% "
                     f"{r['peak_activations']:>8} {r['stages_per_rank']:>10}x {r['model_copies']:>11}x")
    lines.append("bubble: the most idle rank's idle time in the step; peak act: most micro-batch stage "
                 "activations a rank holds; params/rank: in stages of the table's PP")
    return "\n".join(lines)


def _png(width: int, height: int, rgb: bytearray) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    scanlines = b"".join(b"\x00" + bytes(rgb[y * width * 3:(y + 1) * width * 3]) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(scanlines, 9)) + chunk(b"IEND", b""))


def draw_timelines(timelines: list[tuple[int, list[Slot]]], micro_batches: int) -> bytes:
    """A PNG of each (ranks, slots) timeline, one band per schedule, a row per rank, on one time
    scale: F blue, input-gradient B green, W orange, full backward teal, F&B forward over backward,
    DualPipe's second direction darker; micro-batch numbers where they fit."""
    span = max(s.end for _, slots in timelines for s in slots)
    scale = max(1.0, min(40.0, (MAX_WIDTH - 8) / span))
    width = int(span * scale) + 8
    height = sum(ranks * ROW for ranks, _ in timelines) + GAP * (len(timelines) + 1)
    rgb = bytearray(BACKGROUND * (width * height))

    def fill(x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        for y in range(max(y0, 0), min(y1, height)):
            rgb[(y * width + x0) * 3:(y * width + x1) * 3] = bytes(color) * max(0, x1 - x0)

    def shade(kind: str, micro_batch: int, dual: bool) -> tuple[int, int, int]:
        dim = SECOND_DIRECTION if dual and micro_batch >= micro_batches // 2 else 1.0
        return tuple(int(c * dim) for c in COLORS[kind])

    def number(x0: int, x1: int, y: int, value: int) -> None:
        text = str(value)
        if x1 - x0 < 8 * len(text) + 2:
            return
        x = (x0 + x1) // 2 - 4 * len(text)
        for ch in text:
            for i, bit in enumerate(DIGITS[int(ch)]):
                if bit == "1":
                    fill(x + 1 + 2 * (i % 3), y + 2 * (i // 3), x + 3 + 2 * (i % 3), y + 2 + 2 * (i // 3), INK)
            x += 8

    top = GAP
    for ranks, slots in timelines:
        dual = any(s.op.kind == "F&B" for s in slots)
        for r in range(ranks):
            fill(4, top + r * ROW + 1, 4 + int(span * scale), top + (r + 1) * ROW - 1, IDLE)
        for s in slots:
            x0, x1 = 4 + int(s.start * scale), 4 + max(int(s.end * scale), int(s.start * scale) + 1)
            y0, y1 = top + s.rank * ROW + 1, top + (s.rank + 1) * ROW - 1
            if s.op.kind == "F&B":
                (mf, _), (mb, _) = s.op.micro_stages
                middle = (y0 + y1) // 2
                fill(x0, y0, x1, middle, shade("F", mf, dual))
                fill(x0, middle, x1, y1, shade("BW", mb, dual))
                number(x0, x1, y0 + 1, mf)
                number(x0, x1, middle + 1, mb)
            else:
                mb = s.op.micro_stages[0][0]
                fill(x0, y0, x1, y1, shade(s.op.kind, mb, dual))
                number(x0, x1, y0 + (y1 - y0 - 10) // 2, mb)
            fill(x1 - 1, y0, x1, y1, BACKGROUND)
        top += ranks * ROW + GAP
    return _png(width, height, rgb)


def bounds_problem(args: argparse.Namespace) -> Optional[str]:
    """What in the arguments is outside the bounds above, or None."""
    if not 1 <= args.pp <= MAX_PP or not 1 <= args.micro_batches <= MAX_MICRO_BATCHES:
        return f"--pp must be in [1, {MAX_PP}] and --micro-batches in [1, {MAX_MICRO_BATCHES}]"
    if args.pp * args.micro_batches > MAX_WORK:
        return (f"--pp {args.pp} x --micro-batches {args.micro_batches} = {args.pp * args.micro_batches} is above "
                f"{MAX_WORK}, what the simulation takes in about 10 s")
    costs = {"--f": args.f, "--b": args.b, "--w": args.w, "--fb": args.fb, "--p2p": args.p2p}
    wrong = [name for name, value in costs.items() if value is not None and not (
        math.isfinite(value) and 0 <= value <= MAX_COST)]
    if wrong:
        return f"{', '.join(wrong)} must be finite numbers in [0, {MAX_COST:g}]"
    if args.png and (args.pp > MAX_PNG_PP or args.pp * args.micro_batches > MAX_PNG_WORK):
        return (f"--png draws up to --pp {MAX_PNG_PP} and {MAX_PNG_WORK} pp x micro-batches; got {args.pp} x "
                f"{args.micro_batches}: leave out --png, or draw a smaller pipeline")
    if args.png:
        folder = os.path.dirname(os.path.abspath(args.png))
        if not os.path.isdir(folder):
            return f"--png {args.png}: the folder {folder} does not exist"
        if os.path.isdir(args.png):
            return f"--png {args.png} is a folder; give a file name such as {os.path.join(args.png, 'step.png')}"
    return None


@entry_point("dsv3-schedule")
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3-schedule", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pp", type=int, required=True, help="pipeline stages (the table's PP)")
    p.add_argument("--micro-batches", type=int, required=True, help="micro-batches per step")
    p.add_argument("--f", type=float, default=1.0, help="forward chunk time")
    p.add_argument("--b", type=float, default=2.0, help="full backward chunk time (input + weight gradient)")
    p.add_argument("--w", type=float, default=1.0, help="weight-gradient part of B")
    p.add_argument("--fb", type=float, default=None, help="an overlapped forward + backward pair (default F + B)")
    p.add_argument("--p2p", type=float, default=0.0, help="latency of a send between ranks")
    p.add_argument("--png", default=None, help="write the timelines here")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    problem = bounds_problem(args)
    if problem:
        p.error(problem)
    try:
        costs = Costs(args.f, args.b, args.w, args.f + args.b if args.fb is None else args.fb, args.p2p)
    except ValueError as err:
        p.error(str(err))
    rows = compare(args.pp, args.micro_batches, costs)
    if args.json:
        print(json.dumps({"pp": args.pp, "micro_batches": args.micro_batches, "costs": asdict(costs),
                          "schedules": rows}, indent=1))
    else:
        print(format_table(rows, costs))
    if args.png:
        timelines = [(r["ranks"], simulate(op_lists(get_schedule(r["schedule"]), args.pp, args.micro_batches), costs))
                     for r in rows if "error" not in r]
        try:
            with open(args.png, "wb") as f:
                f.write(draw_timelines(timelines, args.micro_batches))
        except OSError as error:
            print(f"dsv3-schedule: error: cannot write --png {args.png}: {error.strerror or error}", file=sys.stderr)
            return 2
        print(f"timelines ({', '.join(r['schedule'] for r in rows if 'error' not in r)}) -> {args.png}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
