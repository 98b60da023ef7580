"""Safetensors shards read and written one tensor at a time, without memory-mapping a shard.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`name -> {"dtype", "shape", "data_offsets": [begin, end]}` relative to the end of the header,
plus an optional `__metadata__`), then the raw little-endian bytes of every tensor. Reading a
tensor is one `readinto` of its byte range into a fresh buffer; writing a shard takes the
names, dtypes and shapes first (the header), then the tensors in that order. Either way the
process holds one tensor, never the shard (peak RSS: BENCHMARKS.md, dsv3-convert).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch

from megatron_dsv3 import safe_data

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A shard that is not valid safetensors; the message names the file and the tensor."""


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


MAX_HEADER_BYTES = 100 * 2**20  # DeepSeek-V3's shard headers are about 100 KB


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def read_header(path: Union[str, os.PathLike]) -> dict[str, Entry]:
    """name -> Entry for every tensor of one shard, from its header alone. A header that is not a
    JSON object of well-formed entries, or whose byte ranges run outside the data or overlap, is
    refused naming the file (and the tensor)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: a header of {length} bytes is not plausible in a {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
            raise SafetensorsError(f"{path}: the header is not JSON ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) \
                or not all(_count(n) for n in info["shape"]) or not isinstance(info.get("data_offsets"), list) \
                or len(info["data_offsets"]) != 2 or not all(_count(o) for o in info["data_offsets"]):
            raise SafetensorsError(f"{path}: the header entry of {name[:200]!r} is not {{dtype, shape, data_offsets}} "
                                   "of counts >= 0")
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: {name} has unsupported dtype {str(info.get('dtype'))[:40]}")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = (8 + length + o for o in info["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > size:
            raise SafetensorsError(f"{path}: {name} bytes {begin}..{end} do not hold a {info['dtype']} {shape} "
                                   f"tensor in a {size}-byte file")
        entries[name] = Entry(path, dtype, shape, begin, end)
    ordered = sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end))
    for (first, a), (second, b) in zip(ordered, ordered[1:]):
        if b.begin < a.end:
            raise SafetensorsError(f"{path}: the bytes of {second} ({b.begin}..{b.end}) overlap those of {first} "
                                   f"({a.begin}..{a.end})")
    return entries


def read_tensor(entry: Entry) -> torch.Tensor:
    """The tensor at `entry`, in a buffer of its own."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(bytearray())
    with open(entry.path, "rb") as f:
        f.seek(entry.begin)
        if f.readinto(view) != entry.end - entry.begin:
            raise SafetensorsError(f"{entry.path}: truncated at a tensor of shape {entry.shape}")
    return out


class ShardWriter:
    """One shard: `ShardWriter(path, [(name, dtype, shape), ...])`, then `write(name, tensor)` in that order."""

    def __init__(self, path: Union[str, os.PathLike], layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self.order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, dtype, tuple(shape)))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.order[self.next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise SafetensorsError(f"{self.path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                                   f"expected {want_name} {dtype} {shape}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.order):
            raise SafetensorsError(f"{self.path}: {len(self.order) - self.next} tensor(s) never written, "
                                   f"the first {self.order[self.next][0]}")


MAX_INDEX_BYTES = 64 * 2**20


def shard_files(directory: Path) -> list[Path]:
    """The shards of a Hugging Face checkpoint folder, through its index when there is one; an index
    that is not JSON, has no weight_map, or names a file outside the folder is refused."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = safe_data.read_json(index, str(index), MAX_INDEX_BYTES, SafetensorsError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SafetensorsError(f"{index} has no weight_map of tensor names to shard files")
        root = directory.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            file = (directory / name).resolve()
            if file.parent != root:
                raise SafetensorsError(f"{index} names the shard {name!r}, which is not a file of {directory}")
            files.append(directory / name)
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors.index.json and no *.safetensors files in {directory}")
    return files


def read_headers(directory: Path) -> dict[str, Entry]:
    """Every tensor of a checkpoint folder by name; a name in two shards is refused."""
    entries: dict[str, Entry] = {}
    for path in shard_files(directory):
        for name, entry in read_header(path).items():
            if name in entries:
                raise SafetensorsError(f"{name} appears in both {entries[name].path.name} and {path.name}")
            entries[name] = entry
    return entries


def iter_in_file_order(entries: dict[str, Entry]) -> Iterator[str]:
    """Names sorted by (file, offset): each shard read front to back, once."""
    return iter(sorted(entries, key=lambda n: (str(entries[n].path), entries[n].begin)))
