"""The pipeline-schedule simulator (`pipeline/simulate.py`), the schedules' descriptors that build
its operation lists, and `dsv3-schedule`, against the DeepSeek-V3 report's bubble table
(shared/reference/dsv3-facts.md)."""
from __future__ import annotations

import json
import struct
import zlib

import pytest

from megatron_dsv3.cli import schedule as cli
from megatron_dsv3.pipeline import ScheduleRefused, get_schedule
from megatron_dsv3.pipeline.simulate import (Costs, Op, OpLists, ScheduleError, dualpipe, dualpipev, one_f_one_b,
                                             peak_activations, simulate, summarize, zb1p)

# The report's schedules by registered name, each over PP pipeline stages (DualPipeV: PP/2 ranks).
SCHEDULES = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def table(name: str, pp: int, c: Costs) -> float:
    """The table's bubble, PP counting pipeline stages (DualPipeV runs them on PP/2 ranks)."""
    if name == "1f1b":
        return (pp - 1) * (c.f + c.b)
    if name == "zb1p":
        return (pp - 1) * (c.f + c.b - 2 * c.w)
    return (pp / 2 - 1) * (c.fb + c.b - 3 * c.w)


# The formulas describe the figures' costs: the input gradient (B - W) takes as long as F, W <= F,
# and an overlapped pair F&B is no slower than F and B one after the other. They also assume
# enough micro-batches: M >= PP for 1F1B and ZB1P, M >= 2 PP for DualPipe, M >= PP for DualPipeV.
FIGURE_COSTS = [Costs(f=1, b=2, w=1, fb=3), Costs(f=1, b=2, w=1, fb=2.5), Costs(f=1, b=1.6, w=0.6, fb=2.0),
                Costs(f=2, b=3, w=1, fb=4.5), Costs(f=1.5, b=2, w=0.5, fb=2)]


@pytest.mark.parametrize("costs", FIGURE_COSTS)
@pytest.mark.parametrize("pp,micro_batches", [(4, 8), (4, 20), (6, 12), (8, 16), (8, 30), (16, 32)])
def test_simulated_bubbles_equal_the_table(pp, micro_batches, costs):
    for name, build in SCHEDULES.items():
        result = summarize(build(pp, micro_batches), costs)
        assert result["bubble"] == pytest.approx(table(name, pp, costs), abs=1e-9), name


@pytest.mark.parametrize("costs", [Costs(f=1.3, b=2.9, w=0.7, fb=3.1), Costs(f=2, b=1, w=0.2, fb=2.5)])
def test_1f1b_bubble_holds_for_any_costs(costs):
    for pp, micro_batches in [(2, 2), (4, 4), (5, 13), (8, 24)]:
        assert summarize(one_f_one_b(pp, micro_batches), costs)["bubble"] == pytest.approx(
            table("1f1b", pp, costs))


def test_weight_gradients_longer_than_forward_leave_more_bubble_than_the_table():
    """With W > F the deferred W no longer fit the waits they are meant to fill."""
    costs = Costs(f=1, b=3, w=2, fb=3.5)
    for name in ("zb1p", "dualpipe", "dualpipev"):
        assert summarize(SCHEDULES[name](8, 16), costs)["bubble"] > table(name, 8, costs) + 0.5, name


def test_p2p_latency_is_paid_between_ranks_only():
    costs = Costs(f=1, b=2, w=1, fb=3, p2p=0.25)
    alone = summarize(one_f_one_b(1, 5), costs)
    assert (alone["step_time"], alone["bubble"]) == (5 * 3, 0)
    one = summarize(one_f_one_b(4, 1), costs)  # one micro-batch down 4 stages and back: 6 sends
    assert one["step_time"] == pytest.approx(4 * (costs.f + costs.b) + 6 * costs.p2p)


def test_p2p_latency_adds_to_every_schedule():
    for name, build in SCHEDULES.items():
        quiet = summarize(build(8, 16), Costs())
        slow = summarize(build(8, 16), Costs(p2p=0.25))
        assert slow["step_time"] > quiet["step_time"], name


def assert_runs_in_dependency_order(schedule: OpLists, costs: Costs) -> None:
    slots = simulate(schedule, costs)
    end = {}
    for s in slots:
        if s.op.forward:
            end["F", s.op.forward] = s.end
        if s.op.kind in ("B", "BW", "F&B"):
            end["B", s.op.micro_stages[-1]] = s.end
    last = schedule.stages - 1
    for s in slots:
        if s.op.kind in ("F", "F&B") and s.op.micro_stages[0][1] > 0:
            mb, stage = s.op.micro_stages[0]
            assert end["F", (mb, stage - 1)] <= s.start
        if s.op.kind in ("B", "BW", "F&B"):
            mb, stage = s.op.micro_stages[-1]
            assert end["F", (mb, stage)] <= s.start
            assert stage == last or end["B", (mb, stage + 1)] <= s.start
        if s.op.kind == "W":
            assert end["B", s.op.micro_stages[0]] <= s.start
    for rank in range(len(schedule.ranks)):
        mine = [s for s in slots if s.rank == rank]
        assert [s.op for s in mine] == list(schedule.ranks[rank])
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))


@pytest.mark.parametrize("pp,micro_batches", [(2, 4), (4, 8), (4, 11), (6, 14), (8, 16)])
def test_every_micro_stage_gets_one_f_b_w_on_one_rank_in_dependency_order(pp, micro_batches):
    for name, build in SCHEDULES.items():
        if name == "dualpipe" and micro_batches % 2:
            continue
        schedule = build(pp, micro_batches)
        counts: dict = {}
        for rank, ops in enumerate(schedule.ranks):
            for op in ops:
                parts = ("F", "BW") if op.kind == "F&B" else (op.kind,)
                for part, micro_stage in zip(parts, op.micro_stages, strict=True):
                    for kind in part:
                        counts.setdefault((micro_stage, kind), []).append(rank)
        micro_stages = [(mb, stage) for mb in range(micro_batches) for stage in range(schedule.stages)]
        for micro_stage in micro_stages:
            ranks = [counts.get((micro_stage, kind)) for kind in "FBW"]
            assert all(r is not None and len(r) == 1 for r in ranks), (name, micro_stage, ranks)
            assert len({r[0] for r in ranks}) == 1, (name, micro_stage, ranks)
        assert len(counts) == 3 * len(micro_stages)
        assert_runs_in_dependency_order(schedule, Costs(f=1, b=2.5, w=0.7, fb=3, p2p=0.1))


def test_dualpipe_sends_half_the_micro_batches_from_each_end():
    pp, m = 8, 16
    schedule = dualpipe(pp, m)
    first_stage = {op.forward[0]: rank for rank, ops in enumerate(schedule.ranks) for op in ops
                   if op.forward and op.forward[1] == 0}
    assert {mb for mb, rank in first_stage.items() if rank == 0} == set(range(m // 2))
    assert {mb for mb, rank in first_stage.items() if rank == pp - 1} == set(range(m // 2, m))
    for rank, ops in enumerate(schedule.ranks):
        assert {chunk[1] for op in ops for chunk in op.micro_stages} == {rank, pp - 1 - rank}


def test_dualpipev_folds_the_stages_into_a_v():
    stages, m = 8, 10
    schedule = dualpipev(stages, m)
    assert len(schedule.ranks) == stages // 2
    for rank, ops in enumerate(schedule.ranks):
        assert {chunk[1] for op in ops for chunk in op.micro_stages} == {rank, stages - 1 - rank}


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_activations_and_parameters_follow_the_table(pp):
    m = 2 * pp
    assert summarize(one_f_one_b(pp, m), Costs())["peak_activations"] == pp
    assert summarize(zb1p(pp, m), Costs())["peak_activations"] == pp
    assert summarize(dualpipe(pp, m), Costs())["peak_activations"] == pp + 1
    assert summarize(dualpipev(pp, m), Costs())["peak_activations"] == pp + 1
    footprint = {n: (s.stages_per_rank, s.model_copies) for n, s in
                 ((n, b(pp, m)) for n, b in SCHEDULES.items())}
    assert footprint == {"1f1b": (1, 1), "zb1p": (1, 1), "dualpipe": (2, 2), "dualpipev": (2, 1)}
    for name, (stages_per_rank, copies) in footprint.items():  # the descriptors say what the lists do
        assert (get_schedule(name).stages_per_rank, get_schedule(name).model_copies) == (stages_per_rank, copies)


def test_activations_are_held_from_forward_to_input_gradient():
    f, b, w, bw = (Op(kind, ((mb, 0),)) for kind, mb in (("F", 0), ("B", 0), ("W", 0), ("BW", 1)))
    assert peak_activations([f, b, w, Op("F", ((1, 0),)), Op("F", ((2, 0),))]) == 2
    assert peak_activations([f, Op("F", ((1, 0),)), bw, Op("F&B", ((2, 0), (0, 0))), Op("F", ((3, 0),))]) == 2


def test_dual_schedules_refuse_too_few_micro_batches():
    """Their descriptors' rules come before the builders (arguments: pipeline ranks, micro-batches)."""
    with pytest.raises(ScheduleRefused, match="micro-batches"):
        get_schedule("dualpipe").op_lists(8, 14)
    with pytest.raises(ScheduleRefused, match="even number of micro-batches"):
        get_schedule("dualpipe").op_lists(8, 17)
    with pytest.raises(ScheduleRefused, match="micro-batches"):
        get_schedule("dualpipev").op_lists(4, 7)
    with pytest.raises(ScheduleRefused, match="even"):
        get_schedule("dualpipe").op_lists(5, 20)


def test_broken_schedules_are_refused():
    good = one_f_one_b(2, 2)
    missing_w = OpLists(2, 2, (good.ranks[0][:-1] + (Op("B", good.ranks[0][-1].micro_stages),), good.ranks[1]))
    with pytest.raises(ScheduleError, match="F/B/W"):
        simulate(missing_w, Costs())
    twice = OpLists(2, 2, (good.ranks[0] + good.ranks[0][:1], good.ranks[1]))
    with pytest.raises(ScheduleError, match="twice"):
        simulate(twice, Costs())
    backward_first = tuple(sorted(good.ranks[0], key=lambda op: op.kind != "BW"))
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(OpLists(2, 2, (backward_first, good.ranks[1])), Costs())


def test_cli_json_matches_the_simulation(capsys):
    assert cli.main(["--pp", "8", "--micro-batches", "16", "--f", "1", "--b", "2", "--w", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    costs = Costs(f=1, b=2, w=1, fb=3)
    assert out["costs"]["fb"] == 3 and out["micro_batches"] == 16
    assert [r["schedule"] for r in out["schedules"]] == sorted(SCHEDULES)
    for row in out["schedules"]:
        expected = {"schedule": row["schedule"], **summarize(SCHEDULES[row["schedule"]](8, 16), costs)}
        assert {k: row[k] for k in expected} == expected  # JSON keeps floats exactly
        assert row["table_bubble"] == pytest.approx(table(row["schedule"], 8, costs))
        assert row["bubble"] == pytest.approx(row["table_bubble"])


def test_cli_table_names_a_schedule_that_refuses(capsys):
    assert cli.main(["--pp", "8", "--micro-batches", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    dual = next(line for line in lines if line.startswith("dualpipe "))
    assert "dualpipe needs at least 2 x PP = 16 micro-batches per step, got 10" in dual
    one_f = next(line for line in lines if line.startswith("1f1b"))
    bubble = table("1f1b", 8, Costs())
    assert one_f.split()[1:5] == ["8", f"{10 * 3 + bubble:g}", f"{bubble:g}", f"{bubble:g}"]


def read_png(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


def test_cli_png_draws_every_schedule(tmp_path, capsys):
    path = tmp_path / "timeline.png"
    assert cli.main(["--pp", "4", "--micro-batches", "8", "--png", str(path)]) == 0
    width, height, raw = read_png(path.read_bytes())
    assert height == (4 + 4 + 4 + 2) * cli.ROW + 5 * cli.GAP
    pixels = {raw[i:i + 3] for y in range(height) for i in range(y * (1 + 3 * width) + 1, (y + 1) * (1 + 3 * width), 3)}
    for kind in ("F", "B", "W", "BW"):
        assert bytes(cli.COLORS[kind]) in pixels, kind
    assert "-> " + str(path) in capsys.readouterr().err
