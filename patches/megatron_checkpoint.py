"""Keep Megatron-Core's checkpoint writer alive through Slurm's preemption signals.

megatron-core 0.16 (`dist_checkpointing.strategies.filesystem_async`) collects write results
through a queue served by a *spawned* Manager process that it creates on the first save and
keeps. That process has default signal dispositions, and srun delivers a forwarded SIGUSR1 or
SIGTERM to every process of the job step: the Manager dies, and the very save the signal asked
for fails with ConnectionRefusedError. Here the queue is created up front by a Manager that
ignores those two signals (the training process itself handles them and saves).

    with signal_safe_checkpoint_writer():
        ...  # dist_checkpointing.save(...) survives SIGUSR1/SIGTERM to the process group

A Megatron-Core without that module attribute is left alone.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
from multiprocessing.managers import SyncManager

from patches import _mark, _unmark

NAME = "megatron.core.dist_checkpointing.strategies.filesystem_async:signal-safe-results-queue"


def ignore_preemption_signals() -> None:
    """Initializer of the Manager process (module level so the spawned child can import it)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def signal_safe_checkpoint_writer():
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        yield
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:  # absent, or already created
        yield
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=ignore_preemption_signals)
    filesystem_async._results_queue = manager.Queue()
    _mark(NAME)
    try:
        yield
    finally:
        filesystem_async._results_queue = None
        manager.shutdown()
        _unmark(NAME)
