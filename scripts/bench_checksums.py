"""What checkpoint checksums cost: a save with its manifest against the hashing in it, the
verification at load, and the same extrapolated to the 671B example's shard sizes.

    .venv/bin/python scripts/bench_checksums.py [--preset small] [--repeats 3] [--dir /tmp/bench_checksums]

One process (a one-rank process group), the preset's model with a local AdamW optimizer, saved by
`checkpoint.dist.save` (Megatron-Core's writer, then the SHA-256 of every file for
`manifest.json`, `manifest.THREADS` files at once). Timed per repeat: the whole save, the hashing
inside it (the same files hashed again right after, from the page cache as at save time), and
`checkpoint.dist.verify` (the load-time check). The 671B example (examples/671b-2048xh800.yaml) is extrapolated from the measured hashing
rate: its checkpoint bytes (`capacity.checkpoint_bytes` of its plan) over the ranks that write
them at save (distinct model shards: EP x PP x TP, the experts dominate) and over all ranks at
load (the files are dealt round-robin). Prints Markdown.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_dsv3.capacity import checkpoint_bytes  # noqa: E402
from megatron_dsv3.checkpoint import dist as ckpt, manifest  # noqa: E402
from megatron_dsv3.compat.megatron_checkpoint import signal_safe_checkpoint_writer  # noqa: E402
from megatron_dsv3.compat.megatron_cpu import cpu_shims  # noqa: E402
from megatron_dsv3.config import DSV3Config  # noqa: E402
from megatron_dsv3.model.gpt import build_model  # noqa: E402
from megatron_dsv3.optim import LocalOptimizer  # noqa: E402
from megatron_dsv3.plan import make_plan  # noqa: E402
from megatron_dsv3.run_config import load_run_config  # noqa: E402
from megatron_dsv3.train import init_distributed  # noqa: E402


def measure(preset: str, repeats: int, folder: Path) -> dict:
    model = build_model(DSV3Config.preset(preset))
    optimizer = LocalOptimizer(model, lr=1e-3)
    for states in optimizer.param_states().values():  # moments as after a step: non-zero bytes to hash
        for value in states.values():
            value.normal_()
    saves, hashes, verifies = [], [], []
    size = 0
    for repeat in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        path = ckpt.save(folder, repeat + 1, model, optimizer, {"step": repeat + 1, "optimizer_steps": 0,
                                                                 "consumed_samples": 0,
                                                                 "model_config": model.config.to_dict()}, keep=1)
        saves.append(time.perf_counter() - start)
        names = manifest.files_to_list(path)
        size = sum((path / name).stat().st_size for name in names)
        start = time.perf_counter()
        manifest.digests(path, names)  # as the save does (threads over the files)
        hashes.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert ckpt.verify(path) is None
        verifies.append(time.perf_counter() - start)
    return {"bytes": size, "save": statistics.median(saves), "hash": statistics.median(hashes),
            "verify": statistics.median(verifies)}


def extrapolate(rate: float) -> dict:
    run = load_run_config(ROOT / "examples" / "671b-2048xh800.yaml")
    world = run.launch.nodes * run.launch.gpus_per_node
    plan = make_plan(run, world, run.launch.gpus_per_node, cuda=True)
    total = checkpoint_bytes(plan)
    writers = plan.layout.expert * plan.layout.pipeline * plan.layout.tensor
    return {"total": total, "world": world, "writers": writers, "save_s": total / writers / rate,
            "load_s": total / world / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/bench_checksums")
    args = parser.parse_args()
    torch.manual_seed(0)
    init_distributed("cpu")
    try:
        with cpu_shims(), signal_safe_checkpoint_writer():
            got = measure(args.preset, args.repeats, Path(args.dir))
    finally:
        dist.destroy_process_group()
        shutil.rmtree(args.dir, ignore_errors=True)
    rate = got["bytes"] / got["hash"]
    big = extrapolate(rate)
    gib = 2**30
    print(f"| preset | checkpoint | save with manifest | of it hashing | hash rate | verify at load |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.preset} | {got['bytes'] / gib:.2f} GiB | {got['save']:.2f} s | {got['hash']:.2f} s "
          f"({got['hash'] / got['save']:.0%}) | {rate / 1e9:.2f} GB/s | {got['verify']:.2f} s |")
    print()
    print(f"671B example: {big['total'] / 1e12:.2f} TB per checkpoint; at save {big['writers']} writer ranks hash "
          f"{big['total'] / big['writers'] / gib:.1f} GiB each in parallel: {big['save_s']:.1f} s; at load "
          f"{big['world']} ranks verify {big['total'] / big['world'] / gib:.1f} GiB each: {big['load_s']:.1f} s "
          f"(at {rate / 1e9:.2f} GB/s per rank, from the page cache)")


if __name__ == "__main__":
    main()
