"""The client of the rank job server (tests/helpers/train_ranks.py): dsv3-train on N local gloo
ranks, forked from one process that imported Megatron-Core once."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class RankServer:
    """Client of tests/helpers/train_ranks.py (see its docstring for the protocol)."""

    def __init__(self, log_dir: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",  # CPU ranks on a CUDA host too
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.err_path = log_dir / "server.err"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "train_ranks.py")], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        self._buffer = b""
        self._ready = False
        self._jobs = 0

    def _readline(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"tests/helpers/train_ranks.py sent nothing for {timeout:.0f} s:\n{self._tail()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"tests/helpers/train_ranks.py exited ({self.proc.poll()}):\n{self._tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _tail(self) -> str:
        self._err.flush()
        return self.err_path.read_text()[-3000:]

    def run(self, nproc: int, argv: list[str], logdir: Path, timeout: float = 90,
            crash_on_save: Optional[int] = None,
            on_start: Optional[Callable[[list[int], list[Path]], None]] = None) -> tuple[list[int], list[str]]:
        """Run dsv3-train on `nproc` ranks; returns (exit codes, rank outputs)."""
        if not self._ready:
            assert self._readline(120) == {"event": "ready"}
            self._ready = True
        self._jobs += 1
        job = {"id": str(self._jobs), "nproc": nproc, "argv": argv, "logdir": str(logdir), "timeout": timeout,
               "crash_on_save": crash_on_save}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        started = self._readline(30)
        assert started["event"] == "started", started
        logs = [logdir / f"rank{r}.log" for r in range(nproc)]
        if on_start is not None:
            on_start(started["pids"], logs)
        done = self._readline(timeout + 30)
        outputs = [p.read_text() if p.exists() else "" for p in logs]
        assert not done["timed_out"], f"ranks did not finish in {timeout} s:\n" + "\n".join(
            f"--- rank {r}\n{o[-3000:]}" for r, o in enumerate(outputs))
        return done["rcs"], outputs

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()
