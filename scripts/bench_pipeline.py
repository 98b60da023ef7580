"""Pipeline schedules on gloo with synthetic stages of fixed cost, beside the simulator.

    .venv/bin/python scripts/bench_pipeline.py --ranks 4 --micro-batches 8 --f-ms 20 --repeats 3

Every registered schedule with operation lists (1F1B, ZB1P, DualPipe, DualPipeV) runs through the
runtime of dsv3-train's DualPipe (`pipeline.dualpipe.run_ops`: the operation lists of the
schedule's descriptor, Megatron-Core's p2p) on `--ranks` local gloo processes. A stage sleeps for
its cost instead of computing (F = f, input gradient B - W = f, W = f, so B = 2f; an F&B pair runs
in order, F + B, as on CPU), so the numbers do not depend on the shared cores, and holds an
activation of `--act-kib` KiB from its forward until its input gradient. The model is the same
for all: 1F1B, ZB1P and DualPipe cut it in `ranks` stages, DualPipeV in 2 x ranks stages of half
the cost (a stage costs f x ranks / the schedule's stages). Prints per rank the measured idle
time (step time minus the rank's busy time: the time of its ops less what they waited for
messages; median over the repeats) beside the simulator's bubble for the same operation list with the op costs as
measured and the measured p2p latency, and the peak activation bytes beside the simulator's peak
in-flight count x the activation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class SleepStage:
    """A stage of fixed cost: sleeps, sends a small tensor on, holds `act_bytes` until its B."""

    def __init__(self, f: float, act_bytes: int, tracker: dict):
        import torch

        self.torch, self.f, self.act_bytes, self.tracker = torch, f, act_bytes, tracker
        self.held: dict[int, object] = {}

    def forward(self, mb, x):
        time.sleep(self.f)
        self.held[mb] = self.torch.empty(self.act_bytes, dtype=self.torch.uint8)
        self.tracker["bytes"] += self.act_bytes
        self.tracker["peak"] = max(self.tracker["peak"], self.tracker["bytes"])
        return self.torch.zeros(4)

    def backward(self, mb, grad, split):
        time.sleep(self.f if split else 2 * self.f)
        del self.held[mb]
        self.tracker["bytes"] -= self.act_bytes
        return self.torch.zeros(4)

    def weight_grad(self, mb):
        time.sleep(self.f)


class OpClock:
    """`run_ops`' per-op hook: an op's cost is its wall time minus the time it waited for a message
    (what a rank spends on the op itself: the stage, the runtime's Python, posting its sends)."""

    def __init__(self, transport):
        self.transport, self.last, self.waited_before = transport, 0.0, 0.0
        self.busy, self.costs = 0.0, {}

    def __call__(self, op) -> None:
        now = time.time()
        cost = now - self.last - (self.transport.waited - self.waited_before)
        self.last, self.waited_before = now, self.transport.waited
        self.busy += cost
        self.costs.setdefault(op.kind, []).append(cost)


def timed_transport():
    from megatron_dsv3.pipeline.dualpipe import Transport

    class Timed(Transport):
        waited = 0.0

        def post(self, key, src):
            arrive = super().post(key, src)

            def timed_arrive():
                start = time.time()
                try:
                    return arrive()
                finally:
                    self.waited += time.time() - start

            return timed_arrive

    return Timed


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_dsv3.cli.schedule import simulated
    from megatron_dsv3.parallel import comm, groups, initialize_parallel
    from megatron_dsv3.pipeline import simulate
    from megatron_dsv3.pipeline.dualpipe import run_ops

    TimedTransport = timed_transport()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    initialize_parallel(1, args.ranks, 1)
    rank, pp = groups.rank(groups.pp_group()), args.ranks
    f = args.f_ms / 1000
    plans = {s.name: (s.op_lists(pp, args.micro_batches), f * pp / s.num_stages(pp)) for s in simulated()}
    latency = p2p_latency(rank)
    results = {}
    for name, (schedule, cost) in plans.items():
        idles, peaks, durations = [], [], {}
        for _ in range(args.repeats):
            tracker = {"bytes": 0, "peak": 0}
            stages = {s for op in schedule.ranks[rank] for _, s in op.micro_stages}
            runners = {s: SleepStage(cost, args.act_kib * 1024, tracker) for s in stages}
            transport = TimedTransport(schedule, rank, groups.pp_group(), (4,), torch.float32, torch.device("cpu"))
            clock = OpClock(transport)
            comm.barrier(groups.pp_group())
            start = clock.last = time.time()
            run_ops(schedule, rank, runners, transport, on_op=clock)
            end = time.time()
            spans = comm.all_gather_object((start, end), groups.pp_group())
            step = max(e for _, e in spans) - min(s for s, _ in spans)
            idles.append(step - clock.busy)
            peaks.append(tracker["peak"])
            for kind, took in clock.costs.items():
                durations.setdefault(kind, []).extend(took)
        # the simulator with the op costs as measured (sleep, its overshoot and the runtime's own work), F&B in order
        every = comm.all_gather_object(durations, groups.pp_group())
        mean = {k: statistics.mean([t for d in every for t in d.get(k, [])] or [0.0]) for k in ("F", "B", "BW", "W")}
        w = mean["W"] or cost
        b = mean["BW"] or (mean["B"] + w)
        costs = simulate.Costs(f=mean["F"], b=b, w=min(w, b), fb=mean["F"] + b, p2p=latency)
        predicted = simulate.summarize(simulate.without_overlap(schedule), costs)
        results[name] = {"idle_s": statistics.median(idles), "predicted_idle_s": predicted["bubble_per_rank"][rank],
                         "peak_bytes": max(peaks),
                         "predicted_peak_bytes": predicted["peak_activations_per_rank"][rank] * args.act_kib * 1024}
    results["p2p_latency_s"] = latency
    everything = comm.all_gather_object(results, groups.pp_group())
    if rank == 0:
        print(json.dumps(everything) if args.json else format_table(everything))
    dist.destroy_process_group()


def p2p_latency(rank: int, rounds: int = 20) -> float:
    """One-way time of a small message between pipeline ranks 0 and 1 (half a round trip, median),
    through the runtime's p2p; every rank gets it, for the simulator's `p2p` cost."""
    import torch

    from megatron_dsv3.parallel import comm, groups
    from megatron_dsv3.pipeline import simulate
    from megatron_dsv3.pipeline.dualpipe import Transport

    schedule = simulate.one_f_one_b(2, 1)  # any schedule: only its pipeline group and p2p are used
    samples = []
    if rank < 2:
        transport = Transport(schedule, rank, groups.pp_group(), (4,), torch.float32, torch.device("cpu"))
        buffer = torch.zeros(4)
        for _ in range(rounds):
            start = time.perf_counter()
            if rank == 0:
                for request in transport._p2p(1, send=buffer):
                    request.wait()
                for request in transport._p2p(1, recv=buffer):
                    request.wait()
            else:
                for request in transport._p2p(0, recv=buffer):
                    request.wait()
                for request in transport._p2p(0, send=buffer):
                    request.wait()
            samples.append((time.perf_counter() - start) / 2)
    measured = comm.all_gather_object(statistics.median(samples) if samples else None, groups.pp_group())[0]
    return float(measured)


def format_table(per_rank: list[dict]) -> str:
    lines = [f"p2p latency {per_rank[0]['p2p_latency_s'] * 1e3:.2f} ms (in the simulation)",
             "schedule   rank  idle ms (measured / simulated, ratio)  peak activation KiB (measured / simulated)"]
    for name in [k for k in per_rank[0] if k != "p2p_latency_s"]:
        for rank, results in enumerate(per_rank):
            r = results[name]
            ratio = r["idle_s"] / r["predicted_idle_s"] if r["predicted_idle_s"] else float("nan")
            lines.append(f"{name:10s} {rank:4d}  {r['idle_s'] * 1e3:8.1f} / {r['predicted_idle_s'] * 1e3:8.1f}  "
                         f"({ratio:5.3f})             {r['peak_bytes'] / 1024:8.0f} / {r['predicted_peak_bytes'] / 1024:8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--f-ms", type=float, default=20.0, help="forward cost of one stage of PP (1F1B, DualPipe)")
    parser.add_argument("--act-kib", type=int, default=256, help="activation one stage holds per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], cwd=ROOT, env={
        **os.environ, "RANK": str(r), "WORLD_SIZE": str(args.ranks), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        for r in range(args.ranks)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
