"""The run as dsv3-launch reads it: the one run config (`run_config.load_run_config`, which also
checks every `launch:` value that reaches the batch script) and the job's shape on the cluster.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from megatron_dsv3.run_config import RunConfig, RunConfigError, load_run_config


class LaunchConfigError(RunConfigError):
    """A run YAML that dsv3-launch cannot use; the message names the offending key."""


def load_run(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """RUN.yaml with `section.key=value` overrides, refused exactly as dsv3-train would refuse it."""
    try:
        return load_run_config(str(path), tuple(overrides))
    except RunConfigError as error:
        raise LaunchConfigError(str(error)) from None


def tasks_per_node(run: RunConfig) -> int:
    """Ranks per node: `launch.tasks_per_node`, else one per GPU (one on a CPU cluster)."""
    launch = run.launch
    return launch.tasks_per_node or (1 if launch.cpu else launch.gpus_per_node)


def world_size(run: RunConfig) -> int:
    return run.launch.nodes * tasks_per_node(run)
