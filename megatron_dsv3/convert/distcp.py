"""Megatron-Core distributed checkpoints (the `torch_dist` format) written and read one chunk at a time.

The format `dist_checkpointing.save` writes and `dsv3-train` resumes (checkpoint/dist.py):

    metadata.json    {"sharded_backend": "torch_dist", ...}: which strategy reads the folder
    common.pt        torch.save({"common": {...}}): step counters and the model config
    .metadata        a pickled torch.distributed.checkpoint Metadata: for every key its global
                     shape, dtype and chunks (offsets, sizes), and where each chunk's bytes are
    __i_0.distcp     chunks, each one torch.save'd tensor at a recorded byte offset
    manifest.json    every other file's size and SHA-256 (checkpoint/manifest.py)

A chunk is any box of the global tensor; a reader under any tensor/expert layout takes the
parts of the chunks it needs, so a converter may write a tensor as the pieces it reads (one
expert's gate projection, say) and never assemble the whole tensor. `dist_checkpointing.save`
needs the whole state dict in memory; `DistWriter` needs one chunk.

Read as data: `DistReader` checks every item and storage entry (`metadata_guard.check_items`)
and the files' sizes before a chunk is read, and hashes the files against their manifest in a
background thread while the conversion reads them; `verified()` waits for that verdict before a
converter puts its output in place. `DistWriter` writes into `OUT.tmp` (`convert/output.py`).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)

from megatron_dsv3.checkpoint import dist as dist_checkpoint, manifest, metadata_guard
from megatron_dsv3.convert import output

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}


class DistCheckpointError(ValueError):
    """A chunk or tensor that does not fit the checkpoint; the message names the key."""


@dataclass
class _Tensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[ChunkStorageMetadata] = field(default_factory=list)
    covered: int = 0  # elements written so far


class DistWriter:
    """Write a checkpoint folder chunk by chunk: `declare` every tensor, `write` its chunks, `close`.

    Files are written into `path.tmp` and put in place by `close`, so an interrupted conversion
    leaves no folder that looks complete; an existing `path` holding files is refused unless
    `replace`. Files roll over at `max_file_bytes`; each is hashed for the manifest once closed.
    A failed write (disk full) aborts and raises `output.OutputWriteError`."""

    def __init__(self, path: Union[str, os.PathLike], max_file_bytes: int = 4 * 2**30, replace: bool = False):
        self.path = Path(path)
        self.tmp = output.begin(self.path, replace)
        self.max_file_bytes = max_file_bytes
        self.tensors: dict[str, _Tensor] = {}
        self.storage: dict[MetadataIndex, _StorageInfo] = {}
        self.digests: dict[str, tuple[int, str]] = {}
        self.file_index = -1
        self.file: Optional[io.BufferedWriter] = None
        self._writing(self._next_file)

    def _writing(self, action, *args):
        """Run `action`; a failed write removes the partial folder and says so in one sentence (the
        caller's `abort` closes the open file)."""
        with output.writing(self.path, self.tmp):
            return action(*args)

    def _close_file(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
            self.digests[self.file_name] = manifest.digest(self.tmp / self.file_name)

    def _next_file(self) -> None:
        self._close_file()
        self.file_index += 1
        self.file_name = f"__{self.file_index}_0.distcp"
        self.file = open(self.tmp / self.file_name, "wb")

    def declare(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        if key in self.tensors:
            raise DistCheckpointError(f"{key} declared twice")
        self.tensors[key] = _Tensor(tuple(shape), dtype)

    def write(self, key: str, offsets: Sequence[int], chunk: torch.Tensor) -> None:
        """Store `chunk` as the box of tensor `key` starting at `offsets` (cast to its dtype)."""
        if key not in self.tensors:
            raise DistCheckpointError(f"{key} was not declared")
        spec = self.tensors[key]
        if len(offsets) != len(spec.shape) or chunk.dim() != len(spec.shape) or any(
                o < 0 or o + n > full for o, n, full in zip(offsets, chunk.shape, spec.shape)):
            raise DistCheckpointError(f"{key}: a {tuple(chunk.shape)} chunk at {tuple(offsets)} does not fit its "
                                      f"global shape {spec.shape}")
        data = chunk.detach().to("cpu", spec.dtype).contiguous()
        if data.untyped_storage().nbytes() != data.numel() * data.element_size():
            data = data.clone()  # torch.save writes a view's whole storage
        if self.file.tell() and self.file.tell() + data.numel() * data.element_size() > self.max_file_bytes:
            self._writing(self._next_file)
        start = self.file.tell()
        self._writing(torch.save, data, self.file)
        index = MetadataIndex(key, torch.Size(offsets))
        if index in self.storage:
            raise DistCheckpointError(f"{key}: two chunks at {tuple(offsets)}")
        self.storage[index] = _StorageInfo(self.file_name, start, self.file.tell() - start)
        spec.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=data.shape))
        spec.covered += data.numel()

    def close(self, common: dict[str, Any]) -> Path:
        """Write `.metadata`, `metadata.json`, `common.pt` ({"common": common}) and the manifest; put
        the folder in place. Refuses (naming it) a tensor whose chunks do not cover it exactly once."""
        self._writing(self._close_file)
        short = [f"{key}: {spec.covered} of {math.prod(spec.shape)} elements written"
                 for key, spec in self.tensors.items() if spec.covered != math.prod(spec.shape)]
        if short:
            raise DistCheckpointError(f"{len(short)} tensor(s) not written whole: " + "; ".join(short[:10]))
        state = {key: TensorStorageMetadata(TensorProperties(dtype=spec.dtype), torch.Size(spec.shape), spec.chunks)
                 for key, spec in self.tensors.items()}
        metadata = Metadata(state_dict_metadata=state, planner_data=None, storage_data=self.storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.path), save_id=str(uuid.uuid4())),
                            version="1.0.0")
        self._writing(self._finish, metadata, common)
        return output.finish(self.tmp, self.path)

    def _finish(self, metadata: Metadata, common: dict[str, Any]) -> None:
        with open(self.tmp / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
        (self.tmp / "metadata.json").write_text(json.dumps(BACKEND))
        torch.save({"common": common}, self.tmp / "common.pt")
        for name in (".metadata", "metadata.json", "common.pt"):
            self.digests[name] = manifest.digest(self.tmp / name)
        manifest.write(self.tmp, self.digests)

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        output.abort(self.tmp)


class DistReader:
    """Tensors of a checkpoint folder by key, read as data (see the module docstring); one chunk
    is kept loaded (consecutive reads of one expert-parallel shard load it once)."""

    def __init__(self, path: Union[str, os.PathLike], read_common: bool = True):
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise FileNotFoundError(f"{self.path} is not a distributed checkpoint (no .metadata)")
        try:
            self.metadata = metadata_guard.read_metadata(self.path)
            metadata_guard.check_items(self.path, self.metadata, read_bytes=False)
            entries = manifest.read(self.path)
            # Megatron-LM's own common state holds pickled objects (its argparse Namespace): not read then.
            self.common: dict[str, Any] = dist_checkpoint.read_common(self.path) if read_common else {}
        except (metadata_guard.UnsafeCheckpointError, manifest.ManifestError) as error:
            raise DistCheckpointError(f"{self.path}: {error}") from None
        except (EOFError, pickle.UnpicklingError, RuntimeError, AttributeError, ValueError) as error:
            raise DistCheckpointError(f"{self.path} is damaged: a file does not load ({type(error).__name__}: "
                                      f"{str(error)[:160]})") from None
        problem = dist_checkpoint.storage_problem(self.path, self.metadata) or (
            manifest.check_sizes(self.path, entries) if entries is not None else None)
        if problem:
            raise DistCheckpointError(f"{self.path}: {problem}")
        self._verdict: list[Optional[str]] = []
        self._verifier = threading.Thread(target=lambda: self._verdict.append(
            manifest.verify(self.path, sorted(entries), entries) if entries is not None else None), daemon=True)
        self._verifier.start()
        self.tensors = {key: md for key, md in self.metadata.state_dict_metadata.items()
                        if isinstance(md, TensorStorageMetadata)}
        self._cached: tuple[Optional[MetadataIndex], Optional[torch.Tensor]] = (None, None)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def _chunk(self, index: MetadataIndex) -> torch.Tensor:
        if self._cached[0] != index:
            self._cached = (None, None)  # free the previous chunk first
            self._cached = (index, self._load(index))
        return self._cached[1]

    def verified(self) -> None:
        """Wait for the checksums; DistCheckpointError names a file that does not match its manifest."""
        self._verifier.join()
        if self._verdict and self._verdict[0] is not None:
            raise DistCheckpointError(f"{self.path}: {self._verdict[0]}")

    def _load(self, index: MetadataIndex) -> torch.Tensor:
        info = self.metadata.storage_data[index]
        with open(self.path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = io.BytesIO(f.read(info.length))
        md = self.tensors[index.fqn]
        chunk = next(c for c in md.chunks if c.offsets == index.offset)
        try:
            tensor = torch.load(data, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any damage to the bytes: name the file (and its checksum)
            self.verified()
            raise DistCheckpointError(f"{self.path / info.relative_path}: the chunk of {index.fqn} at byte "
                                      f"{info.offset} does not load ({type(error).__name__})") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes) \
                or tensor.dtype != md.properties.dtype:
            self.verified()
            raise DistCheckpointError(f"{self.path / info.relative_path}: the chunk of {index.fqn} at byte "
                                      f"{info.offset} is not the {md.properties.dtype} {tuple(chunk.sizes)} tensor "
                                      ".metadata declares")
        return tensor

    def read(self, key: str, offsets: Optional[Sequence[int]] = None, sizes: Optional[Sequence[int]] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of tensor `key` (the whole tensor by default)."""
        if key not in self.tensors:
            raise DistCheckpointError(f"{self.path} holds no tensor {key}")
        md = self.tensors[key]
        offsets = list(offsets or [0] * len(md.size))
        sizes = list(sizes or [n - o for n, o in zip(md.size, offsets)])
        exact = [c for c in md.chunks if list(c.offsets) == offsets and list(c.sizes) == sizes]
        if exact and dtype in (None, md.properties.dtype):  # one chunk is the box: no copy, not kept
            index = MetadataIndex(key, exact[0].offsets)
            return self._cached[1] if self._cached[0] == index else self._load(index)
        out = torch.empty(sizes, dtype=dtype or md.properties.dtype)
        filled = 0
        for chunk in md.chunks:
            lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)) and math.prod(sizes):
                continue
            data = self._chunk(MetadataIndex(key, chunk.offsets))
            src = data[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
            filled += src.numel()
        if filled != out.numel():
            raise DistCheckpointError(f"{key}: the chunks in {self.path} cover {filled} of the {out.numel()} "
                                      f"elements at {tuple(offsets)} size {tuple(sizes)}")
        return out
