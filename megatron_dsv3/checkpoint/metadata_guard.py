"""Checkpoint files are read as data: nothing in a checkpoint can run code.

1. A distributed checkpoint's `.metadata` is a pickle (PyTorch's format), and unpickling runs
   whatever callables the file names: here it is read by an unpickler that resolves only the
   classes PyTorch's checkpoint metadata is made of (its dataclasses and enums, `torch.Size`,
   dtypes, layouts and memory formats) and refuses any other global by name.
2. Allow-listed classes can still describe a trap: a weight declared as a byte item
   (`BytesStorageMetadata`) whose storage entry points at a pickle appended to a shard, which
   PyTorch's loader unpickles in full. `check_items` checks every item and storage entry against
   what dsv3 writes before a byte is read: tensors with chunks inside their shape, each chunk's
   entry a plain `*.distcp` file name with a non-negative offset and length, no transforms, and
   byte items only under BYTE_ITEMS (megatron-core >= 0.19 keeps the `common` dict there).
3. While loading (`reading_as_data()`), the byte items that pass are unpickled with
   `weights_only=True` (compat/megatron_checkpoint.py), and any other is refused again.
   `common.pt` is read with `torch.load(weights_only=True)`, which has its own allow-list.

    check_items(path, read_metadata(path), tensors=state_keys)   # UnsafeCheckpointError names the item
    with reading_as_data():
        dist_checkpointing.load(state, path)
"""
from __future__ import annotations

import contextlib
import io
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.distributed.checkpoint import filesystem, metadata, planner

from megatron_dsv3.compat.megatron_checkpoint import data_only_byte_items

_METADATA_MODULES = {module.__name__: module for module in (metadata, planner)}
_SINGLE_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
REFUSAL = "which checkpoint metadata never holds"
BYTE_ITEMS = ("common_state/",)  # the items dsv3 checkpoints hold as bytes (megatron-core >= 0.19's common dict)
MAX_BYTE_ITEM = 64 * 2**20  # the common dict is a few KB
MAX_METADATA = 2**30  # a 671B checkpoint's .metadata is tens of MB
_STORAGE_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.distcp")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names a global that checkpoint metadata never holds, or an item that is not
    what dsv3 writes; the message names it."""


def is_byte_item(fqn: str) -> bool:
    return fqn.startswith(BYTE_ITEMS)


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
    path = Path(checkpoint) / ".metadata"
    if path.stat().st_size > MAX_METADATA:
        raise UnsafeCheckpointError(f"is {path.stat().st_size} bytes, more than checkpoint metadata holds")
    loaded = loads(path.read_bytes())
    if not isinstance(loaded, metadata.Metadata):
        raise UnsafeCheckpointError(f"holds a {type(loaded).__name__}, not checkpoint metadata")
    return loaded


def _sizes(value: Any, dims: int) -> bool:
    return (isinstance(value, torch.Size) and len(value) == dims
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value))


def _tensor_problem(key: str, md: metadata.TensorStorageMetadata) -> str:
    """What is wrong with a tensor item's declaration, or ""."""
    if not isinstance(md.properties, metadata.TensorProperties) or not isinstance(md.properties.dtype, torch.dtype):
        return f"item {key} declares no tensor dtype"
    if not isinstance(md.size, torch.Size) or not _sizes(md.size, len(md.size)):
        return f"item {key} declares a malformed shape"
    if not isinstance(md.chunks, list) or not all(isinstance(c, metadata.ChunkStorageMetadata) for c in md.chunks):
        return f"item {key} declares malformed chunks"
    for chunk in md.chunks:
        if not _sizes(chunk.offsets, len(md.size)) or not _sizes(chunk.sizes, len(md.size)) or any(
                o + n > full for o, n, full in zip(chunk.offsets, chunk.sizes, md.size)):
            return f"item {key} has a chunk at {tuple(chunk.offsets)} outside its shape {tuple(md.size)}"
    return ""


def check_items(checkpoint: str | Path, meta: metadata.Metadata, tensors: Iterable[str] = (),
                read_bytes: bool = True) -> None:
    """Refuse (UnsafeCheckpointError naming the item) metadata that is not what dsv3 writes, before
    any shard is read: every item a tensor (or, under BYTE_ITEMS, bytes), every storage entry of
    the item's declared kind and inside its folder; `tensors` must all be tensor items.
    `read_bytes=False` (the converters, which read tensors only) lets other byte items exist unread."""
    items = meta.state_dict_metadata
    storage = meta.storage_data if meta.storage_data is not None else {}
    if not isinstance(items, dict) or not isinstance(storage, dict):
        raise UnsafeCheckpointError("does not map items to storage")
    for key, md in items.items():
        if not isinstance(key, str):
            raise UnsafeCheckpointError(f"names an item {key!r} that is not a string")
        if isinstance(md, metadata.BytesStorageMetadata):
            if read_bytes and not is_byte_item(key):
                raise UnsafeCheckpointError(
                    f"declares item {key} as bytes (a pickle), which dsv3 writes only for {', '.join(BYTE_ITEMS)}: "
                    "refused unread")
        elif isinstance(md, metadata.TensorStorageMetadata):
            problem = _tensor_problem(key, md)
            if problem:
                raise UnsafeCheckpointError(problem)
        else:
            raise UnsafeCheckpointError(f"declares item {key} as a {type(md).__name__}")
    for key in tensors:
        if key in items and not isinstance(items[key], metadata.TensorStorageMetadata):
            raise UnsafeCheckpointError(f"declares item {key} as a {type(items[key]).__name__}, not a tensor")
    stored: set[tuple[str, Any]] = set()
    for index, info in storage.items():
        if not isinstance(index, metadata.MetadataIndex) or index.fqn not in items:
            raise UnsafeCheckpointError(f"has a storage entry for {getattr(index, 'fqn', index)!r}, an item it does "
                                        "not declare")
        md = items[index.fqn]
        tensor = isinstance(md, metadata.TensorStorageMetadata)
        if tensor and not any(index.offset == chunk.offsets for chunk in md.chunks):
            raise UnsafeCheckpointError(f"has a storage entry for {index.fqn} at {index.offset}, not a chunk of it")
        if not tensor and index.offset is not None:
            raise UnsafeCheckpointError(f"has a tensor storage entry for {index.fqn}, which it declares as bytes")
        if not isinstance(info, filesystem._StorageInfo) or not isinstance(info.relative_path, str) \
                or not _STORAGE_FILE.fullmatch(info.relative_path):
            raise UnsafeCheckpointError(f"stores {index.fqn} in {getattr(info, 'relative_path', info)!r}, not a "
                                        "*.distcp file of the checkpoint folder")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (info.offset, info.length)):
            raise UnsafeCheckpointError(f"stores {index.fqn} at a malformed offset or length")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"stores {index.fqn} through transforms {info.transform_descriptors!r}, "
                                        "which dsv3 never writes")
        if not tensor and info.length > MAX_BYTE_ITEM:
            raise UnsafeCheckpointError(f"stores byte item {index.fqn} in {info.length} bytes, more than it holds")
        stored.add((index.fqn, index.offset))
    for key, md in items.items():
        if isinstance(md, metadata.TensorStorageMetadata):
            missing = next((c.offsets for c in md.chunks if (key, c.offsets) not in stored), None)
            if missing is not None:
                raise UnsafeCheckpointError(f"stores no bytes for the chunk of {key} at {tuple(missing)}")


@contextlib.contextmanager
def reading_as_data() -> Iterator[None]:
    """Inside, PyTorch's FileSystemReader reads `.metadata` with the restricted unpickler, and
    byte items are read only under BYTE_ITEMS, with `weights_only=True`."""
    refusal = lambda fqn: UnsafeCheckpointError(  # noqa: E731
        f"declares item {fqn} as bytes (a pickle), which dsv3 writes only for {', '.join(BYTE_ITEMS)}: refused unread")
    with _restricted_metadata(), data_only_byte_items(is_byte_item, refusal):
        yield


@contextlib.contextmanager
def _restricted_metadata() -> Iterator[None]:
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
