"""MetricsLogger: fans metrics out to sinks, and draws the expert heatmaps for the sinks that
show images; ``build_logger`` reads the run's ``logging:`` section (``run_config.LoggingSection``:
its keys, defaults and checks)."""
from __future__ import annotations

import collections
import numbers
import os
from typing import Any, Optional

import numpy as np
import torch.distributed as dist

from megatron_dsv3.run_config import RunConfigError

from . import heatmaps
from .expert_load import ExpertLoadTracker
from .sinks import ConsoleSink, JsonlSink, TensorBoardSink, WandbSink

METRICS_FILENAME = "metrics.jsonl"
HISTORY_STEPS = 2000  # logged steps the load-over-time heatmap keeps (the latest)

def is_logging_rank(rank: int = 0) -> bool:
    """True on the rank that logs (``rank=-1``: the last, where Megatron's loss lives).

    Without an initialised ``torch.distributed`` every process is the logging rank.
    """
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
    """Sends each record to every sink; call only on the logging rank.

    At the first logged step from each multiple of ``heatmap_interval`` (0: never), and at a run's
    last step, the sinks with a
    ``write_images`` method get the heatmaps (``monitor/heatmaps.py``) as ``moe/heatmap/load``,
    ``moe/heatmap/bias`` and ``moe/heatmap/load_over_time`` (averaged over the MoE layers, or of
    decoder layer ``heatmap_layer``). Without such a sink nothing is drawn or kept.
    """

    def __init__(self, sinks: list, heatmap_interval: int = 0, heatmap_layer: Optional[int] = None):
        self.sinks = list(sinks)
        self.heatmap_interval = heatmap_interval
        self.heatmap_layer = heatmap_layer
        self._image_sinks = [s for s in self.sinks if hasattr(s, "write_images")] if heatmap_interval else []
        self._history: collections.deque = collections.deque(maxlen=HISTORY_STEPS)  # (step, load / balanced [E])
        self._heatmaps_drawn_at = 0  # the step they were last drawn at
        self._logged_at: Optional[int] = None  # the previous expert-load log's step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Scalars (floats, ints, 0-d tensors) of one step."""
        scalars = {k: _to_scalar(v) for k, v in metrics.items()}
        for sink in self.sinks:
            sink.write(step, scalars)

    def log_expert_load(self, step: int, tracker: ExpertLoadTracker, prefix: str = "moe/",
                        last: bool = False) -> dict[str, float]:
        """Log the tracker's summary and per-expert arrays (and the heatmaps when due, or at the
        run's `last` step), then reset it; returns the summary."""
        scalars, arrays = tracker.summary(prefix), tracker.histograms(prefix)
        for sink in self.sinks:
            sink.write(step, scalars, arrays)
        if self._image_sinks:
            self._remember(step, tracker, arrays, prefix)
            if last or step // self.heatmap_interval > self._heatmaps_drawn_at // self.heatmap_interval:
                self._heatmaps_drawn_at = step
                images = self.heatmaps(step, tracker, arrays, prefix)
                for sink in self._image_sinks:
                    sink.write_images(step, images)
        self._logged_at = step
        tracker.reset()
        return scalars

    def _layer_rows(self, tracker: ExpertLoadTracker, arrays: dict[str, list], prefix: str,
                    stat: str) -> tuple[list[str], np.ndarray]:
        names = [tracker.layer_names[n] for n in tracker.layer_numbers
                 if f"{prefix}{tracker.layer_names[n]}/{stat}" in arrays]
        rows = [arrays[f"{prefix}{name}/{stat}"] for name in names]
        return names, np.asarray(rows, dtype=np.float64).reshape(len(names), tracker.num_experts)

    def _remember(self, step: int, tracker: ExpertLoadTracker, arrays: dict[str, list], prefix: str) -> None:
        if self.heatmap_layer is not None:
            key = f"{prefix}{tracker.layer_names[self.heatmap_layer]}/load"
            if key in arrays:
                self._history.append((step, np.asarray(arrays[key]) * tracker.num_experts))
            return
        _, load_LE = self._layer_rows(tracker, arrays, prefix, "load")
        if len(load_LE):
            self._history.append((step, load_LE.mean(axis=0) * tracker.num_experts))

    def heatmaps(self, step: int, tracker: ExpertLoadTracker, arrays: dict[str, list],
                 prefix: str = "moe/") -> dict[str, np.ndarray]:
        """The images of this step's arrays and of the load history (RGB [H, W, 3] uint8)."""
        images = {}
        names, load_LE = self._layer_rows(tracker, arrays, prefix, "load")
        if names:
            images[f"{prefix}heatmap/load"] = heatmaps.layer_expert_map(
                load_LE * tracker.num_experts, names, "Expert load, steps " + (
                    f"{self._logged_at + 1}-{step}" if self._logged_at is not None else f"logged at {step}"),
                "load / balanced load", centered=False)
        names, bias_LE = self._layer_rows(tracker, arrays, prefix, "bias")
        if names:
            images[f"{prefix}heatmap/bias"] = heatmaps.layer_expert_map(
                bias_LE, names, f"Routing bias b_i at step {step}", "bias", centered=True)
        if self._history:
            which = ("the MoE layers' mean" if self.heatmap_layer is None
                     else tracker.layer_names[self.heatmap_layer])
            steps, rows = zip(*self._history)
            images[f"{prefix}heatmap/load_over_time"] = heatmaps.load_over_time_map(
                steps, np.stack(rows), f"Expert load over time ({which})")
        return images

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_logger(logging, run_dir: str | os.PathLike, run_config: Optional[dict] = None,
                 total_steps: Optional[int] = None, moe_layers: Optional[list[int]] = None) -> MetricsLogger:
    """MetricsLogger from the ``logging:`` section; files go under ``run_dir``; ``run_config``
    (a plain dict) is recorded by wandb. ``moe_layers`` (the MoE layers' decoder indices) checks
    ``logging.heatmap_layer``."""
    if logging.heatmap_layer is not None and moe_layers is not None and logging.heatmap_layer not in moe_layers:
        raise RunConfigError(f"logging.heatmap_layer={logging.heatmap_layer} is not a MoE layer of this model "
                             f"(MoE layers: {', '.join(map(str, moe_layers))})")
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
    return MetricsLogger(sinks, logging.heatmap_interval, logging.heatmap_layer)
