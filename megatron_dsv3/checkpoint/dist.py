"""Checkpoints through megatron.core.dist_checkpointing, resharded on load.

Every parameter, persistent buffer (the routing bias) and Adam moment is saved as a
ShardedTensor whose global shape is the unsharded one, so a run saved with one tensor/expert
parallel layout loads under another. A checkpoint is written to `iter_NNNNNNN.tmp` and renamed
only once complete, then `latest` is replaced atomically: a crash in the middle of a save leaves
the previous checkpoint as the one that loads.

A run's checkpoints form one line of steps. At start-up rank 0 picks the checkpoint to resume
(the one `latest` names, or the newest complete one before it when that one is damaged, named
in the log) and tells every rank; saves past the starting step belong to an abandoned run (a
fresh start, a rollback of `latest`, a damaged checkpoint) and are moved into `abandoned/`,
where nothing resumes them and nothing deletes them. Pruning keeps the `keep` newest
checkpoints and never the one just written or the newest one before it (the last one a
training step has validated). After divergence, `latest` is rolled back to the newest
checkpoint whose weights gave a good loss.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from megatron_dsv3.checkpoint import metadata_guard
from megatron_dsv3.checkpoint.metadata_guard import UnsafeCheckpointError
from megatron_dsv3.parallel import comm, groups
from megatron_dsv3.parallel.sharding import named_tensors, replica_id, split_of

_ITER = re.compile(r"^iter_(\d{7})$")


def _sharded(key: str, data: torch.Tensor, like: torch.Tensor) -> ShardedTensor:
    dim, group = split_of(like)
    offsets = [(dim, groups.rank(group), groups.size(group))] if dim is not None else []
    # DualPipe's second copy of a stage (`mirror_copy`) is a replica too: saved once
    copy = int(getattr(like, "mirror_copy", 0))
    return ShardedTensor.from_rank_offsets(key, data, *offsets, replica_id=(copy, *replica_id(like)))


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
    """Steps of the renamed (complete when written) checkpoints in `directory`, ascending."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER.match(p.name)))


def read_common(path: str | Path) -> dict[str, Any]:
    """The `common` dict of a checkpoint, read without running code: from `common.pt` (megatron-core up
    to 0.18), or from the `common_state` object megatron-core 0.19 keeps in the shard files instead."""
    path = Path(path)
    if (path / "common.pt").is_file():
        return torch.load(path / "common.pt", map_location="cpu", weights_only=True).get("common", {})
    storage = metadata_guard.read_metadata(path).storage_data or {}
    info = next((v for k, v in storage.items() if k.fqn.startswith("common_state/")), None)
    if info is None:
        raise FileNotFoundError(2, "neither common.pt nor a common_state object", str(path / "common.pt"))
    with open(path / info.relative_path, "rb") as f:
        f.seek(info.offset)
        data = io.BytesIO(f.read(info.length))
    return torch.load(data, map_location="cpu", weights_only=True)[0].get("common", {})


def problem_with(path: str | Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be loaded (a missing, truncated or unsafe file), or None."""
    path = Path(path)
    try:
        json.loads((path / "metadata.json").read_text())
        if "step" not in read_common(path):
            return "common.pt holds no step"
        layout = metadata_guard.read_metadata(path)
    except UnsafeCheckpointError as error:
        return f".metadata {error}"
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except Exception as error:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        return f"unreadable ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in (layout.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is truncated ({file.stat().st_size} of at least {size} bytes)"
    return None


def choose_resume(directory: str | Path) -> tuple[Optional[int], list[str]]:
    """The step to resume (None: start fresh) and notes on what was skipped and why. Candidates:
    the step `latest` names, then the complete checkpoints before it, newest first."""
    directory = Path(directory)
    steps, notes = list_checkpoints(directory), []
    marker = directory / "latest"
    if marker.is_file():
        text = marker.read_text().strip()
        if text.isdigit() and int(text) in steps:
            steps = [s for s in steps if s <= int(text)]
        else:
            notes.append(f"{marker} names {text[:40]!r}, not a checkpoint here: ignored")
    for step in reversed(steps):
        problem = problem_with(checkpoint_path(directory, step))
        if problem is None:
            return step, notes
        notes.append(f"skipped damaged checkpoint {checkpoint_path(directory, step)}: {problem}")
    return None, notes


def agree_on_resume(directory: str | Path) -> tuple[Optional[int], list[str]]:
    """`choose_resume` on rank 0, the same answer on every rank."""
    choice = choose_resume(directory) if _rank() == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        choice = comm.broadcast_object(choice, src=0)
    return choice


def set_aside(directory: str | Path, steps: list[int]) -> list[Path]:
    """Move these checkpoints into `directory/abandoned/` (never over an earlier one there)."""
    moved = []
    for step in steps:
        source = checkpoint_path(directory, step)
        target = Path(directory) / "abandoned" / source.name
        target.parent.mkdir(exist_ok=True)
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{source.name}.{suffix}")
        os.replace(source, target)
        moved.append(target)
    return moved


def _write_latest(directory: str | Path, step: Optional[int]) -> None:
    marker = Path(directory) / "latest"
    if step is None:
        marker.unlink(missing_ok=True)
        return
    marker_tmp = marker.with_suffix(".tmp")
    marker_tmp.write_text(f"{step}\n")
    os.replace(marker_tmp, marker)


def start_line(directory: str | Path, start_step: Optional[int]) -> list[str]:
    """Collectively make `start_step` (None: a fresh run) the end of the checkpoint line: later
    saves are set aside and `latest` names the start. Returns what rank 0 moved, as log lines."""
    notes = []
    if _rank() == 0:
        later = [s for s in list_checkpoints(directory) if start_step is None or s > start_step]
        for path in set_aside(directory, later):
            notes.append(f"set aside {path.name} as {path} (saved past step {start_step or 0}, where this run starts)")
        if Path(directory).is_dir():
            _write_latest(directory, start_step)
    _barrier()
    return notes


def last_good(directory: str | Path, bad_step: int) -> Optional[int]:
    """The newest checkpoint whose weights gave a good loss when the loss of step `bad_step`
    (1-based) is the first bad one: a save at step s is first evaluated by the loss of s + 1."""
    good = [s for s in list_checkpoints(directory) if s + 1 < bad_step]
    return good[-1] if good else None


def roll_back(directory: str | Path, bad_step: int) -> tuple[Optional[Path], list[Path]]:
    """After divergence (rank 0 only): set aside the saves whose weights are not known good and
    point `latest` at the last good one. Returns (its path or None, what was set aside)."""
    good = last_good(directory, bad_step)
    moved = set_aside(directory, [s for s in list_checkpoints(directory) if good is None or s > good])
    _write_latest(directory, good)
    return (checkpoint_path(directory, good) if good is not None else None), moved


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        comm.barrier()


def _prune(directory: str | Path, newest: int, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints, never `newest` or the one before it."""
    steps = list_checkpoints(directory)
    kept = set(steps[-keep:]) if keep > 0 else set(steps)
    kept |= {newest, max((s for s in steps if s < newest), default=newest)}
    for old in steps:
        if old not in kept:
            shutil.rmtree(checkpoint_path(directory, old), ignore_errors=True)


def save(directory: str | Path, step: int, model: nn.Module, optimizer: Any, common: dict[str, Any],
         keep: int = 3) -> Path:
    """Write a checkpoint of `step` collectively; returns its path. The barriers and the
    writes are bounded by the default process group's timeout (`checkpoint.save_timeout_s`)."""
    final = checkpoint_path(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    is_writer = _rank() == 0
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = sharded_state_dict(model, optimizer)
    state["common"] = common
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if is_writer:
        if final.exists():  # a step saved again: keep the old one whole until the new one is in place
            replaced = final.with_name(final.name + ".replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            os.replace(tmp, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_latest(directory, step)
        _prune(directory, step, keep)
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
    try:
        with metadata_guard.restricted_metadata():
            loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as error:  # PyTorch's (a BaseException) holds every rank's failure
        reasons = [str(error), *map(str, getattr(error, "failures", {}).values())]
        unsafe = next((r for r in reasons if metadata_guard.REFUSAL in r), None)
        if unsafe is None:
            raise
        raise UnsafeCheckpointError(f"{path / '.metadata'} {unsafe[unsafe.index('refers to'):]}") from None
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


@torch.no_grad()
def load_weights(path: str | Path, model: nn.Module, optimizer: Optional[Any] = None) -> list[str]:
    """`checkpoint.load_weights`: only the weights of `path` into `model` under the current layout (the
    optimizer keeps its fresh moments; its FP32 master copies, if any, take the weights). Every tensor
    of the model must be in the checkpoint with its global shape, else RunConfigError names them;
    checkpoint tensors the model lacks (MTP weights for a run without MTP) are skipped and listed
    in the returned notes."""
    from megatron_dsv3.run_config import RunConfigError

    path = Path(path)
    problem = problem_with(path) if path.is_dir() else "it is not a folder"
    if problem:
        raise RunConfigError(f"checkpoint.load_weights={path}: {problem}")
    stored = {key: tuple(md.size) for key, md in metadata_guard.read_metadata(path).state_dict_metadata.items()
              if key.startswith("model.")}
    state = sharded_state_dict(model, loading=True)
    missing = sorted(key for key in state if key not in stored)
    misshaped = [f"{key}: checkpoint {stored[key]}, model {tuple(sh.global_shape)}" for key, sh in state.items()
                 if key in stored and stored[key] != tuple(sh.global_shape)]
    if missing or misshaped:
        saved = load_common(path).get("model_config", {})
        now = model.config.to_dict()
        differing = [f"{k}: {saved[k]!r} there, {now.get(k)!r} here" for k in sorted(saved)
                     if saved[k] != now.get(k) and k in now]
        raise RunConfigError(
            f"checkpoint.load_weights={path} does not fit this model: "
            + (f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
               if missing else "")
            + (f"mis-shaped: {'; '.join(misshaped[:8])}; " if misshaped else "")
            + (f"its model config differs in {'; '.join(differing)}" if differing else ""))
    with metadata_guard.restricted_metadata():
        loaded = dist_checkpointing.load(state, str(path))
    for name, target in named_tensors(model).items():
        target.copy_(loaded[f"model.{name}"])
    if optimizer is not None:
        optimizer.load_master_weights({name: loaded[f"model.{name}"] for name, _ in model.named_parameters()})
    skipped = sorted(set(stored) - set(state))
    return [f"skipped {len(skipped)} checkpoint tensor(s) this model has no place for: "
            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"] if skipped else []
