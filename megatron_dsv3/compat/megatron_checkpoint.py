"""Megatron-Core's checkpoint writer kept alive through Slurm's preemption signals and dying with
its rank; byte items of a checkpoint read as data.

Byte items: PyTorch's DefaultLoadPlanner, whose `load_bytes` Megatron-Core's loading strategies
inherit (0.16-0.19), unpickles every `BytesStorageMetadata` item with
`torch.load(weights_only=False)`: a checkpoint that declares a weight as bytes and points it at a
pickle runs that pickle's code. Inside `data_only_byte_items(allowed, refusal)` a byte item is
read only when `allowed(fqn)`, and then with `weights_only=True`; any other raises `refusal(fqn)`.

Writer:

megatron-core 0.16 (`dist_checkpointing.strategies.filesystem_async`) collects write results
through a queue served by a *spawned* Manager process that it creates on the first save and
keeps. That process has default signal dispositions, and srun delivers a forwarded SIGUSR1 or
SIGTERM to every process of the job step: the Manager dies, and the very save the signal asked
for fails with ConnectionRefusedError. Inside `signal_safe_checkpoint_writer()` the queue comes,
on the first save as before, from a Manager that blocks those two signals (the training process
itself handles them and saves), and that dies with the training process on Linux: a rank killed
with SIGKILL otherwise leaves it running, and with it the multiprocessing resource tracker, which
exits only when every holder of its pipe (the rank and the Manager it spawned) has closed it.

    with signal_safe_checkpoint_writer():
        ...  # dist_checkpointing.save(...) survives SIGUSR1/SIGTERM to the process group

A Megatron-Core without that module function is left alone. Megatron-Core also forks a writer
process per save (`write_preloaded_data_multiproc`), which inherits the trainer's signal
handlers: under plain torchrun a rank killed mid-save left it (and, through it, the resource
tracker) running for good. Inside `signal_safe_checkpoint_writer()` every process this one forks
from its main thread gets SIGKILL when it loses its parent, as the Manager does.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
from multiprocessing.managers import SyncManager
from typing import Callable

import torch

from megatron_dsv3.compat.active import mark, unmark

NAME = "megatron.core.dist_checkpointing.strategies.filesystem_async:signal-safe-results-queue"
FORKS_NAME = "os.fork:children-die-with-the-checkpointing-rank"
BYTES_NAME = "torch.distributed.checkpoint.DefaultLoadPlanner.load_bytes:weights-only"
PREEMPTION_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _writer_manager_setup(parent_pid: int, die_with_parent: bool) -> None:
    """Initializer of the Manager process: preemption signals blocked; SIGKILL when the parent dies."""
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    if die_with_parent:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


# Forked children die with this process while `_FORK_GUARD["on"]`: os.register_at_fork cannot be
# undone, so it is registered once and the context manager turns it on and off.
_FORK_GUARD = {"on": False, "registered": False, "from_main_thread": False}


def _before_fork() -> None:
    _FORK_GUARD["from_main_thread"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    """In a child forked while the guard is on, from the main thread (the death signal follows the
    thread that forked: only the main thread lives as long as the process): die with the parent."""
    if _FORK_GUARD["on"] and _FORK_GUARD["from_main_thread"] and sys.platform == "linux":
        parent = os.getppid()
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)


@contextlib.contextmanager
def forked_children_die_with_this_process():
    if not hasattr(os, "register_at_fork") or _FORK_GUARD["on"]:
        yield
        return
    if not _FORK_GUARD["registered"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _FORK_GUARD["registered"] = True
    _FORK_GUARD["on"] = True
    mark(FORKS_NAME)
    try:
        yield
    finally:
        _FORK_GUARD["on"] = False
        unmark(FORKS_NAME)


@contextlib.contextmanager
def data_only_byte_items(allowed: Callable[[str], bool], refusal: Callable[[str], Exception]):
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    original = DefaultLoadPlanner.load_bytes

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        if not allowed(fqn):
            raise refusal(fqn)
        loaded = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded

    DefaultLoadPlanner.load_bytes = load_bytes
    mark(BYTES_NAME)
    try:
        yield
    finally:
        DefaultLoadPlanner.load_bytes = original
        unmark(BYTES_NAME)


@contextlib.contextmanager
def signal_safe_checkpoint_writer():
    with forked_children_die_with_this_process(), _signal_safe_results_queue():
        yield


@contextlib.contextmanager
def _signal_safe_results_queue():
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as writer
    except ImportError:
        yield
        return
    original = getattr(writer, "_get_write_results_queue", None)
    if (original is None or getattr(original, "signal_safe", False)
            or getattr(writer, "_results_queue", "absent") is not None):
        yield  # another Megatron-Core layout, already inside this patch, or a queue that exists already
        return
    managers: list[SyncManager] = []

    def signal_safe_queue():
        if writer._results_queue is None:
            manager = SyncManager(ctx=mp.get_context("spawn"))
            # The death signal follows the *thread* that starts the child: only the main thread lives
            # as long as the process.
            die_with_parent = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
            # Blocked, not ignored, and already in this thread while the child starts: the signal
            # mask survives fork and exec, so a signal repeated during the start-up cannot kill it.
            # Signals arriving meanwhile stay pending here and reach the trainer's handler after.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
            try:
                manager.start(initializer=_writer_manager_setup, initargs=(os.getpid(), die_with_parent))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            managers.append(manager)
            writer._results_queue = manager.Queue()
        return writer._results_queue

    signal_safe_queue.signal_safe = True
    writer._get_write_results_queue = signal_safe_queue
    mark(NAME)
    try:
        yield
    finally:
        writer._get_write_results_queue = original
        writer._results_queue = None
        for manager in managers:
            manager.shutdown()
        unmark(NAME)
