"""Checkpoint files are read without running code from them.

A distributed checkpoint's `.metadata` is a pickle (PyTorch's format), and unpickling runs
whatever callables the file names: a crafted file runs a command when a run resumes. Here it is
read by an unpickler that resolves only the classes PyTorch's checkpoint metadata is made of
(its dataclasses and enums, `torch.Size`, dtypes, layouts and memory formats) and refuses any
other global by name. `common.pt` is read by `torch.load` with `weights_only=True`, which has
the same kind of allow-list.

    with restricted_metadata():            # every FileSystemReader.read_metadata is restricted
        dist_checkpointing.load(state, path)
    read_metadata(path)                    # the same reader, for checking a checkpoint first
"""
from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import filesystem, metadata, planner

_METADATA_MODULES = {module.__name__: module for module in (metadata, planner)}
_SINGLE_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
REFUSAL = "which checkpoint metadata never holds"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names a global that checkpoint metadata never holds."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SINGLE_NAMES:
            return super().find_class(module, name)
        if module in _METADATA_MODULES:
            value = getattr(_METADATA_MODULES[module], name, None)
            if isinstance(value, type) and value.__module__ == module:
                return value
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}, {REFUSAL}")


def loads(data: bytes) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def read_metadata(checkpoint: str | Path) -> metadata.Metadata:
    """The `.metadata` of a checkpoint folder, read with the restricted unpickler."""
    return loads((Path(checkpoint) / ".metadata").read_bytes())


@contextlib.contextmanager
def restricted_metadata() -> Iterator[None]:
    """Inside, PyTorch's FileSystemReader reads `.metadata` with the restricted unpickler."""
    original = filesystem.FileSystemReader.read_metadata

    def read_restricted(self, *args: Any, **kwargs: Any) -> metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            loaded = _RestrictedUnpickler(stream).load()
        if getattr(loaded, "storage_meta", None) is None:
            loaded.storage_meta = metadata.StorageMeta()
        loaded.storage_meta.load_id = self.load_id
        return loaded

    filesystem.FileSystemReader.read_metadata = read_restricted
    try:
        yield
    finally:
        filesystem.FileSystemReader.read_metadata = original
