"""Render the sbatch script of a run from the template `sbatch.sh.tmpl` (package data).

Every value written into the script is shell-quoted, in `#SBATCH` lines too (sbatch reads single
and double quotes as the shell does; values it would read differently are refused by the run
config's `LaunchSection`).
"""
from __future__ import annotations

import re
import shlex
from typing import Any, Iterable, Optional

from megatron_dsv3 import exit_status
from megatron_dsv3.launch.presets import environment, launch_dir, load_preset
from megatron_dsv3.launch.preflight import PreflightReport
from megatron_dsv3.launch.run import LaunchConfigError, tasks_per_node
from megatron_dsv3.run_config import RunConfig, RunConfigError, text

# Each task (a dsv3-train rank, or dsv3-torchrun) starts with SIGUSR1 ignored (not fatal) until it
# installs its handler: srun delivers the forwarded warning signal to every process of the step.
IGNORE_USR1_UNTIL_HANDLED = """bash -c 'trap "" USR1; exec "$@"' dsv3-step"""


def train_command(run: RunConfig, config_path: str, overrides: Iterable[str] = ()) -> list[str]:
    """The per-rank command: `dsv3-train --config RUN.yaml [section.key=value ...]`."""
    launch = run.launch
    if launch.command:
        command = shlex.split(launch.command) if isinstance(launch.command, str) else list(launch.command)
    elif launch.python:
        command = [launch.python, "-m", "megatron_dsv3.train"]
    else:
        command = ["dsv3-train"]
    extra = [o for o in overrides if not o.startswith("launch.")]
    if launch.cpu and run.train.device == "auto" and not any(o.startswith("train.device=") for o in extra):
        extra.append("train.device=cpu")
    return command + ["--config", config_path] + extra


def _directives(run: RunConfig) -> list[str]:
    launch = run.launch
    torchrun = launch.launcher == "torchrun"
    quote = shlex.quote
    lines = [f"--job-name={quote(launch.job_name)}", f"--nodes={launch.nodes}",
             f"--ntasks-per-node={1 if torchrun else tasks_per_node(run)}"]
    if not launch.cpu:
        lines += [f"--gpus-per-node={launch.gpus_per_node}", "--exclusive"]
    lines += [f"--time={quote(launch.time)}"]
    lines += [f"--{key}={quote(getattr(launch, key))}" for key in ("partition", "account") if getattr(launch, key)]
    lines += [f"--output={quote(launch.output_dir + '/%x-%j.out')}", "--open-mode=append",
              f"--signal=B:USR1@{launch.signal_seconds}", "--requeue" if launch.requeue else "--no-requeue"]
    return [f"#SBATCH {line}" for line in lines]


def _step(run: RunConfig, command: list[str]) -> str:
    """The srun line(s) of the training step, one option group per line."""
    launch, tasks = run.launch, tasks_per_node(run)
    groups = [["srun", "--kill-on-bad-exit=1", "--open-mode=append"]]
    if launch.container_image:
        mounts = ['"$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR"'] + [shlex.quote(str(m)) for m in launch.container_mounts]
        groups += [[f"--container-image={shlex.quote(launch.container_image)}"],
                   [f"--container-mounts={','.join(mounts)}", '--container-workdir="$SLURM_SUBMIT_DIR"']]
    if launch.launcher == "torchrun":  # torchrun under dsv3-torchrun, which relays preemption to the ranks
        wrapper = [shlex.quote(launch.python), "-m", "megatron_dsv3.cli.torchrun"] if launch.python else [
            "dsv3-torchrun"]
        groups += [["--ntasks-per-node=1", '--output="$LOG_DIR/node-%n.log"'],
                   [IGNORE_USR1_UNTIL_HANDLED],
                   [*wrapper, '--nnodes="$SLURM_JOB_NUM_NODES"', f"--nproc-per-node={tasks}"],
                   ["--rdzv-backend=c10d", '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"'],
                   ['--log-dir="$LOG_DIR/torchrun"', "--redirects=3", "--tee=3", "--no-python"]]
    else:
        groups += [[f"--ntasks-per-node={tasks}", '--output="$LOG_DIR/rank-%t.log"'],
                   [IGNORE_USR1_UNTIL_HANDLED]]
    groups.append([shlex.quote(arg) for arg in command])
    return " \\\n  ".join(" ".join(group) for group in groups)


def _quote(value: str) -> str:
    quoted = shlex.quote(value)
    return f"'{value}'" if quoted == value and value.startswith("=") else quoted


def _environment(run: RunConfig, preset: dict[str, Any]) -> list[str]:
    lines = []
    for var in environment(preset, run.parallel, run.launch.env_overrides):
        if var.value is None:
            lines.append(f"unset {var.name}  # {var.source}")
        else:
            lines.append(f"export {var.name}={_quote(var.value)}  # {var.source}")
    return lines


def render_sbatch(run: RunConfig, config_path: str, overrides: Iterable[str] = (),
                  report: Optional[PreflightReport] = None) -> str:
    """The batch script for `run` (already loaded with load_run); `config_path` as the ranks will see it."""
    try:
        text("config path", config_path)
    except RunConfigError as error:
        raise LaunchConfigError(f"{error}; rename the file") from None
    launch = run.launch
    preset = load_preset(launch.env_preset)
    if launch.requeue:
        action = ('  echo "dsv3-launch: checkpoint saved; requeueing job $SLURM_JOB_ID to resume"\n'
                  '  scontrol requeue "$SLURM_JOB_ID" && exit 0\n'
                  '  echo "dsv3-launch: scontrol requeue failed; resubmit to resume from the checkpoint" >&2')
    else:
        action = '  echo "dsv3-launch: checkpoint saved; launch.requeue is off, resubmit to resume" >&2'
    setup = "".join(f"{line}\n" for line in launch.setup)
    values = {
        "config": config_path,
        "directives": "\n".join(_directives(run)),
        "preflight": "\n".join(f"# {line}" for line in (report.lines() if report else ["preflight: not run"])),
        "env_title": f"preset {preset.get('name', launch.env_preset)}",
        "environment": "\n".join(_environment(run, preset)),
        "log_dir": shlex.quote(launch.output_dir),
        "setup": ("\n# ---- site setup (launch.setup)\n" + setup) if setup else "",
        "step": _step(run, train_command(run, config_path, overrides)),
        "preempted_exit": str(exit_status.PREEMPTED),
        "requeue_action": action,
    }
    template = (launch_dir() / "sbatch.sh.tmpl").read_text()
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)
