"""Environment presets (package data: `megatron_dsv3/launch/presets/*.yaml`) and the environment a
run's batch script exports."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_dsv3 import safe_data
from megatron_dsv3.launch.run import LaunchConfigError
from megatron_dsv3.pipeline.schedule import get as get_schedule
from megatron_dsv3.run_config import ParallelSection


def launch_dir() -> Path:
    """The folder of the batch-script template and the presets: installed with the package;
    $DSV3_LAUNCH_DIR points at a site's own copy."""
    return Path(os.environ.get("DSV3_LAUNCH_DIR") or Path(__file__).resolve().parent)


def load_preset(name: str) -> dict[str, Any]:
    path = launch_dir() / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (launch_dir() / "presets").glob("*.yaml"))
        raise LaunchConfigError(f"launch.env_preset={name!r} has no file {path}; known presets: {', '.join(known)}")
    try:
        preset = safe_data.load_yaml(path.read_text(), f"launch preset {path}")
    except safe_data.YAMLError as error:
        raise LaunchConfigError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise LaunchConfigError(f"launch preset {path} cannot be read: {error}") from None
    gpu = preset.get("gpu") if isinstance(preset, dict) else None
    problem = ("must hold a mapping" if not isinstance(preset, dict) else
               "env must be a mapping of variables" if not isinstance(preset.get("env") or {}, dict) else
               "gpu must be null or a mapping with a model and a finite memory_gib > 0" if gpu is not None and not (
                   isinstance(gpu, dict) and isinstance(gpu.get("model"), str) and _positive(gpu.get("memory_gib")))
               else "reserve_gib must be a finite number >= 0" if not _positive(preset.get("reserve_gib", 0), zero=True)
               else None)
    if problem:
        raise LaunchConfigError(f"launch preset {path}: {problem}")
    return preset


def _positive(value: Any, zero: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value >= 0 if zero else value > 0))


def gpu_memory_gib(preset: dict[str, Any]) -> Optional[float]:
    """Usable GPU memory of the preset's GPU; None for CPU presets."""
    gpu = preset.get("gpu")
    return None if not gpu else float(gpu["memory_gib"])


def cuda_device_max_connections(parallel: ParallelSection) -> int:
    """CUDA_DEVICE_MAX_CONNECTIONS from the layout.

    1 when tensor parallel: TP communication overlap relies on kernels being issued in order on one
    hardware queue. 32 when expert parallel or a schedule with `side_streams` (DualPipe's F&B):
    all-to-all and P2P overlap with compute on many streams. Otherwise CUDA's default of 8.
    """
    if parallel.tensor > 1:
        return 1
    if parallel.expert > 1 or get_schedule(parallel.schedule).side_streams:
        return 32
    return 8


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: Optional[str]  # None = unset
    source: str  # "preset <name>", "layout", "site override"


def environment(preset: dict[str, Any], parallel: ParallelSection, overrides: dict[str, Any]) -> list[EnvVar]:
    """Preset variables, then the layout-derived ones, then site overrides, which always win."""
    name = preset.get("name", "?")
    values: dict[str, EnvVar] = {}
    for key, value in (preset.get("env") or {}).items():
        values[key] = EnvVar(key, str(value), f"preset {name}")
    if preset.get("gpu"):
        values["CUDA_DEVICE_MAX_CONNECTIONS"] = EnvVar(
            "CUDA_DEVICE_MAX_CONNECTIONS", str(cuda_device_max_connections(parallel)),
            f"layout TP{parallel.tensor} EP{parallel.expert} {parallel.schedule}")
    for key, value in overrides.items():
        was = values.get(key)
        note = f"site override (preset: {was.value})" if was and was.value is not None else "site override"
        values[key] = EnvVar(key, None if value is None else _text(value), note)
    return list(values.values())


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
