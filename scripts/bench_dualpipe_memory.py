"""Activation bytes per pipeline rank under DualPipe and DualPipeV (issue 24), measured on gloo.

One training step of the tiny model (8 layers, MoE and MTP on, 8 micro-batches of 1 x 16 tokens)
per schedule and pipeline size, through tests/helpers/parallel_worker.py's `activations` scenario:
what autograd saves plus what the executor holds (outputs until sent, deferred W's stores), per
storage (tests/helpers/activation_memory.py). Printed per rank: the simulator's micro-batches in
flight, one micro-batch's bytes on the rank's larger stage, their product (the bound the test
checks), the peak, and the largest total held as a deferred W starts. With `--before TREE` (a
checkout of an earlier commit) the same worker runs that tree's package first, in the same run.

    .venv/bin/python scripts/bench_dualpipe_memory.py --before /tmp/dual_before
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megatron_dsv3.pipeline.dualpipe import DUALPIPE, DUALPIPEV

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "parallel_worker.py"
CASES = ((DUALPIPE.name, 2), (DUALPIPEV.name, 2), (DUALPIPE.name, 4), (DUALPIPEV.name, 4))
LAYERS = "8"


def run(tree: Path, world: int, argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    from distributed import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DSV3_DIST_TIMEOUT": "300", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *argv], env=env, cwd=tree,
                                      stdout=subprocess.DEVNULL))
    if any(p.wait() for p in procs):
        raise SystemExit(f"{argv} failed on {tree}")


def measure(tree: Path, schedule: str, pipeline: int, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    run(tree, 1, ["step", str(out), "--write-state", "--layers", LAYERS])
    run(tree, pipeline, ["activations", str(out), "--pipeline", str(pipeline), "--schedule", schedule,
                         "--layers", LAYERS, "--micro", "1"])
    return [torch.load(out / f"activations{r}.pt") for r in range(pipeline)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an earlier checkout, measured with the same worker")
    args = parser.parse_args()
    trees = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    kib = lambda n: f"{n / 1024:.0f}"  # noqa: E731
    print("| schedule | PP | rank | in flight | one micro-batch KiB | bound KiB | "
          + " | ".join(f"peak {t} KiB" for t in trees) + (" | peak after/before" if args.before else "")
          + " | " + " | ".join(f"largest at a W, {t} KiB" for t in trees) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        for schedule, pipeline in CASES:
            results = {name: measure(tree, schedule, pipeline, Path(tmp) / f"{name}-{schedule}{pipeline}")
                       for name, tree in trees.items()}
            for rank, after in enumerate(results["after"]):
                one = max(after["per_stage"].values())
                peaks = [results[t][rank]["peak"] for t in trees]
                at_w = [max(results[t][rank]["at_w"], default=0) for t in trees]
                ratio = f" | {peaks[0] / peaks[1]:.3f}" if args.before else ""
                print(f"| {schedule} | {pipeline} | {rank} | {after['in_flight']} | {kib(one)} | "
                      f"{kib(after['in_flight'] * one)} | " + " | ".join(map(kib, peaks)) + ratio + " | "
                      + " | ".join(map(kib, at_w)) + " |", flush=True)


if __name__ == "__main__":
    main()
