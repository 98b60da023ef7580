"""Slurm's srun delivers a forwarded SIGUSR1 to every process of the job step, and keeps
repeating it in our sbatch script. The trainer, and the helper processes Megatron-Core's
checkpoint writer starts, must survive that: the run saves, exits 75 and resumes."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers.distributed import ROOT


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("save_interval", [2, 0], ids=["writer-running", "first-save-is-the-preemption-save"])
def test_repeated_process_group_sigusr1_saves_exits_75_and_resumes(tmp_path, save_interval):
    """With save_interval 2 the checkpoint writer's helper process exists when the signals come;
    with 0 it is started by the very save the signals asked for, while they keep coming."""
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "megatron_dsv3.train", "train.steps=400", "train.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=2", "logging.interval=1",
            f"checkpoint.save_interval={save_interval}", f"checkpoint.dir={ckpt}", "logging.jsonl=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = []
    try:
        for line in proc.stdout:  # wait for step 3 (with save_interval 2 a checkpoint exists by then)
            out.append(line)
            if re.match(r"step [3-9]/", line):
                break
        for _ in range(60):  # like the sbatch script: repeat the signal to the whole process group
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(0.2)
        out.append(proc.stdout.read())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(out)
    assert proc.returncode == 75, text[-3000:]
    saved = re.search(r"preempted: saved \S+iter_(\d+) at step (\d+)", text)
    assert saved, text[-3000:]

    resumed = subprocess.run(args[:3] + ["train.steps=" + str(int(saved.group(2)) + 2)] + args[4:], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from step {int(saved.group(2))}" in resumed.stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killed_trainer_leaves_no_checkpoint_writer_or_resource_tracker(tmp_path):
    """The writer's Manager dies with its trainer (PR_SET_PDEATHSIG); the multiprocessing resource
    tracker, which exits when every holder of its pipe has closed it (the Manager held it too), follows."""
    log = tmp_path / "train.log"
    args = [sys.executable, "-m", "megatron_dsv3.train", "train.steps=100000", "train.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=2", "logging.interval=1",
            "checkpoint.save_interval=5", f"checkpoint.dir={tmp_path / 'ckpt'}", "logging.jsonl=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:  # a file: an orphan holding a pipe would keep a reader waiting
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    helpers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 150
        while not re.search(r"^step [6-9]/", log.read_text(), re.M):  # saved at 5; the next save is at 10
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        helpers = [p for p in psutil.Process(proc.pid).children()
                   if re.search(r"resource_tracker|spawn_main", " ".join(p.cmdline()))]
        assert len(helpers) == 2, helpers  # the tracker and the writer's Manager
        proc.kill()
        proc.wait(timeout=30)
        alive = _still_running(helpers, grace=30)
    finally:
        proc.kill()
        for process in helpers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    assert alive == []


def _still_running(processes: list[psutil.Process], grace: float) -> list[str]:
    """Those of `processes` still running (not zombies: an orphan waits for init to reap it) after `grace` s."""
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{process.pid}: {' '.join(process.cmdline())[:120]}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
