"""dsv3-launch: golden sbatch scripts, preflight refusals, node-limited routing, memory estimate."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_dsv3.cli import launch as cli
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.launch import (LaunchConfigError, PreflightError, cuda_device_max_connections, load_preset,
                                  load_run, preflight, render_sbatch)
from megatron_dsv3.memory import GIB, count_params, estimate_memory
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.pipeline import get_schedule
from megatron_dsv3.plan import check_schedule, nodes_per_token
from megatron_dsv3.run_config import ParallelSection, RunConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
V3 = "examples/671b-2048xh800.yaml"
LITE = "examples/lite-4node.yaml"
TINY = "examples/tiny-cpu.yaml"
# golden name -> (example, overrides)
GOLDEN_CASES = {
    "tiny-cpu": (TINY, ()),
    "lite-4node": (LITE, ()),
    "lite-2node-torchrun": (LITE, ("launch.nodes=2", "launch.launcher=torchrun", "launch.python=/opt/venv/bin/python")),
    "671b-2048xh800": (V3, ()),
}


def render(example: str, *overrides: str) -> str:
    run = load_run(ROOT / example, overrides)
    return render_sbatch(run, example, overrides, report=preflight(run))


def v3_run(*overrides: str) -> RunConfig:
    return load_run(ROOT / V3, overrides)


# ------------------------------------------------------------------ golden files
@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendered_script_matches_golden_file(name):
    example, overrides = GOLDEN_CASES[name]
    script = render(example, *overrides)
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("DSV3_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text(), f"re-render with DSV3_UPDATE_GOLDEN=1 if the change to {golden} is intended"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendered_script_is_valid_bash(name, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render(GOLDEN_CASES[name][0], *GOLDEN_CASES[name][1]))
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_script_forwards_warning_signal_requeues_on_75_and_keeps_failures():
    script = render(V3)
    assert "#SBATCH --signal=B:USR1@600" in script and "#SBATCH --requeue" in script
    assert "trap 'forward USR1' USR1" in script and 'kill -USR1 "$STEP_PID"' in script
    assert '[[ "$rc" -eq 75 ]]' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert script.rstrip().endswith('exit "$rc"')
    assert '--output="$LOG_DIR/rank-%t.log"' in script


def test_requeue_off_never_requeues():
    script = render(TINY, "launch.requeue=false")
    assert "#SBATCH --no-requeue" in script and "scontrol requeue" not in script


def test_cpu_job_has_no_gpu_request_two_tasks_and_rendezvous_from_slurm():
    script = render(TINY)
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=2" in script
    assert "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)" in script
    assert "export MASTER_PORT=" in script
    assert "dsv3-train --config examples/tiny-cpu.yaml train.device=cpu" in script
    assert "NCCL_" not in script and "CUDA_DEVICE_MAX_CONNECTIONS" not in script


def test_container_and_bare_environment_options():
    v3 = render(V3)
    assert "--container-image=/lustre/images/dsv3+megatron.sqsh" in v3
    assert '--container-mounts="$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR",/lustre:/lustre' in v3
    lite = render(LITE, "launch.python=/opt/venv/bin/python")
    assert "--container" not in lite and "source .venv/bin/activate" in lite
    assert "/opt/venv/bin/python -m megatron_dsv3.train --config examples/lite-4node.yaml" in lite


def test_overrides_reach_the_train_command_but_launch_keys_do_not():
    script = render(TINY, "train.steps=7", "launch.job_name=x", "launch.command=python stub.py")
    assert "python stub.py --config examples/tiny-cpu.yaml train.steps=7 train.device=cpu" in script
    assert "#SBATCH --job-name=x" in script and "launch.job_name" not in script


# ------------------------------------------------------------------ environment
def test_site_overrides_win_and_are_shown():
    script = render(V3, "launch.env_overrides={NCCL_IB_HCA: '=mlx5_2', NCCL_IB_GID_INDEX: null}")
    assert ("export NCCL_IB_HCA='=mlx5_2'  # site override (preset: =mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,"
            "mlx5_6,mlx5_7)") in script
    assert "unset NCCL_IB_GID_INDEX  # site override" in script
    assert script.count("NCCL_IB_HCA=") == 1


def test_fabric_settings_are_explicit_in_gpu_presets():
    for example in (V3, LITE):
        script = render(example)
        for var in ("NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "NCCL_SOCKET_IFNAME", "NCCL_IB_TIMEOUT",
                    "NCCL_IB_QPS_PER_CONNECTION", "CUDA_DEVICE_MAX_CONNECTIONS"):
            assert f"export {var}=" in script, (example, var)
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=32  # layout TP1 EP64 dualpipe" in render(V3)


def test_h100_preset_exports_its_own_values():
    script = render(LITE, "launch.env_preset=h100")
    exports = dict(line.removeprefix("export ").removesuffix("  # preset h100").split("=", 1)
                   for line in script.splitlines() if line.startswith("export ") and line.endswith("  # preset h100"))
    assert {var: value.strip("'") for var, value in exports.items()} == {
        var: str(value) for var, value in load_preset("h100")["env"].items()}
    assert exports["NVTE_FWD_LAYERNORM_SM_MARGIN"] == "16"  # H800's preset keeps 20 SMs free
    assert "h800" not in script


@pytest.mark.parametrize("tensor, expert, schedule, expected", [
    (2, 1, "1f1b", 1), (2, 8, "dualpipe", 1), (1, 8, "1f1b", 32), (1, 1, "dualpipe", 32), (1, 1, "1f1b", 8)])
def test_cuda_device_max_connections_from_layout(tensor, expert, schedule, expected):
    parallel = ParallelSection(tensor=tensor, pipeline=2, expert=expert, schedule=schedule)
    assert cuda_device_max_connections(parallel) == expected


# ------------------------------------------------------------------ run YAML
def test_unknown_launch_key_is_refused_by_name():
    with pytest.raises(LaunchConfigError, match="unknown config key 'launch.gpu_per_node'"):
        v3_run("launch.gpu_per_node=8")


@pytest.mark.parametrize("override, message", [
    ("launch.launcher=mpirun", "launch.launcher"), ("launch.nodes=0", "launch.nodes"),
    ("parallel.schedule=zb", "parallel.schedule"), ("launch.env_preset=a100", "env_preset")])
def test_bad_launch_values_are_refused(override, message):
    with pytest.raises(LaunchConfigError, match=message):
        run = v3_run(override)
        preflight(run)


# ------------------------------------------------------------------ node-limited routing
@pytest.mark.parametrize("experts, groups, limited, ep, tp, per_node, reach", [
    (256, 8, 4, 64, 1, 8, 4),   # DeepSeek-V3: 8 nodes of 32 experts, group == node
    (256, 8, 4, 8, 1, 8, 1),    # EP inside one node
    (256, 8, 4, 4, 2, 8, 1),    # EP4 x TP2 fills one node
    (256, 16, 4, 128, 1, 8, 4),  # 16 groups on 16 nodes
    (256, 8, 4, 16, 1, 8, 2),   # 2 nodes, 4 groups each: at most 2 nodes
])
def test_node_limited_routing_accepts_groups_aligned_to_nodes(experts, groups, limited, ep, tp, per_node, reach):
    assert nodes_per_token(experts, groups, limited, ep, tp, per_node) == reach


@pytest.mark.parametrize("experts, groups, ep, per_node, message", [
    (256, 8, 128, 8, "multiple of 16"),       # a group of 32 experts split over 2 nodes
    (256, 8, 12, 8, "whole number"),          # EP group ends mid-node
    (256, 8, 3, 8, "straddle"),               # sub-node EP groups cross node borders
    (64, 1, 16, 8, "single routing group"),   # lite has no groups: EP must stay in a node
])
def test_node_limited_routing_refuses_groups_split_across_nodes(experts, groups, ep, per_node, message):
    with pytest.raises(PreflightError, match=message):
        nodes_per_token(experts, groups, 4 if groups > 1 else 1, ep, 1, per_node)


def test_preflight_refuses_ep_that_breaks_node_limited_routing():
    with pytest.raises(PreflightError, match="node-limited routing broken"):
        preflight(v3_run("parallel.expert=128"))


# ------------------------------------------------------------------ layout and schedule
@pytest.mark.parametrize("overrides, message", [
    (("parallel.pipeline=24",), "tensor=1 x pipeline=24 does not divide the world size 2048"),
    (("parallel.tensor=16", "parallel.pipeline=1", "parallel.expert=8", "parallel.schedule=1f1b"),
     "must stay inside a node"),
    (("launch.nodes=2", "parallel.pipeline=2", "parallel.tensor=1", "parallel.expert=16"),
     "expert=16 must divide tensor x data = 8"),
    (("train.global_batch_size=15000",), "not a multiple of train.micro_batch_size=1 x data-parallel size 128"),
    (("launch.tasks_per_node=16",), "exceeds gpus_per_node"),
    (("parallel.tensor=3", "parallel.pipeline=1", "launch.nodes=3", "launch.gpus_per_node=3"
      , "parallel.expert=1", "parallel.schedule=1f1b", "train.global_batch_size=3"), "num_attention_heads"),
])
def test_preflight_refuses_layouts_that_do_not_fit(overrides, message):
    with pytest.raises(PreflightError, match=message):
        preflight(v3_run(*overrides))


@pytest.mark.parametrize("schedule, pipeline, micro_batches, message", [
    ("dualpipe", 15, 64, "even number of pipeline ranks, got 15"), ("dualpipe", 16, 30, "at least 2 x PP = 32"),
    ("dualpipe", 16, 33, "even number of micro-batches"), ("dualpipe", 1, 8, "at least 2 pipeline ranks"),
    ("dualpipev", 4, 7, "at least 2 x PP = 8")])
def test_dualpipe_constraints_are_refused(schedule, pipeline, micro_batches, message):
    with pytest.raises(PreflightError, match=message):
        check_schedule(get_schedule(schedule), pipeline, micro_batches)


def test_dualpipe_constraints_accept_valid_schedules():
    check_schedule(get_schedule("dualpipe"), 16, 120)
    check_schedule(get_schedule("dualpipev"), 3, 6)
    check_schedule(get_schedule("1f1b"), 7, 1)


def test_preflight_refuses_dualpipe_with_too_few_micro_batches():
    with pytest.raises(PreflightError, match="micro-batches"):
        preflight(v3_run("train.global_batch_size=3072"))  # 24 micro-batches < 2 x 16


# ------------------------------------------------------------------ memory
def test_param_counts_match_published_sizes():
    v3 = count_params(DSV3Config.preset("deepseek-v3-671b"))
    assert 670e9 < v3.total < 672e9 and 36.5e9 < v3.active < 38.5e9
    lite = count_params(DSV3Config.preset("deepseek-v3-lite"))
    assert 15.2e9 < lite.total < 16.2e9


def test_published_671b_layout_passes_preflight():
    plan = preflight(v3_run()).plan
    assert plan.layout.world_size == 2048 and plan.layout.data == 128 and plan.layout.expert_data == 2
    assert plan.micro_batches == 120 and plan.nodes_per_token == 4
    report = preflight(v3_run())
    assert report.memory.total < 80 * GIB


def test_671b_on_one_node_is_refused_naming_estimate_and_capacity():
    run = v3_run("launch.nodes=1", "parallel.pipeline=1", "parallel.expert=8", "parallel.schedule=1f1b",
                 "train.global_batch_size=64")
    with pytest.raises(PreflightError, match=r"memory estimate \d+\.\d GiB per GPU exceeds the 80 GiB capacity"):
        preflight(run)
    assert preflight(run, check_memory=False).memory.total > 1000 * GIB


def test_lite_fits_on_two_and_four_nodes():
    for nodes in (2, 4):
        report = preflight(load_run(ROOT / LITE, [f"launch.nodes={nodes}"]))
        assert report.memory.total < 80 * GIB and report.plan.layout.data == 8 * nodes


def test_recompute_and_fp8_shrink_activations():
    config = DSV3Config.preset("deepseek-v3-671b")
    layout = preflight(v3_run()).plan.layout
    train = v3_run().train
    dualpipe = get_schedule("dualpipe")
    act = {(rc, fp8): estimate_memory(config, layout, dualpipe, dataclasses.replace(train, recompute=rc, fp8=fp8)
                                      ).activations
           for rc in ("none", "selective", "full") for fp8 in ("none", "tile")}
    assert act["full", "tile"] < act["selective", "tile"] < act["none", "tile"]
    assert act["selective", "tile"] < act["selective", "none"]


def test_dualpipe_holds_two_stages_per_rank_and_one_more_micro_batch():
    """DualPipe's rank r holds 1F1B's stages r and PP-1-r (rank 0 one embedding for both ends, as
    DSV3Model keeps one); the estimate is of the rank needing the most, not an average."""
    config = DSV3Config.preset("deepseek-v3-671b")
    train = v3_run().train
    layout = ParallelLayout(tensor=1, pipeline=16, expert=64, data=128)

    def params(schedule: str, rank: int) -> float:
        return estimate_memory(config, layout, get_schedule(schedule), train, pipeline_rank=rank).params

    embedding = 2 * count_params(config).embedding  # BF16 weights
    assert params("dualpipe", 0) == pytest.approx(params("1f1b", 0) + params("1f1b", 15) - embedding)
    assert params("dualpipe", 5) == pytest.approx(params("1f1b", 5) + params("1f1b", 10))
    dual = estimate_memory(config, layout, get_schedule("dualpipe"), train)
    assert dual.params == max(params("dualpipe", r) for r in range(16))
    first = estimate_memory(config, layout, get_schedule("1f1b"), train, pipeline_rank=0)
    assert (dual.micro_batches_in_flight, first.micro_batches_in_flight) == (17, 16)


def test_bf16_moments_and_zero1_shrink_optimizer_states():
    config = DSV3Config.preset("deepseek-v3-lite")
    train = load_run(ROOT / LITE).train
    layout = preflight(load_run(ROOT / LITE)).plan.layout

    def estimate(distributed_optimizer: bool = True, **changes):
        return estimate_memory(config, layout, get_schedule("1f1b"), dataclasses.replace(train, **changes),
                               distributed_optimizer=distributed_optimizer)

    fp32 = estimate(bf16_adam_moments=False).optimizer
    bf16 = estimate(bf16_adam_moments=True).optimizer
    assert bf16 == pytest.approx(fp32 * 8 / 12)  # master 4 + moments 8 -> 4 + 4 bytes
    wider = preflight(load_run(ROOT / LITE, ["launch.nodes=4"])).memory.optimizer
    narrower = preflight(load_run(ROOT / LITE, ["launch.nodes=2"])).memory.optimizer
    assert wider < narrower
    # Without the distributed optimizer every replica holds the whole state: lite's dense part is
    # replicated over DP32 and its experts over expert-DP 4. (Its FP32 weights: dsv3-train, and so
    # dsv3-launch, refuses BF16 weights without the distributed optimizer that holds their masters.)
    sharded = estimate(param_dtype="float32").optimizer
    replicated = estimate(False, param_dtype="float32")
    assert sharded * 4 < replicated.optimizer < sharded * 32
    replicated_run = load_run(ROOT / LITE, ["parallel.distributed_optimizer=false", "train.param_dtype=float32"])
    assert preflight(replicated_run, check_memory=False).memory.optimizer == pytest.approx(replicated.optimizer)
    # FP32 weights (train.param_dtype: float32) have no master copy but twice the bytes.
    assert estimate(param_dtype="float32").params == pytest.approx(2 * estimate().params)


# ------------------------------------------------------------------ CLI
def test_cli_dry_run_prints_the_script_and_submits_nothing(capsys, monkeypatch):
    monkeypatch.setattr(cli, "submit", lambda path: pytest.fail("dry run submitted"))
    assert cli.main([str(ROOT / TINY), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --ntasks-per-node=2" in out


def test_cli_refuses_before_submitting(capsys, monkeypatch):
    monkeypatch.setattr(cli, "submit", lambda path: pytest.fail("refused run submitted"))
    assert cli.main([str(ROOT / V3), "launch.nodes=1", "parallel.pipeline=1", "parallel.expert=8",
                     "parallel.schedule=1f1b", "train.global_batch_size=64"]) == 2
    assert "refused: memory estimate" in capsys.readouterr().err


def test_cli_writes_and_submits_the_script(tmp_path, monkeypatch, capsys):
    submitted = []
    monkeypatch.setattr(cli, "submit", lambda path: submitted.append(Path(path).read_text()) or 42)
    assert cli.main([str(ROOT / TINY), f"launch.output_dir={tmp_path}"]) == 0
    assert submitted and (tmp_path / "dsv3-tiny.sbatch").read_text() == submitted[0]
    assert "submitted job 42" in capsys.readouterr().out
