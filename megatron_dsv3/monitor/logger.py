"""MetricsLogger: fans metrics out to sinks; ``build_logger`` reads the run's ``logging:`` section
(``run_config.LoggingSection``: its keys, defaults and checks)."""
from __future__ import annotations

import numbers
import os
from typing import Any, Optional

from .expert_load import ExpertLoadTracker
from .sinks import ConsoleSink, JsonlSink, TensorBoardSink, WandbSink

METRICS_FILENAME = "metrics.jsonl"

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

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

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


def build_logger(logging, run_dir: str | os.PathLike, run_config: Optional[dict] = None,
                 total_steps: Optional[int] = None) -> MetricsLogger:
    """MetricsLogger from the ``logging:`` section; files go under ``run_dir``; ``run_config``
    (a plain dict) is recorded by wandb."""
    run_dir = os.fspath(run_dir)
    sinks: list = []
    if logging.console:
        sinks.append(ConsoleSink(total_steps=total_steps))
    if logging.jsonl:
        sinks.append(JsonlSink(os.path.join(run_dir, METRICS_FILENAME)))
    if logging.tensorboard:
        sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard")))
    if logging.wandb:
        name = logging.wandb_run_name or os.path.basename(os.path.abspath(run_dir))
        sinks.append(WandbSink(logging.wandb_project, name, run_config, logging.wandb_mode, dir=run_dir,
                               bar_charts=logging.wandb_bar_charts))
    return MetricsLogger(sinks)
