"""PNG plots of a run's metrics records (as `dsv3-report` reads them from metrics.jsonl).

Each function takes the per-step records and returns PNG bytes, or None when the records hold
nothing to plot. Drawn with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import io
import re
from typing import Any, Callable, Optional

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)(?P<layer>layer_\d+)/(?P<stat>[a-z0-9_]+)$")
_MTP_DEPTH_KEY = re.compile(r"^mtp/(?P<stat>loss|acceptance)_d(?P<depth>\d+)$")
STARVED_FRACTION = 0.1  # an expert is starved below this fraction of the mean load (1/E)
LEGEND_LAYERS = 8  # line plots name each layer up to this many; beyond, layers are thin grey lines


def _pyplot():
    try:  # imported when the report draws, not by the runs that import the monitor
        import matplotlib
    except ImportError as err:
        raise ImportError("the HTML report draws its plots with matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def layers(records: list[dict]) -> dict[str, str]:
    """MoE layer name (``layer_01``) -> its key prefix (``moe/``), in layer order."""
    found: dict[str, str] = {}
    for r in records:
        for key in r:
            m = _LAYER_KEY.match(key)
            if m:
                found.setdefault(m["layer"], m["prefix"])
    return dict(sorted(found.items(), key=lambda kv: int(kv[0].split("_")[1])))


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a scalar metric, over the records that have it."""
    pairs = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def matrix(records: list[dict], key: str) -> tuple[list[int], list[list[float]]]:
    """(steps, per-step vectors) of an array metric, keeping the steps with the usual length."""
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), list) and r[key]]
    if not rows:
        return [], []
    width = max(len(v) for _, v in rows)
    kept = [(s, [float(x) for x in v]) for s, v in rows if len(v) == width]
    return [s for s, _ in kept], [v for _, v in kept]


def mtp_depth_keys(records: list[dict], stat: str) -> list[str]:
    """``mtp/{stat}_dK`` keys present, by depth K."""
    found = {int(m["depth"]): key for r in records for key in r
             for m in [_MTP_DEPTH_KEY.match(key)] if m and m["stat"] == stat}
    return [found[d] for d in sorted(found)]


def loss_plot(records: list[dict]) -> Optional[bytes]:
    """Loss, MTP loss (the logged step's), each depth's MTP loss (mean since the previous logged
    step) and the validation loss and MTP loss (the held-out split's, at each evaluation) against the step."""
    keys = ("loss", "mtp_loss", *mtp_depth_keys(records, "loss"), "valid/loss", "valid/mtp_loss")
    curves = [(k, *series(records, k)) for k in keys]
    labels = {"valid/loss": "validation loss", "valid/mtp_loss": "validation MTP loss"}
    return _step_curves(curves, "Loss and MTP loss", "cross-entropy (nats)", height=3.6,
                        label=lambda name: labels.get(name, f"{name} (mean since the previous log)"
                                                      if name.startswith("mtp/") else name),
                        dashed=lambda name: name.startswith("mtp/"))


def acceptance_plot(records: list[dict]) -> Optional[bytes]:
    """How often each MTP depth's top-1 prediction was the true token (depth 1: the token after
    next, the acceptance rate of speculative decoding), against the step."""
    curves = [(key, *series(records, key)) for key in mtp_depth_keys(records, "acceptance")]
    return _step_curves(curves, "MTP acceptance", "top-1 = true token", height=3.2, ylim=(0, 1),
                        label=lambda name: f"depth {name.rsplit('_d', 1)[1]}")


def _step_curves(curves: list[tuple[str, list, list]], title: str, ylabel: str, height: float,
                 label: Callable[[str], str], dashed: Callable[[str], bool] = lambda name: False,
                 ylim: Optional[tuple[float, float]] = None) -> Optional[bytes]:
    """(name, steps, values) curves against the step, one line each; None when all are empty."""
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, height))
    for name, steps, values in curves:
        ax.plot(steps, values, label=label(name), marker="." if len(steps) < 50 else None,
                linestyle="--" if dashed(name) else "-")
    ax.set(xlabel="step", ylabel=ylabel, title=title, **({"ylim": ylim} if ylim else {}))
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def max_vio_plot(records: list[dict], moe_layers: dict[str, str]) -> Optional[bytes]:
    """MaxVio per MoE layer and the maximum over layers, against the step."""
    curves = [(layer, *series(records, f"{prefix}{layer}/max_vio")) for layer, prefix in moe_layers.items()]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    named = len(curves) <= LEGEND_LAYERS
    for i, (layer, steps, values) in enumerate(curves):
        if named:
            ax.plot(steps, values, label=layer, linewidth=1, alpha=0.7)
        else:
            ax.plot(steps, values, color="grey", linewidth=0.5, alpha=0.4,
                    label=f"each of {len(curves)} layers" if i == 0 else None)
    by_step: dict[int, float] = {}
    for _, steps, values in curves:
        for s, v in zip(steps, values):
            by_step[s] = max(v, by_step.get(s, v))
    ax.plot(sorted(by_step), [by_step[s] for s in sorted(by_step)], color="black", linewidth=2, label="max")
    ax.set(xlabel="step", ylabel="max load / mean load - 1", title="MaxVio (0 = balanced)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=min(5, len(curves) + 1) if named else 2)
    return _png(fig)


def _heatmaps(records: list[dict], moe_layers: dict[str, str], stat: str, title: str, label: str,
              cmap: str, scale, centered: bool) -> Optional[bytes]:
    """One expert x step panel per layer of the array `stat`, on one shared colour scale."""
    panels = []
    for layer, prefix in moe_layers.items():
        steps, rows = matrix(records, f"{prefix}{layer}/{stat}")
        if steps:
            panels.append((layer, steps, [scale(v) for v in rows]))
    if not panels:
        return None
    values = [x for _, _, rows in panels for v in rows for x in v]
    if centered:
        bound = max(abs(x) for x in values) or 1.0
        vmin, vmax = -bound, bound
    else:
        vmin, vmax = 0.0, max(2.0, max(values))
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 1.6 * len(panels)), squeeze=False,
                             sharex=True)
    for ax, (layer, steps, rows) in zip(axes[:, 0], panels):
        experts = len(rows[0])
        image = ax.imshow([list(col) for col in zip(*rows)], aspect="auto", origin="lower", cmap=cmap,
                          vmin=vmin, vmax=vmax, interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, experts - 0.5))
        ax.set_ylabel(f"{layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=label, fraction=0.04, pad=0.02)
    return _png(fig)


def load_heatmap(records: list[dict], moe_layers: dict[str, str]) -> Optional[bytes]:
    """Per layer, each expert's load relative to balanced (1 = 1/E) at each logged step."""
    return _heatmaps(records, moe_layers, "load", "Expert load over time", "load / balanced load",
                     "viridis", lambda v: [x * len(v) for x in v], centered=False)


def bias_heatmap(records: list[dict], moe_layers: dict[str, str]) -> Optional[bytes]:
    """Per layer, each expert's routing bias b_i at each logged step."""
    return _heatmaps(records, moe_layers, "bias", "Routing bias drift (aux-loss-free b_i)", "bias b_i",
                     "RdBu_r", lambda v: v, centered=True)


def starved_experts(records: list[dict], moe_layers: dict[str, str],
                    fraction: float = STARVED_FRACTION) -> dict[str, dict[int, int]]:
    """layer -> {expert: logged steps with load below `fraction` of the mean load}, starved ones only."""
    out: dict[str, dict[int, int]] = {}
    for layer, prefix in moe_layers.items():
        _, rows = matrix(records, f"{prefix}{layer}/load")
        counts: dict[int, int] = {}
        for v in rows:
            mean = sum(v) / len(v)
            for expert, x in enumerate(v):
                if x < fraction * mean:
                    counts[expert] = counts.get(expert, 0) + 1
        out[layer] = dict(sorted(counts.items()))
    return out


def starved_plot(records: list[dict], moe_layers: dict[str, str],
                 fraction: float = STARVED_FRACTION) -> Optional[bytes]:
    """Number of starved experts per layer against the step (summed over layers beyond LEGEND_LAYERS)."""
    curves = []
    for layer, prefix in moe_layers.items():
        steps, rows = matrix(records, f"{prefix}{layer}/load")
        if steps:
            curves.append((layer, steps, [sum(x < fraction * sum(v) / len(v) for x in v) for v in rows]))
    if not curves:
        return None
    if len(curves) > LEGEND_LAYERS:
        total: dict[int, int] = {}
        for _, steps, counts in curves:
            for step, count in zip(steps, counts):
                total[step] = total.get(step, 0) + count
        curves = [(f"all {len(curves)} layers", sorted(total), [total[s] for s in sorted(total)])]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for layer, steps, counts in curves:
        ax.step(steps, counts, where="mid", label=layer)
    ax.set(xlabel="step", ylabel="experts",
           title=f"Starved experts (load below {fraction:g} x the mean load)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=-0.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=min(4, len(curves)))
    return _png(fig)


def all_plots(records: list[dict[str, Any]], fraction: float = STARVED_FRACTION) -> dict[str, bytes]:
    """Caption -> PNG of every plot the records have data for, in reading order."""
    moe_layers = layers(records)
    plots = {
        "Loss and MTP loss": loss_plot(records),
        "MTP acceptance per depth": acceptance_plot(records),
        "MaxVio per layer and the maximum": max_vio_plot(records, moe_layers),
        "Expert load per layer (expert x step)": load_heatmap(records, moe_layers),
        "Routing bias per layer (expert x step)": bias_heatmap(records, moe_layers),
        "Starved experts per layer": starved_plot(records, moe_layers, fraction),
    }
    return {caption: png for caption, png in plots.items() if png is not None}
