"""One registry of names: layer specs, model presets and pipeline schedules.

Megatron-Core has no registry (its schedule choice is an if/else), so plugins register here:

    import megatron_dsv3
    megatron_dsv3.register("layer_spec", "my-layer", my_layer_spec_fn)
    spec_fn = megatron_dsv3.get("layer_spec", "dsv3")

A leaf: it imports nothing of the package. Each module registers its own entries when it is
imported (presets in `config.py`, "dsv3" in `model/spec.py`, the Megatron-Core specs in
`mcore/specs.py`, schedules in `pipeline/`), and `import megatron_dsv3` imports them all.
"""
from __future__ import annotations

from typing import Any

KINDS = ("layer_spec", "preset", "schedule")
_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


def _entries(kind: str) -> dict[str, Any]:
    if kind not in _REGISTRY:
        raise KeyError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    return _REGISTRY[kind]


def register(kind: str, name: str, obj: Any = None, *, overwrite: bool = False):
    """Register `obj` under (kind, name); usable as a decorator when `obj` is omitted."""
    entries = _entries(kind)

    def add(value: Any) -> Any:
        if name in entries and not overwrite:
            raise KeyError(f"{kind} {name!r} is already registered (pass overwrite=True to replace it)")
        entries[name] = value
        return value

    return add if obj is None else add(obj)


def get(kind: str, name: str) -> Any:
    entries = _entries(kind)
    if name not in entries:
        raise KeyError(f"no {kind} named {name!r}; registered: {', '.join(sorted(entries)) or 'none'}")
    return entries[name]


def names(kind: str) -> list[str]:
    return sorted(_entries(kind))
