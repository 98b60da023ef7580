"""Which workarounds are applied right now (each shim marks itself while it is active), and the
scoped, undoable set of shims that `megatron_cpu` and `meta_device` are each made of."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

_ACTIVE: list[str] = []

Shim = Callable[[], Callable[[], None]]  # applies itself, returns its undo


def applied() -> list[str]:
    """Names of the workarounds active right now, in the order they were applied."""
    return list(_ACTIVE)


def mark(name: str) -> None:
    _ACTIVE.append(name)


def unmark(name: str) -> None:
    _ACTIVE.remove(name)


class ShimSet:
    """Named shims applied and undone together, only when `wanted()`. Entering twice (nested) is
    allowed; only the outermost exit restores, in reverse order, every shim even if one fails."""

    def __init__(self, shims: list[tuple[str, Shim]], wanted: Callable[[], bool] = lambda: True):
        self.shims, self.wanted = shims, wanted
        self._lock = threading.Lock()
        self._depth = 0
        self._undo_stack: list[tuple[str, Callable[[], None]]] = []

    def apply(self) -> list[str]:
        """Activate the shims. Returns the names activated by this call."""
        with self._lock:
            self._depth += 1
            if self._depth > 1 or not self.wanted():
                return []
            names = []
            try:
                for name, shim in self.shims:
                    self._undo_stack.append((name, shim()))
                    mark(name)
                    names.append(name)
            except BaseException:
                self._depth -= 1
                self._undo_all()
                raise
            return names

    def undo(self) -> None:
        """Deactivate what the matching `apply()` activated (the outermost one restores everything)."""
        with self._lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth == 0:
                self._undo_all()

    def _undo_all(self) -> None:
        errors = []
        while self._undo_stack:
            name, restore = self._undo_stack.pop()
            try:
                restore()
            except Exception as error:  # keep restoring the rest, report at the end
                errors.append(error)
            unmark(name)
        if errors:
            raise errors[0]

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """`apply()` ... `undo()`; restores everything even on exceptions."""
        self.apply()
        try:
            yield
        finally:
            self.undo()

    def active(self) -> bool:
        return bool(self._undo_stack)
