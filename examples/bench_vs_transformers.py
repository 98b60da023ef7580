"""Forward+backward throughput of our model vs transformers' DeepseekV3ForCausalLM on CPU.

Same architecture (DSV3Config.preset("tiny") -> to_hf()), same weights (ours exported into
transformers), same batch, fp32, training mode. MTP off in both (transformers has none) and
no sequence-wise balance loss (transformers has none), so both compute LM loss only.
Each repeat times one step of every contender in turn (interleaved), and the median is kept.

    python examples/bench_vs_transformers.py --threads 2 --repeats 15
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DeepseekV3ForCausalLM

    from megatron_dsv3 import DSV3Config, build_model
    from megatron_dsv3.convert.hf import export_hf_weights

    config = DSV3Config.preset("tiny", mtp_num_modules=0, seq_aux_loss_coeff=0.0)
    ours = build_model(config, seed=0).train()
    weights = export_hf_weights(ours, fused_experts=True)

    def hf(experts: str):
        model = DeepseekV3ForCausalLM._from_config(config.to_hf(), attn_implementation="sdpa", dtype=torch.float32)
        model.config._experts_implementation = experts
        model.load_state_dict(weights, strict=True)
        return model.train()

    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=g)
    inputs, labels = stream[:, :-1], stream[:, 1:]
    hf_default, hf_eager = hf("grouped_mm"), hf("eager")

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(inputs, labels=labels).loss.backward()

    def step_hf(model):
        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=inputs, labels=labels).loss.backward()  # shift inside: same targets as ours
        return step

    contenders = {
        "megatron_dsv3": step_ours,
        "transformers (sdpa, grouped_mm experts)": step_hf(hf_default),
        "transformers (sdpa, eager expert loop)": step_hf(hf_eager),
    }
    times = {name: [] for name in contenders}
    load_before = os.getloadavg()[0]
    for _ in range(args.warmup):
        for step in contenders.values():
            step()
    for _ in range(args.repeats):
        for name, step in contenders.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    tokens = args.batch * args.seq
    medians = {name: statistics.median(t) for name, t in times.items()}
    ours_tps = tokens / medians["megatron_dsv3"]
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {args.threads}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work shares the CPU)")
    print(f"tiny preset, fp32, batch {args.batch} x seq {args.seq}, forward+backward, MTP off, "
          f"median of {args.repeats} interleaved repeats")
    print("| model | median s/step | tokens/s | ours / this |")
    print("|---|---|---|---|")
    for name, median in medians.items():
        tps = tokens / median
        print(f"| {name} | {median:.4f} | {tps:,.0f} | {ours_tps / tps:.2f}x |")


if __name__ == "__main__":
    main()
