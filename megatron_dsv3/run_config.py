"""The run configuration shared by dsv3-train and dsv3-launch: a YAML file plus dotted overrides.

    dsv3-train --config examples/tiny-cpu.yaml train.steps=50 parallel.expert=2

Sections: model, parallel, train, data, checkpoint, logging, launch (read by dsv3-launch).
Unknown keys are refused by name; the resolved config is saved beside the checkpoints.
"""
from __future__ import annotations

import copy
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
    "parallel": {"tensor": 1, "pipeline": 1, "expert": 1, "schedule": "1f1b", "distributed_optimizer": "auto"},
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
    "checkpoint": {"dir": "runs/tiny/checkpoints", "save_interval": 100, "resume": True, "keep": 3},
    "logging": {"interval": 10, "console": True, "jsonl": True, "wandb": False, "wandb_project": "megatron-dsv3",
                "wandb_mode": None, "tensorboard": False},
    "launch": {},
}


def _merge(base: dict, update: dict, where: str, open_sections=("launch", "model.overrides", "data")) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if key not in out and where not in open_sections and not (where == "" and key in DEFAULTS):
            raise RunConfigError(f"unknown config key {path!r}; known keys here: {', '.join(sorted(out))}")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and path not in open_sections:
            out[key] = _merge(out[key], value, path, open_sections)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RunConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    return key.split("."), yaml.safe_load(raw) if raw != "" else None


def load_run_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Defaults <- YAML file <- dotted overrides, validated."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise RunConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RunConfigError(f"config file {path} must hold a mapping of sections")
        config = _merge(config, loaded, "")
    for item in overrides:
        keys, value = _parse_override(item)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        config = _merge(config, nested, "")
    validate_run_config(config)
    return config


def model_config(run: dict[str, Any]) -> DSV3Config:
    overrides = dict(run["model"].get("overrides") or {})
    overrides.setdefault("fp8", run["train"]["fp8"])
    return DSV3Config.preset(run["model"]["preset"], **overrides)


def validate_run_config(run: dict[str, Any]) -> None:
    train, par = run["train"], run["parallel"]
    for key in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval"):
        if not isinstance(train[key], int) or train[key] <= 0:
            raise RunConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    for key in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "clip_grad", "max_loss"):
        value = train[key]
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e6 or 3e-4, without a dot, as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunConfigError(f"train.{key} must be a number, got {train[key]!r}")
        train[key] = float(value)
    for key in ("tensor", "pipeline", "expert"):
        if not isinstance(par[key], int) or par[key] <= 0:
            raise RunConfigError(f"parallel.{key} must be a positive integer, got {par[key]!r}")
    if train["global_batch_size"] % train["micro_batch_size"]:
        raise RunConfigError(f"train.global_batch_size={train['global_batch_size']} is not a multiple of "
                             f"train.micro_batch_size={train['micro_batch_size']}")
    if train["device"] not in ("auto", "cpu", "cuda"):
        raise RunConfigError(f"train.device must be auto, cpu or cuda, got {train['device']!r}")
    from megatron_dsv3 import registry

    if par["schedule"] not in registry.names("schedule"):
        raise RunConfigError(f"parallel.schedule={par['schedule']!r} is not a registered pipeline schedule "
                             f"(registered: {', '.join(registry.names('schedule'))})")
    if par["distributed_optimizer"] not in ("auto", True, False):
        raise RunConfigError(f"parallel.distributed_optimizer={par['distributed_optimizer']!r} must be auto, true or false")
    if train["param_dtype"] not in ("float32", "bfloat16"):
        raise RunConfigError(f"train.param_dtype={train['param_dtype']!r} must be float32 or bfloat16")
    if train["param_dtype"] == "bfloat16" and not train["bf16"]:
        raise RunConfigError("train.param_dtype=bfloat16 needs train.bf16=true (BF16 weights compute under BF16 autocast)")
    if train["param_dtype"] == "bfloat16" and par["distributed_optimizer"] is False:
        raise RunConfigError("train.param_dtype=bfloat16 keeps the FP32 master weights in Megatron's distributed optimizer, "
                             "and parallel.distributed_optimizer is false")
    if train["recompute"] not in ("none", "selective", "full"):
        raise RunConfigError(f"train.recompute={train['recompute']!r} is not one of none, selective (RMSNorm, MLA "
                             "up-projections and SwiGLU outputs rerun in backward) or full (every decoder layer)")
    if train["fp8"] not in ("none", "tile"):
        raise RunConfigError(f"train.fp8 must be none or tile, got {train['fp8']!r}")
    model_config(run)  # refuses bad model presets/overrides by name
    resolve_data_config(run["data"])
