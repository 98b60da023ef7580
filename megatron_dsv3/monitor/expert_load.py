"""Expert-load statistics of DeepSeekMoE routing, per MoE layer and overall.

MaxVio (auxiliary-loss-free balancing paper, arXiv 2408.15664, section 4.1):
``MaxVio = max_i load_i / mean_i load_i - 1``; 0 means perfectly balanced, E - 1 means
every token went to one expert. Upstream Megatron-Core logs neither per-layer percentiles
nor the balancing bias b_i (report section 2.1.2); this tracker does both, from the global
counts the bias update already sums (no collective of its own), plus:

- load entropy: entropy of the layer's load fractions / log E (1 = balanced, 0 = collapsed);
- routing entropy: mean over tokens of the entropy of the normalised affinities
  s_i / sum_j s_j (eq. 15, as the balance loss's P_i normalises them) / log E: 1 means the router
  cannot tell the experts apart, lower means confident routing;
- starved experts: load below ``starved_below`` x the mean load, and for how many consecutive
  steps each has been so (its streak survives the resets between logging steps);
- bias drift: root-mean-square change of b_i since the previous logging step.
"""
from __future__ import annotations

from typing import Iterable, Optional

import math

import torch

PERCENTILES = (50, 90, 99)
STARVED_BELOW = 0.1  # default threshold, as a fraction of the mean load (logging.starved_below)


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


def load_entropy(counts_E: torch.Tensor) -> float:
    """Entropy of the load fractions over log E: 1 when balanced, 0 when one expert takes all."""
    counts_E = counts_E.detach().to("cpu", torch.float64)
    if counts_E.numel() < 2 or counts_E.sum() <= 0:
        return 0.0
    frac = counts_E / counts_E.sum()
    return float(-(frac * frac.clamp_min(1e-300).log()).sum() / math.log(counts_E.numel()))


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
        starved_below: an expert whose step load is below this fraction of the mean load is starved.

    ``update`` keeps everything on the counts' device (no host sync); ``summary`` and
    ``histograms`` move to CPU. Counts must already be summed over the global batch.
    """

    def __init__(self, num_layers_moe: int, num_experts: int, layer_numbers: Optional[list[int]] = None,
                 starved_below: float = STARVED_BELOW):
        layers = list(range(num_layers_moe)) if layer_numbers is None else [int(n) for n in layer_numbers]
        if len(layers) != num_layers_moe or len(set(layers)) != len(layers):
            raise ValueError(f"layer_numbers must be {num_layers_moe} distinct numbers, got {layer_numbers}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 0 < starved_below < 1:
            raise ValueError(f"starved_below must be between 0 and 1, got {starved_below}")
        self.num_experts = num_experts
        self.starved_below = starved_below
        # Kept across resets: consecutive steps each expert has been starved, and the bias as the
        # previous logging step saw it (for the drift).
        self._starved_steps: dict[int, torch.Tensor] = {}
        self._logged_bias: dict[int, torch.Tensor] = {}
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
        """Forget the counts, per-step MaxVio, routing entropy and bias seen since the last reset;
        the bias seen becomes the reference of the next drift."""
        self._logged_bias.update(getattr(self, "_bias", {}))
        self._counts: dict[int, torch.Tensor] = {}
        self._vio_sum: dict[int, torch.Tensor] = {}
        self._updates: dict[int, int] = {}
        self._bias: dict[int, torch.Tensor] = {}
        self._entropy_sum: dict[int, torch.Tensor] = {}

    def update(self, layer_number: int, tokens_per_expert_E: torch.Tensor,
               expert_bias_E: Optional[torch.Tensor] = None,
               routing_entropy: Optional[torch.Tensor] = None) -> None:
        """Add one step's global tokens-per-expert counts of a layer (and its mean routing entropy
        in nats, `Router.routing_entropy`); keep its latest bias."""
        if layer_number not in self.layer_names:
            raise KeyError(f"layer {layer_number} is not a tracked MoE layer {self.layer_numbers}")
        counts_E = torch.as_tensor(tokens_per_expert_E).detach().to(torch.float64)
        if counts_E.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert must have shape ({self.num_experts},), got {tuple(counts_E.shape)}")
        mean = counts_E.mean()
        vio = torch.where(mean > 0, counts_E.max() / mean.clamp_min(1e-30) - 1, torch.zeros_like(mean))
        starved_E = counts_E < self.starved_below * mean
        streak_E = self._starved_steps.get(layer_number)
        self._starved_steps[layer_number] = starved_E * (1 + (streak_E if streak_E is not None else 0))
        if routing_entropy is not None:
            entropy = torch.as_tensor(routing_entropy).detach().to(torch.float64)
            self._entropy_sum[layer_number] = self._entropy_sum.get(layer_number, 0) + entropy
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
        """What was accumulated since the last reset, and the streaks and drift reference of the
        layers this tracker updates (to send to the logging rank)."""
        return {"counts": self._counts, "vio_sum": self._vio_sum, "updates": self._updates, "bias": self._bias,
                "entropy_sum": self._entropy_sum, "starved_steps": self._starved_steps,
                "logged_bias": self._logged_bias}

    def absorb(self, state: dict[str, dict]) -> None:
        """Take over the layers another tracker (another pipeline stage's) accumulated; its streaks
        and drift reference replace this tracker's copies from the previous absorb."""
        for mine, theirs in ((self._counts, state["counts"]), (self._vio_sum, state["vio_sum"]),
                             (self._updates, state["updates"]), (self._bias, state["bias"]),
                             (self._entropy_sum, state["entropy_sum"])):
            clash = set(mine) & set(theirs)
            if clash:
                raise ValueError(f"layers {sorted(clash)} were tracked by both trackers")
            mine.update(theirs)
        self._starved_steps.update(state["starved_steps"])
        self._logged_bias.update(state["logged_bias"])

    def _layers_seen(self) -> Iterable[int]:
        return [n for n in self.layer_numbers if n in self._counts or n in self._bias]

    def summary(self, prefix: str = "moe/") -> dict[str, float]:
        """Per-layer and overall statistics since the last reset.

        Per layer ``{prefix}layer_NN/``: ``max_vio`` (of the counts summed over the
        interval), ``max_vio_batch`` (mean of the per-step MaxVio), ``load_min``,
        ``load_max``, ``load_p50/p90/p99`` (fractions of the layer's tokens), ``load_cv``,
        ``dead_experts``, ``load_entropy``, ``routing_entropy`` (mean of the steps'),
        ``starved_experts`` (starved at the last step), ``starved_steps_max`` (how many steps in
        a row the longest-starved of them has been), ``bias_mean/std/min/max``, ``bias_drift``. Overall ``{prefix}``:
        ``max_vio_mean``, ``max_vio_max``, ``max_vio_batch_mean``, ``load_cv_mean``,
        ``load_entropy_mean``, ``routing_entropy_mean``, ``dead_experts`` and ``starved_experts``
        (sums), ``starved_steps_max``, ``bias_drift_mean``, and the load and bias statistics of all
        layers pooled.
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
                stats["load_entropy"] = load_entropy(counts_E)
                streak_E = self._starved_steps[n].cpu()
                stats["starved_experts"] = int((streak_E > 0).sum())
                stats["starved_steps_max"] = int(streak_E.max())
                fracs.append(counts_E / counts_E.sum())
                per_layer.append(stats)
                if n in self._entropy_sum and self.num_experts > 1:
                    mean_nats = float(self._entropy_sum[n].cpu()) / self._updates[n]
                    stats["routing_entropy"] = mean_nats / math.log(self.num_experts)
            if n in self._bias:
                bias_E = self._bias[n].detach().to("cpu", torch.float64)
                stats.update(bias_stats(bias_E))
                biases.append(bias_E)
                if n in self._logged_bias:
                    change_E = bias_E - self._logged_bias[n].detach().to("cpu", torch.float64)
                    stats["bias_drift"] = float(change_E.square().mean().sqrt())
            out.update({name + k: v for k, v in stats.items()})
        if per_layer:
            vios = [s["max_vio"] for s in per_layer]
            out[prefix + "max_vio_mean"] = sum(vios) / len(vios)
            out[prefix + "max_vio_max"] = max(vios)
            out[prefix + "max_vio_batch_mean"] = sum(s["max_vio_batch"] for s in per_layer) / len(per_layer)
            out[prefix + "load_cv_mean"] = sum(s["load_cv"] for s in per_layer) / len(per_layer)
            out[prefix + "dead_experts"] = sum(s["dead_experts"] for s in per_layer)
            out[prefix + "load_entropy_mean"] = sum(s["load_entropy"] for s in per_layer) / len(per_layer)
            out[prefix + "starved_experts"] = sum(s["starved_experts"] for s in per_layer)
            out[prefix + "starved_steps_max"] = max(s["starved_steps_max"] for s in per_layer)
            for key in ("routing_entropy", "bias_drift"):
                values = [s[key] for s in per_layer if key in s]
                if values:
                    out[f"{prefix}{key}_mean"] = sum(values) / len(values)
            out.update({prefix + k: v for k, v in fraction_stats(torch.cat(fracs)).items()})
        if biases:
            out.update({prefix + k: v for k, v in bias_stats(torch.cat(biases)).items()})
        return out

    def histograms(self, prefix: str = "moe/") -> dict[str, list[float]]:
        """Per-expert values: ``{prefix}layer_NN/load`` (fractions), ``.../tokens`` (global token
        counts summed since the last reset), ``.../starved_steps`` (current streaks) and ``.../bias``."""
        out: dict[str, list] = {}
        for n in self._layers_seen():
            name = f"{prefix}{self.layer_names[n]}/"
            counts_E = self._counts.get(n)
            if counts_E is not None and counts_E.sum() > 0:
                counts_E = counts_E.cpu()
                out[name + "load"] = (counts_E / counts_E.sum()).tolist()
                out[name + "tokens"] = [int(c) for c in counts_E.round().tolist()]
                out[name + "starved_steps"] = [int(c) for c in self._starved_steps[n].cpu().tolist()]
            if n in self._bias:
                out[name + "bias"] = self._bias[n].detach().to("cpu", torch.float64).tolist()
        return out
