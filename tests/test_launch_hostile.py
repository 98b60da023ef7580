"""dsv3-launch against hostile and odd values: what cannot be written safely into the batch script is
refused by key; the rest is quoted, so the script, run under bash with stub Slurm commands, runs no
injected command and keeps its `#SBATCH` block (sbatch stops reading directives at the first
line that is not a comment). The trainer's sections are refused as dsv3-train refuses them."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_dsv3.cli import launch as cli
from megatron_dsv3.launch import LaunchConfigError, load_run, preflight, render_sbatch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-cpu.yaml"
INJECTED = "touch /tmp/dsv3-injected"


def _run_yaml(tmp_path: Path, name: str = "run.yaml", **launch) -> Path:
    """examples/tiny-cpu.yaml with `launch` keys replaced, written under tmp_path."""
    run = yaml.safe_load(TINY.read_text())
    run["launch"].update(launch)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(run))
    return path


def _sbatch_directives(script: str) -> list[str]:
    """The options sbatch reads: `#SBATCH` lines up to the first line that is not a comment, split
    into words with quotes removed (sbatch's parser, for the quoting the renderer uses)."""
    options = []
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            options += shlex.split(line[len("#SBATCH "):], comments=True)
    return options


# ------------------------------------------------------------------ refused by name
@pytest.mark.parametrize("key, value, message", [
    ("job_name", f"x\n{INJECTED}", "launch.job_name='x\\\\n"),
    ("time", f"00:20:00\n{INJECTED}", "launch.time"),
    ("partition", f"debug\n{INJECTED}", "launch.partition"),
    ("account", f"acct\n{INJECTED}", "launch.account"),
    ("output_dir", f"runs\n{INJECTED}", "launch.output_dir"),
    ("env_overrides", {f"X=1; {INJECTED}; Y": "1"}, "env_overrides key 'X=1; touch /tmp/dsv3-injected; Y' is not"),
    ("env_overrides", {"NCCL_DEBUG": f"INFO\n{INJECTED}"}, "launch.env_overrides.NCCL_DEBUG"),
    ("env_overrides", {"NCCL_DEBUG": ["INFO"]}, "launch.env_overrides.NCCL_DEBUG must be a string"),
    ("container_image", f"img.sqsh\n{INJECTED}", "launch.container_image"),
    ("container_mounts", [f"/a:/a\n{INJECTED}"], "launch.container_mounts"),
    ("python", f"python3\n{INJECTED}", "launch.python"),
    ("job_name", "x\ty", "control characters"),
    ("job_name", "../x", "launch.job_name.*'/'"),
    ("job_name", "a\\b", "launch.job_name.*escape"),
    ("output_dir", "runs/%j", "launch.output_dir.*'%'"),
    ("time", 86400, "launch.time=86400 must be quoted"),
    ("time", "tomorrow", "launch.time='tomorrow' is not a Slurm time limit"),
    ("partition", "gpu h100", "launch.partition='gpu h100' is not Slurm partition"),
    ("account", "a;b", "launch.account='a;b' is not a Slurm account"),
    ("env_preset", "../cpu", "launch.env_preset"),
    ("command", "python 'unbalanced", "launch.command=.* does not split"),
])
def test_hostile_launch_values_are_refused_by_key(tmp_path, key, value, message):
    with pytest.raises(LaunchConfigError, match=message):
        load_run(_run_yaml(tmp_path, **{key: value}))


def test_hostile_launch_overrides_are_refused_by_key():
    with pytest.raises(LaunchConfigError, match="launch.job_name"):
        load_run(TINY, [f'launch.job_name="x\\n{INJECTED}"'])  # YAML's "\n" is a newline
    with pytest.raises(LaunchConfigError, match="env_overrides key 'A;B'"):
        load_run(TINY, ["launch.env_overrides={'A;B': 1}"])
    with pytest.raises(LaunchConfigError, match="override 'launch.job_name=\\[x': the value is not valid YAML"):
        load_run(TINY, ["launch.job_name=[x"])


def test_config_path_with_a_newline_is_refused(tmp_path):
    path = _run_yaml(tmp_path, name=f"run\n{INJECTED}.yaml")
    with pytest.raises(LaunchConfigError, match="config path"):
        render_sbatch(load_run(path), str(path))


def test_time_override_is_taken_as_typed():
    """YAML would read 24:00:00 as 86400 (minutes, to sbatch)."""
    run = load_run(TINY, ["launch.time=24:00:00"])
    assert "--time=24:00:00" in _sbatch_directives(render_sbatch(run, str(TINY)))


# ------------------------------------------------------------------ the trainer's sections
@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "unknown config key 'train.stepz'"),
    ("train.steps=abc", "train.steps must be a positive integer, got 'abc'"),
    ("model.preset=huge", "huge"),
])
def test_cli_refuses_what_dsv3_train_refuses_before_rendering(capsys, monkeypatch, override, message):
    monkeypatch.setattr(cli, "submit", lambda path: pytest.fail("refused run submitted"))
    assert cli.main([str(TINY), override, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


# ------------------------------------------------------------------ odd but legal, run under bash
ODD_JOB = "it's \"odd\" #1 $(touch pwned-job) ; `touch pwned-job2`"
ODD_OUTPUT = "out dir/$(touch pwned-out) 'q' #x"
ODD_ENV = "a b $(touch pwned-env) `touch pwned-env2` 'q' \"dq\" ; x"
ODD_IMAGE = "my image $(touch pwned-img).sqsh"
ODD_PYTHON = "/opt/my venv/bin/python"
ODD_CKPT = "ck $(touch pwned-ck) 'q'"
STUBS = {
    "srun": 'printf "%s\\0" "$@" > "$STUB_OUT/srun.args"; env -0 > "$STUB_OUT/srun.env"; exit 75',
    "scontrol": 'echo "$*" >> "$STUB_OUT/scontrol.log"; [[ "$1 $2" == "show hostnames" ]] && echo node1; exit 0',
    "sbatch": 'echo "$*" >> "$STUB_OUT/sbatch.log"; exit 1',
}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_odd_values_are_quoted_and_run_no_injected_command(tmp_path, launcher):
    work, stub_out, stubs = tmp_path / "work", tmp_path / "stub-out", tmp_path / "stubs"
    for folder in (work, stub_out, stubs):
        folder.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    config = _run_yaml(tmp_path, name="cfg dir $(touch pwned-cfg)/run.yaml", job_name=ODD_JOB,
                       output_dir=ODD_OUTPUT, time="1-00:00:00", partition="debug,gpu", account="acct_1",
                       env_overrides={"ODD": ODD_ENV, "EMPTY": ""}, container_image=ODD_IMAGE,
                       container_mounts=["/data dir:/data"], python=ODD_PYTHON, launcher=launcher,
                       setup=["touch setup-ran"])
    overrides = [f"checkpoint.dir={ODD_CKPT}", "train.steps=5"]
    run = load_run(config, overrides)
    script = render_sbatch(run, str(config), overrides, report=preflight(run))

    directives = _sbatch_directives(script)
    assert f"--job-name={ODD_JOB}" in directives and f"--output={ODD_OUTPUT}/%x-%j.out" in directives
    assert {"--time=1-00:00:00", "--partition=debug,gpu", "--account=acct_1", "--signal=B:USR1@30",
            "--requeue"} <= set(directives)

    (tmp_path / "job.sbatch").write_text(script)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_OUT": str(stub_out),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(work), "SLURM_NTASKS": "2",
           "SLURM_JOB_NUM_NODES": "1"}
    done = subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr  # the step "exited 75" and the job requeued
    assert "requeue 4242" in (stub_out / "scontrol.log").read_text()
    assert not (stub_out / "sbatch.log").exists()
    assert sorted(p.name for p in tmp_path.rglob("pwned*")) == [] and not Path("/tmp/dsv3-injected").exists()
    assert (work / "setup-ran").exists()  # launch.setup is shell by design
    assert (work / ODD_OUTPUT / "4242").is_dir()

    srun_args = (stub_out / "srun.args").read_text().split("\0")[:-1]
    assert f"--container-image={ODD_IMAGE}" in srun_args and str(config) in srun_args
    assert f"checkpoint.dir={ODD_CKPT}" in srun_args and ODD_PYTHON in srun_args
    exported = dict(item.split("=", 1) for item in (stub_out / "srun.env").read_text().split("\0")[:-1])
    assert exported["ODD"] == ODD_ENV and exported["EMPTY"] == ""
