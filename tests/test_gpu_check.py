"""scripts/gpu_check.sh: its --smoke mode on CPU (what CI runs, so the GPU script cannot rot) and its FLOP count."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smoke_mode_runs_every_section_and_writes_sane_json(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--smoke"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=230)
    report = tmp_path / "out" / "gpu_check.json"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (report.read_text()[-3000:] if report.exists() else "")
    result = json.loads(report.read_text())
    assert result["mode"] == "smoke" and result["failed"] == []
    assert set(result["sections"]) == {"gpu_tests", "gemm", "train", "collectives"}
    assert all(section["ok"] for section in result["sections"].values())

    tests = result["sections"]["gpu_tests"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0  # on CPU the GPU tests skip

    for shape in result["sections"]["gemm"]["shapes"].values():
        assert _finite_positive(shape["bf16_tflops"]) and _finite_positive(shape["emulation_tflops"])
        assert _finite_positive(shape["quantise+gemm_vs_bf16"])

    runs = result["sections"]["train"]["runs"]
    for name in ("bf16", "fp8_tile"):
        run = runs[name]
        assert run["rc"] == 0
        for key in ("tokens_per_s", "model_tflops", "mfu", "peak_memory_gib", "final_loss"):
            assert _finite_positive(run[key]), (name, key, run[key])
        assert run["final_loss"] < 10
    fp8 = runs["fp8_tile"]
    assert fp8["fp8_backend"] == "emulation" and fp8["expert_gemm_rows"]["total"] > 0
    assert fp8["expert_rows_on_fp8_kernel"] == 0.0  # no kernel on CPU: every expert row on the emulation
    assert _finite_positive(runs["fp8_vs_bf16_tokens_per_s"])

    collectives = result["sections"]["collectives"]
    assert collectives["backend"] == "gloo" and len(collectives["checked"]) == 5


def test_usage_errors_exit_2_without_running_anything(tmp_path):
    for args in ([], [str(tmp_path), "--fast"], ["--smoke"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage" in proc.stderr, args
    assert not (tmp_path / "gpu_check.json").exists()


def test_flop_count_grows_with_sequence_by_the_attention_term_only_and_ignores_idle_experts():
    from megatron_dsv3.config import DSV3Config

    gpu_check = _gpu_check_module()
    config = DSV3Config.preset("deepseek-v3-lite", num_layers=4, num_routed_experts=16)
    per_key = 3 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * (4 + config.mtp_num_modules)
    assert gpu_check.flops_per_token(config, 2048) - gpu_check.flops_per_token(config, 1024) == pytest.approx(1024 * per_key)
    more_experts = DSV3Config.preset("deepseek-v3-lite", num_layers=4, num_routed_experts=64)
    # only the router grows (E x hidden per MoE layer): under 0.1% here
    assert gpu_check.flops_per_token(more_experts, 1024) == pytest.approx(gpu_check.flops_per_token(config, 1024), rel=1e-3)
    # the 1B proxy: between 6 x its 0.75e9 active trunk parameters minus the embedding, and 6 x 1.2e9
    assert 6 * 0.5e9 < gpu_check.flops_per_token(config, 1024) < 6 * 1.2e9
