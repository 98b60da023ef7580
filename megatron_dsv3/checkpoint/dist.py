"""Checkpoints through megatron.core.dist_checkpointing, resharded on load.

Every parameter, persistent buffer (the routing bias) and Adam moment is saved as a
ShardedTensor whose global shape is the unsharded one, so a run saved with one tensor/expert
parallel layout loads under another. A checkpoint is written to `iter_NNNNNNN.tmp` and renamed
only once complete, then `latest` is replaced atomically: a crash in the middle of a save leaves
the previous checkpoint as the one that loads.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import nn

from megatron_dsv3.parallel import groups
from megatron_dsv3.parallel.sharding import named_tensors, replica_id, split_of

_ITER = re.compile(r"^iter_(\d{7})$")


def _sharded(key: str, data: torch.Tensor, like: torch.Tensor) -> ShardedTensor:
    dim, group = split_of(like)
    offsets = [(dim, groups.rank(group), groups.size(group))] if dim is not None else []
    return ShardedTensor.from_rank_offsets(key, data, *offsets, replica_id=replica_id(like))


def sharded_state_dict(model: nn.Module, optimizer: Optional[Any] = None, loading: bool = False) -> dict[str, Any]:
    """`optimizer` is a LocalOptimizer or a ZeRO-1 one: both hand over their moments shaped like
    this rank's parameters (the ZeRO-1 one gathers its data-parallel shards first), so the saved
    layout does not depend on the optimizer or the data-parallel size. Weights are saved in FP32:
    BF16 weights are replaced by the optimizer's FP32 master copies."""
    state: dict[str, Any] = {}
    masters = optimizer.master_weights(empty=loading) if optimizer is not None else {}  # FP32 for BF16 weights
    for name, tensor in named_tensors(model).items():
        state[f"model.{name}"] = _sharded(f"model.{name}", masters.get(name, tensor.data), tensor)
    if optimizer is not None:
        params = dict(model.named_parameters())
        for name, moments in optimizer.param_states(empty=loading).items():
            for moment, value in moments.items():
                state[f"optimizer.{moment}.{name}"] = _sharded(f"optimizer.{moment}.{name}", value, params[name])
    return state


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"iter_{step:07d}"


def list_checkpoints(directory: str | Path) -> list[int]:
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER.match(p.name)))


def latest_step(directory: str | Path) -> Optional[int]:
    """The step named in `latest`, or the newest complete checkpoint if `latest` is absent."""
    marker = Path(directory) / "latest"
    if marker.is_file():
        step = int(marker.read_text().strip())
        if checkpoint_path(directory, step).is_dir():
            return step
    steps = list_checkpoints(directory)
    return steps[-1] if steps else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(directory: str | Path, step: int, model: nn.Module, optimizer: Any, common: dict[str, Any],
         keep: int = 3) -> Path:
    """Write a checkpoint of `step` collectively; returns its path."""
    final = checkpoint_path(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = sharded_state_dict(model, optimizer)
    state["common"] = common
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if is_writer:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = Path(directory) / "latest"
        marker_tmp = marker.with_suffix(".tmp")
        marker_tmp.write_text(f"{step}\n")
        os.replace(marker_tmp, marker)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(checkpoint_path(directory, old), ignore_errors=True)
    _barrier()
    return final


@torch.no_grad()
def load(path: str | Path, model: nn.Module, optimizer: Optional[Any] = None) -> dict[str, Any]:
    """Load `path` into model (and optimizer) under the current layout; returns the common dict."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = sharded_state_dict(model, optimizer, loading=True)
    state["common"] = {}
    loaded = dist_checkpointing.load(state, str(path))
    for name, target in named_tensors(model).items():
        target.copy_(loaded[f"model.{name}"])
    if optimizer is not None:
        optimizer.load_master_weights({name: loaded[f"model.{name}"] for name, _ in model.named_parameters()})
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in loaded.items():
            if key.startswith("optimizer."):
                _, moment, name = key.split(".", 2)
                moments.setdefault(name, {})[moment] = value
        optimizer.load_param_states(moments)
    return loaded.get("common") or load_common(path)


def load_common(path: str | Path) -> dict[str, Any]:
    """The step counters and config saved with a checkpoint, without loading any tensor."""
    return dist_checkpointing.load_common_state_dict(str(path)).get("common", {})
