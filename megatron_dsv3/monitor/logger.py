"""MetricsLogger: fans metrics out to sinks; ``build_logger`` reads the run YAML's ``logging:``."""
from __future__ import annotations

import numbers
import os
from typing import Any, Optional

from .expert_load import ExpertLoadTracker
from .sinks import ConsoleSink, JsonlSink, TensorBoardSink, WandbSink

METRICS_FILENAME = "metrics.jsonl"

DEFAULT_LOGGING = {
    "interval": 10,
    "console": True,
    "jsonl": True,
    "wandb": False,
    "wandb_project": "megatron-dsv3",
    "wandb_mode": None,  # "offline" | "online" | None (WANDB_MODE decides)
    "wandb_run_name": None,  # default: the run directory's name
    "wandb_bar_charts": False,
    "tensorboard": False,
    "total_steps": None,  # default: train.steps / train.iters / train_iters of the run config
}


def is_logging_rank(rank: int = 0) -> bool:
    """True on the rank that logs (``rank=-1``: the last, where Megatron's loss lives).

    Without an initialised ``torch.distributed`` every process is the logging rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == rank % dist.get_world_size()


def _to_scalar(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric value must be a number or string, got {type(value).__name__}")


class MetricsLogger:
    """Sends each record to every sink; call only on the logging rank."""

    def __init__(self, sinks: list, interval: int = 1):
        self.sinks = list(sinks)
        self.interval = max(1, int(interval))

    def should_log(self, step: int) -> bool:
        return step % self.interval == 0

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Scalars (floats, ints, 0-d tensors) of one step."""
        scalars = {k: _to_scalar(v) for k, v in metrics.items()}
        for sink in self.sinks:
            sink.write(step, scalars)

    def log_expert_load(self, step: int, tracker: ExpertLoadTracker, prefix: str = "moe/") -> dict[str, float]:
        """Log the tracker's summary and per-expert arrays, then reset it; returns the summary."""
        scalars, arrays = tracker.summary(prefix), tracker.histograms(prefix)
        for sink in self.sinks:
            sink.write(step, scalars, arrays)
        tracker.reset()
        return scalars

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _total_steps(run_config: Optional[dict]) -> Optional[int]:
    cfg = run_config or {}
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    for value in (train.get("steps"), train.get("iters"), cfg.get("train_iters")):
        if value:
            return int(value)
    return None


def build_logger(logging_cfg: Optional[dict], run_dir: str | os.PathLike,
                 run_config: Optional[dict] = None) -> MetricsLogger:
    """MetricsLogger from the ``logging:`` section; files go under ``run_dir``."""
    unknown = set(logging_cfg or {}) - set(DEFAULT_LOGGING)
    if unknown:
        raise ValueError(f"unknown logging keys {sorted(unknown)}; known: {sorted(DEFAULT_LOGGING)}")
    cfg = {**DEFAULT_LOGGING, **(logging_cfg or {})}
    run_dir = os.fspath(run_dir)
    sinks: list = []
    if cfg["console"]:
        sinks.append(ConsoleSink(total_steps=cfg["total_steps"] or _total_steps(run_config)))
    if cfg["jsonl"]:
        sinks.append(JsonlSink(os.path.join(run_dir, METRICS_FILENAME)))
    if cfg["tensorboard"]:
        sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard")))
    if cfg["wandb"]:
        name = cfg["wandb_run_name"] or os.path.basename(os.path.abspath(run_dir))
        sinks.append(WandbSink(cfg["wandb_project"], name, run_config, cfg["wandb_mode"], dir=run_dir,
                               bar_charts=cfg["wandb_bar_charts"]))
    return MetricsLogger(sinks, interval=cfg["interval"])
