"""Fault injection: kill -9 a random rank of a 2-rank dsv3-train run at random times, restart, repeat.

One uninterrupted 2-rank run (expert=2, 20 steps, a checkpoint every 2 steps: 10 saves) is the
reference. The same run in another folder is then killed again and again: for each attempt a
seeded schedule names the rank to kill and when (a delay after the start, a delay after a given
step's console line, or a delay after a given step's `iter_NNNNNNN.tmp` folder appears, i.e. in
the middle of that save). The rank and its helper processes get SIGKILL; after a random grace the
other rank gets SIGKILL too, as torchrun or srun would kill it. Then the job is restarted, until
one attempt runs to the end. Checked:

- before every restart, which checkpoint the trainer must resume from: the newest complete one
  among the step `latest` names and the ones before it (every `iter_NNNNNNN` folder when there is
  no `latest`), where complete means every file but `.metadata` and `manifest.json` is
  byte-identical to the reference's checkpoint of that step, `.metadata` indexes the same shard
  files, offsets and lengths, all within the files, and was written under the `.tmp` name (before
  the rename), and `manifest.json` holds the reference's checksums but for `.metadata`'s, which
  matches the folder's;
  folders passed over are logged (only a deletion in progress may leave one incomplete);
- every restarted attempt logs "resumed from step N (…/iter_N)" for exactly that checkpoint and
  re-runs no step at or before N;
- all 20 steps were logged, and every loss (and grad norm, lr, MTP and balance loss) logged for a
  step, by the last attempt that ran it and by any killed earlier, equals the reference's exactly;
  the final checkpoints are byte-identical (but for `.metadata`, as above).

Replay: the seed is printed with the schedule, in the test's output and in every assertion message;
`DSV3_FAULT_SEED=<seed> pytest tests/test_fault_injection.py` replays the same schedule (which
step or save each kill aims at; where it lands within that save depends on timing and is logged).
`DSV3_FAULT_KILLS` sets the number of kills (default 10).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import signal
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest

from helpers.rank_server import RankServer

STEPS, SAVE_INTERVAL = 20, 2
SEED = int(os.environ.get("DSV3_FAULT_SEED", "1103"))
KILLS = int(os.environ.get("DSV3_FAULT_KILLS", "10"))
WINDOW = 3  # a kill aims at one of the next 3 saves (or 6 steps) after the checkpoint its attempt resumes from
ARGS = ["parallel.expert=2", f"train.steps={STEPS}", f"checkpoint.save_interval={SAVE_INTERVAL}",
        "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=10",
        "logging.interval=1", "train.device=cpu", "logging.jsonl=true", "logging.console=true",
        "logging.wandb=false", "parallel.timeout_s=60", "checkpoint.save_timeout_s=120"]
COMPARED = ("loss", "grad_norm", "lr", "mtp_loss", "balance_loss")
RESUMED = re.compile(r"^resumed from step (\d+) \((.+)\)$", re.M)
STEP_LINE = re.compile(r"^step (\d+)/%d " % STEPS, re.M)


# ----------------------------------------------------------------------------- reading a run
def _metrics(run_dir: Path) -> tuple[list[dict], int]:
    """Every per-step record of metrics.jsonl in order (a step re-run after a resume appears again),
    and the number of lines that were not JSON. A kill can leave a torn last line, and the next
    attempt may append its first record to it: a torn line's trailing complete record is kept."""
    records, torn = [], 0
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1
            start = line.rfind('{"step"')
            try:
                record = json.loads(line[start:]) if start > 0 else None
            except ValueError:
                record = None
        if isinstance(record, dict) and "loss" in record:
            records.append(record)
    return records, torn


def _files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if p.is_file()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_dirs(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []


def _difference(path: Path, reference: Path) -> Optional[str]:
    """How the checkpoint at `path` differs from what the uninterrupted run saved at the same step
    (None: it is complete). Every file but `.metadata` must be equal byte for byte; `.metadata`
    names its save, so it must index the same shards (files, offsets, lengths), all within the
    files, and have been written under the `.tmp` name, i.e. before the rename."""
    import torch.distributed.checkpoint.metadata  # noqa: F401  (the classes .metadata unpickles to)

    got, want = _files(path), _files(reference)
    if sorted(got) != sorted(want):
        return f"holds {sorted(got)}, a complete one {sorted(want)}"
    for name in sorted(want):
        if name not in (".metadata", "manifest.json") and _sha256(got[name]) != _sha256(want[name]):
            return f"{name} differs from the uninterrupted run's"
    # manifest.json holds the checksum of `.metadata`, which names its save: the rest must be the
    # reference's, and the whole must match the folder
    ours, theirs = (json.loads(files["manifest.json"].read_text())["files"] for files in (got, want))
    if {k: v for k, v in ours.items() if k != ".metadata"} != {k: v for k, v in theirs.items() if k != ".metadata"}:
        return "manifest.json lists other files or checksums than the uninterrupted run's"
    if ours[".metadata"]["sha256"] != _sha256(got[".metadata"]):
        return "manifest.json does not match this .metadata"
    try:
        meta = pickle.loads(got[".metadata"].read_bytes())
    except Exception as error:  # noqa: BLE001 - a torn file fails in many ways
        return f".metadata does not load ({type(error).__name__}: {error})"
    ref_meta = pickle.loads(want[".metadata"].read_bytes())
    if meta.storage_data != ref_meta.storage_data:
        return ".metadata indexes other shards"
    if meta.state_dict_metadata.keys() != ref_meta.state_dict_metadata.keys():
        return ".metadata indexes other keys"
    for index, info in meta.storage_data.items():
        if info.offset + info.length > got[info.relative_path].stat().st_size:
            return f"{info.relative_path} ends before {index.fqn}"
    if Path(meta.storage_meta.checkpoint_id).name != path.name + ".tmp":
        return f"saved as {meta.storage_meta.checkpoint_id}, not as its .tmp folder"
    return None


def _resume_target(ckpt_dir: Path, ref_ckpt: Path) -> tuple[Optional[int], list[str]]:
    """The step a restart must resume from and notes on what it must pass over: the newest complete
    checkpoint among the one `latest` names and those before it (all `iter_NNNNNNN` folders when
    `latest` names none). A folder can be incomplete only while it is being deleted (pruning, or
    the replacement of a folder of the same step), never from a save."""
    steps = sorted(int(name[5:]) for name in _checkpoint_dirs(ckpt_dir) if re.fullmatch(r"iter_\d{7}", name))
    notes = []
    marker = ckpt_dir / "latest"
    text = marker.read_text() if marker.exists() else None
    if text is not None and re.fullmatch(r"\d+\n", text) and int(text) in steps:
        steps = [step for step in steps if step <= int(text)]
    elif steps:
        notes.append(("no `latest`" if text is None else f"`latest` holds {text!r}, no checkpoint folder")
                     + ": every folder is a candidate")
    for step in reversed(steps):
        problem = _difference(ckpt_dir / f"iter_{step:07d}", ref_ckpt / f"iter_{step:07d}")
        if problem is None:
            return step, notes
        notes.append(f"iter_{step:07d} is incomplete: {problem}")
    return None, notes


# ----------------------------------------------------------------------------- killing
def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a rank and its helper processes (dist_checkpointing forks writers during a save);
    returns their pids, none if the rank had already exited. The rank is stopped first, so that it
    cannot fork a writer between the listing and the kill: an orphaned writer can block forever."""
    try:
        rank = psutil.Process(pid)
        if rank.status() == psutil.STATUS_ZOMBIE:
            return []
        rank.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while rank.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) and time.monotonic() < deadline:
            time.sleep(0.001)
        procs = [rank, *rank.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return [proc.pid for proc in procs]


def _schedule(seed: int, kills: int) -> list[dict]:
    """The whole kill plan, a function of the seed alone. `at` in [0, 1) picks the step or save
    among the next WINDOW saves after the checkpoint an attempt resumes from."""
    rng = random.Random(seed)
    plan = []
    for n in range(kills):
        trigger = rng.choice(("time", "step", "save", "save"))
        plan.append({"kill": n + 1, "rank": rng.randrange(2), "trigger": trigger, "at": rng.random(),
                     "delay": round(rng.uniform(0.0, 2.5 if trigger == "time" else 0.3), 3),
                     "grace": round(rng.uniform(0.0, 1.0), 3)})
    return plan


def _situation(ckpt_dir: Path, log: Path, since_ns: int) -> str:
    """What the job was doing at the moment of a kill, for the journal: the last step logged, and
    a save in progress if this attempt made (or is making) an `iter_NNNNNNN.tmp` folder."""
    text = log.read_text(errors="replace") if log.exists() else ""
    steps = STEP_LINE.findall(text)
    where = f"after step {steps[-1]}" if steps else ("loaded the checkpoint" if RESUMED.search(text) else "start-up")
    for tmp in sorted(ckpt_dir.glob("iter_*.tmp")) if ckpt_dir.is_dir() else []:
        try:
            fresh = tmp.stat().st_ctime_ns >= since_ns - 50_000_000
            where += f"; {'saving' if fresh else 'an older kill left'} {tmp.name} ({len(list(tmp.iterdir()))} files)"
        except FileNotFoundError:
            where += f"; saving {tmp.name} (just renamed or removed)"
    return where


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    rank_server = RankServer(tmp_path_factory.mktemp("fault_rank_server"))
    yield rank_server
    rank_server.close()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_9_a_random_rank_at_random_times_every_resume_is_complete_and_losses_match(tmp_path, server):
    journal = [f"fault injection: seed {SEED}, {KILLS} kills; replay with DSV3_FAULT_SEED={SEED} "
               f"DSV3_FAULT_KILLS={KILLS} pytest tests/test_fault_injection.py"]

    def note(line: str) -> None:
        journal.append(line)
        print(line, flush=True)

    def why(message: str) -> str:
        return f"{message}\n" + "\n".join(journal)

    print(journal[0], flush=True)
    plan = _schedule(SEED, KILLS)
    for entry in plan:
        note("  plan: " + json.dumps(entry))

    reference = tmp_path / "reference"
    codes, logs = server.run(2, [*ARGS, f"checkpoint.dir={reference / 'ckpt'}", "checkpoint.keep=0"],
                             reference / "logs", timeout=120)
    assert codes == [0, 0], why("the reference run failed:\n" + "\n".join(log[-3000:] for log in logs))
    ref_records, ref_torn = _metrics(reference)
    ref_metrics = {record["step"]: record for record in ref_records}
    assert [r["step"] for r in ref_records] == list(range(1, STEPS + 1)) and ref_torn == 0, why("reference metrics")
    ref_ckpt = reference / "ckpt"
    saves = list(range(SAVE_INTERVAL, STEPS + 1, SAVE_INTERVAL))
    assert _checkpoint_dirs(ref_ckpt) == [f"iter_{s:07d}" for s in saves], why("reference checkpoints")

    run = tmp_path / "faulty"
    ckpt_dir = run / "ckpt"
    argv = [*ARGS, f"checkpoint.dir={ckpt_dir}"]  # the default checkpoint.keep=3: old ones are deleted meanwhile
    started = time.monotonic()
    expected: Optional[int] = None  # the checkpoint the next attempt must resume from
    resumes, kills_in_save, kills = [], 0, 0
    for attempt in range(1, KILLS + 3):
        assert time.monotonic() - started < 300, why("the faulty run did not complete in 300 s")
        entry = plan[attempt - 1] if attempt <= len(plan) else None
        logdir = run / f"attempt{attempt:02d}"
        outcome: dict = {}

        def inject(pids, rank_logs, entry=entry, resume=expected, outcome=outcome):
            if entry is None:
                return
            t0, t0_ns = time.monotonic(), time.time_ns()
            # Aim within the next WINDOW saves, so that the kills spread over the whole run. A
            # restart of a finished run (a rank was killed as it exited) saves its last step again.
            left = min(STEPS - (resume or 0), WINDOW * SAVE_INTERVAL)
            step = (resume or 0) + 1 + int(entry["at"] * left)
            save = min(STEPS, (resume or 0) + SAVE_INTERVAL * (1 + int(entry["at"] * (left // SAVE_INTERVAL))))
            if entry["trigger"] == "time":
                outcome["aim"] = f"{entry['delay']} s after the start"
            elif entry["trigger"] == "step":
                outcome["aim"] = f"{entry['delay']} s after the line of step {step}"
            else:
                outcome["aim"] = f"{entry['delay']} s into the save of step {save}"
            tmp = ckpt_dir / f"iter_{save:07d}.tmp"
            while True:  # wait for the trigger (bounded: the job server kills ranks at its timeout)
                if not any(_alive(pid) for pid in pids) or time.monotonic() - t0 > 100:
                    outcome["missed"] = True
                    return
                if entry["trigger"] == "time":
                    fired = True
                elif entry["trigger"] == "step":
                    text = rank_logs[0].read_text(errors="replace") if rank_logs[0].exists() else ""
                    fired = str(step) in STEP_LINE.findall(text)
                else:  # a .tmp folder made by this attempt (an older one may be left from a kill)
                    try:
                        fired = tmp.stat().st_ctime_ns >= t0_ns - 50_000_000
                    except FileNotFoundError:
                        fired = False
                if fired:
                    break
                time.sleep(0.003)
            time.sleep(max(0.0, entry["delay"] - (time.monotonic() - t0 if entry["trigger"] == "time" else 0.0)))
            victim, other = pids[entry["rank"]], pids[1 - entry["rank"]]
            outcome["situation"] = _situation(ckpt_dir, rank_logs[0], t0_ns)
            killed = _kill_tree(victim)
            outcome["killed"], outcome["at_s"] = bool(killed), round(time.monotonic() - t0, 3)
            time.sleep(entry["grace"])
            others = _kill_tree(other)
            outcome["other_exited_by_itself"], outcome["pids"] = not others, killed + others

        try:
            codes, logs = server.run(2, argv, logdir, timeout=120, on_start=inject)
        except AssertionError as error:  # a hang: the job server killed the ranks at the timeout
            raise AssertionError(why(f"attempt {attempt} ({outcome}): {error}")) from None
        deadline = time.monotonic() + 10
        while any(map(_alive, outcome.get("pids", []))) and time.monotonic() < deadline:
            time.sleep(0.05)
        leaked = [pid for pid in outcome.get("pids", []) if _alive(pid)]
        assert not leaked, why(f"attempt {attempt}: processes {leaked} survived SIGKILL")
        log0 = logs[0]
        resumed = RESUMED.findall(log0)
        first_step = STEP_LINE.search(log0)
        line = (f"attempt {attempt}: expected resume {expected}; " + (
            f"kill rank {entry['rank']} {outcome.get('aim')}" if entry else "no kill") + (
            "; trigger never came" if outcome.get("missed") else "") + (
            f"; killed at {outcome['at_s']} s ({outcome['situation']})" if outcome.get("killed") else "") + (
            "; the other rank had already exited" if outcome.get("other_exited_by_itself") else "") +
            f"; exit codes {codes}; resumed {resumed or 'nothing'}")
        note(line)
        for trainer_note in re.findall(r"^checkpoint: .*$", log0, re.M):
            note(f"  rank 0: {trainer_note}")

        # The resume: from exactly the checkpoint verified complete before this restart.
        if resumed:
            assert len(resumed) == 1, why(f"attempt {attempt} resumed twice")
            step, path = int(resumed[0][0]), Path(resumed[0][1])
            assert (step, path) == (expected, ckpt_dir / f"iter_{expected:07d}" if expected else None), why(
                f"attempt {attempt} resumed from step {step} ({path}), expected step {expected}")
            resumes.append(step)
            if first_step:
                assert int(first_step.group(1)) == step + 1, why(f"attempt {attempt} re-ran step {first_step.group(1)}")
        else:
            assert expected is None or not (first_step or "training tiny" in log0), why(
                f"attempt {attempt} trained without resuming from step {expected}")
            if first_step:
                assert int(first_step.group(1)) == 1, why(f"attempt {attempt} started at step {first_step.group(1)}")

        if codes == [0, 0]:
            break
        # A failed attempt is one this test broke: it killed the chosen rank, or that rank had
        # finished (exit 0) and the test killed the other one as it was finishing.
        ours = outcome.get("killed") or (outcome.get("other_exited_by_itself") is False
                                         and codes[entry["rank"]] == 0)
        assert ours, why(f"attempt {attempt} failed with {codes}, and not from a kill of this test:\n"
                         + "\n".join(f"--- rank {r}\n{log[-3000:]}" for r, log in enumerate(logs)))
        kills += 1
        kills_in_save += "saving" in outcome.get("situation", "")

        # What the next attempt must resume from, and that it is a complete checkpoint.
        expected, passed_over = _resume_target(ckpt_dir, ref_ckpt)
        for line in passed_over:
            note(f"  after attempt {attempt}: {line}")
        note(f"  after attempt {attempt}: folders {_checkpoint_dirs(ckpt_dir)}, "
             f"`latest` {(ckpt_dir / 'latest').read_text().strip() if (ckpt_dir / 'latest').exists() else None}; "
             + (f"resume from step {expected}, verified complete" if expected else "start afresh"))
    else:
        pytest.fail(why(f"the run did not complete in {KILLS + 2} attempts"))
    note(f"completed after {attempt} attempts, {kills} kills ({kills_in_save} during a save), "
         f"resumes from steps {resumes}, {time.monotonic() - started:.1f} s")

    # Every step was logged, and every value logged for a step (the last one, and those of attempts
    # killed before their next checkpoint) equals the uninterrupted run's, bitwise.
    records, torn = _metrics(run)
    note(f"metrics.jsonl: {len(records)} step records, {torn} torn line(s)")
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1)), why(
        f"steps logged: {sorted({r['step'] for r in records})}")
    for record in records:
        step = record["step"]
        for key in COMPARED:
            assert record[key] == ref_metrics[step][key], why(
                f"step {step} {key}: {record[key]!r} after faults, {ref_metrics[step][key]!r} uninterrupted")
    final = _difference(ckpt_dir / f"iter_{STEPS:07d}", ref_ckpt / f"iter_{STEPS:07d}")
    assert final is None, why(f"the final checkpoint iter_{STEPS:07d} {final}")
    assert not list(ckpt_dir.glob("*.tmp")), why(f"left over: {_checkpoint_dirs(ckpt_dir)}")

    # The faults really happened: several kills, some in the middle of a save, resumes past step 0.
    assert kills >= min(KILLS, 3), why(f"only {kills} kills landed")
    assert kills_in_save >= 1 or KILLS < 3, why("no kill landed in the middle of a save")
    assert any(step > 0 for step in resumes) or KILLS == 0, why("no attempt resumed from a checkpoint")
