"""Recomputation modes on the tiny preset (BENCHMARKS.md): bytes kept for backward and
forward+backward time of none / selective / full, timed interleaved in one process.

    .venv/bin/python examples/bench_recompute.py --threads 2 --repeats 15
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_dsv3 import DSV3Config, build_model
from megatron_dsv3.monitor.activations import bytes_kept_for_backward

MODES = ("none", "selective", "full")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = DSV3Config.preset("tiny")
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    models = {mode: build_model(config, seed=0).train() for mode in MODES}
    kept, seconds = {}, {mode: [] for mode in MODES}
    for mode, model in models.items():
        model.recompute = mode
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for mode, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out, kept[mode] = bytes_kept_for_backward(model, lambda: model(tokens[:, :-1], labels=tokens[:, 1:]))
            out.loss.backward()
            if repeat:
                seconds[mode].append(time.perf_counter() - start)
    print(f"tiny, batch {args.batch} x {args.seq}, {args.threads} threads, median of {args.repeats}")
    print("| recompute | bytes kept for backward | vs none | fwd+bwd ms | vs none |")
    print("|---|---|---|---|---|")
    base_ms = statistics.median(seconds["none"]) * 1e3
    for mode in MODES:
        ms = statistics.median(seconds[mode]) * 1e3
        print(f"| {mode} | {kept[mode] / 2**20:.1f} MiB | {kept[mode] / kept['none']:.2f}x | {ms:.1f} | "
              f"{ms / base_ms:.2f}x |")


if __name__ == "__main__":
    main()
