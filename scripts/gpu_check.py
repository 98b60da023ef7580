"""Acceptance checks on a GPU machine, or at toy sizes on CPU (`--smoke`); driven by gpu_check.sh.

Writes OUT_DIR/gpu_check.json with one entry per section and exits 1 if any section failed:
  gpu_tests    the `gpu`-marked tests (pytest -m gpu)
  gemm         FP8 tile GEMM TFLOP/s against BF16 at 4096^3, 8192^3 and a DeepSeek-V3 expert shape,
               for each backend present (quantisation of the operands not timed, then timed)
  train        one-process dsv3-train of a ~1B DeepSeek-V3-shaped proxy in BF16 and FP8 tile:
               tokens/s, MFU, peak memory, share of expert GEMM rows that ran on an FP8 kernel
  collectives  the trainer's collectives over a 1-process group (NCCL; gloo in --smoke) with the
               size-1 shortcuts bypassed, so each collective really runs

MFU counts model FLOPs per token = 6 x (active parameters minus the input embedding, plus each
MTP module's active block and its use of the shared output head) + the attention score and
context matmuls, 3 x 2 x seq/2 x heads x (qk_head_dim + v_head_dim) per layer (causal: half
the keys on average), against the BF16 dense peak of the GPU (H100/H200/H800: 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 280  # the whole check; every subprocess gets what is left of it, so the JSON is always written
_deadline = {"at": time.monotonic() + BUDGET_S}


def _time_left(cap_s: float) -> float:
    """Timeout for the next subprocess: at most cap_s, never past the check's deadline."""
    return max(1.0, min(cap_s, _deadline["at"] - time.monotonic() - 5))
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0}
PROXY_1B = {"model.preset": "deepseek-v3-lite", "model.overrides.num_layers": 4,
            "model.overrides.num_routed_experts": 16}  # 1.01e9 parameters, 0.75e9 active, plus one MTP module
TOY = {"model.preset": "tiny", "model.overrides.num_layers": 2}
EXPERT_GEMM_671B = (4096, 4096, 7168)  # M tokens, N = 2 x moe_ffn (gate and up), K = hidden


# ---------------------------------------------------------------------------------------------- GEMMs

def _time_s(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call, after one warm-up call (CUDA: event timing, one sync at the end)."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    start_s = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start_s) / repeats


@torch.no_grad()
def gemm_section(device: torch.device, smoke: bool) -> dict:
    from megatron_dsv3.fp8 import backends, quantize_blocks, quantize_tiles, scaled_gemm

    shapes = {"toy_256": (256, 256, 256)} if smoke else {
        "4096^3": (4096, 4096, 4096), "8192^3": (8192, 8192, 8192), "dsv3_expert_gate_up": EXPERT_GEMM_671B}
    repeats = 2 if smoke else 20
    kernel_ok = device.type == "cuda" and backends._scaled_mm_ok()
    results = {}
    for label, (M, N, K) in shapes.items():
        flops = 2 * M * N * K
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        b = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        bf16_s = _time_s(lambda: a @ b.t(), device, repeats)
        entry = {"M": M, "N": N, "K": K, "bf16_tflops": flops / bf16_s / 1e12}
        (qa, sa), (qb, sb) = quantize_tiles(a), quantize_blocks(b)
        candidates = {"emulation": lambda: backends.fp8_gemm(qa, sa, qb, sb)} if not kernel_ok else {
            "torch-scaled-mm": lambda: backends._scaled_mm_blockwise(qa, sa, qb, sb)}
        candidates["quantise+gemm"] = lambda: scaled_gemm(*quantize_tiles(a), *quantize_blocks(b))
        if device.type == "cuda" and backends._te_version() is not None:
            te_linear = backends.te_linear_sharing(torch.nn.Parameter(b), None)

            def te_forward():
                with backends.te_fp8_autocast():
                    return te_linear(a)
            candidates["transformer-engine"] = te_forward
        for name, fn in candidates.items():
            seconds = _time_s(fn, device, repeats)
            entry[f"{name}_tflops"] = flops / seconds / 1e12
            entry[f"{name}_vs_bf16"] = bf16_s / seconds
        results[label] = entry
    return {"ok": True, "kernel": "torch-scaled-mm" if kernel_ok else "emulation", "shapes": results}


# ---------------------------------------------------------------------------------------------- training

def flops_per_token(config, seq: int) -> float:
    """Model FLOPs of one training token (forward + backward), as the module docstring counts them."""
    from megatron_dsv3.memory import count_params

    counts = count_params(config)
    h, ffn = config.hidden_size, config.moe_ffn_hidden_size
    idle_experts = (config.num_routed_experts - config.num_experts_per_token) * 3 * h * ffn
    mtp_active = counts.mtp_module - (idle_experts if config.num_moe_layers else 0) + config.vocab_size * h
    matmul_params = counts.active - counts.embedding + config.mtp_num_modules * mtp_active
    attention = 3 * 2 * (seq / 2) * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    return 6 * matmul_params + attention * (config.num_layers + config.mtp_num_modules)


def _train_overrides(out: Path, name: str, smoke: bool, fp8: bool) -> list[str]:
    model = TOY if smoke else PROXY_1B
    train = {"train.steps": 3 if smoke else 30, "train.seq_length": 128 if smoke else 1024,
             "train.micro_batch_size": 2 if smoke else 4, "train.global_batch_size": 2 if smoke else 4,
             "train.warmup_steps": 1 if smoke else 5, "train.bf16": not smoke, "train.fp8": "tile" if fp8 else "none",
             "train.device": "cpu" if smoke else "cuda", "logging.interval": 1 if smoke else 5,
             "checkpoint.dir": str(out / name / "checkpoints"), "checkpoint.save_interval": 0,
             "checkpoint.resume": False, "data.cache_dir": str(out / "data_cache"),
             "data.corpus_max_bytes": 2_000_000 if smoke else 20_000_000}
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in {**model, **train}.items()]


def train_child(result_path: str, argv: list[str]) -> int:
    """Run dsv3-train in this process; record peak memory and the FP8 expert-row counters."""
    from megatron_dsv3 import train
    from megatron_dsv3.fp8 import backends, expert_gemm_rows

    rc = train.main(argv)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    Path(result_path).write_text(json.dumps({"rc": rc, "peak_memory_bytes": peak, "expert_gemm_rows": dict(expert_gemm_rows),
                                             "fp8_backend": backends._state["name"]}))
    return rc


def _peak_tflops(device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        return 1.0, "nominal 1 TFLOP/s (CPU smoke run: MFU is a placeholder)"
    name = torch.cuda.get_device_name()
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops, f"{name} BF16 dense"
    return float("nan"), f"unknown peak for {name}"


def train_section(out: Path, device: torch.device, smoke: bool) -> dict:
    from megatron_dsv3.config import DSV3Config

    results, ok = {}, True
    peak_tflops, peak_source = _peak_tflops(device)
    model = TOY if smoke else PROXY_1B
    config = DSV3Config.preset(model["model.preset"], num_layers=model["model.overrides.num_layers"],
                               **({} if smoke else {"num_routed_experts": model["model.overrides.num_routed_experts"]}))
    for name, fp8 in (("bf16", False), ("fp8_tile", True)):
        overrides = _train_overrides(out, name, smoke, fp8)
        child = out / name / "child.json"
        child.parent.mkdir(parents=True, exist_ok=True)
        log = out / name / "train.log"
        with open(log, "w") as log_file:
            proc = subprocess.run([sys.executable, __file__, "train-child", str(child), "--", *overrides],
                                  stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, timeout=_time_left(150))
        entry = {"rc": proc.returncode, "log": str(log), "overrides": overrides}
        if proc.returncode == 0 and child.exists():
            record = json.loads(child.read_text())
            steps = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
            rates = [s["tokens_per_s"] for s in steps if "tokens_per_s" in s]
            rates = rates[1:] or rates  # the first window holds start-up when there are others
            tokens_per_s = sum(rates) / len(rates)
            seq = int(next(o for o in overrides if o.startswith("train.seq_length=")).split("=")[1])
            rows = record["expert_gemm_rows"]
            entry.update(tokens_per_s=tokens_per_s, model_tflops=tokens_per_s * flops_per_token(config, seq) / 1e12,
                         peak_memory_gib=record["peak_memory_bytes"] / 2**30, fp8_backend=record["fp8_backend"],
                         expert_rows_on_fp8_kernel=(rows["kernel"] / rows["total"]) if fp8 and rows["total"] else None,
                         expert_gemm_rows=rows, final_loss=steps[-1].get("loss"))
            entry["mfu"] = entry["model_tflops"] / peak_tflops
        else:
            ok = False
        results[name] = entry
    if ok:
        results["fp8_vs_bf16_tokens_per_s"] = results["fp8_tile"]["tokens_per_s"] / results["bf16"]["tokens_per_s"]
    return {"ok": ok, "peak_tflops": peak_tflops, "peak_source": peak_source,
            "flops_per_token": flops_per_token(config, 128 if smoke else 1024), "runs": results}


# ---------------------------------------------------------------------------------------------- collectives

@contextlib.contextmanager
def _group_size_reported_as(size: int):
    """Make `groups.size` report `size`, so the optimizer's all-reduce runs on one process (scoped)."""
    from megatron_dsv3.parallel import groups

    original = groups.size
    groups.size = lambda group: size
    try:
        yield
    finally:
        groups.size = original


def collectives_child(backend: str) -> int:
    """The trainer's collectives on a 1-process group, every size-1 shortcut bypassed; checks values."""
    import torch.distributed as dist

    from megatron_dsv3.model.moe.dispatch import TokenDispatcher
    from megatron_dsv3.optim.local import all_reduce_flat
    from megatron_dsv3.parallel import collectives

    device = torch.device("cuda" if backend == "nccl" else "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    group, checked = dist.group.WORLD, []
    try:
        x = torch.randn(64, 32, device=device, requires_grad=True)
        y = collectives._CopyToGroup.apply(x, group)  # forward identity, backward all-reduce
        z = collectives._ReduceFromGroup.apply(y * 2, group)  # forward all-reduce
        z.sum().backward()
        assert torch.equal(z, 2 * x.detach()) and torch.equal(x.grad, torch.full_like(x, 2.0))
        checked += ["copy_to_group (all_reduce in backward)", "reduce_from_group (all_reduce)"]
        a = torch.randn(10, 8, device=device, requires_grad=True)
        b = collectives._AllToAll.apply(a, [10], [10], group)
        b.backward(torch.ones_like(b))
        assert torch.equal(b, a.detach()) and torch.equal(a.grad, torch.ones_like(a))
        checked.append("all_to_all (uneven splits, forward and backward)")
        dispatcher = TokenDispatcher(4, group, None)
        tokens, counts = torch.randn(12, 16, device=device), torch.tensor([3, 0, 5, 4], device=device)
        received, exchange = dispatcher.exchange(tokens, counts)
        out = dispatcher.combine(received * 3, exchange)
        assert torch.equal(out, tokens * 3) and exchange.tokens_per_expert.tolist() == [3, 0, 5, 4]
        checked.append("MoE dispatch and combine (all_to_all_single of counts, then tokens, and back)")
        grads = [torch.ones(5, device=device), torch.full((2, 3), 2.0, device=device)]
        with _group_size_reported_as(2):
            all_reduce_flat(grads, group)
        assert torch.equal(grads[1], torch.full((2, 3), 2.0, device=device))
        checked.append("gradient all_reduce_flat")
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    print(json.dumps({"backend": backend, "checked": checked}))
    return 0


def collectives_section(out: Path, device: torch.device) -> dict:
    backend = "nccl" if device.type == "cuda" else "gloo"
    proc = subprocess.run([sys.executable, __file__, "collectives-child", backend], capture_output=True, text=True,
                          cwd=REPO, timeout=_time_left(60))
    (out / "collectives.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "backend": backend, "rc": proc.returncode, "error": proc.stderr[-2000:]}
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------------------------------------- gpu tests

def gpu_tests_section(out: Path, device: torch.device) -> dict:
    report = out / "gpu_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           f"--junitxml={report}", "tests"], capture_output=True, text=True, cwd=REPO,
                          timeout=_time_left(120))
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    if not report.exists():
        return {"ok": False, "rc": proc.returncode, "error": proc.stdout[-2000:] + proc.stderr[-2000:]}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = counts["failures"] == counts["errors"] == 0 and counts["tests"] > 0
    if device.type == "cuda":  # on a GPU, a skipped GPU test is a failure to run it
        ok = ok and counts["skipped"] == 0
    return {"ok": ok, "rc": proc.returncode, **counts}


# ---------------------------------------------------------------------------------------------- main

def run_checks(out: Path, smoke: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if not smoke and device.type != "cuda":
        print("gpu_check: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    from megatron_dsv3.fp8 import describe_backend, select_backend

    select_backend()
    start_s = time.perf_counter()
    _deadline["at"] = time.monotonic() + BUDGET_S
    result = {"mode": "smoke" if smoke else "gpu", "device": torch.cuda.get_device_name() if device.type == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version(),
              "fp8_backend": describe_backend(), "sections": {}}
    sections = {"gpu_tests": lambda: gpu_tests_section(out, device), "gemm": lambda: gemm_section(device, smoke),
                "train": lambda: train_section(out, device, smoke), "collectives": lambda: collectives_section(out, device)}
    for name, section in sections.items():
        section_start = time.perf_counter()
        try:
            result["sections"][name] = section()
        except Exception as exc:  # record and go on: one JSON names every failing section
            result["sections"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-4000:]}
        result["sections"][name]["wall_s"] = time.perf_counter() - section_start
        print(f"gpu_check: {name}: {'ok' if result['sections'][name]['ok'] else 'FAILED'} "
              f"({result['sections'][name]['wall_s']:.1f} s)", flush=True)
    result["failed"] = [name for name, section in result["sections"].items() if not section["ok"]]
    result["wall_s"] = time.perf_counter() - start_s
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"gpu_check: wrote {out / 'gpu_check.json'}; failed: {result['failed'] or 'none'}")
    return 1 if result["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-child"]:
        return train_child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    if argv[:1] == ["collectives-child"]:
        return collectives_child(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU (CI)")
    args = parser.parse_args(argv)
    return run_checks(args.out_dir, args.smoke)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
