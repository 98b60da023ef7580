"""API drift between Megatron-Core releases (supported: >= 0.16, < 0.20).

Config dataclasses gain, lose and rename fields between releases. `build_megatron_config`
builds a `TransformerConfig` / `MLATransformerConfig` from the names this project uses, maps
known renames to the installed spelling, and drops (with one warning) what the installed
version does not know. `config_value` reads a field under either spelling.
"""
from __future__ import annotations

import dataclasses
import inspect
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


# Megatron-LM's `pretrain()` (megatron/training/training.py) took its arguments' parser hooks up to
# 0.17; from 0.18 the caller parses them (`parse_and_validate_args`) and passes a config container
# built from them (`pretrain_cfg_container_from_args`), and 0.19 makes the model provider optional.
_MODEL_CONFIG_RECOMMENDATION = r"\s*It is recommended to use a ModelConfig"


def run_pretrain(datasets_provider: Any, model_provider: Any, forward_step: Any, *, extra_args_provider: Any,
                 args_defaults: dict, get_embedding_ranks: Any) -> Any:
    """Megatron-LM's `pretrain()` with a model provider, as each release from 0.16 to 0.19 takes it."""
    # Imported here: this module serves the adapters, where megatron.training (Megatron-LM) may be absent.
    from megatron.core.enums import ModelType
    from megatron.training import training

    from megatron_dsv3.compat.megatron_training_wheel import prebuilt_dataset_helpers

    common = dict(train_valid_test_dataset_provider=datasets_provider, model_provider=model_provider,
                  model_type=ModelType.encoder_or_decoder, forward_step_func=forward_step,
                  get_embedding_ranks=get_embedding_ranks)
    with prebuilt_dataset_helpers():
        if "cfg_container" not in inspect.signature(training.pretrain).parameters:
            return training.pretrain(extra_args_provider=extra_args_provider, args_defaults=args_defaults, **common)
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
        with warnings.catch_warnings():  # the container's model config stays None: the provider builds the model
            warnings.filterwarnings("ignore", message=_MODEL_CONFIG_RECOMMENDATION)
            container = pretrain_cfg_container_from_args(args)
        return training.pretrain(cfg_container=container, **common)


def list_balancing_types(args: Any) -> None:
    """Keep Megatron-LM's `--moe-router-load-balancing-type` (and its coefficients) a list.

    validate_args turns a one-element list into a string, and the training log then tests
    `"aux_loss" in args.moe_router_load_balancing_type` (training.py, 0.16 to 0.19): a substring of
    "seq_aux_loss", so a `load_balancing_loss` entry nothing records is logged, always 0. As a
    list, the test is a membership test; Megatron-Core's config accepts lists of both."""
    if isinstance(args.moe_router_load_balancing_type, str):
        args.moe_router_load_balancing_type = [args.moe_router_load_balancing_type]
        coeff = args.moe_aux_loss_coeff
        args.moe_aux_loss_coeff = list(coeff) if isinstance(coeff, (list, tuple)) else [coeff]
