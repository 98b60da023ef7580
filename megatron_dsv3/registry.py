"""One registry of names: layer specs, model presets and pipeline schedules.

Megatron-Core has no registry (its schedule choice is an if/else), so plugins register here:

    import megatron_dsv3
    megatron_dsv3.register("layer_spec", "my-layer", my_layer_spec_fn)
    spec_fn = megatron_dsv3.get("layer_spec", "dsv3")
"""
from __future__ import annotations

from typing import Any

KINDS = ("layer_spec", "preset", "schedule")
_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, obj: Any = None, *, overwrite: bool = False):
    """Register `obj` under (kind, name); usable as a decorator when `obj` is omitted."""
    if kind not in _REGISTRY:
        raise KeyError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")

    def add(value: Any) -> Any:
        if name in _REGISTRY[kind] and not overwrite:
            raise KeyError(f"{kind} {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[kind][name] = value
        return value

    return add if obj is None else add(obj)


def get(kind: str, name: str) -> Any:
    _register_builtins()
    if kind not in _REGISTRY:
        raise KeyError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    if name not in _REGISTRY[kind]:
        raise KeyError(f"no {kind} named {name!r}; registered: {', '.join(sorted(_REGISTRY[kind])) or 'none'}")
    return _REGISTRY[kind][name]


def names(kind: str) -> list[str]:
    _register_builtins()
    return sorted(_REGISTRY[kind])


_builtins_done = False


def _register_builtins() -> None:
    """The plugin's own entries, registered lazily to keep `import megatron_dsv3` light."""
    global _builtins_done
    if _builtins_done:
        return
    _builtins_done = True
    from megatron_dsv3.config import PRESETS
    from megatron_dsv3.model.spec import decoder_layer_spec
    from megatron_dsv3.pipeline import SCHEDULES

    register("layer_spec", "dsv3", decoder_layer_spec, overwrite=True)
    # Megatron-Core GPTModel specs (megatron_dsv3.model.mcore): unlike "dsv3" (DSV3Config, layer
    # index -> ModuleSpec), these take a Megatron TransformerConfig.
    from megatron_dsv3.model.mcore import get_dsv3_decoder_block_spec, get_dsv3_mtp_block_spec

    register("layer_spec", "megatron-gpt", get_dsv3_decoder_block_spec, overwrite=True)
    register("layer_spec", "megatron-gpt-mtp", get_dsv3_mtp_block_spec, overwrite=True)
    for name, config in PRESETS.items():
        register("preset", name, config, overwrite=True)
    for name, schedule in SCHEDULES.items():
        register("schedule", name, schedule, overwrite=True)
