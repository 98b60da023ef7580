"""One run per checkpoint folder, and a folder a run can write: checked by rank 0 before it trains.

    lock = claim(directory, needed_bytes=3 * 2**30)   # RunLockError: one sentence naming the problem
    ...
    lock.release()                                      # also removes the folders `claim` created, if empty

`claim` creates the folder, writes and removes a probe file in it (a read-only folder or file
system is refused at start, not at the first save), checks that it has room for one more
checkpoint by the plan's estimate, and creates `.lock` there atomically. The lock holds the
host, PID, process start time and the time it was taken; while held, a thread refreshes its
modification time every HEARTBEAT_S. A second run finding it is refused with those facts. A lock
is stale, and taken over with a note, when its process is gone (same host: no such PID, or a
PID reused by a later process), or when it was not refreshed for STALE_AFTER_S (a run on
another host that died with its node).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import psutil

NAME = ".lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class RunLockError(ValueError):
    """The checkpoint folder cannot be used: held by a run, not writable, or without room."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _holder(path: Path) -> Optional[dict]:
    """The lock's contents, or None when it is gone or unreadable (a torn write of a dying run)."""
    try:
        held = json.loads(path.read_bytes()[:4096])
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def _stale_because(path: Path, held: Optional[dict]) -> Optional[str]:
    """Why the lock at `path` is stale, or None while its run may be alive."""
    try:
        idle = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if held is None:
        return "it is unreadable" if idle > HEARTBEAT_S else None
    if held.get("host") == socket.gethostname():
        try:
            process = psutil.Process(int(held.get("pid")))
            alive = (abs(process.create_time() - float(held.get("started"))) < 1.0
                     and process.status() != psutil.STATUS_ZOMBIE)
        except (psutil.NoSuchProcess, TypeError, ValueError):
            alive = False
        return None if alive else f"process {held.get('pid')} on this host is gone"
    if idle > STALE_AFTER_S:
        return f"it was last refreshed {idle:.0f} s ago"
    return None


class RunLock:
    """The lock this process holds on a checkpoint folder (see the module docstring)."""

    def __init__(self, path: Path, created: list[Path]):
        self.path, self.created = path, created
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="dsv3-checkpoint-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock, then the folders `claim` created that are still empty."""
        self._stop.set()
        held = _holder(self.path)
        if held is not None and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        _remove_empty(self.created)


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


def _make(directory: Path) -> list[Path]:
    """mkdir -p `directory`; returns the folders it created, outermost first."""
    missing = []
    folder = directory
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return list(reversed(missing))


def _take(path: Path) -> bool:
    """Create the lock file if there is none; False when another run's is there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(_me(), f)
    return True


def claim(directory: str | Path, needed_bytes: int = 0, notes: Optional[list[str]] = None) -> RunLock:
    """Make `directory`, check it is writable with `needed_bytes` free, and lock it (see above)."""
    directory = Path(directory)
    notes = notes if notes is not None else []
    created: list[Path] = []
    try:
        created = _make(directory)
        if not directory.is_dir():
            raise RunLockError(f"checkpoint.dir {directory} is not a folder")
        probe = directory / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        free = shutil.disk_usage(directory).free
        if free < needed_bytes:
            raise RunLockError(f"checkpoint.dir {directory} has {free / 2**20:.0f} MiB free, and one checkpoint of "
                               f"this run takes about {needed_bytes / 2**20:.0f} MiB (FP32 weights and Adam moments): "
                               "free some space or choose another checkpoint.dir")
        path = directory / NAME
        while not _take(path):
            held = _holder(path)
            stale = _stale_because(path, held)
            if stale is None:
                held = held or {}
                raise RunLockError(
                    f"checkpoint.dir {directory} is in use by the run of PID {held.get('pid')} on host "
                    f"{held.get('host')} since {held.get('since')} ({path}): stop that run, or give this one "
                    f"another checkpoint.dir (a lock not refreshed for {STALE_AFTER_S:.0f} s is taken as stale)")
            aside = path.with_name(f"{NAME}.stale-{os.getpid()}")
            try:
                os.replace(path, aside)  # one of two runs taking over the same stale lock wins the rename
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
            notes.append(f"took over the stale lock {path} of PID {(held or {}).get('pid')} on host "
                         f"{(held or {}).get('host')}: {stale}")
        return RunLock(path, created)
    except (OSError, RunLockError) as error:
        _remove_empty(created)
        if isinstance(error, RunLockError):
            raise
        what = "is read-only" if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "cannot be written"
        raise RunLockError(f"checkpoint.dir {directory} {what} ({error.strerror or error}): checkpoints could not be "
                           "saved there") from None
