"""Keep Megatron-Core's checkpoint writer alive through Slurm's preemption signals.

megatron-core 0.16 (`dist_checkpointing.strategies.filesystem_async`) collects write results
through a queue served by a *spawned* Manager process that it creates on the first save and
keeps. That process has default signal dispositions, and srun delivers a forwarded SIGUSR1 or
SIGTERM to every process of the job step: the Manager dies, and the very save the signal asked
for fails with ConnectionRefusedError. Inside `signal_safe_checkpoint_writer()` the queue comes,
on the first save as before, from a Manager that blocks those two signals (the training process
itself handles them and saves).

    with signal_safe_checkpoint_writer():
        ...  # dist_checkpointing.save(...) survives SIGUSR1/SIGTERM to the process group

A Megatron-Core without that module function is left alone.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
from multiprocessing.managers import SyncManager

from patches import _mark, _unmark

NAME = "megatron.core.dist_checkpointing.strategies.filesystem_async:signal-safe-results-queue"
PREEMPTION_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}


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
            # Blocked, not ignored, and already in this thread while the child starts: the signal
            # mask survives fork and exec, so a signal repeated during the start-up cannot kill it.
            # Signals arriving meanwhile stay pending here and reach the trainer's handler after.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
            try:
                manager.start(initializer=signal.pthread_sigmask, initargs=(signal.SIG_BLOCK, PREEMPTION_SIGNALS))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            managers.append(manager)
            writer._results_queue = manager.Queue()
        return writer._results_queue

    signal_safe_queue.signal_safe = True
    writer._get_write_results_queue = signal_safe_queue
    _mark(NAME)
    try:
        yield
    finally:
        writer._get_write_results_queue = original
        writer._results_queue = None
        for manager in managers:
            manager.shutdown()
        _unmark(NAME)
