"""Expert-load statistics of DeepSeekMoE routing, per MoE layer and overall.

MaxVio (auxiliary-loss-free balancing paper, arXiv 2408.15664, section 4.1):
``MaxVio = max_i load_i / mean_i load_i - 1``; 0 means perfectly balanced, E - 1 means
every token went to one expert. Upstream Megatron-Core logs neither per-layer percentiles
nor the balancing bias b_i (report section 2.1.2); this tracker does both.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

PERCENTILES = (50, 90, 99)


def max_vio(counts_E: torch.Tensor) -> float:
    """max load / mean load - 1 of one layer's tokens-per-expert counts (0 if no tokens)."""
    counts_E = counts_E.to(torch.float64)
    mean = counts_E.mean()
    return float(counts_E.max() / mean - 1) if mean > 0 else 0.0


def fraction_stats(frac: torch.Tensor) -> dict[str, float]:
    """min, max and percentiles (linear interpolation, as numpy) of load fractions."""
    frac = frac.detach().to("cpu", torch.float64)
    q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
    stats = {"load_min": float(frac.min()), "load_max": float(frac.max())}
    stats.update({f"load_p{p}": float(v) for p, v in zip(PERCENTILES, torch.quantile(frac, q))})
    return stats


def load_stats(counts_E: torch.Tensor) -> dict[str, float]:
    """MaxVio, load-fraction min/max/percentiles, coefficient of variation, dead experts."""
    counts_E = counts_E.detach().to("cpu", torch.float64)
    stats = {"max_vio": max_vio(counts_E), **fraction_stats(counts_E / counts_E.sum())}
    stats["load_cv"] = float(counts_E.std(unbiased=False) / counts_E.mean())
    stats["dead_experts"] = int((counts_E == 0).sum())
    return stats


def bias_stats(bias_E: torch.Tensor) -> dict[str, float]:
    """Mean, population std, min and max of the balancing bias b_i."""
    bias_E = bias_E.detach().to("cpu", torch.float64)
    return {
        "bias_mean": float(bias_E.mean()),
        "bias_std": float(bias_E.std(unbiased=False)),
        "bias_min": float(bias_E.min()),
        "bias_max": float(bias_E.max()),
    }


class ExpertLoadTracker:
    """Accumulates tokens-per-expert counts per MoE layer between two logging steps.

    Args:
        num_layers_moe: number of MoE layers tracked.
        num_experts: routed experts per layer (E).
        layer_numbers: the layer number of each MoE layer, as the caller passes it to
            ``update`` and as it appears in metric names; default ``0 .. num_layers_moe-1``.

    ``update`` keeps everything on the counts' device (no host sync); ``summary`` and
    ``histograms`` move to CPU. Counts must already be summed over the global batch.
    """

    def __init__(self, num_layers_moe: int, num_experts: int, layer_numbers: Optional[list[int]] = None):
        layers = list(range(num_layers_moe)) if layer_numbers is None else [int(n) for n in layer_numbers]
        if len(layers) != num_layers_moe or len(set(layers)) != len(layers):
            raise ValueError(f"layer_numbers must be {num_layers_moe} distinct numbers, got {layer_numbers}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.layer_numbers = layers
        width = max(2, len(str(max(layers, default=0))))
        self.layer_names = {n: f"layer_{n:0{width}d}" for n in layers}
        self.reset()

    @classmethod
    def for_config(cls, cfg) -> "ExpertLoadTracker":
        """Tracker for a DSV3Config: MoE layers named by their 0-based decoder index."""
        layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
        return cls(len(layers), cfg.num_routed_experts, layers)

    def reset(self) -> None:
        """Forget the counts, per-step MaxVio and bias seen since the last reset."""
        self._counts: dict[int, torch.Tensor] = {}
        self._vio_sum: dict[int, torch.Tensor] = {}
        self._updates: dict[int, int] = {}
        self._bias: dict[int, torch.Tensor] = {}

    def update(self, layer_number: int, tokens_per_expert_E: torch.Tensor,
               expert_bias_E: Optional[torch.Tensor] = None) -> None:
        """Add one step's global tokens-per-expert counts of a layer; keep its latest bias."""
        if layer_number not in self.layer_names:
            raise KeyError(f"layer {layer_number} is not a tracked MoE layer {self.layer_numbers}")
        counts_E = torch.as_tensor(tokens_per_expert_E).detach().to(torch.float64)
        if counts_E.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert must have shape ({self.num_experts},), got {tuple(counts_E.shape)}")
        mean = counts_E.mean()
        vio = torch.where(mean > 0, counts_E.max() / mean.clamp_min(1e-30) - 1, torch.zeros_like(mean))
        if layer_number in self._counts:
            self._counts[layer_number] += counts_E
            self._vio_sum[layer_number] += vio
            self._updates[layer_number] += 1
        else:
            self._counts[layer_number] = counts_E.clone()
            self._vio_sum[layer_number] = vio
            self._updates[layer_number] = 1
        if expert_bias_E is not None:
            bias_E = torch.as_tensor(expert_bias_E).detach()
            if bias_E.shape != (self.num_experts,):
                raise ValueError(f"expert_bias must have shape ({self.num_experts},), got {tuple(bias_E.shape)}")
            self._bias[layer_number] = bias_E.clone()

    def state(self) -> dict[str, dict]:
        """What was accumulated since the last reset (to send to the logging rank)."""
        return {"counts": self._counts, "vio_sum": self._vio_sum, "updates": self._updates, "bias": self._bias}

    def absorb(self, state: dict[str, dict]) -> None:
        """Take over the layers another tracker (another pipeline stage's) accumulated."""
        for mine, theirs in ((self._counts, state["counts"]), (self._vio_sum, state["vio_sum"]),
                             (self._updates, state["updates"]), (self._bias, state["bias"])):
            clash = set(mine) & set(theirs)
            if clash:
                raise ValueError(f"layers {sorted(clash)} were tracked by both trackers")
            mine.update(theirs)

    def _layers_seen(self) -> Iterable[int]:
        return [n for n in self.layer_numbers if n in self._counts or n in self._bias]

    def summary(self, prefix: str = "moe/") -> dict[str, float]:
        """Per-layer and overall statistics since the last reset.

        Per layer ``{prefix}layer_NN/``: ``max_vio`` (of the counts summed over the
        interval), ``max_vio_batch`` (mean of the per-step MaxVio), ``load_min``,
        ``load_max``, ``load_p50/p90/p99`` (fractions of the layer's tokens), ``load_cv``,
        ``dead_experts``, ``bias_mean/std/min/max``. Overall ``{prefix}``: ``max_vio_mean``,
        ``max_vio_max``, ``max_vio_batch_mean``, ``load_cv_mean``, ``dead_experts`` (sum),
        and the load and bias statistics of all layers pooled.
        """
        out: dict[str, float] = {}
        per_layer: list[dict[str, float]] = []
        fracs, biases = [], []
        for n in self._layers_seen():
            name = f"{prefix}{self.layer_names[n]}/"
            stats: dict[str, float] = {}
            counts_E = self._counts.get(n)
            if counts_E is not None and counts_E.sum() > 0:
                counts_E = counts_E.cpu()
                stats.update(load_stats(counts_E))
                stats["max_vio_batch"] = float(self._vio_sum[n].cpu()) / self._updates[n]
                fracs.append(counts_E / counts_E.sum())
                per_layer.append(stats)
            if n in self._bias:
                stats.update(bias_stats(self._bias[n]))
                biases.append(self._bias[n].detach().to("cpu", torch.float64))
            out.update({name + k: v for k, v in stats.items()})
        if per_layer:
            vios = [s["max_vio"] for s in per_layer]
            out[prefix + "max_vio_mean"] = sum(vios) / len(vios)
            out[prefix + "max_vio_max"] = max(vios)
            out[prefix + "max_vio_batch_mean"] = sum(s["max_vio_batch"] for s in per_layer) / len(per_layer)
            out[prefix + "load_cv_mean"] = sum(s["load_cv"] for s in per_layer) / len(per_layer)
            out[prefix + "dead_experts"] = sum(s["dead_experts"] for s in per_layer)
            out.update({prefix + k: v for k, v in fraction_stats(torch.cat(fracs)).items()})
        if biases:
            out.update({prefix + k: v for k, v in bias_stats(torch.cat(biases)).items()})
        return out

    def histograms(self, prefix: str = "moe/") -> dict[str, list[float]]:
        """Per-expert values: ``{prefix}layer_NN/load`` (fractions) and ``.../bias``."""
        out: dict[str, list[float]] = {}
        for n in self._layers_seen():
            name = f"{prefix}{self.layer_names[n]}/"
            counts_E = self._counts.get(n)
            if counts_E is not None and counts_E.sum() > 0:
                out[name + "load"] = (counts_E / counts_E.sum()).cpu().tolist()
            if n in self._bias:
                out[name + "bias"] = self._bias[n].detach().to("cpu", torch.float64).tolist()
        return out
