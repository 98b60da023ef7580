"""Which workarounds are applied right now: each shim marks itself while it is active."""
from __future__ import annotations

_ACTIVE: list[str] = []


def applied() -> list[str]:
    """Names of the workarounds active right now, in the order they were applied."""
    return list(_ACTIVE)


def mark(name: str) -> None:
    _ACTIVE.append(name)


def unmark(name: str) -> None:
    _ACTIVE.remove(name)
