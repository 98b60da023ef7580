"""Run a script on N local gloo ranks (127.0.0.1, a free port) with a hard time limit.

A rank that hangs in a collective is killed when the limit passes, and the test fails with
every rank's output instead of blocking CI.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# Below Linux's ephemeral range (32768-60999 by default), where every outgoing connection and every
# bind to port 0 takes its port: a port from here, free now, is not handed out to another socket
# before the rank that listens on it binds (gloo's own connections would take it).
PORTS = range(20000, 32000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, from outside the ephemeral range."""
    for port in random.sample(PORTS, 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port among 200 tried in {PORTS.start}-{PORTS.stop - 1} on 127.0.0.1")


def run_ranks(world: int, argv: list[str], timeout: float = 180, collective_timeout: int = 60) -> list[str]:
    """Start `python *argv` as ranks 0..world-1; return their outputs, or raise naming the failure."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DSV3_DIST_TIMEOUT": str(collective_timeout), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        partial = [p.communicate()[0] for p in procs]
        raise AssertionError(f"{world} ranks did not finish in {timeout:.0f} s:\n" + "\n".join(
            f"--- rank {r}\n{o[-3000:]}" for r, o in enumerate(partial)))
    except BaseException:  # e.g. pytest-timeout or Ctrl-C while waiting: no rank outlives the test
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise AssertionError(f"ranks {failed} failed:\n" + "\n".join(
            f"--- rank {r} (exit {procs[r].returncode})\n{outputs[r][-4000:]}" for r in failed))
    return outputs
