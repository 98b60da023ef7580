"""The run YAML as dsv3-launch reads it: defaults, dotted overrides, the `launch:` section, the layout."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from megatron_dsv3.run_config import DEFAULTS as TRAIN_DEFAULTS

LAUNCH_DEFAULTS: dict[str, Any] = {
    "nodes": 1, "gpus_per_node": 8, "tasks_per_node": None, "partition": None, "account": None,
    "time": "04:00:00", "job_name": "dsv3", "env_preset": "h800", "env_overrides": {},
    "container_image": None, "container_mounts": [], "launcher": "srun", "requeue": True,
    "signal_seconds": 120, "output_dir": "runs/slurm", "cpu": False, "python": None,
    "command": None,  # the training command; None = `dsv3-train` (or `<python> -m megatron_dsv3.train`)
    "setup": [],  # shell lines run in the batch script before the step (module load, source venv, ...)
}
# The trainer's defaults, so that preflight plans the run dsv3-train will actually do.
DEFAULTS: dict[str, dict[str, Any]] = {
    **{section: TRAIN_DEFAULTS[section] for section in ("model", "parallel", "train", "checkpoint")},
    "launch": LAUNCH_DEFAULTS,
}
SCHEDULES = ("1f1b", "dualpipe", "dualpipev")
LAUNCHERS = ("srun", "torchrun")


class LaunchConfigError(ValueError):
    """A run YAML that dsv3-launch cannot read; the message names the offending key."""


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or "." not in key:
        raise LaunchConfigError(f"override {text!r} is not of the form section.key=value")
    return key, yaml.safe_load(raw) if raw else None


def apply_override(run: dict, key: str, value: Any) -> None:
    node = run
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LaunchConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def load_run(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read RUN.yaml, apply `section.key=value` overrides, fill defaults; refuse unknown launch keys."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise LaunchConfigError(f"{path}: top level must be a mapping")
    for text in overrides:
        apply_override(raw, *parse_override(text))
    run = copy.deepcopy(raw)
    for section, defaults in DEFAULTS.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise LaunchConfigError(f"section {section!r} must be a mapping")
        run[section] = {**copy.deepcopy(defaults), **given}
    unknown = sorted(set(raw.get("launch") or {}) - set(LAUNCH_DEFAULTS))
    if unknown:
        raise LaunchConfigError(f"unknown launch key(s): {', '.join(unknown)}; known: {', '.join(LAUNCH_DEFAULTS)}")
    _check_launch(run["launch"])
    if run["parallel"]["schedule"] not in SCHEDULES:
        raise LaunchConfigError(f"parallel.schedule={run['parallel']['schedule']!r} is not one of {SCHEDULES}")
    return run


def _check_launch(launch: dict[str, Any]) -> None:
    for key in ("nodes", "gpus_per_node", "signal_seconds"):
        value = launch[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "signal_seconds" else 1):
            raise LaunchConfigError(f"launch.{key} must be a positive integer, got {value!r}")
    tasks = launch["tasks_per_node"]
    if tasks is not None and (not isinstance(tasks, int) or tasks < 1):
        raise LaunchConfigError(f"launch.tasks_per_node must be a positive integer or null, got {tasks!r}")
    if launch["launcher"] not in LAUNCHERS:
        raise LaunchConfigError(f"launch.launcher={launch['launcher']!r} is not one of {LAUNCHERS}")
    if not isinstance(launch["env_overrides"], dict):
        raise LaunchConfigError("launch.env_overrides must be a mapping of VARIABLE: value")
    for key in ("container_mounts", "setup"):
        if not isinstance(launch[key], list):
            raise LaunchConfigError(f"launch.{key} must be a list")
    for key in ("requeue", "cpu"):
        if not isinstance(launch[key], bool):
            raise LaunchConfigError(f"launch.{key} must be true or false, got {launch[key]!r}")


@dataclass(frozen=True)
class Layout:
    """Ranks and parallel sizes of one run; data parallel = world / (tensor * pipeline)."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    tensor: int
    pipeline: int
    expert: int
    schedule: str
    cpu: bool

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def data(self) -> int:
        return self.world // (self.tensor * self.pipeline)

    @property
    def expert_data(self) -> int:
        """Replicas of each expert: world / (expert * pipeline); experts are not tensor-parallel
        (dsv3-train sets Megatron-Core's expert_tensor_parallel_size = 1)."""
        return self.world // (self.expert * self.pipeline)

    def describe(self) -> str:
        unit = "tasks" if self.cpu else "GPUs"
        return (f"{self.nodes} nodes x {self.tasks_per_node} {unit} = {self.world} ranks; TP{self.tensor} "
                f"PP{self.pipeline} ({self.schedule}) EP{self.expert} DP{self.data}")


def layout(run: dict[str, Any]) -> Layout:
    launch, parallel = run["launch"], run["parallel"]
    tasks = launch["tasks_per_node"] or (1 if launch["cpu"] else launch["gpus_per_node"])
    return Layout(nodes=launch["nodes"], gpus_per_node=launch["gpus_per_node"], tasks_per_node=tasks,
                  tensor=int(parallel["tensor"]), pipeline=int(parallel["pipeline"]),
                  expert=int(parallel["expert"]), schedule=parallel["schedule"], cpu=launch["cpu"])
