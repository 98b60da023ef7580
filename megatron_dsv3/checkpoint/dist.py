"""Checkpoints through megatron.core.dist_checkpointing, resharded on load.

Every parameter, persistent buffer (the routing bias) and Adam moment is saved as a
ShardedTensor whose global shape is the unsharded one, so a run saved with one tensor/expert
parallel layout loads under another. A checkpoint is written to `iter_NNNNNNN.tmp` and renamed
only once complete, then `latest` is replaced atomically: a crash in the middle of a save leaves
the previous checkpoint as the one that loads.

Every checkpoint carries `manifest.json` (checkpoint/manifest.py): its files' sizes and SHA-256,
hashed by the ranks at save and verified by them at load. A save that fails (disk full, an I/O
error) removes its `.tmp` folder and raises `CheckpointWriteError` on every rank; the previous
checkpoint and `latest` are untouched.

A run's checkpoints form one line of steps. At start-up rank 0 picks the checkpoint to resume
(the one `latest` names, or the newest sound one before it when that one is damaged or crafted,
named in the log: `metadata_guard` checks its items, the ranks its checksums) and tells every
rank; saves past the starting step belong to an abandoned run (a fresh start, a rollback of
`latest`, a damaged checkpoint) and are moved into `abandoned/`, where nothing resumes them and
nothing deletes them. Pruning keeps the `keep` newest checkpoints and never the one just written
or the newest one before it (the last one a training step has validated). After divergence,
`latest` is rolled back to the newest checkpoint whose weights gave a good loss and whose files
match their manifest.
"""
from __future__ import annotations

import io
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

from megatron_dsv3 import safe_data
from megatron_dsv3.checkpoint import manifest, metadata_guard
from megatron_dsv3.checkpoint.manifest import ManifestError
from megatron_dsv3.checkpoint.metadata_guard import UnsafeCheckpointError
from megatron_dsv3.parallel import comm, groups
from megatron_dsv3.parallel.sharding import named_tensors, replica_id, split_of
from megatron_dsv3.run_config import RunConfigError

_ITER = re.compile(r"^iter_(\d{7})$")
_LATEST = re.compile(rb"([0-9]{1,7})\n?")  # what _write_latest writes: ASCII digits of a step with a folder
BACKEND = "torch_dist"  # metadata.json's sharded_backend: the only format dsv3 writes and reads
COUNTERS = ("step", "optimizer_steps", "consumed_samples")  # non-negative integers in every `common`
UNVERIFIED = f"it has no {manifest.NAME} (saved before checksums)"  # `verify`'s answer: loadable, unchecked


class _Unreadable(ValueError):
    """A checkpoint file that is not what its name says (metadata.json not an object, common.pt too large)."""


class CheckpointWriteError(RuntimeError):
    """A save failed (disk full, an I/O error): its partial folder is gone, the previous checkpoint
    and `latest` are as they were. The message says so and names the cause."""


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


def read_latest(directory: str | Path) -> tuple[Optional[int], Optional[str]]:
    """The step `latest` names (None: no file, or none it may name) and a note when it names none:
    only ASCII digits of at most seven places (a step of an `iter_NNNNNNN` folder) are read."""
    marker = Path(directory) / "latest"
    if not marker.is_file():
        return None, None
    with open(marker, "rb") as f:
        raw = f.read(64)
    match = _LATEST.fullmatch(raw)
    if match is None:
        return None, f"{marker} names {raw[:40].decode('utf-8', 'replace').strip()!r}, not a checkpoint here: ignored"
    return int(match.group(1)), None


def _common_problem(common: Any) -> Optional[str]:
    """What is wrong with a checkpoint's `common` dict (step counters and model config), or None."""
    if not isinstance(common, dict):
        return "its common state is not a mapping"
    for key in COUNTERS:
        value = common.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            return f"common state holds no {key} (a count >= 0), got {value!r}"[:160]
    if not isinstance(common.get("model_config"), dict):
        return "common state holds no model_config"
    return None


def read_common(path: str | Path) -> dict[str, Any]:
    """The `common` dict of a checkpoint, read without running code: from `common.pt` (megatron-core up
    to 0.18), or from the `common_state` object megatron-core 0.19 keeps in the shard files instead."""
    path = Path(path)
    if (path / "common.pt").is_file():
        if (path / "common.pt").stat().st_size > metadata_guard.MAX_BYTE_ITEM:
            raise _Unreadable(f"common.pt is {(path / 'common.pt').stat().st_size} bytes, more than a common state holds")
        loaded = torch.load(path / "common.pt", map_location="cpu", weights_only=True)
        return loaded.get("common", {}) if isinstance(loaded, dict) else {}
    meta = metadata_guard.read_metadata(path)
    metadata_guard.check_items(path, meta, read_bytes=False)
    info = next((v for k, v in meta.storage_data.items() if metadata_guard.is_byte_item(k.fqn)), None)
    if info is None:
        raise FileNotFoundError(2, "neither common.pt nor a common_state object", str(path / "common.pt"))
    with open(path / info.relative_path, "rb") as f:
        f.seek(info.offset)
        data = io.BytesIO(f.read(info.length))
    loaded = torch.load(data, map_location="cpu", weights_only=True)
    return loaded[0].get("common", {}) if isinstance(loaded, list) and loaded and isinstance(loaded[0], dict) else {}


def problem_with(path: str | Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be loaded, or None. Read as data and cheap (no shard
    is read): a missing, truncated or malformed file, an item dsv3 does not write, a file whose
    size differs from its manifest. The checksums are `verify`'s."""
    path = Path(path)
    try:
        backend = safe_data.read_json(path / "metadata.json", "metadata.json", 2**20, _Unreadable)
        if backend.get("sharded_backend") != BACKEND:
            return f"metadata.json names the format {str(backend.get('sharded_backend'))[:40]!r}, not {BACKEND!r}"
        problem = _common_problem(read_common(path))
        if problem:
            return problem
        layout = metadata_guard.read_metadata(path)
        metadata_guard.check_items(path, layout)
        entries = manifest.read(path)
    except UnsafeCheckpointError as error:
        return f".metadata {error}"
    except (ManifestError, _Unreadable) as error:
        return str(error)
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except Exception as error:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        return f"unreadable ({type(error).__name__}: {str(error)[:200]})"
    return storage_problem(path, layout) or (manifest.check_sizes(path, entries) if entries is not None else None)


def storage_problem(path: Path, layout: Any) -> Optional[str]:
    """A storage file of the (checked) metadata `layout` that is missing or ends before its items."""
    needed: dict[str, int] = {}
    for info in layout.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is truncated ({file.stat().st_size} of at least {size} bytes)"
    return None


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def verify(path: str | Path) -> Optional[str]:
    """Collectively: the first file of the checkpoint whose bytes do not match its manifest, as a
    sentence, or None when all do. The files are dealt round-robin over the ranks; every rank
    gets the same answer. A checkpoint without a manifest (saved before checksums) is reported."""
    rank, world = _world()
    try:
        entries = manifest.read(path)
    except (ManifestError, OSError) as error:
        entries, problem = None, str(error)
    else:
        problem = None if entries is not None else UNVERIFIED
    if entries is not None:
        names = sorted(entries)
        problem = manifest.verify(path, names[rank::world], entries)
    if world > 1:
        problems = comm.all_gather_object(problem)
        problem = next((p for p in problems if p is not None), None)
    return problem


def _resume_candidates(directory: Path, notes: list[str]):
    """Steps worth verifying, newest first: the one `latest` names and the sound ones before it."""
    steps = list_checkpoints(directory)
    named, note = read_latest(directory)
    if note:
        notes.append(note)
    elif named is not None and named in steps:
        steps = [s for s in steps if s <= named]
    elif named is not None:
        notes.append(f"{directory / 'latest'} names {named}, not a checkpoint here: ignored")
    for step in reversed(steps):
        problem = problem_with(checkpoint_path(directory, step))
        if problem is None:
            yield step
        else:
            notes.append(f"skipped damaged checkpoint {checkpoint_path(directory, step)}: {problem}")


def agree_on_resume(directory: str | Path) -> tuple[Optional[int], list[str]]:
    """The step every rank resumes (None: start fresh) and rank 0's notes on what was skipped and why:
    rank 0 proposes the newest sound candidate, the ranks verify its checksums together, and a
    checkpoint that fails is skipped for the one before it. One without a manifest is resumed
    with a note (it was saved before checksums)."""
    directory = Path(directory)
    rank, world = _world()
    notes: list[str] = []
    candidates = _resume_candidates(directory, notes) if rank == 0 else iter(())
    while True:
        step = next(candidates, None)
        if world > 1:
            step = comm.broadcast_object(step, src=0)
        if step is None:
            return None, notes
        path = checkpoint_path(directory, step)
        problem = verify(path)
        if problem in (None, UNVERIFIED):
            if problem:
                notes.append(f"{path} is not verified: {problem}")
            return step, notes
        notes.append(f"skipped damaged checkpoint {path}: {problem}")


def choose_resume(directory: str | Path) -> tuple[Optional[int], list[str]]:
    """`agree_on_resume` in a process of its own (tools and tests): the step to resume and the notes."""
    return agree_on_resume(directory)


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


def roll_back(directory: str | Path, bad_step: int, verified: frozenset[int] = frozenset()
              ) -> tuple[Optional[Path], list[Path]]:
    """After divergence, on every rank: the last good checkpoint is the newest whose weights gave a
    good loss (the loss of step `bad_step`, 1-based, is the first bad one, and a save at step s is
    first judged by the loss of s + 1) and whose files match their manifest (`verified` steps were
    checked at load already). Rank 0 sets aside the saves after it and points `latest` at it.
    Returns (its path or None, what was set aside), on rank 0; (its path, []) elsewhere."""
    rank, world = _world()
    candidates = [s for s in list_checkpoints(directory) if s + 1 < bad_step] if rank == 0 else []
    if world > 1:
        candidates = comm.broadcast_object(candidates, src=0)
    good = None
    for step in reversed(candidates):
        path = checkpoint_path(directory, step)
        if step in verified or (verify(path) is None and problem_with(path) is None):
            good = step
            break
    moved = []
    if rank == 0:
        moved = set_aside(directory, [s for s in list_checkpoints(directory) if good is None or s > good])
        _write_latest(directory, good)
    _barrier()
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


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind a failure, if any: torch.save turns ENOSPC into a RuntimeError whose context
    is the OSError, and PyTorch's CheckpointException holds every rank's (exception, traceback)."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current
        todo += [c for c in (current.__cause__, current.__context__) if c is not None]
        for failure in getattr(current, "failures", {}).values():
            todo += [f for f in (failure if isinstance(failure, tuple) else (failure,)) if isinstance(f, BaseException)]
    return None


def _why(error: BaseException) -> str:
    """The cause of a failed write in a few words: the OSError inside a wrapped failure when there is
    one, else the first rank's failure (Megatron-Core's forked writer sends back only the message of
    torch.save's RuntimeError, whose "unexpected pos" means a short write)."""
    cause = os_error_in(error)
    if cause is not None:
        return cause.strerror
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(error, "failures", {}).values()]
    first = next((f for f in failures if isinstance(f, BaseException)), error)
    text = (str(first).strip().splitlines() or [type(first).__name__])[0][:200]
    return text + (" (a short write: is the disk full?)" if "unexpected pos" in text else "")


def _free_space(directory: Path) -> str:
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return ""
    return f"; {usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB there"


def _agree(problem: Optional[str]) -> Optional[str]:
    """The first rank's problem (None if none had one), on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return next((p for p in comm.all_gather_object(problem) if p is not None), None)
    return problem


def save(directory: str | Path, step: int, model: nn.Module, optimizer: Any, common: dict[str, Any],
         keep: int = 3) -> Path:
    """Write a checkpoint of `step` collectively; returns its path. The barriers and the writes are
    bounded by the default process group's timeout (`checkpoint.save_timeout_s`). The ranks hash
    what they wrote into `manifest.json` before the rename. A failed write raises
    CheckpointWriteError on every rank, after rank 0 removed the partial folder."""
    directory = Path(directory)
    final = checkpoint_path(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    rank, world = _world()
    previous = read_latest(directory)[0] if rank == 0 else None
    problem = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as error:
        problem = _why(error)
    problem = _agree(problem)
    if problem is None:
        state = sharded_state_dict(model, optimizer)
        state["common"] = common
        try:
            dist_checkpointing.save(state, str(tmp))  # megatron-core raises a write failure on every rank
        except (Exception, CheckpointException) as error:  # PyTorch's (a BaseException) holds every rank's
            if _is_timeout(error):
                raise
            problem = _why(error)
    if problem is None:
        try:
            names = manifest.files_to_list(tmp)
            found = manifest.digests(tmp, [name for i, name in enumerate(names)
                                           if manifest.hashed_at_save_by(name, i, world) == rank])
            mine = [(name, size, sha) for name, (size, sha) in found.items()]
        except OSError as error:
            problem, mine = _why(error), []
        parts = comm.all_gather_object((problem, mine)) if world > 1 else [(problem, mine)]
        problem = next((p for p, _ in parts if p is not None), None)
    renamed = False
    if problem is None and rank == 0:
        try:
            manifest.write(tmp, {name: (size, sha) for _, part in parts for name, size, sha in part})
            if final.exists():  # a step saved again: keep the old one whole until the new one is in place
                replaced = final.with_name(final.name + ".replaced")
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
                os.replace(tmp, final)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.replace(tmp, final)
            renamed = True
            _write_latest(directory, step)
            _prune(directory, step, keep)
        except OSError as error:
            problem = _why(error)
    problem = _agree(problem)
    if problem is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (directory / "latest.tmp").unlink(missing_ok=True)
        kept = (f"{checkpoint_path(directory, previous).name} and `latest` are as they were" if previous is not None
                else "`latest` is as it was")
        done = (f"{final.name} is complete but `latest` could not name it; " if renamed else
                f"removed the partial {tmp.name}; ")
        raise CheckpointWriteError(f"could not write checkpoint {final} ({problem}{_free_space(directory)}): "
                                   + done + kept)
    _barrier()
    return final


def _load_problem(path: Path, state: dict[str, Any]) -> None:
    """Refuse, before a shard is read, a checkpoint whose items are not what dsv3 writes or whose
    items for `state`'s keys are not tensors."""
    metadata_guard.check_items(path, metadata_guard.read_metadata(path), tensors=[k for k in state if k != "common"])


@torch.no_grad()
def load(path: str | Path, model: nn.Module, optimizer: Optional[Any] = None) -> dict[str, Any]:
    """Load `path` into model (and optimizer) under the current layout; returns the common dict."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = sharded_state_dict(model, optimizer, loading=True)
    state["common"] = {}
    try:
        _load_problem(path, state)
        with metadata_guard.reading_as_data():
            loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as error:  # PyTorch's (a BaseException) holds every rank's failure
        if isinstance(error, UnsafeCheckpointError):
            raise UnsafeCheckpointError(f"{path / '.metadata'} {error}") from None
        reasons = [str(error), *map(str, getattr(error, "failures", {}).values())]
        unsafe = next((r for r in reasons if metadata_guard.REFUSAL in r or "refused unread" in r), None)
        if unsafe is None:
            raise
        raise UnsafeCheckpointError(f"{path / '.metadata'} {unsafe.strip().splitlines()[-1]}") from None
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
    return load_common(path)


def load_common(path: str | Path) -> dict[str, Any]:
    """The step counters and config saved with a checkpoint, read as data without loading any tensor."""
    return read_common(path)
@torch.no_grad()
def load_weights(path: str | Path, model: nn.Module, optimizer: Optional[Any] = None) -> list[str]:
    """`checkpoint.load_weights`: only the weights of `path` into `model` under the current layout (the
    optimizer keeps its fresh moments; its FP32 master copies, if any, take the weights). Every tensor
    of the model must be in the checkpoint with its global shape, else RunConfigError names them;
    checkpoint tensors the model lacks (MTP weights for a run without MTP) are skipped and listed
    in the returned notes."""
    path = Path(path)
    problem = problem_with(path) if path.is_dir() else "it is not a folder"
    problem = _agree(problem) or verify(path)
    if problem not in (None, UNVERIFIED):
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
    try:
        _load_problem(path, state)
        with metadata_guard.reading_as_data():
            loaded = dist_checkpointing.load(state, str(path))
    except UnsafeCheckpointError as error:
        raise RunConfigError(f"checkpoint.load_weights={path}: .metadata {error}") from None
    for name, target in named_tensors(model).items():
        target.copy_(loaded[f"model.{name}"])
    if optimizer is not None:
        optimizer.load_master_weights({name: loaded[f"model.{name}"] for name, _ in model.named_parameters()})
    skipped = sorted(set(stored) - set(state))
    return [f"skipped {len(skipped)} checkpoint tensor(s) this model has no place for: "
            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"] if skipped else []
