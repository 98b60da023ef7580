"""The rehearsal (issue 24): one rank's step on meta under a fake process group counts the bytes a
real step allocates, names the operation where a tensor lands on the CPU, refuses a run whose peak
does not fit the preset's GPU (exit 2), and reports JSON of a fixed shape."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.distributed import ROOT, run_ranks
from megatron_dsv3 import compat
from megatron_dsv3.cli.launch import main as launch_main
from megatron_dsv3.compat.meta_device import meta_shims
from megatron_dsv3.model.common import RMSNorm
from megatron_dsv3.rehearse import KINDS, RehearsalError, rehearse
from megatron_dsv3.rehearse.routing import Balanced, MaxVio, RoutingError, forced_expert_ids, parse_routing
from megatron_dsv3.run_config import load_run_config

TINY = str(ROOT / "examples" / "tiny-cpu.yaml")
# 1 x 64 tokens per micro-batch, 4 micro-batches: 128 (token, slot) pairs, 16 per expert of 8 (balanced
# counts that every rank shares, so a real run can be forced to them).
SMALL = ["train.micro_batch_size=1", "train.global_batch_size=4", "train.seq_length=64"]
SCHEDULES = {"1f1b": ["parallel.pipeline=2", "parallel.schedule=1f1b"],
             "dualpipe": ["parallel.pipeline=2", "parallel.schedule=dualpipe", "parallel.distributed_optimizer=true"],
             "dualpipev": ["parallel.pipeline=2", "parallel.schedule=dualpipev", "model.overrides={num_layers: 4}"]}


def _reports(outputs: list[str]) -> dict[tuple[int, int], dict]:
    found = {}
    for output in outputs:
        for line in output.splitlines():
            if line.startswith("REPORT "):
                _, case, rank, report = line.split(" ", 3)
                found[int(case), int(rank)] = json.loads(report)
    return found


@pytest.mark.slow
def test_meta_rehearsal_counts_the_bytes_a_real_cpu_step_allocates():
    """1F1B, DualPipe (with ZeRO-1) and DualPipeV on 2 gloo ranks, routers forced to the balanced
    counts, against the meta rehearsal of the same ranks: peak and every kind within 1%."""
    cases = json.dumps([SMALL + overrides for overrides in SCHEDULES.values()])
    worker = str(ROOT / "tests" / "helpers" / "rehearse_worker.py")
    real = _reports(run_ranks(2, [worker, "run", TINY, cases], timeout=300))
    done = subprocess.run([sys.executable, worker, "rehearse", "2", TINY, cases], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    meta = _reports([done.stdout])
    assert set(real) == set(meta) == {(c, r) for c in range(len(SCHEDULES)) for r in range(2)}
    for (case, rank), run in real.items():
        rehearsed, name = meta[case, rank], list(SCHEDULES)[case]
        assert rehearsed["device"] == "meta" and run["device"] == "cpu"
        assert run["peak_bytes"] > 1e6 and run["peak_by_kind"]["activations"] > 0, (name, run)
        assert rehearsed["peak_bytes"] == pytest.approx(run["peak_bytes"], rel=0.01), (name, rank)
        for kind in KINDS:
            assert rehearsed["peak_by_kind"][kind] == pytest.approx(run["peak_by_kind"][kind], rel=0.01, abs=1024), (
                name, rank, kind)
        assert rehearsed["peak_where"]["op"] == run["peak_where"]["op"], (name, rank)


def _tiny(overrides=()):
    return load_run_config(TINY, tuple(SMALL) + tuple(overrides))


def test_a_cpu_tensor_planted_in_the_step_is_named(monkeypatch):
    real_forward = RMSNorm.forward

    def planted(self, x):
        return real_forward(self, x) + torch.zeros(x.shape[-1])  # a CPU tensor inside the step

    monkeypatch.setattr(RMSNorm, "forward", planted)
    with pytest.raises(RehearsalError) as caught:
        rehearse(_tiny(), rank=0, world=1, ranks_per_node=1)
    message = str(caught.value)
    assert "aten.zeros" in message and "CPU tensor [128]" in message, message
    assert "layernorm" in message and "forward" in message, message
    assert compat.applied() == [] and not torch.distributed.is_initialized()


def _small_gpu_preset(tmp_path: Path, monkeypatch, memory_gib: float) -> list[str]:
    """A copy of the launcher's presets plus one whose GPU holds `memory_gib`."""
    presets = tmp_path / "launch" / "presets"
    presets.mkdir(parents=True)
    source = ROOT / "megatron_dsv3" / "launch"
    for path in (source / "presets").glob("*.yaml"):
        (presets / path.name).write_text(path.read_text())
    (tmp_path / "launch" / "sbatch.sh.tmpl").write_text((source / "sbatch.sh.tmpl").read_text())
    (presets / "small.yaml").write_text(yaml.safe_dump(
        {"name": "small", "gpu": {"model": "Small GPU", "memory_gib": memory_gib, "sms": 1}, "reserve_gib": 0,
         "env": {}}))
    monkeypatch.setenv("DSV3_LAUNCH_DIR", str(tmp_path / "launch"))
    return [*SMALL, "launch.cpu=false", "launch.env_preset=small", "launch.gpus_per_node=1", "launch.nodes=1",
            "launch.tasks_per_node=1"]


def test_a_peak_over_the_gpu_memory_is_refused_with_exit_2(tmp_path, monkeypatch, capsys):
    overrides = _small_gpu_preset(tmp_path, monkeypatch, memory_gib=0.005)  # 5 MiB: the tiny step needs more
    assert launch_main([TINY, *overrides, "--rehearse"]) == 2
    err = capsys.readouterr().err
    assert "refused: rank 0" in err and "over the 0.005 GiB of the GPU" in err, err
    assert "aten." in err and "filled by" in err and "optimizer" in err, err
    assert launch_main([TINY, *overrides, "--rehearse", "--rank", "1"]) == 2  # a world of one rank
    assert "--rank 1 is not a rank of the world of 1 ranks" in capsys.readouterr().err
    assert launch_main([TINY, *overrides, "--rehearse", "--routing", "skewed"]) == 2
    assert "--routing 'skewed' is not 'balanced' or 'maxvio=X'" in capsys.readouterr().err
    # the preflight's opt-in check refuses the job the same way, before any script is written
    assert launch_main([TINY, *overrides, "--dry-run", "--skip-memory-check", "--rehearsal-check"]) == 2
    assert "refused: rank 0" in capsys.readouterr().err


def test_a_rehearsal_reports_json_of_a_fixed_shape(tmp_path, monkeypatch, capsys):
    overrides = _small_gpu_preset(tmp_path, monkeypatch, memory_gib=80)
    assert launch_main([TINY, *overrides, "--rehearse", "--json", "--routing", "maxvio=0.5"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["rank"] == 0 and report["world"] == 1 and report["routing"] == "maxvio=0.5" and report["fits"]
    assert report["schedule"] == "1f1b" and report["micro_batches"] == 4 and report["capacity_gib"] == 80
    assert report["place"]["stages"] == [0] and report["place"]["layers"] == [0, 1, 2]
    memory = report["memory"]
    assert memory["device"] == "meta" and set(memory["peak_by_kind"]) == set(KINDS)
    assert sum(memory["peak_by_kind"].values()) == memory["peak_bytes"] > 0
    assert set(memory["peak_where"]) == {"op", "phase", "module", "code"}
    assert memory["start_by_kind"]["parameters"] > 0 and memory["start_by_kind"]["activations"] == 0
    assert set(report["estimate"]) == {"parameters", "gradients", "optimizer", "activations", "transient", "reserve",
                                       "total"}
    assert isinstance(report["wall_s"], float) and all(isinstance(n, int) for n in memory["host_reads"].values())


# ----------------------------------------------------------------------------- routing assumptions
def test_routing_assumptions_give_their_counts():
    local = range(4, 6)
    balanced = Balanced().pair_counts(130, 8, local)
    assert sum(balanced) == 130 and balanced[4] == balanced[5] == 17 and max(balanced) - min(balanced) == 1
    skewed = MaxVio(0.5, top_k=2).pair_counts(128, 8, local)
    assert sum(skewed) == 128 and skewed[4] == 24 and max(skewed) / (128 / 8) - 1 == pytest.approx(0.5)
    with pytest.raises(RoutingError, match="at most 64"):
        MaxVio(4.0, top_k=2).pair_counts(128, 8, local)  # 80 pairs for one expert: a token picks it once
    assert parse_routing("maxvio=0.25", 2) == MaxVio(0.25, 2)
    for bad in ("maxvio=-1", "skewed", "maxvio=x"):
        with pytest.raises(RoutingError, match="balanced"):
            parse_routing(bad, 2)


def test_forced_routing_realises_the_counts_with_distinct_experts_per_token():
    counts = MaxVio(1.0, top_k=3).pair_counts(96, 6, range(0, 2))
    ids = forced_expert_ids(counts, tokens=32, top_k=3, device=torch.device("cpu"))
    assert ids.shape == (32, 3)
    assert torch.bincount(ids.flatten(), minlength=6).tolist() == counts
    assert all(len(set(row)) == 3 for row in ids.tolist())


# ----------------------------------------------------------------------------- meta shims
def test_meta_shims_place_cuda_on_meta_and_cast_like_cuda_autocast():
    with meta_shims():
        assert "torch:cuda-factory-redirect:meta" in compat.applied()
        assert torch.zeros(2, device="cuda").device.type == "meta"
        x = torch.empty(4, 8, device="meta", requires_grad=True)
        w = torch.nn.Parameter(torch.empty(8, 8, device="meta"))
        with torch.autocast("meta", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(x, w)  # CUDA autocast's lower-precision list
            assert y.dtype == torch.bfloat16 and y.sum(-1).dtype == torch.float32  # sum: its FP32 list
            assert torch.is_autocast_enabled("meta") and torch.get_autocast_dtype("meta") == torch.bfloat16
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
    assert compat.applied() == []
    with pytest.raises(RuntimeError):
        torch.autocast("meta")


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_memory_estimate_counts_what_the_rehearsal_measures(schedule):
    """memory.py against the rehearsed ranks of a small FP32 run: the weights, gradients and optimizer
    state exactly, the most activations held within 3% (BENCHMARKS.md "Memory: rehearsal of one rank at full size" has the 671B's)."""
    run = _tiny(["parallel.pipeline=2", f"parallel.schedule={schedule}", "train.global_batch_size=8",
                 "parallel.distributed_optimizer=true"])
    for rank in (0, 1):
        rehearsal = rehearse(run, rank=rank, world=2, ranks_per_node=2)
        memory, estimate = rehearsal.memory, rehearsal.estimate
        assert estimate.pipeline_rank == rehearsal.place.pipeline_rank == rank
        assert memory.start_by_kind["parameters"] == pytest.approx(estimate.params, rel=1e-3)
        assert memory.start_by_kind["gradients"] == pytest.approx(estimate.grads, rel=1e-3)
        assert memory.start_by_kind["optimizer"] == pytest.approx(estimate.optimizer, rel=1e-3)
        assert memory.max_by_kind["activations"] == pytest.approx(estimate.activations, rel=0.03), (schedule, rank)
