"""The run configuration shared by dsv3-train and dsv3-launch: a YAML file plus dotted overrides.

    dsv3-train --config examples/tiny-cpu.yaml train.steps=50 parallel.expert=2

Sections: model, parallel, train, data, checkpoint, logging, launch (read by dsv3-launch).
Unknown keys are refused by name; the resolved config is saved beside the checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.data.datasets import DEFAULTS as DATA_DEFAULTS, resolve_data_config


class RunConfigError(ValueError):
    """A bad run configuration; the message names the key."""


DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny", "overrides": {}},
    # distributed_optimizer: Megatron-Core's DDP + distributed optimizer (ZeRO-1); auto = on GPU only.
    # timeout_s bounds every collective of the training step (a stalled rank fails the job).
    "parallel": {"tensor": 1, "pipeline": 1, "expert": 1, "schedule": "1f1b", "distributed_optimizer": "auto",
                 "timeout_s": 600},
    "train": {
        "steps": 300, "micro_batch_size": 8, "global_batch_size": 16, "seq_length": 128,
        "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 20, "weight_decay": 0.1,
        "adam_beta1": 0.9, "adam_beta2": 0.95, "clip_grad": 1.0, "seed": 1234,
        "bf16": False, "fp8": "none", "bf16_adam_moments": False, "recompute": "none",
        "param_dtype": "float32",  # bfloat16: BF16 weights, FP32 masters in the distributed optimizer
        "log_interval": 10, "device": "auto",
        # Schedules as [[tokens_from, value], ...]; the report's are gamma 0.001 until 14.3T tokens
        # then 0, and lambda 0.3 until 10T then 0.1. None keeps the model preset's constant value.
        "bias_update_rate_schedule": None, "mtp_loss_weight_schedule": None,
        "max_loss": 1.0e3,  # a loss above this (or NaN) stops the run
    },
    "data": dict(DATA_DEFAULTS),
    # save_timeout_s bounds a checkpoint's writes and the waits while rank 0 renames and prunes.
    "checkpoint": {"dir": "runs/tiny/checkpoints", "save_interval": 100, "resume": True, "keep": 3,
                   "save_timeout_s": 1800},
    "logging": {"interval": 10, "console": True, "jsonl": True, "wandb": False, "wandb_project": "megatron-dsv3",
                "wandb_mode": None, "tensorboard": False},
    "launch": {},
}


OPEN_SECTIONS = ("launch", "model.overrides", "data")  # their keys are checked by their readers


def _merge(base: dict, update: dict, where: str = "") -> dict:
    """`update` over `base`, section by section: a key given replaces only that key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        is_open = any(where == section or where.startswith(section + ".") for section in OPEN_SECTIONS)
        if key not in out and not is_open:
            raise RunConfigError(f"unknown config key {path!r}; known keys here: {', '.join(sorted(out))}")
        if isinstance(out.get(key), dict):
            if value is None:
                continue  # an empty section in YAML
            if not isinstance(value, dict):
                raise RunConfigError(f"{path} must be a mapping of keys, got {value!r}")
            out[key] = _merge(out[key], value, path)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    keys = key.split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise RunConfigError(f"override {item!r} must look like section.key=value")
    try:
        return keys, yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as error:
        raise RunConfigError(f"override {item!r}: the value is not valid YAML ({error.problem})") from None


def load_run_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Defaults <- YAML file <- dotted overrides, validated."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise RunConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RunConfigError(f"config file {path} is not valid YAML{where}: "
                                 f"{getattr(error, 'problem', None) or error}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise RunConfigError(f"config file {path} cannot be read: {error}") from None
        if not isinstance(loaded, dict):
            raise RunConfigError(f"config file {path} must hold a mapping of sections")
        config = _merge(config, loaded)
    for item in overrides:
        keys, value = _parse_override(item)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        config = _merge(config, nested)
    validate_run_config(config)
    return config


def model_config(run: dict[str, Any]) -> DSV3Config:
    overrides = dict(run["model"].get("overrides") or {})
    overrides.setdefault("fp8", run["train"]["fp8"])
    return DSV3Config.preset(run["model"]["preset"], **overrides)


def _integer(run: dict, section: str, key: str, minimum: int) -> None:
    value = run[section][key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise RunConfigError(f"{section}.{key} must be {kind}, got {value!r}")


def _number(run: dict, section: str, key: str, low: float, high: float = float("inf"),
            low_open: bool = False, high_open: bool = False) -> None:
    """A real number in the interval; PyYAML (YAML 1.1) reads 1e6 or 3e-4 without a dot as
    strings, so numeric strings are accepted and stored as floats."""
    value = run[section][key]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    in_range = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not in_range:
        if high == float("inf"):
            interval = f"{'>' if low_open else '>='} {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise RunConfigError(f"{section}.{key} must be a number {interval}, got {run[section][key]!r}")
    run[section][key] = float(value)


def _boolean(run: dict, section: str, key: str) -> None:
    if not isinstance(run[section][key], bool):
        raise RunConfigError(f"{section}.{key} must be true or false, got {run[section][key]!r}")


def _choice(run: dict, section: str, key: str, choices: tuple, meaning: str = "") -> None:
    value = run[section][key]
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise RunConfigError(f"{section}.{key}={value!r} is not one of {', '.join(map(str, choices))}{meaning}")


def _value_schedule(run: dict, key: str) -> None:
    schedule = run["train"][key]
    if schedule is None:
        return
    pairs_ok = isinstance(schedule, list) and all(
        isinstance(item, (list, tuple)) and len(item) == 2 for item in schedule)
    if pairs_ok:
        try:
            pairs_ok = all(float(a) >= 0 and float(b) >= 0 for a, b in schedule)
        except (TypeError, ValueError):
            pairs_ok = False
    if not pairs_ok:
        raise RunConfigError(f"train.{key} must be null or a list of [tokens_from, value] pairs of "
                             f"non-negative numbers, got {schedule!r}")


def validate_run_config(run: dict[str, Any]) -> None:
    """Every run setting's check, each error naming its key."""
    for key in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval"):
        _integer(run, "train", key, 1)
    for key in ("warmup_steps", "seed"):
        _integer(run, "train", key, 0)
    _number(run, "train", "lr", 0, low_open=True)
    _number(run, "train", "min_lr", 0, run["train"]["lr"] if isinstance(run["train"]["lr"], float) else float("inf"))
    _number(run, "train", "weight_decay", 0)
    for key in ("adam_beta1", "adam_beta2"):
        _number(run, "train", key, 0, 1, high_open=True)
    _number(run, "train", "clip_grad", 0)
    _number(run, "train", "max_loss", 0, low_open=True)
    for key in ("bf16", "bf16_adam_moments"):
        _boolean(run, "train", key)
    for key in ("bias_update_rate_schedule", "mtp_loss_weight_schedule"):
        _value_schedule(run, key)
    _choice(run, "train", "device", ("auto", "cpu", "cuda"))
    _choice(run, "train", "fp8", ("none", "tile"))
    _choice(run, "train", "recompute", ("none", "selective", "full"),
            " (selective: RMSNorm, MLA up-projections and SwiGLU outputs rerun in backward; full: every decoder layer)")
    _choice(run, "train", "param_dtype", ("float32", "bfloat16"))
    train, par = run["train"], run["parallel"]
    for key in ("tensor", "pipeline", "expert"):
        _integer(run, "parallel", key, 1)
    _choice(run, "parallel", "distributed_optimizer", ("auto", True, False))
    _number(run, "parallel", "timeout_s", 0, low_open=True)
    ckpt = run["checkpoint"]
    if not isinstance(ckpt["dir"], str) or not ckpt["dir"]:
        raise RunConfigError(f"checkpoint.dir must be a folder path, got {ckpt['dir']!r}")
    _integer(run, "checkpoint", "save_interval", 0)
    _integer(run, "checkpoint", "keep", 0)
    _boolean(run, "checkpoint", "resume")
    _number(run, "checkpoint", "save_timeout_s", 0, low_open=True)
    _integer(run, "logging", "interval", 1)
    for key in ("console", "jsonl", "wandb", "tensorboard"):
        _boolean(run, "logging", key)
    if train["global_batch_size"] % train["micro_batch_size"]:
        raise RunConfigError(f"train.global_batch_size={train['global_batch_size']} is not a multiple of "
                             f"train.micro_batch_size={train['micro_batch_size']}")
    from megatron_dsv3 import registry

    if par["schedule"] not in registry.names("schedule"):
        raise RunConfigError(f"parallel.schedule={par['schedule']!r} is not a registered pipeline schedule "
                             f"(registered: {', '.join(registry.names('schedule'))})")
    if train["param_dtype"] == "bfloat16" and not train["bf16"]:
        raise RunConfigError("train.param_dtype=bfloat16 needs train.bf16=true (BF16 weights compute under BF16 autocast)")
    if train["param_dtype"] == "bfloat16" and par["distributed_optimizer"] is False:
        raise RunConfigError("train.param_dtype=bfloat16 keeps the FP32 master weights in Megatron's distributed optimizer, "
                             "and parallel.distributed_optimizer is false")
    model = model_config(run)  # refuses bad model presets/overrides by name
    if train["seq_length"] > model.max_position_embeddings:
        raise RunConfigError(f"train.seq_length={train['seq_length']} is above the model's max_position_embeddings="
                             f"{model.max_position_embeddings} (model.overrides.max_position_embeddings raises it)")
    resolve_data_config(run["data"])
