"""A job server for tests/test_train.py: dsv3-train on N local gloo ranks, imported once.

    python tests/helpers/train_ranks.py        # then one JSON job per line on stdin

Importing Megatron-Core costs several seconds of CPU. This process pays it once, never runs a
tensor op itself, and forks every rank of every job from that state (forking after OpenMP has run
would hang the child; nothing here runs it). Per job it answers, one JSON line each on stdout:

    {"id": .., "event": "started", "pids": [rank 0 pid, ...]}
    {"id": .., "event": "done", "rcs": [exit code of each rank], "timed_out": bool}

A job is {"id", "nproc", "argv" (dsv3-train overrides), "logdir" (rank{r}.log files go there),
"timeout" (seconds; ranks still alive then are killed), "crash_on_save" (optional N: the N-th
checkpoint save of rank 0 writes its .tmp directory, damages it and kills the process before
the rename, as a crash in the middle of a save would)}.

Heavy imports happen only under the __main__ guard: dist_checkpointing starts a helper process
with the "spawn" method, which re-imports this file as __mp_main__.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from distributed import free_port  # tests/helpers/distributed.py: this file runs as a script from here


def _install_crash_on_save(n: int) -> None:
    """Make the n-th dist_checkpointing.save of this process die after a partial write."""
    import multiprocessing
    from pathlib import Path

    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save
    calls = {"n": 0}

    def save(state, directory, *args, **kwargs):
        calls["n"] += 1
        result = real_save(state, directory, *args, **kwargs)
        if calls["n"] < n:
            return result
        # Half-written: drop the metadata and cut every shard file in half, then die without
        # returning (so the .tmp directory is never renamed and `latest` never rewritten).
        for path in Path(directory).iterdir():
            if path.name.endswith(".distcp"):
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
            elif path.name in (".metadata", "metadata.json"):
                path.unlink()
        print(f"train_ranks: crashing in save #{calls['n']} into {directory}", flush=True)
        for child in multiprocessing.active_children():  # a checkpoint-writer Manager, if any
            child.kill()
        os._exit(86)

    dist_checkpointing.save = save


def _rank(job: dict, rank: int, port: int) -> None:
    """Body of one forked rank: redirect output, set torchrun's variables, run dsv3-train."""
    import torch

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    log = os.open(os.path.join(job["logdir"], f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    torch.set_num_threads(1)
    if job["nproc"] > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(job["nproc"]),
                           "LOCAL_WORLD_SIZE": str(job["nproc"]), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    # Megatron-Core's checkpoint writer hands its results back through a queue that dsv3-train
    # serves from a spawned Manager process; a synchronous save puts and gets in this process, so
    # a plain queue does the same job without starting an interpreter per rank and job.
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()
    if job.get("crash_on_save") and rank == 0:
        _install_crash_on_save(int(job["crash_on_save"]))
    from megatron_dsv3.train import main

    code = main(list(job["argv"]))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _run_job(job: dict) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    os.makedirs(job["logdir"], exist_ok=True)
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(job, rank, port), daemon=False) for rank in range(job["nproc"])]
    for proc in procs:
        proc.start()
    _reply({"id": job["id"], "event": "started", "pids": [p.pid for p in procs]})
    deadline = time.monotonic() + float(job.get("timeout", 120))
    timed_out = False
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            timed_out = True
            break
    if timed_out:
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
                proc.join(10)
    _reply({"id": job["id"], "event": "done", "rcs": [p.exitcode for p in procs], "timed_out": timed_out})


def serve() -> None:
    # Everything a rank needs, imported once here (no tensor op runs in this process).
    import megatron_dsv3.checkpoint.dist  # noqa: F401
    import megatron_dsv3.data  # noqa: F401
    import megatron_dsv3.model.gpt  # noqa: F401
    import megatron_dsv3.monitor  # noqa: F401
    import megatron_dsv3.optim  # noqa: F401
    import megatron_dsv3.train  # noqa: F401
    import megatron_dsv3.compat.megatron_cpu  # noqa: F401

    _reply({"event": "ready"})
    for line in sys.stdin:
        if line.strip():
            _run_job(json.loads(line))


if __name__ == "__main__":
    serve()
