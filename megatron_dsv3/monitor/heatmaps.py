"""Heatmap images of expert load and routing bias for the dashboards (wandb, TensorBoard).

`MetricsLogger` draws them every `logging.heatmap_interval` steps, only when a sink shows images:
a layer x expert load map and bias map of the logging interval, and an expert x step load map
over the run (layer-averaged, or one chosen layer). Each function returns an RGB image
[height, width, 3] uint8, which `wandb.Image` and TensorBoard's `add_image` (HWC) both take.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DPI = 80


def _figure(height_in: float):
    # matplotlib (about 0.7 s to import) when a heatmap is drawn, not in every run that imports the monitor
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _load_scale(values: np.ndarray) -> dict:
    """Load relative to balanced: white at 1 (balanced), blue down to 0 (starved), red above."""
    from matplotlib.colors import TwoSlopeNorm  # imported when drawing, as in _figure

    return {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(values.max())))}


def _tick_labels(ax, names: Sequence[str], axis: str, most: int = 24) -> None:
    """Name the rows (or columns) when there are few; otherwise every n-th."""
    every = max(1, -(-len(names) // most))
    positions = list(range(0, len(names), every))
    getattr(ax, f"set_{axis}ticks")(positions, [names[i] for i in positions], fontsize="small")


def layer_expert_map(values_LE: np.ndarray, layer_names: Sequence[str], title: str, label: str,
                     centered: bool) -> np.ndarray:
    """One row per MoE layer, one column per expert. `centered`: a diverging scale around 0
    (the bias); otherwise load relative to balanced (1 = 1/E) on `_load_scale`."""
    values_LE = np.asarray(values_LE, dtype=np.float64)
    layers, experts = values_LE.shape
    if centered:
        bound = float(np.abs(values_LE).max()) or 1.0
        scale = {"cmap": "PuOr_r", "vmin": -bound, "vmax": bound}
    else:
        scale = _load_scale(values_LE)
    fig = _figure(min(10.0, 1.4 + 0.28 * layers))
    ax = fig.add_subplot()
    image = ax.imshow(values_LE, aspect="auto", origin="lower", interpolation="nearest", **scale)
    _tick_labels(ax, list(layer_names), "y")
    ax.set(xlabel="expert", title=title)
    if experts <= 32:
        ax.set_xticks(range(experts))
        ax.tick_params(axis="x", labelsize="small")
    fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
    return _rgb(fig)


def load_over_time_map(steps: Sequence[int], values_TE: np.ndarray, title: str) -> np.ndarray:
    """One column per logged step, one row per expert: load relative to balanced (1 = 1/E) over
    the steps since the previous logged step (the column spans them)."""
    values_TE = np.asarray(values_TE, dtype=np.float64)
    experts = values_TE.shape[1]
    fig = _figure(min(8.0, 1.6 + 0.12 * experts))
    ax = fig.add_subplot()
    steps = np.asarray(steps, dtype=np.float64)  # logged steps need not be evenly spaced
    first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1.0)
    image = ax.pcolormesh(np.concatenate([[first], steps]), np.arange(experts + 1) - 0.5, values_TE.T,
                          **_load_scale(values_TE))
    ax.set(xlabel="step", ylabel="expert", title=title)
    fig.colorbar(image, ax=ax, label="load / balanced load", fraction=0.04, pad=0.02)
    return _rgb(fig)
