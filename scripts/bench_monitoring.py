"""Monitoring's cost on the tiny preset's CPU step time (issue 16).

    python scripts/bench_monitoring.py --rounds 5 --steps 60
    python scripts/bench_monitoring.py --blocks 20     # in one process, on/off every 10 steps

Runs dsv3-train in fresh processes, rotating three settings so that drift in the machine's load
hits all alike: `off` turns every sink off and logs once, at the last step; `default` logs every
10 steps to the console and metrics.jsonl (the defaults); `all` adds TensorBoard and wandb
(offline). Each run reports the wall time of its training loop (build and start-up excluded)
and, inside it, the seconds spent in the log phase and in the tracker's per-step update, the
loop's CPU time (every thread of the trainer: less sensitive than wall time to other jobs on a
shared machine) and the CPU time of the trainer's child processes (wandb's service); the script
prints each round's ratios to `off` and their medians. Two costs are timed apart, against
the step time: the heatmap
images (drawn once per `logging.heatmap_interval` steps, 500 by default), at the tiny run's
shapes and at DeepSeek-V3's (58 MoE layers x 256 experts); and the on-device counting that feeds
the metrics in both settings (routing entropy in the router, MTP top-1 hits).

`--blocks N` interleaves finer, for a machine shared with other jobs: one run with every sink on
alternates blocks of 10 steps with monitoring (the tracker's updates and the log phase at the
block's last step) and without (both skipped), N pairs, the order inside a pair alternating;
each pair's ratio compares two blocks run within seconds of each other.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "off": ["logging.console=false", "logging.jsonl=false", "logging.tensorboard=false", "logging.wandb=false",
            "logging.heatmap_interval=0"],
    "default": ["logging.interval=10", "logging.console=true", "logging.jsonl=true", "logging.heatmap_interval=0"],
    "all": ["logging.interval=10", "logging.console=true", "logging.jsonl=true", "logging.tensorboard=true",
            "logging.wandb=true", "logging.heatmap_interval=0"],
}
COMMON = ["train.device=cpu", "checkpoint.save_interval=0"]


def child(steps: int, overrides: list[str]) -> None:
    """One training run; prints {"loop_s": .., "log_s": .., "update_s": .., "steady_s_per_step": ..}
    as its last line: the loop from resume's end to the loop's end, the log phase and tracker
    updates inside it, and the time per step of the loop's second half (from the end of step
    steps/2 + 1: the same number of logging steps per step as a long run, and past the start-up
    work that wandb's service does beside the first steps)."""
    import psutil
    import torch

    from megatron_dsv3 import train
    from megatron_dsv3.monitor import ExpertLoadTracker

    torch.set_num_threads(1)
    marks = {"log_s": 0.0, "update_s": 0.0}
    resume, finish = train.Trainer.resume, train.Trainer.finish
    log, update = train.Trainer.log, ExpertLoadTracker.update

    def timed(function, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            marks[key] += time.perf_counter() - start
            return result
        return wrapper

    train.Trainer.log, ExpertLoadTracker.update = timed(log, "log_s"), timed(update, "update_s")
    step, step_ends = train.Trainer.train_step, []

    def timed_step(self):
        result = step(self)
        step_ends.append(time.perf_counter())
        return result

    train.Trainer.train_step = timed_step

    def timed_resume(self):
        resume(self)
        marks["start"], marks["cpu_start"] = time.perf_counter(), time.process_time()

    def timed_finish(self):
        marks["end"], marks["cpu_end"] = time.perf_counter(), time.process_time()
        helpers = psutil.Process().children(recursive=True)  # wandb's service, while it still runs
        marks["helpers_cpu_s"] = sum(sum(p.cpu_times()[:2]) for p in helpers if p.is_running())
        return finish(self)

    train.Trainer.resume, train.Trainer.finish = timed_resume, timed_finish
    if "logging.interval=10" not in overrides:
        overrides = overrides + [f"logging.interval={steps}"]
    code = train.main([f"train.steps={steps}", *overrides])
    assert code == 0, code
    half = steps // 2
    print(json.dumps({"loop_s": marks["end"] - marks["start"], "log_s": marks["log_s"], "update_s": marks["update_s"],
                      "steady_s_per_step": (marks["end"] - step_ends[half]) / (steps - half - 1),
                      "loop_cpu_s": marks["cpu_end"] - marks["cpu_start"], "helpers_cpu_s": marks["helpers_cpu_s"]}))


def block_child(pairs: int, overrides: list[str]) -> None:
    """One run of 20 x `pairs` steps + 20 warm-up steps; prints [[on_s, off_s], ...] per pair."""
    import torch

    from megatron_dsv3 import train
    from megatron_dsv3.monitor import ExpertLoadTracker

    torch.set_num_threads(1)
    step, log, update = train.Trainer.train_step, train.Trainer.log, ExpertLoadTracker.update
    starts, state = [], {"step": 0}

    def monitoring_on() -> bool:  # blocks of 10 steps; pair k runs (on, off) for even k, else (off, on)
        block = state["step"] // 10 - 2  # the first two blocks warm up, monitored
        return block < 0 or (block % 2 == 0) == ((block // 2) % 2 == 0)

    def timed_step(self):
        starts.append(time.perf_counter())
        state["step"] = self.step
        return step(self)

    def gated_log(self, *args):
        if monitoring_on():
            log(self, *args)

    def gated_update(self, *args, **kwargs):
        if monitoring_on():
            update(self, *args, **kwargs)

    train.Trainer.train_step, train.Trainer.log, ExpertLoadTracker.update = timed_step, gated_log, gated_update
    steps = 20 * pairs + 30  # warm-up, the pairs, and a last block whose start ends the last pair
    assert train.main([f"train.steps={steps}", *overrides]) == 0
    blocks = [starts[i + 10] - starts[i] for i in range(20, 20 + 20 * pairs, 10)]
    out = []
    for k in range(pairs):
        first, second = blocks[2 * k], blocks[2 * k + 1]
        out.append([first, second] if k % 2 == 0 else [second, first])  # [on, off]
    print(json.dumps(out))


def run_blocks(pairs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tmp, WANDB_CONFIG_DIR=tmp,
                   WANDB_CACHE_DIR=tmp, WANDB_DATA_DIR=tmp, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
        overrides = SETTINGS["all"] + COMMON + [f"checkpoint.dir={tmp}/run/checkpoints"]
        out = subprocess.run([sys.executable, __file__, "--block-child", str(pairs), *overrides], env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"block run failed:\n{out.stderr[-3000:]}")
    pairs_s = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = [on / off for on, off in pairs_s]
    for k, ((on, off), ratio) in enumerate(zip(pairs_s, ratios), 1):
        print(f"pair {k}: on {on / 10 * 1e3:.1f} ms/step, off {off / 10 * 1e3:.1f} ms/step, ratio {ratio:.4f}")
    print(json.dumps({
        "pairs": len(ratios), "median_ratio": statistics.median(ratios), "mean_ratio": statistics.mean(ratios),
        "stdev_ratio": statistics.stdev(ratios), "stderr_of_mean": statistics.stdev(ratios) / len(ratios) ** 0.5,
        "ratio_of_sums": sum(on for on, _ in pairs_s) / sum(off for _, off in pairs_s),
    }, indent=1))


def run_once(setting: str, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tmp, WANDB_CONFIG_DIR=tmp,
                   WANDB_CACHE_DIR=tmp, WANDB_DATA_DIR=tmp, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
        overrides = SETTINGS[setting] + COMMON + [f"checkpoint.dir={tmp}/run/checkpoints"]
        out = subprocess.run([sys.executable, __file__, "--child", str(steps), *overrides], env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{setting} run failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def counting_cost(repeats: int = 200) -> dict[str, float]:
    """Seconds per training step of the on-device counting, at the tiny run's shapes: the routing
    entropy of each MoE layer's [tokens, experts] affinities and MTP depth 1's top-1 hits."""
    import torch

    from megatron_dsv3.config import DSV3Config

    torch.set_num_threads(1)
    cfg = DSV3Config.preset("tiny")
    tokens = 8 * 128  # a micro-batch of the tiny run: 8 sequences of 128
    micro, moe_layers = 2, 3  # micro-batches per step (16 / 8); MoE layers 1, 2 and the MTP block's
    scores = torch.rand(tokens, cfg.num_routed_experts)
    logits = torch.randn(8, 128, cfg.vocab_size)
    target = torch.randint(0, cfg.vocab_size, (8, 128))
    entropy_sum, hits = torch.zeros(()), torch.zeros(4)

    def once():
        nonlocal entropy_sum
        for _ in range(moe_layers):
            p = scores / scores.sum(dim=-1, keepdim=True)
            entropy_sum -= (p * p.clamp_min(1e-30).log()).sum()
        valid = target != -100
        hits[2] += ((logits.argmax(dim=-1) == target) & valid).sum()

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        for _ in range(micro):
            once()
    return {"counting_s_per_step": (time.perf_counter() - start) / repeats}


def heatmap_cost(layers: int, experts: int, logged_steps: int = 200, repeats: int = 3) -> float:
    """Seconds to draw the three heatmaps of `layers` x `experts` with a load history of
    `logged_steps` columns (`MetricsLogger.heatmaps`)."""
    import torch

    from megatron_dsv3.monitor import ExpertLoadTracker, MetricsLogger

    tracker = ExpertLoadTracker(layers, experts)
    logger = MetricsLogger([], heatmap_interval=1)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, logged_steps + 1):
        for n in range(layers):
            tracker.update(n, torch.randint(0, 100, (experts,), generator=generator), torch.randn(experts) * 0.01)
        logger._remember(step, tracker, tracker.histograms(), "moe/")
        if step < logged_steps:
            tracker.reset()
    arrays = tracker.histograms()
    logger.heatmaps(logged_steps, tracker, arrays)  # warm matplotlib up
    start = time.perf_counter()
    for _ in range(repeats):
        logger.heatmaps(logged_steps, tracker, arrays)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--block-child":
        block_child(int(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=0, metavar="PAIRS",
                        help="instead: one run alternating 10-step blocks with and without monitoring")
    args = parser.parse_args()
    if args.blocks:
        run_blocks(args.blocks)
        return
    names = list(SETTINGS)
    ratios = {name: [] for name in names[1:]}
    steady = {name: [] for name in names[1:]}  # the same for the loops' second halves
    cpu = {name: [] for name in names[1:]}  # the loops' CPU time (all the trainer's threads), to off's
    helpers = {name: [] for name in names}  # CPU seconds of the trainer's child processes (wandb's service)
    times = {name: [] for name in names}
    inside = {name: [] for name in names}  # (log + update) / loop, measured inside each run
    for round_ in range(args.rounds):
        order = names[round_ % 3:] + names[:round_ % 3]  # rotate which goes first
        got = {name: run_once(name, args.steps) for name in order}
        for name, run in got.items():
            times[name].append(run["loop_s"] / args.steps)
            inside[name].append((run["log_s"] + run["update_s"]) / run["loop_s"])
        for name in ratios:
            ratios[name].append(got[name]["loop_s"] / got["off"]["loop_s"])
            steady[name].append(got[name]["steady_s_per_step"] / got["off"]["steady_s_per_step"])
            cpu[name].append(got[name]["loop_cpu_s"] / got["off"]["loop_cpu_s"])
        for name in names:
            helpers[name].append(got[name]["helpers_cpu_s"])
        print(f"round {round_ + 1}: " + ", ".join(
            f"{name} {got[name]['loop_s'] / args.steps * 1e3:.1f} ms/step ({inside[name][-1] * 100:.2f}% in log)"
            for name in names) + "; ratios " + ", ".join(f"{n} {r[-1]:.4f}" for n, r in ratios.items())
            + "; second half " + ", ".join(f"{n} {r[-1]:.4f}" for n, r in steady.items())
            + "; loop CPU " + ", ".join(f"{n} {r[-1]:.4f}" for n, r in cpu.items())
            + "; helper processes' CPU s " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in helpers.items()), flush=True)
    step_s = statistics.median(times["off"])
    counting = counting_cost()["counting_s_per_step"]
    draws = {"tiny 3x8": heatmap_cost(3, 8), "dsv3 58x256": heatmap_cost(58, 256)}
    print(json.dumps({
        "steps": args.steps, "rounds": args.rounds,
        "median_ratio_to_off": {n: statistics.median(r) for n, r in ratios.items()},
        "stdev_ratio_to_off": {n: statistics.stdev(r) if len(r) > 1 else None for n, r in ratios.items()},
        "median_second_half_ratio_to_off": {n: statistics.median(r) for n, r in steady.items()},
        "stdev_second_half_ratio_to_off": {n: statistics.stdev(r) if len(r) > 1 else None for n, r in steady.items()},
        "median_ms_per_step": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "median_fraction_in_log_and_update": {k: statistics.median(v) for k, v in inside.items()},
        "median_loop_cpu_ratio_to_off": {n: statistics.median(r) for n, r in cpu.items()},
        "stdev_loop_cpu_ratio_to_off": {n: statistics.stdev(r) if len(r) > 1 else None for n, r in cpu.items()},
        "median_helper_processes_cpu_s": {n: statistics.median(r) for n, r in helpers.items()},
        "counting_ms_per_step": counting * 1e3, "counting_fraction_of_step": counting / step_s,
        "heatmap_draw_s": draws,
        "heatmap_fraction_of_500_tiny_steps": {k: v / (500 * step_s) for k, v in draws.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
