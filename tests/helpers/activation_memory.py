"""Activation bytes a pipeline rank holds, measured on a real (CPU) run.

Counted: every tensor autograd saves for backward (through `torch.autograd.graph.saved_tensors_hooks`,
alive until its graph is freed or whatever unpacked it lets go: a deferred W keeps its GEMMs' inputs
this way), plus what the executor holds beside autograd (`held()`: stage outputs waiting for their
backward or for a send to complete, weight-gradient stores). Each storage counts once, parameters'
storages never. `peak` is the largest total seen, sampled at every save, every unpack and every
`sample()`.

A small stand-in, for DualPipe's memory tests (issue 24), until the rehearsal's tracker by kind
replaces it.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch


class ActivationBytes:
    def __init__(self, params: Iterable[torch.Tensor], held: Callable[[], Iterable[torch.Tensor]] = lambda: ()):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.held = held
        self.saved: dict[int, list[int]] = {}  # storage -> [bytes, saved tensors alive on it]
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "ActivationBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        kept = tensor.detach()  # what autograd keeps: no graph of its own, so no reference cycle
        storage = kept.untyped_storage()
        if storage.data_ptr() not in self.params:
            entry = self.saved.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
            entry[1] += 1
            weakref.finalize(kept, self._release, storage.data_ptr())
            self.sample()
        return kept

    def _unpack(self, kept: torch.Tensor) -> torch.Tensor:
        self.sample()
        return kept

    def _release(self, storage: int) -> None:
        entry = self.saved[storage]
        entry[1] -= 1
        if not entry[1]:
            del self.saved[storage]

    def now(self) -> int:
        """Bytes held now: saved storages, and the held tensors' other storages."""
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.held()}
        extra = sum(n for ptr, n in held.items() if ptr not in self.saved and ptr not in self.params)
        return sum(n for n, _ in self.saved.values()) + extra

    def sample(self) -> int:
        current = self.now()
        self.peak = max(self.peak, current)
        return current


def tensors_in(obj: Any, depth: int = 6) -> Iterator[torch.Tensor]:
    """The tensors an executor's record holds: in tuples, lists, dicts, partial functions, bound
    methods, and the `store` / `deferred` of an object (a weight-gradient store lists its own with
    `tensors()`). Modules are not entered (their parameters are not activations)."""
    if depth < 0 or obj is None or isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value, depth - 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, depth - 1)
    elif isinstance(obj, functools.partial):
        yield from tensors_in([obj.args, obj.keywords], depth - 1)
    elif inspect.ismethod(obj):
        yield from tensors_in(obj.__self__, depth - 1)
    elif callable(getattr(obj, "tensors", None)):
        yield from obj.tensors()
    else:
        for name in ("store", "deferred"):
            yield from tensors_in(getattr(obj, name, None), depth - 1)
