"""API drift between Megatron-Core releases (supported: >= 0.16, < 0.20).

Config dataclasses gain, lose and rename fields between releases. `build_megatron_config`
builds a `TransformerConfig` / `MLATransformerConfig` from the names this project uses, maps
known renames to the installed spelling, and drops (with one warning) what the installed
version does not know. `config_value` reads a field under either spelling.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

# Same meaning, different names across releases: 0.16 MLATransformerConfig spells the YaRN
# fields without prefix, while GPTModel's 'yarn' position embedding (and later releases) read
# the `yarn_`-prefixed names.
ALIASES: dict[str, tuple[str, ...]] = {
    "rotary_scaling_factor": ("yarn_rotary_scaling_factor",),
    "original_max_position_embeddings": ("yarn_original_max_position_embeddings",),
    "beta_fast": ("yarn_beta_fast",),
    "beta_slow": ("yarn_beta_slow",),
    "mscale": ("yarn_mscale",),
    "mscale_all_dim": ("yarn_mscale_all_dim",),
}
for _name, _others in list(ALIASES.items()):
    for _other in _others:
        ALIASES.setdefault(_other, (_name,))


class DroppedConfigFieldWarning(UserWarning):
    """A config field this project sets is unknown to the installed Megatron-Core."""


def build_megatron_config(cls: type, **kwargs: Any):
    """`cls(**kwargs)` with renamed fields mapped and unknown fields dropped (one warning)."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    accepted, dropped = {}, []
    for name, value in kwargs.items():
        if name in known:
            accepted[name] = value
            continue
        alias = next((a for a in ALIASES.get(name, ()) if a in known), None)
        if alias is not None and alias not in kwargs:
            accepted[alias] = value
        else:
            dropped.append(name)
    if dropped:
        import megatron.core

        warnings.warn(f"{cls.__name__} of megatron-core {getattr(megatron.core, '__version__', '?')} "
                      f"does not know {', '.join(sorted(dropped))}; dropped", DroppedConfigFieldWarning,
                      stacklevel=2)
    return cls(**accepted)


_MISSING = object()


def config_value(config: Any, name: str, default: Any = _MISSING) -> Any:
    """`config.name`, or the same field under a known alias; `default` when neither exists."""
    for candidate in (name, *ALIASES.get(name, ())):
        if hasattr(config, candidate):
            return getattr(config, candidate)
    if default is _MISSING:
        raise AttributeError(f"{type(config).__name__} has no field {name!r} (nor aliases {ALIASES.get(name, ())})")
    return default


def mtp_layer_attribute() -> str:
    """The decoder layer inside Megatron's MTP layer: `transformer_layer` up to 0.16, `mtp_model_layer`
    from 0.17 (the submodule, its spec field and its state-dict prefix were renamed together)."""
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules

    fields = {f.name for f in dataclasses.fields(MultiTokenPredictionLayerSubmodules)}
    return "mtp_model_layer" if "mtp_model_layer" in fields else "transformer_layer"


def grow_aux_loss_entry(name: str, num_layers: int) -> None:
    """Make Megatron's layer-wise aux-loss entry `name` (if it exists) hold `num_layers` layers.

    Up to 0.17 `get_moe_layer_wise_logging_tracker()` is the tracker dict itself; from 0.18 it is a
    copy built from `moe_logging.get_moe_metrics_tracker().metrics`, where the entry must be grown."""
    import torch

    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(name)
        if entry is not None and entry["values"].numel() < num_layers:
            entry["values"] = torch.nn.functional.pad(entry["values"], (0, num_layers - entry["values"].numel()))
        return
    entry = get_moe_metrics_tracker().metrics.get(name)
    if entry is not None and entry.values.numel() < num_layers:
        entry.values = torch.nn.functional.pad(entry.values, (0, num_layers - entry.values.numel()))
