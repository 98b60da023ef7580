"""Keep Megatron-Core's checkpoint writer alive through Slurm's preemption signals.

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

A Megatron-Core without that module function is left alone.
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

from megatron_dsv3.compat.active import mark, unmark

NAME = "megatron.core.dist_checkpointing.strategies.filesystem_async:signal-safe-results-queue"
PREEMPTION_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _writer_manager_setup(parent_pid: int, die_with_parent: bool) -> None:
    """Initializer of the Manager process: preemption signals blocked; SIGKILL when the parent dies."""
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    if die_with_parent:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


@contextlib.contextmanager
def signal_safe_checkpoint_writer():
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
