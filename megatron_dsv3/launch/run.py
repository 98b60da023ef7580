"""The run YAML as dsv3-launch reads it: the trainer's sections validated exactly as dsv3-train
validates them (`load_run_config`), the `launch:` section, and the layout.

Every `launch:` value that reaches the batch script is checked here: no control characters (a
newline would end sbatch's `#SBATCH` block and start a shell command), Slurm's own formats for
`time`, `partition` and `account`, shell variable names for `env_overrides`. The renderer quotes
what it writes; `launch.setup` and `launch.command` are shell by design, trusted like the script.
"""
from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from megatron_dsv3.config import ConfigError
from megatron_dsv3.data import DataError
from megatron_dsv3.run_config import RunConfigError, load_run_config

LAUNCH_DEFAULTS: dict[str, Any] = {
    "nodes": 1, "gpus_per_node": 8, "tasks_per_node": None, "partition": None, "account": None,
    "time": "04:00:00", "job_name": "dsv3", "env_preset": "h800", "env_overrides": {},
    "container_image": None, "container_mounts": [], "launcher": "srun", "requeue": True,
    "signal_seconds": 120, "output_dir": "runs/slurm", "cpu": False, "python": None,
    "command": None,  # the training command; None = `dsv3-train` (or `<python> -m megatron_dsv3.train`)
    "setup": [],  # shell lines run in the batch script before the step (module load, source venv, ...)
}
LAUNCHERS = ("srun", "torchrun")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit.
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE")
SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SLURM_NAME_LIST = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
SHELL_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Taken as typed: YAML 1.1 reads an unquoted 24:00:00 as the base-60 number 86400.
VERBATIM_OVERRIDES = ("launch.time",)


class LaunchConfigError(ValueError):
    """A run YAML that dsv3-launch cannot read; the message names the offending key."""


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value; the text itself for VERBATIM_OVERRIDES)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or "." not in key:
        raise LaunchConfigError(f"override {text!r} is not of the form section.key=value")
    if key in VERBATIM_OVERRIDES:
        return key, raw
    try:
        return key, yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        raise LaunchConfigError(f"override {text!r}: the value is not valid YAML "
                                f"({getattr(error, 'problem', None) or error})") from None


def apply_override(run: dict, key: str, value: Any) -> None:
    node = run
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LaunchConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def load_run(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """RUN.yaml with `section.key=value` overrides: every section but `launch:` through the trainer's
    `load_run_config` (refused exactly as dsv3-train would refuse it, before anything is queued),
    then `launch:` over its defaults, unknown keys and unsafe values refused by name."""
    overrides = list(overrides)
    try:
        run = load_run_config(str(path), tuple(o for o in overrides if not o.startswith("launch.")))
    except (RunConfigError, ConfigError, DataError) as error:
        raise LaunchConfigError(str(error)) from error
    given = {"launch": copy.deepcopy(run["launch"])}
    for text in overrides:
        if text.startswith("launch."):
            apply_override(given, *parse_override(text))
    unknown = sorted(set(given["launch"]) - set(LAUNCH_DEFAULTS))
    if unknown:
        raise LaunchConfigError(f"unknown launch key(s): {', '.join(unknown)}; known: {', '.join(LAUNCH_DEFAULTS)}")
    run["launch"] = {**copy.deepcopy(LAUNCH_DEFAULTS), **given["launch"]}
    _check_launch(run["launch"])
    return run


def _text(key: str, value: Any) -> str:
    """`value` as one non-empty line; a number stands for its digits (`job_name: 42`)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise LaunchConfigError(f"{key} must be a string, got {value!r}")
    text = str(value)
    if not text or CONTROL_CHARACTER.search(text):
        raise LaunchConfigError(f"{key}={text!r} must be one non-empty line without control characters: in the "
                                "batch script a newline would end sbatch's #SBATCH block and run the rest as a command")
    return text


def _slurm_text(key: str, value: Any, pattern: re.Pattern, form: str) -> str:
    text = _text(key, value)
    if not pattern.fullmatch(text):
        raise LaunchConfigError(f"{key}={text!r} is not {form}")
    return text


def _check_launch(launch: dict[str, Any]) -> None:
    """Refuse bad `launch:` values by key; normalise the texts in place."""
    for key in ("nodes", "gpus_per_node", "signal_seconds"):
        value = launch[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "signal_seconds" else 1):
            raise LaunchConfigError(f"launch.{key} must be a positive integer, got {value!r}")
    tasks = launch["tasks_per_node"]
    if tasks is not None and (not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1):
        raise LaunchConfigError(f"launch.tasks_per_node must be a positive integer or null, got {tasks!r}")
    if launch["launcher"] not in LAUNCHERS:
        raise LaunchConfigError(f"launch.launcher={launch['launcher']!r} is not one of {LAUNCHERS}")
    for key in ("requeue", "cpu"):
        if not isinstance(launch[key], bool):
            raise LaunchConfigError(f"launch.{key} must be true or false, got {launch[key]!r}")
    for key in ("container_mounts", "setup"):
        if not isinstance(launch[key], list):
            raise LaunchConfigError(f"launch.{key} must be a list")

    launch["job_name"] = _text("launch.job_name", launch["job_name"])
    if set(launch["job_name"]) & set("/\\"):
        raise LaunchConfigError(f"launch.job_name={launch['job_name']!r} must not contain '/' (it names the script and "
                                "log files) or '\\' (sbatch reads it as an escape)")
    launch["output_dir"] = _text("launch.output_dir", launch["output_dir"])
    if set(launch["output_dir"]) & set("%\\"):
        raise LaunchConfigError(f"launch.output_dir={launch['output_dir']!r} must not contain '%' (sbatch expands "
                                "%-patterns in --output) or '\\' (sbatch reads it as an escape)")
    if not isinstance(launch["time"], str):
        raise LaunchConfigError(f"launch.time={launch['time']!r} must be quoted text such as \"24:00:00\" "
                                "(YAML reads an unquoted 24:00:00 as the base-60 number 86400)")
    _slurm_text("launch.time", launch["time"], SLURM_TIME,
                "a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED")
    if launch["partition"] is not None:
        launch["partition"] = _slurm_text("launch.partition", launch["partition"], SLURM_NAME_LIST,
                                          "Slurm partition name(s): letters, digits, '_', '.', '-', comma-separated")
    if launch["account"] is not None:
        launch["account"] = _slurm_text("launch.account", launch["account"], SLURM_NAME,
                                        "a Slurm account name: letters, digits, '_', '.', '-'")
    _slurm_text("launch.env_preset", launch["env_preset"], SLURM_NAME,
                "a preset name (a file launch/presets/NAME.yaml; letters, digits, '_', '.', '-')")
    for key in ("python", "container_image"):
        if launch[key] is not None:
            launch[key] = _text(f"launch.{key}", launch[key])
    launch["container_mounts"] = [_text("launch.container_mounts", mount) for mount in launch["container_mounts"]]
    _check_env_overrides(launch["env_overrides"])
    _check_command(launch["command"])


def _check_env_overrides(overrides: Any) -> None:
    if not isinstance(overrides, dict):
        raise LaunchConfigError("launch.env_overrides must be a mapping of VARIABLE: value")
    for name, value in overrides.items():
        if not isinstance(name, str) or not SHELL_VARIABLE.fullmatch(name):
            raise LaunchConfigError(f"launch.env_overrides key {name!r} is not a shell variable name "
                                    "(letters, digits and '_', not starting with a digit)")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise LaunchConfigError(f"launch.env_overrides.{name} must be a string, number, true/false or null "
                                    f"(null unsets it), got {value!r}")
        if CONTROL_CHARACTER.search(str(value)):
            raise LaunchConfigError(f"launch.env_overrides.{name}={value!r} must not contain control characters")


def _check_command(command: Any) -> None:
    """`launch.command` is trusted (the site's own training command), but must split into words."""
    if command is None or (isinstance(command, list) and command and all(isinstance(w, str) for w in command)):
        return
    if not isinstance(command, str):
        raise LaunchConfigError(f"launch.command must be a string or a non-empty list of strings, got {command!r}")
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise LaunchConfigError(f"launch.command={command!r} does not split into words: {error}") from None
    if not words:
        raise LaunchConfigError("launch.command is empty; leave it null to run dsv3-train")


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
