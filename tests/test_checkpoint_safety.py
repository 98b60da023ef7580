"""A checkpoint is data, nothing saved is lost, and no save hangs or leaves a process behind.

- A crafted checkpoint (allow-listed metadata classes, a weight declared as a byte item whose
  bytes are a pickle appended to a shard) runs no code through `checkpoint.load_weights` or
  resume, and the resume falls back to the previous complete checkpoint; the same folder does
  run its code through Megatron-Core's own loader (the control that makes the test mean it).
- Checksums: a flipped byte in the newest checkpoint is named and the previous one resumes; a
  checkpoint that fails its checksums is never "last good"; `latest` is read strictly.
- Nothing lost: save_interval 0 saves at the end; converters refuse an output folder with files
  unless --replace, which removes the old files; a second run on a locked checkpoint.dir is
  refused while the first trains on; a stale lock is taken over.
- Disks (root, as CI runs: a tmpfs is mounted for the test): a save onto a full disk stops with
  exit 5, the previous checkpoint and `latest` intact and no partial folder, and the run then
  resumes bitwise; a read-only checkpoint.dir is refused at start; a converter's output onto a
  full disk is refused with the old output intact.
- No hang, no orphan: a rank stalled inside a save ends the run within 3 x parallel.timeout_s;
  Ctrl-C saves and exits 130; under plain torchrun, kill -9 of rank 0 mid-save leaves no process.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from helpers.crafted_checkpoint import crafted_copy  # noqa: E402
from helpers.distributed import free_port  # noqa: E402
from helpers.rank_server import RankServer  # noqa: E402
from helpers.run_dirs import wait_for  # noqa: E402

ROOT = HERE.parent
pytestmark = pytest.mark.slow  # nearly every case trains, saves and damages a checkpoint (10-30 s each)
SMALL = ["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "logging.interval=1",
         "train.warmup_steps=2", "logging.jsonl=false", "logging.console=true", "logging.wandb=false",
         "parallel.timeout_s=60"]


def _train(capsys, run: Path, *extra: str) -> tuple[int, str, str]:
    from megatron_dsv3.train import main

    capsys.readouterr()
    code = main([*SMALL, "logging.jsonl=true", f"checkpoint.dir={run / 'ckpt'}", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def _latest(ckpt: Path) -> str:
    return (ckpt / "latest").read_text()


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    rank_server = RankServer(tmp_path_factory.mktemp("safety_rank_server"))
    yield rank_server
    rank_server.close()


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` for the block; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused here ({mounted.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ----------------------------------------------------------------------------- a checkpoint is data
def _megatron_load(path: Path, guarded: bool) -> Exception:
    """Load `path` into a tiny model with Megatron-Core's own loader (inside our data-only reading when
    `guarded`), skipping our item checks; returns what it raised."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_dsv3.checkpoint import dist as ckpt, metadata_guard
    from megatron_dsv3.compat.megatron_cpu import cpu_shims
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.model.gpt import build_model
    from megatron_dsv3.train import init_distributed

    model = build_model(DSV3Config.preset("tiny"))
    init_distributed("cpu")
    try:
        with cpu_shims(), metadata_guard.reading_as_data() if guarded else contextlib.nullcontext():
            dist_checkpointing.load(ckpt.sharded_state_dict(model, loading=True), str(path))
    except (Exception, BaseException) as error:  # noqa: BLE001 - PyTorch's CheckpointException is a BaseException
        return error
    finally:
        dist.destroy_process_group()
    raise AssertionError(f"{path} loaded")


def test_a_crafted_checkpoint_runs_no_code_through_load_weights_or_resume(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = run / "ckpt"
    code, _, err = _train(capsys, run, "train.steps=2", "checkpoint.save_interval=1")
    assert code == 0, err[-2000:]
    marker = tmp_path / "pwned"
    # The control: Megatron-Core's loader runs the pickle (then fails), so the folder is a real trap.
    control = crafted_copy(ckpt / "iter_0000002", tmp_path / "control", tmp_path / "control-ran")
    _megatron_load(control, guarded=False)
    assert (tmp_path / "control-ran").exists()
    # Our data-only reading refuses the byte item even with the item checks bypassed.
    error = _megatron_load(crafted_copy(ckpt / "iter_0000002", tmp_path / "c2", marker), guarded=True)
    assert "model.embed_tokens.weight as bytes" in str(error) or "refused unread" in repr(error), repr(error)
    assert not marker.exists()

    crafted = crafted_copy(ckpt / "iter_0000002", tmp_path / "crafted", marker)
    code, out, err = _train(capsys, tmp_path / "fresh", "train.steps=1", f"checkpoint.load_weights={crafted}")
    assert code == 2 and not marker.exists(), err[-2000:]
    assert re.search(r"load_weights=.*crafted: \.metadata declares item model\.embed_tokens\.weight as bytes", err)

    shutil.rmtree(ckpt / "iter_0000002")
    shutil.copytree(crafted, ckpt / "iter_0000002")
    code, out, err = _train(capsys, run, "train.steps=3", "checkpoint.save_interval=0")
    assert code == 0 and not marker.exists(), err[-2000:]
    assert re.search(r"skipped damaged checkpoint .*iter_0000002: \.metadata declares item model\.embed_tokens\.weight "
                     r"as bytes", out), out
    assert f"resumed from step 1 ({ckpt / 'iter_0000001'})" in out
    assert (ckpt / "abandoned" / "iter_0000002").is_dir() and _latest(ckpt) == "3\n"


def test_a_flipped_byte_in_the_newest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = run / "ckpt"
    code, _, err = _train(capsys, run, "train.steps=2", "checkpoint.save_interval=1")
    assert code == 0, err[-2000:]
    reference = _losses(run)
    shard = sorted((ckpt / "iter_0000002").glob("*.distcp"))[0]
    _flip_middle(shard)  # same size: only the checksum tells
    code, out, err = _train(capsys, run, "train.steps=2", "checkpoint.save_interval=1")
    assert code == 0, err[-2000:]
    assert f"skipped damaged checkpoint {ckpt / 'iter_0000002'}: {shard.name} does not match its checksum" in out
    assert "resumed from step 1" in out and _losses(run)[2] == reference[2]


def test_a_checkpoint_that_fails_its_checksums_is_never_the_last_good_one(tmp_path, capsys):
    from megatron_dsv3.checkpoint import dist as ckpt_lib

    run = tmp_path / "run"
    ckpt = run / "ckpt"
    code, _, err = _train(capsys, run, "train.steps=3", "checkpoint.save_interval=1", "checkpoint.keep=0")
    assert code == 0, err[-2000:]
    _flip_middle(sorted((ckpt / "iter_0000002").glob("*.distcp"))[0])
    good, moved = ckpt_lib.roll_back(ckpt, bad_step=4)  # steps 1 and 2 gave good losses; 2 is damaged
    assert good == ckpt / "iter_0000001" and _latest(ckpt) == "1\n"
    assert sorted(p.name for p in moved) == ["iter_0000002", "iter_0000003"]


@pytest.mark.parametrize("text", ["²\n", "4" * 5000, "4\n\n", " 4\n", "٤\n"],
                         ids=["superscript", "5000-digits", "two-newlines", "leading-space", "arabic-indic"])
def test_latest_is_read_strictly(text, tmp_path):
    from megatron_dsv3.checkpoint import dist as ckpt_lib

    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "latest").write_text(text)
    step, note = ckpt_lib.read_latest(tmp_path)
    assert step is None and note and re.search(r"latest names .*not a checkpoint here: ignored", note)
    (tmp_path / "latest").write_text("4\n")
    assert ckpt_lib.read_latest(tmp_path) == (4, None)


# ----------------------------------------------------------------------------- nothing lost
def test_save_interval_0_saves_at_the_end(tmp_path, capsys):
    from megatron_dsv3.checkpoint import dist as ckpt_lib

    run = tmp_path / "run"
    code, out, err = _train(capsys, run, "train.steps=2", "checkpoint.save_interval=0")
    assert code == 0, err[-2000:]
    assert f"saved {run / 'ckpt' / 'iter_0000002'}" in out and _latest(run / "ckpt") == "2\n"
    assert ckpt_lib.problem_with(run / "ckpt" / "iter_0000002") is None
    assert ckpt_lib.verify(run / "ckpt" / "iter_0000002") is None
    assert not (run / "ckpt" / ".lock").exists()


def test_converters_refuse_an_output_with_files_and_replace_removes_the_old_ones(tmp_path, capsys):
    from megatron_dsv3.cli.convert import main

    run = tmp_path / "run"
    code, _, err = _train(capsys, run, "train.steps=1", "checkpoint.save_interval=0")
    assert code == 0, err[-2000:]
    source = run / "ckpt" / "iter_0000001"
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "model-00009-of-00009.safetensors").write_bytes(b"an older export")
    assert main(["dist-to-hf", str(source), str(out), "--max-file-gb", "0.001"]) == 2
    assert "holds files: give --replace" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert main(["dist-to-hf", str(source), str(out), "--max-file-gb", "0.001", "--replace"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted({*index["weight_map"].values(), "config.json",
                                                           "model.safetensors.index.json", "README.md"})  # byte tokenizer note
    assert "model-00009-of-00009.safetensors" not in os.listdir(out) and "mine" not in (out / "config.json").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is no data to lose
    assert main(["hf-to-dist", str(out), str(empty)]) == 0 and (empty / "manifest.json").is_file()
    assert main(["hf-to-dist", str(out), str(empty)]) == 2
    assert main(["hf-to-dist", str(out), str(empty), "--replace"]) == 0


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    import socket

    ckpt = tmp_path / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ckpt / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0,
                                            "since": "yesterday"}))
    code, out, err = _train(capsys, tmp_path / "run", "train.steps=1")
    assert code == 0, err[-2000:]
    assert f"took over the stale lock {ckpt / '.lock'} of PID {dead.pid}" in out
    assert not (ckpt / ".lock").exists()


@pytest.mark.timeout(240)
def test_a_second_run_on_a_locked_folder_is_refused_while_the_first_trains_on(tmp_path, capsys, server):
    run = tmp_path / "run"
    argv = [*SMALL, "train.steps=100000", "checkpoint.save_interval=0", f"checkpoint.dir={run / 'ckpt'}"]
    seen = {}

    def second_run(pids: list[int], logs: list[Path]) -> None:
        wait_for(r"^step 2/", logs[0])
        code, out, err = _train(capsys, run, "train.steps=3")
        seen["second"] = (code, err)
        steps = len(re.findall(r"^step \d+/", logs[0].read_text(), re.M))
        wait_for(rf"^step {steps + 2}/", logs[0])  # the first run trains on
        os.kill(pids[0], signal.SIGTERM)

    codes, logs = server.run(1, argv, run / "logs", timeout=180, on_start=second_run)
    code, err = seen["second"]
    assert code == 2 and re.search(rf"checkpoint\.dir {run / 'ckpt'} is in use by the run of PID \d+ on host \S+ "
                                   r"since \d{4}-\d\d-\d\dT", err), err[-2000:]
    assert codes == [75], logs[0][-2000:]
    assert re.search(r"preempted: saved \S+iter_\d+", logs[0]) and not (run / "ckpt" / ".lock").exists()


# ----------------------------------------------------------------------------- disks
@pytest.mark.timeout(240)
def test_a_save_onto_a_full_disk_keeps_the_previous_checkpoint_and_the_resume_is_bitwise(tmp_path, capsys):
    from megatron_dsv3.checkpoint import dist as ckpt_lib

    reference = tmp_path / "reference"
    code, _, err = _train(capsys, reference, "train.steps=2", "checkpoint.save_interval=1")
    assert code == 0, err[-2000:]
    size = sum(p.stat().st_size for p in (reference / "ckpt" / "iter_0000001").iterdir())
    run = tmp_path / "run"
    with _tmpfs(run / "ckpt", f"size={int(size * 1.5)}"):  # room for one checkpoint, not two
        code, out, err = _train(capsys, run, "train.steps=2", "checkpoint.save_interval=1")
        assert code == 5, (out[-2000:], err[-2000:])
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and re.search(
            r"stopped: could not write checkpoint \S+iter_0000002 \((.*No space left on device|.*short write: is the disk "
            r"full\?\)); \d+ MiB free of \d+ MiB there\): removed the partial iter_0000002\.tmp; iter_0000001 and `latest` are as they were", lines[0]), err
        assert sorted(p.name for p in (run / "ckpt").iterdir() if p.is_dir()) == ["iter_0000001"]
        assert _latest(run / "ckpt") == "1\n" and ckpt_lib.verify(run / "ckpt" / "iter_0000001") is None
        resumed = tmp_path / "resumed"
        shutil.copytree(run / "ckpt", resumed / "ckpt")
    code, out, err = _train(capsys, resumed, "train.steps=2", "checkpoint.save_interval=1")
    assert code == 0 and "resumed from step 1" in out, err[-2000:]
    assert _losses(resumed)[2] == _losses(reference)[2]
    for shard in sorted((reference / "ckpt" / "iter_0000002").glob("*.distcp")):
        assert (resumed / "ckpt" / "iter_0000002" / shard.name).read_bytes() == shard.read_bytes()


def test_a_read_only_checkpoint_dir_is_refused_at_start(tmp_path, capsys):
    ckpt = tmp_path / "run" / "ckpt"
    with _tmpfs(ckpt, "ro,size=1m"):
        code, out, err = _train(capsys, tmp_path / "run", "train.steps=2")
    assert code == 2, err[-2000:]
    assert re.search(rf"checkpoint\.dir {ckpt} is read-only \(Read-only file system\)", err), err
    assert not re.search(r"^step \d", out, re.M)


def test_a_checkpoint_dir_without_room_for_one_checkpoint_is_refused_at_start(tmp_path, capsys):
    ckpt = tmp_path / "run" / "ckpt"
    with _tmpfs(ckpt, "size=1m"):
        code, out, err = _train(capsys, tmp_path / "run", "train.steps=2")
    assert code == 2, err[-2000:]
    assert re.search(rf"checkpoint\.dir {ckpt} has 1 MiB free, and one checkpoint of this run takes about 12 MiB", err)


def test_a_conversion_onto_a_full_disk_leaves_the_old_output_as_it_was(tmp_path, capsys):
    from megatron_dsv3.cli.convert import main

    run = tmp_path / "run"
    code, _, err = _train(capsys, run, "train.steps=1", "checkpoint.save_interval=0")
    assert code == 0, err[-2000:]
    with _tmpfs(tmp_path / "disk", "size=2m") as disk:
        (disk / "out").mkdir()
        (disk / "out" / "config.json").write_text("{}")
        code = main(["dist-to-mcore", str(run / "ckpt" / "iter_0000001"), str(disk / "out"), "--replace"])
        err = capsys.readouterr().err
        assert code == 5, err[-2000:]
        assert re.search(r"could not write \S+/out \(No space left on device; \d+ MiB free there\): removed the partial "
                         r"out\.tmp; \S+/out is as it was", err), err
        assert sorted(os.listdir(disk)) == ["out"] and os.listdir(disk / "out") == ["config.json"]


# ----------------------------------------------------------------------------- no hang, no orphan
@pytest.mark.timeout(240)
def test_a_rank_stalled_inside_a_save_ends_the_run_within_the_stall_limit(tmp_path, server):
    """parallel.timeout_s=5: a save waits at most 3 x 5 s for a rank (before, 1800 s)."""
    run = tmp_path / "run"
    argv = [*SMALL, "parallel.expert=2", "train.steps=100000", "checkpoint.save_interval=3", "parallel.timeout_s=5",
            f"checkpoint.dir={run / 'ckpt'}"]
    waited = {}

    def stall_rank_1_in_a_save(pids: list[int], logs: list[Path]) -> None:
        deadline = time.monotonic() + 120
        while not list((run / "ckpt").glob("iter_*.tmp")):
            assert time.monotonic() < deadline, logs[0].read_text()[-2000:]
            time.sleep(0.005)
        os.kill(pids[1], signal.SIGSTOP)
        start = time.monotonic()
        wait_for(r"outlasted", logs[0], timeout=120)
        waited["s"] = time.monotonic() - start
        os.kill(pids[1], signal.SIGKILL)

    codes, logs = server.run(2, argv, run / "logs", timeout=180, on_start=stall_rank_1_in_a_save)
    assert codes[0] == 4, logs[0][-3000:]
    assert re.search(r"checkpoint write checkpoint\.save_timeout_s=15 s", logs[0]), logs[0][-2000:]
    assert waited["s"] < 15 + 30, waited  # the bound, and time for a busy machine to notice it


@pytest.mark.timeout(180)
def test_ctrl_c_saves_and_exits_130_and_the_rerun_resumes(tmp_path, capsys, server):
    run = tmp_path / "run"
    argv = [*SMALL, "train.steps=100000", "checkpoint.save_interval=0", f"checkpoint.dir={run / 'ckpt'}"]

    def ctrl_c(pids: list[int], logs: list[Path]) -> None:
        wait_for(r"^step 2/", logs[0])
        os.kill(pids[0], signal.SIGINT)

    codes, logs = server.run(1, argv, run / "logs", timeout=120, on_start=ctrl_c)
    assert codes == [130], logs[0][-3000:]
    saved = re.search(r"interrupted \(Ctrl-C\): saved \S+iter_(\d+) at step (\d+); exiting with 130", logs[0])
    assert saved, logs[0][-3000:]
    step = int(saved.group(2))
    code, out, err = _train(capsys, run, f"train.steps={step + 1}")
    assert code == 0 and f"resumed from step {step}" in out, err[-2000:]


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_torchrun_kill_9_of_rank_0_mid_save_leaves_no_process(tmp_path):
    """The checkpoint writer rank 0 forked for a save (stopped here, so that it is mid-save for sure)
    and the resource tracker die with rank 0; torchrun ends the other rank. Nothing stays."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "megatron_dsv3.train",
            *SMALL, "parallel.expert=2", "train.steps=100000", "checkpoint.save_interval=1",
            f"checkpoint.dir={tmp_path / 'ckpt'}"]
    with log.open("w") as out:  # a file: an orphan holding a pipe would keep a reader waiting
        torchrun = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 200
        writer = None
        while writer is None:
            assert torchrun.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            for process in _descendants(torchrun.pid):
                seen.setdefault(process.pid, process)
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # a child starting or ending
                rank0 = next((p for p in psutil.Process(torchrun.pid).children() if p.environ().get("RANK") == "0"),
                             None)
                if rank0 is not None and re.search(r"^step 2/", log.read_text(), re.M):
                    # the writer once it writes into the checkpoint folder: past its start, where it asks
                    # for a death signal (stopped before that, it would have none to receive)
                    writer = next((c for c in rank0.children() if c.cmdline() == rank0.cmdline() and any(
                        Path(f.path).is_relative_to(tmp_path / "ckpt") for f in c.open_files())), None)
            time.sleep(0.002)
        writer.send_signal(signal.SIGSTOP)  # mid-save for as long as it takes
        for process in _descendants(torchrun.pid):
            seen.setdefault(process.pid, process)
        rank0.send_signal(signal.SIGKILL)
        torchrun.wait(timeout=150)
        alive = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            alive = [f"{p.pid}: {' '.join(p.cmdline())[:120]}" for p in seen.values()
                     if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(torchrun.pid, signal.SIGKILL)
        for process in seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    assert writer.pid in seen and alive == [], alive
