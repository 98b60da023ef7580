"""dsv3-launch against a real one-node Slurm (slurmctld + slurmd + munge, started here as root by
launch/slurm/setup_local_slurm.sh): the real dsv3-train runs as 2 gloo tasks under srun.

The setup installs Debian packages, writes /etc/slurm and a munge key and starts daemons, so these
tests run only with DSV3_SYSTEM_TESTS=1 (`system` marker). At the end they cancel the jobs they
submitted and stop the daemons that were not running before they started."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "launch" / "slurm" / "setup_local_slurm.sh"
EXAMPLE = ROOT / "examples" / "tiny-cpu.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Where setup_local_slurm.sh's daemons write their pids (its slurm.conf; munged's default), in stop order.
DAEMON_PIDFILES = {"slurmd": Path("/run/slurmd.pid"), "slurmctld": Path("/run/slurmctld.pid"),
                   "munged": Path("/run/munge/munged.pid")}
SUBMITTED: list[int] = []

pytestmark = [pytest.mark.slow, pytest.mark.system]


def _running_daemons() -> dict[str, psutil.Process]:
    """The Slurm daemons whose pid file names a live process of that name."""
    running = {}
    for name, pidfile in DAEMON_PIDFILES.items():
        try:
            process = psutil.Process(int(pidfile.read_text().split()[0]))
            if process.name() == name and process.status() != psutil.STATUS_ZOMBIE:
                running[name] = process
        except (OSError, ValueError, IndexError, psutil.Error):
            continue
    return running


def _cancel_submitted() -> None:
    """Cancel what this module submitted and wait (bounded) until Slurm has ended it."""
    if not SUBMITTED or shutil.which("scancel") is None:
        return
    subprocess.run(["scancel", *map(str, SUBMITTED)], capture_output=True, timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_job(j).get("JobState", "COMPLETED") not in TERMINAL for j in SUBMITTED):
        time.sleep(1)


def _stop(daemons: dict[str, psutil.Process]) -> None:
    for name in DAEMON_PIDFILES:  # slurmd first, munged last
        if name in daemons:
            daemons[name].terminate()
            try:
                daemons[name].wait(30)
            except psutil.TimeoutExpired:
                daemons[name].kill()


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm needs root to start slurmctld, slurmd and munged")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no Slurm installed and no apt-get to install it")
    before = _running_daemons()
    try:
        try:
            done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("launch/slurm/setup_local_slurm.sh did not finish in 300 s")
        if done.returncode != 0:
            pytest.fail(f"Slurm could not be started: {done.stderr.strip() or done.stdout.strip()}")
        yield
    finally:
        _cancel_submitted()
        _stop({name: p for name, p in _running_daemons().items() if before.get(name) != p})  # started here


def _submit(tmp_path: Path, *overrides: str, command: str | None = None) -> int:
    args = [f"launch.output_dir={tmp_path / 'slurm'}", f"checkpoint.dir={tmp_path / 'ckpt'}", *overrides]
    args.append(f"launch.command={command}" if command else f"launch.python={sys.executable}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "megatron_dsv3.cli.launch", str(EXAMPLE), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    job_id = int(re.search(r"submitted job (\d+)", done.stdout).group(1))
    SUBMITTED.append(job_id)
    return job_id


def _job(job_id: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job_id: int, timeout: float = 150) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(job_id)
        if job.get("JobState") in TERMINAL:
            return job
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)], timeout=30)
    pytest.fail(f"job {job_id} did not finish within {timeout:.0f} s: {_job(job_id)}")


def _wait_for_text(path: Path, pattern: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.5)
    pytest.fail(f"{path} never showed {pattern!r}")


def _losses(log: Path) -> list[float]:
    return [float(v) for v in re.findall(r"step \d+/\d+ \| loss ([0-9.]+)", log.read_text())]


@pytest.mark.timeout(180)
def test_tiny_cpu_job_runs_two_tasks_and_loss_falls(slurm, tmp_path):
    job_id = _submit(tmp_path, "train.steps=60")
    job = _wait(job_id)
    logs = tmp_path / "slurm" / str(job_id)
    assert job["JobState"] == "COMPLETED", (job, (logs / "rank-0.log").read_text())
    assert job["ExitCode"] == "0:0"
    assert (logs / "rank-1.log").exists(), "one log per rank"
    losses = _losses(logs / "rank-0.log")
    assert len(losses) >= 3, (logs / "rank-0.log").read_text()
    assert losses[-1] < losses[0]


@pytest.mark.timeout(180)
def test_warning_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """The two tasks run as two pipeline stages (1F1B) here: both stages save and both resume."""
    steps = 100
    job_id = _submit(tmp_path, f"train.steps={steps}", "train.seq_length=64", "parallel.pipeline=2")
    rank0 = tmp_path / "slurm" / str(job_id) / "rank-0.log"
    _wait_for_text(rank0, r"\| loss ")
    # what Slurm does `signal_seconds` before the time limit (--signal=B:USR1@N): signal the batch shell
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True, timeout=30)
    job = _wait(job_id)
    log = rank0.read_text()
    batch_out = (tmp_path / "slurm" / f"dsv3-tiny-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", (job, batch_out, log)
    assert job["Restarts"] == "1", batch_out
    assert "requeueing job" in batch_out
    assert "TP1 x PP2 x DP1" in log, log
    resumed = re.search(r"resumed from step (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < steps, log
    assert re.search(rf"step {steps}/{steps} \| loss", log), log


@pytest.mark.timeout(180)
def test_slurm_time_limit_warning_makes_the_step_checkpoint(slurm, tmp_path):
    """Slurm's own --signal=B:USR1@N (sent up to 60 s early, so at once here); requeue off to stay bounded."""
    job_id = _submit(tmp_path, "train.steps=100000", "launch.time=00:01:00", "launch.signal_seconds=50",
                     "launch.requeue=false")
    job = _wait(job_id)
    batch_out = (tmp_path / "slurm" / f"dsv3-tiny-{job_id}.out").read_text()
    assert "received SIGUSR1" in batch_out, batch_out
    assert job["ExitCode"] == "75:0" and job["Restarts"] == "0", (job, batch_out)
    assert "requeue is off" in batch_out
    assert re.search(r"preempted: saved \S+ at step \d+", (tmp_path / "slurm" / job["JobId"] / "rank-0.log").read_text())


@pytest.mark.timeout(180)
def test_failing_step_fails_the_job_with_its_exit_code(slurm, tmp_path):
    job_id = _submit(tmp_path, "train.steps=20", command="sh -c 'exit 3'")
    job = _wait(job_id)
    assert job["JobState"] == "FAILED"
    assert job["ExitCode"] == "3:0"


@pytest.mark.timeout(180)
def test_torchrun_launcher_warning_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """One srun task runs dsv3-torchrun, which runs torchrun with the 2 ranks: the warning reaches the
    ranks, the step exits 75 (torchrun alone would exit 1) and the job requeues and resumes."""
    steps = 100
    job_id = _submit(tmp_path, f"train.steps={steps}", "train.seq_length=64", "launch.launcher=torchrun")
    node_log = tmp_path / "slurm" / str(job_id) / "node-0.log"
    _wait_for_text(node_log, r"\| loss ")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True, timeout=30)
    job = _wait(job_id)
    log = node_log.read_text()
    batch_out = (tmp_path / "slurm" / f"dsv3-tiny-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, batch_out, log)
    assert "training step exited with code 75" in batch_out and "requeueing job" in batch_out
    assert "the ranks saved a checkpoint and exited 75 (torchrun exited 1)" in log
    resumed = re.search(r"resumed from step (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < steps, log
    assert re.search(rf"step {steps}/{steps} \| loss", log), log
