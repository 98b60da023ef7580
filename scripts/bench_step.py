"""Training-step speed on CPU (issue 17): against transformers, against the GEMM ceiling, under imbalance.

    python scripts/bench_step.py step --preset tiny       # tokens/s vs transformers' DeepseekV3 + FLOP/s
    python scripts/bench_step.py step --preset small
    python scripts/bench_step.py imbalance                # MoE layer at MaxVio 0, 1, 3: padded vs segments
    python scripts/bench_step.py compile                  # torch.compile of the decoder layers vs eager

`step`: one training step (forward, backward, torch AdamW) of our model and of transformers'
DeepseekV3ForCausalLM with the same architecture and weights, fp32, MTP and the sequence-wise loss
off (transformers has neither), on the preset's benchmark batch. Every transformers configuration
(attention sdpa with grouped_mm or eager-loop experts, and eager attention with grouped_mm) is timed and the fastest
is the baseline. Our step's FLOPs are counted analytically (`step_flops`) and divided by its time;
the ceiling is torch.mm's FP32 GFLOP/s at the step's largest GEMM shapes (forward, input- and
weight-gradient forms), measured in the same run. All contenders are interleaved in every repeat;
medians and spreads (min-max) are printed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

BENCH_SHAPES = {"tiny": (4, 256), "small": (8, 256)}  # (batch, seq) per preset: the fixed benchmark batch


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):.4f} ({min(times):.4f}-{max(times):.4f})"


def interleave(contenders: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return times


# ------------------------------------------------------------------------------ FLOPs
def step_flops(config, batch: int, seq: int) -> tuple[float, list[tuple[int, int, int]]]:
    """FLOPs of forward + backward (3x the forward's GEMMs) and the GEMM shapes (M, N, K) of the
    forward, without MTP. Attention counts the causal half of QK^T and PV."""
    tokens = batch * seq
    h, heads = config.hidden_size, config.num_attention_heads
    gemms = []  # (M, N, K) with multiplicity folded into M
    q_out = heads * config.qk_head_dim
    for layer in range(config.num_layers):
        if config.q_lora_rank:
            gemms += [(tokens, config.q_lora_rank, h), (tokens, q_out, config.q_lora_rank)]
        else:
            gemms.append((tokens, q_out, h))
        gemms += [(tokens, config.kv_lora_rank + config.qk_rope_head_dim, h),
                  (tokens, heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank),
                  (tokens, h, heads * config.v_head_dim)]
        if config.is_moe_layer(layer):
            shared = config.num_shared_experts * config.moe_ffn_hidden_size
            routed = tokens * config.num_experts_per_token
            gemms += [(tokens, config.num_routed_experts, h), (tokens, 2 * shared, h), (tokens, h, shared),
                      (routed, 2 * config.moe_ffn_hidden_size, h), (routed, h, config.moe_ffn_hidden_size)]
        else:
            gemms += [(tokens, 2 * config.dense_ffn_hidden_size, h), (tokens, h, config.dense_ffn_hidden_size)]
    gemms.append((tokens, config.vocab_size, h))
    linear = sum(2 * m * n * k for m, n, k in gemms)
    pairs = batch * seq * (seq + 1) / 2
    attention = config.num_layers * 2 * pairs * heads * (config.qk_head_dim + config.v_head_dim)
    return 3 * (linear + attention), gemms


def gemm_ceiling_probes(config, batch: int, seq: int, top: int = 3, calls: int = 5) -> dict:
    """torch.mm at the `top` largest forward GEMMs of the step, in its three forms each, `calls`
    back-to-back calls per probe: name -> (FLOPs, fn)."""
    _, gemms = step_flops(config, batch, seq)
    probes = {}
    for m, n, k in sorted(set(gemms), key=lambda s: -s[0] * s[1] * s[2])[:top]:
        a, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        for name, lhs, rhs in ((f"fwd {m}x{n}x{k}", a, w.t()), (f"dgrad {m}x{k}x{n}", dy, w),
                               (f"wgrad {n}x{k}x{m}", dy.t(), a)):
            probes[name] = (calls * 2 * m * n * k, lambda lhs=lhs, rhs=rhs: [torch.mm(lhs, rhs) for _ in range(calls)])
    return probes


# ------------------------------------------------------------------------------ step
def run_step(args) -> None:
    from transformers import DeepseekV3ForCausalLM

    from megatron_dsv3 import DSV3Config, build_model
    from megatron_dsv3.convert.hf import export_hf_weights

    batch, seq = BENCH_SHAPES[args.preset]
    config = DSV3Config.preset(args.preset, mtp_num_modules=0, seq_aux_loss_coeff=0.0)
    ours = build_model(config, seed=0).train()
    weights = export_hf_weights(ours, fused_experts=True)

    def hf(attention: str, experts: str):
        model = DeepseekV3ForCausalLM._from_config(config.to_hf(), attn_implementation=attention, dtype=torch.float32)
        model.config._experts_implementation = experts
        model.load_state_dict(weights, strict=True)
        return model.train()

    stream = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = stream[:, :-1], stream[:, 1:]

    def trainer(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            optimizer.zero_grad(set_to_none=True)
            forward(model).backward()
            optimizer.step()
        return step

    contenders = {"megatron_dsv3": trainer(ours, lambda m: m(inputs, labels=labels).loss)}
    # batched_mm, transformers' third expert implementation, gathers a weight copy per routed token
    # (about 10 GB on small; 10x slower than grouped_mm on tiny in a trial): left out.
    for attention, experts in [("sdpa", "grouped_mm"), ("sdpa", "eager"), ("eager", "grouped_mm")]:
        contenders[f"transformers ({attention}, {experts} experts)"] = trainer(
            hf(attention, experts), lambda m: m(input_ids=inputs, labels=labels).loss)
    probes = gemm_ceiling_probes(config, batch, seq)
    for name, (_, fn) in probes.items():
        contenders[f"mm {name}"] = fn

    load = os.getloadavg()[0]
    times = interleave(contenders, args.repeats, args.warmup)
    tokens = batch * seq
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{machine()}; 1-min load average {load:.1f} before, {os.getloadavg()[0]:.1f} after (shared machine)")
    print(f"{args.preset} preset, fp32, batch {batch} x seq {seq}, forward+backward+AdamW, MTP off, "
          f"median (min-max) of {args.repeats} interleaved repeats\n")
    print("| model | s/step | tokens/s | ours / this |\n|---|---|---|---|")
    ours_tps = tokens / median["megatron_dsv3"]
    hf_names = [n for n in times if n.startswith("transformers")]
    for name in ["megatron_dsv3"] + sorted(hf_names, key=median.get):
        print(f"| {name} | {summary(times[name])} | {tokens / median[name]:,.0f} | "
              f"{ours_tps / (tokens / median[name]):.2f}x |")
    fastest = min(hf_names, key=median.get)
    print(f"\nvs the fastest transformers configuration ({fastest}): {median[fastest] / median['megatron_dsv3']:.2f}x")

    flops, _ = step_flops(config, batch, seq)
    achieved = flops / median["megatron_dsv3"] / 1e9
    print(f"\nStep FLOPs (analytic, fwd+bwd, causal attention): {flops / 1e9:.1f} GFLOP; "
          f"achieved {achieved:.1f} GFLOP/s\n")
    print("| torch.mm FP32 at the step's largest GEMMs (5 calls) | s | GFLOP/s |\n|---|---|---|")
    ceiling = 0.0
    for name, (gemm_flops, _) in probes.items():
        rate = gemm_flops / median[f"mm {name}"] / 1e9
        ceiling = max(ceiling, rate)
        print(f"| {name} | {summary(times[f'mm {name}'])} | {rate:.1f} |")
    print(f"\nachieved / ceiling ({ceiling:.1f} GFLOP/s): {achieved / ceiling:.0%}")


# ------------------------------------------------------------------------------ imbalance
def max_vio(layer, x) -> float:
    with torch.no_grad():
        ids = layer.router.select(torch.sigmoid(x.flatten(0, 1) @ layer.router.weight.t()))
    load = torch.bincount(ids.flatten(), minlength=layer.router.weight.shape[0]).float()
    return float(load.max() / load.mean() - 1)


def force_max_vio(layer, x, target: float) -> float:
    """Set the routing bias so this batch's MaxVio is close to `target`: the aux-loss-free update
    (b += gamma * sign(mean - load)) with a shrinking gamma balances it, then expert 0's bias is
    bisected until its load is (1 + target) x the mean. Returns the MaxVio reached."""
    bias = layer.router.expert_bias
    bias.zero_()
    with torch.no_grad():
        scores = torch.sigmoid(x.flatten(0, 1) @ layer.router.weight.t())
        for i in range(400):
            load = torch.bincount(layer.router.select(scores).flatten(), minlength=bias.numel()).float()
            bias += 0.02 * 0.99 ** i * torch.sign(load.mean() - load)
        if target > 0:
            low, high = 0.0, 4.0
            for _ in range(40):
                bias[0] = (low + high) / 2
                load = torch.bincount(layer.router.select(scores).flatten(), minlength=bias.numel()).float()
                low, high = (bias[0].item(), high) if load[0] / load.mean() - 1 < target else (low, bias[0].item())
    return max_vio(layer, x)


def moe_layer(target: float, padded: bool):
    from megatron_dsv3 import DSV3Config
    from megatron_dsv3.model.moe.layer import DeepSeekMoE

    config = DSV3Config.preset("small", seq_aux_loss_coeff=0.0)
    torch.manual_seed(0)
    layer = DeepSeekMoE(config, layer_number=1).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=config.init_std)
    batch, seq = BENCH_SHAPES["small"]
    x = torch.randn(batch, seq, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    reached = force_max_vio(layer, x, target)
    if padded:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_experts_grouped import padded_reference  # the pre-issue-17 experts, padded to the largest count

        layer.experts.forward = types.MethodType(padded_reference, layer.experts)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
    return step, reached


def peak_bytes(fn) -> int:
    """Peak bytes of the tensors `fn()` allocates beyond those alive before it (torch.profiler's
    memory timeline: creations minus destructions, in order)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, current)
    return peak


def run_imbalance(args) -> None:
    targets = (0.0, 1.0, 3.0)
    contenders, reached = {}, {}
    for target in targets:
        for padded in (True, False):
            contenders[(target, padded)], reached[target] = moe_layer(target, padded)
    load = os.getloadavg()[0]
    times = interleave(contenders, args.repeats, args.warmup)
    peaks = {key: peak_bytes(fn) / 2**20 for key, fn in contenders.items()}  # deterministic: once
    print(f"{machine()}; 1-min load average {load:.1f} before, {os.getloadavg()[0]:.1f} after (shared machine)")
    batch, seq = BENCH_SHAPES["small"]
    print(f"DeepSeekMoE layer of the small preset (64 experts, top-6, 2 shared), {batch} x {seq} tokens, fp32, "
          f"forward+backward; median (min-max) of {args.repeats} interleaved repeats; peak = the most bytes of "
          f"tensors alive at once that the step allocated (torch.profiler memory timeline)\n")
    print("| MaxVio (reached) | padded s | segments s | padded / segments | padded peak MiB | segments peak MiB |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(times[(0.0, False)])
    for target in targets:
        pad, seg = times[(target, True)], times[(target, False)]
        print(f"| {target:g} ({reached[target]:.2f}) | {summary(pad)} | {summary(seg)} | "
              f"{statistics.median(pad) / statistics.median(seg):.2f}x | "
              f"{peaks[(target, True)]:.0f} | {peaks[(target, False)]:.0f} |")
    print(f"\nsegments at MaxVio 3 / segments at MaxVio 0: {statistics.median(times[(3.0, False)]) / base:.2f}x; "
          f"padded: {statistics.median(times[(3.0, True)]) / statistics.median(times[(0.0, True)]):.2f}x")


# ------------------------------------------------------------------------------ compile
def run_compile(args) -> None:
    from megatron_dsv3 import DSV3Config, build_model

    batch, seq = BENCH_SHAPES["small"]
    config = DSV3Config.preset("small")
    stream = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    models = {"eager": build_model(config, seed=0).train(), "compiled": build_model(config, seed=0).train()}
    for name, layer in models["compiled"].layers.items():
        models["compiled"].layers[name] = torch.compile(layer)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(stream[:, :-1], labels=stream[:, 1:]).loss.backward()
        return run

    first = {}
    for name, model in models.items():
        seconds = timed(step(model))
        first[name] = (seconds, {n.replace("._orig_mod", ""): p.grad.clone() for n, p in model.named_parameters()})
        print(f"first step, {name}: {seconds:.2f} s", flush=True)
    worst = max(float((first["compiled"][1][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                for n, g in first["eager"][1].items())
    times = interleave({name: step(model) for name, model in models.items()}, args.repeats, args.warmup)
    print(f"{machine()}; small preset, {batch} x {seq}, forward+backward")
    print(f"first step: eager {first['eager'][0]:.2f} s, compiled {first['compiled'][0]:.2f} s (compilation); "
          f"largest gradient difference relative to the tensor's max: {worst:.2e}")
    for name, t in times.items():
        print(f"{name}: {summary(t)} s/step")
    print(f"compiled / eager: {statistics.median(times['compiled']) / statistics.median(times['eager']):.2f}x time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("step", "imbalance", "compile"))
    parser.add_argument("--preset", choices=tuple(BENCH_SHAPES), default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"step": run_step, "imbalance": run_imbalance, "compile": run_compile}[args.mode](args)


if __name__ == "__main__":
    main()
