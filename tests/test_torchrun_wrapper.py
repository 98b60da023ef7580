"""dsv3-torchrun: two gloo ranks of the real dsv3-train under torchrun (127.0.0.1, a free port).

A preemption signal, to the wrapper or (as srun delivers it) to every process of the job, makes the
ranks save a checkpoint and the wrapper exit 75, and leaves no process behind; a rank killed with
SIGKILL leaves no orphaned checkpoint-writer or resource-tracker process either.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers.distributed import ROOT, free_port
from megatron_dsv3 import exit_status
from megatron_dsv3.cli.torchrun import exit_code

SMALL = ["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "logging.interval=1",
         "train.device=cpu", "train.steps=100000", "checkpoint.save_interval=2", "logging.jsonl=false"]


class Job:
    """`dsv3-torchrun` with two local ranks of `python -m megatron_dsv3.train` (its `cli()`). The output
    goes to a file: an orphan holding a pipe would keep a reader waiting for its end."""

    def __init__(self, tmp_path: Path):
        self.ckpt, self.log = tmp_path / "ckpt", tmp_path / "job.log"
        args = [sys.executable, "-m", "megatron_dsv3.cli.torchrun", "--nnodes=1", "--nproc-per-node=2",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1",
                "--max-restarts=0", "--no-python", sys.executable, "-m", "megatron_dsv3.train", *SMALL,
                f"checkpoint.dir={self.ckpt}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.seen: list[psutil.Process] = []

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_step(self, step: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(int(n) >= step for n in re.findall(r"^step (\d+)/", self.text(), re.M)):
                return
            time.sleep(0.5)
        pytest.fail(f"no step {step} within {timeout:.0f} s (exit {self.proc.poll()}):\n" + self.text()[-3000:])

    def processes(self) -> tuple[list[psutil.Process], list[psutil.Process]]:
        """(torchrun's children, i.e. the ranks; every process below the wrapper)."""
        wrapper = psutil.Process(self.proc.pid)
        torchrun = wrapper.children()[0]
        self.seen = wrapper.children(recursive=True)
        return torchrun.children(), self.seen

    def finish(self, timeout: float = 150) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_everything(self) -> None:
        """Whatever of the job still runs, after a failure."""
        if self.proc.poll() is None:
            self.seen += psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.kill()
        for process in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.proc.wait()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _alive(processes: list[psutil.Process], grace: float = 15) -> list[str]:
    """The processes still running after `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid}: {' '.join(p.cmdline())[:120]}" for p in alive]
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, to_every_process", [(signal.SIGUSR1, False), (signal.SIGTERM, False),
                                                   (signal.SIGUSR1, True)],
                         ids=["SIGUSR1-to-wrapper", "SIGTERM-to-wrapper", "SIGUSR1-to-every-process-like-srun"])
def test_preemption_saves_exits_75_and_leaves_no_process(tmp_path, sig, to_every_process):
    job = Job(tmp_path)
    try:
        job.wait_for_step(3)  # the checkpoint of step 2 exists: so do its writer and resource tracker
        ranks, everything = job.processes()
        assert len(ranks) == 2 and len(everything) > 3, everything
        if to_every_process:  # srun forwards the warning to every process of the step, repeated by the script
            deadline = time.monotonic() + 150
            while job.proc.poll() is None and time.monotonic() < deadline:
                for process in [psutil.Process(job.proc.pid), *everything]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.send_signal(sig)
                time.sleep(0.2)
        else:
            job.proc.send_signal(sig)
        code = job.finish()
        left_behind = _alive(everything)
    finally:
        job.kill_everything()
    text = job.text()
    assert code == exit_status.PREEMPTED, text[-3000:]
    saved = re.search(r"preempted: saved \S+iter_(\d+) at step (\d+)", text)
    assert saved and (job.ckpt / f"iter_{int(saved.group(1)):07d}").is_dir(), text[-3000:]
    assert "the ranks saved a checkpoint and exited 75 (torchrun exited 1)" in text
    assert left_behind == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rank_killed_leaves_no_orphaned_writer_or_resource_tracker(tmp_path):
    job = Job(tmp_path)
    try:
        job.wait_for_step(3)
        ranks, everything = job.processes()
        helpers = [p for p in everything if p not in ranks and p.ppid() in {r.pid for r in ranks}]
        assert any("resource_tracker" in " ".join(p.cmdline()) for p in helpers), helpers
        assert any("spawn_main" in " ".join(p.cmdline()) for p in helpers), helpers  # the writer's Manager
        ranks[0].kill()
        code = job.finish()
        left_behind = _alive(everything)
    finally:
        job.kill_everything()
    assert code not in (0, exit_status.PREEMPTED), job.text()[-3000:]
    assert left_behind == []


@pytest.mark.parametrize("torchrun_code, rank_codes, expected", [
    (1, {"rank-0": 75, "rank-1": 75}, 75),
    (1, {"rank-0": 75}, 75),  # rank 1 stopped by torchrun after rank 0 saved and left
    (1, {"rank-0": 75, "rank-1": 1}, 1),
    (0, {"rank-0": 0, "rank-1": 0}, 0),
    (1, {}, 1),
    (-9, {}, 137),
])
def test_exit_code_is_75_only_when_the_ranks_report_75(torchrun_code, rank_codes, expected):
    assert exit_code(torchrun_code, rank_codes) == expected


def test_exit_status_is_recorded_per_rank_and_only_when_asked(tmp_path, monkeypatch):
    from megatron_dsv3 import exit_status

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(exit_status.ENV, raising=False)
    exit_status.record(75)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(exit_status.ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    exit_status.record(75)
    assert exit_status.recorded(tmp_path) == {"rank-3": 75}
