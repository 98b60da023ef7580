"""dsv3-train end to end on CPU: resume, crash safety, resharded loading, preemption, refusals,
divergence and the saved run config.

Single-process runs call `megatron_dsv3.train.main` in this process (the import is paid once).
Multi-rank runs, crashes and signals go to tests/helpers/train_ranks.py, a job server that imports the
trainer once and forks gloo ranks per job, so each job costs seconds, not an interpreter start
per rank. Every run is the tiny preset on 4 x 32-token sequences a step, with one intra-op thread.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers.rank_server import RankServer
from helpers.run_dirs import load_checkpoint, metric_records, wait_for

SMALL = ["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "logging.interval=1",
         "train.warmup_steps=10", "logging.jsonl=true", "logging.console=true", "logging.wandb=false",
         "parallel.timeout_s=60", "checkpoint.save_timeout_s=120"]


# ----------------------------------------------------------------------------- helpers
def _args(run_dir: Path, *extra: str) -> list[str]:
    return [*SMALL, f"checkpoint.dir={run_dir / 'ckpt'}", *extra]


def _train(capsys, *argv: str) -> tuple[int, str, str]:
    """dsv3-train in this process: (exit code, stdout, stderr)."""
    from megatron_dsv3.train import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (re-run after a crash) keeps its latest value."""
    return {r["step"]: r["loss"] for r in metric_records(run_dir)}


def _latest(ckpt_dir: Path) -> int:
    return int((ckpt_dir / "latest").read_text().strip())


def _iter_dirs(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("iter_")) if ckpt_dir.exists() else []


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    server = RankServer(tmp_path_factory.mktemp("rank_server"))
    yield server
    server.close()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is faster, and far faster on busy cores (no spinning)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _one_checkpoint_writer_manager():
    """dsv3-train starts a signal-safe Manager process for Megatron-Core's checkpoint writer unless
    one exists; create it once for all the runs of this process instead of once per run."""
    try:
        from megatron_dsv3.compat.megatron_checkpoint import signal_safe_checkpoint_writer
    except ImportError:
        yield
        return
    with signal_safe_checkpoint_writer():
        yield


@pytest.fixture(scope="module", autouse=True)
def _start_rank_server_early(request):
    """Let the server import Megatron-Core while the one-process tests run, if any test needs it."""
    if any("ranks" in getattr(item, "fixturenames", ()) for item in request.session.items
           if getattr(item, "module", None) is request.module):
        request.getfixturevalue("ranks")


# ----------------------------------------------------------------------------- 1. resume exactness
@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run_bitwise(tmp_path, capsys):
    """8 steps straight vs 4 + 4 with a restart: steps 5-8 have bitwise-equal losses and grad norms,
    and the final checkpoints hold bitwise-equal weights, routing biases and Adam moments."""
    a, b = tmp_path / "a", tmp_path / "b"
    code, out, _ = _train(capsys, *_args(a, "train.steps=8", "checkpoint.save_interval=4"))
    assert code == 0, out
    code, out, _ = _train(capsys, *_args(b, "train.steps=4", "checkpoint.save_interval=4"))
    assert code == 0 and "resumed from" not in out
    code, out, _ = _train(capsys, *_args(b, "train.steps=8", "checkpoint.save_interval=4"))
    assert code == 0
    assert f"resumed from step 4 ({b / 'ckpt' / 'iter_0000004'})" in out
    assert not re.search(r"^step [1-4]/", out, re.M), "the resumed run re-ran steps before its checkpoint"

    ra, rb = {r["step"]: r for r in metric_records(a)}, {r["step"]: r for r in metric_records(b)}
    assert sorted(ra) == sorted(rb) == list(range(1, 9))
    for step in range(5, 9):  # bitwise: the same float64 values after the JSON round trip
        assert rb[step]["loss"] == ra[step]["loss"], step
        assert rb[step]["grad_norm"] == ra[step]["grad_norm"], step
        assert rb[step]["lr"] == ra[step]["lr"], step

    # The checkpoint the second run resumed from carries state that matters: a routing bias moved
    # by 4 bias updates, non-zero Adam moments and the optimizer's step count (bias correction).
    mid_tensors, mid_moments, mid_common = load_checkpoint(b / "ckpt" / "iter_0000004")
    assert (mid_common["step"], mid_common["optimizer_steps"], mid_common["consumed_samples"]) == (4, 4, 16)
    biases = [name for name in mid_tensors if name.endswith("router.expert_bias")]
    assert biases and all(mid_tensors[name].abs().sum() > 0 for name in biases)
    assert all(v.abs().sum() > 0 for k, v in mid_moments.items() if k.startswith("exp_avg_sq."))

    ta, ma, ca = load_checkpoint(a / "ckpt" / "iter_0000008")
    tb, mb, cb = load_checkpoint(b / "ckpt" / "iter_0000008")
    assert ca["optimizer_steps"] == cb["optimizer_steps"] == 8
    assert ta.keys() == tb.keys() and ma.keys() == mb.keys()
    import torch

    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name
    assert not all(torch.equal(ta[name], mid_tensors[name]) for name in biases), "the bias never moved after step 4"


# ----------------------------------------------------------------------------- 2. crash mid-save
@pytest.mark.timeout(180)
def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, capsys, ranks):
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    argv = _args(run, "train.steps=4", "checkpoint.save_interval=2")
    codes, logs = ranks.run(1, argv, run / "logs", crash_on_save=2)
    assert codes == [86], logs[0][-3000:]
    assert "crashing in save #2" in logs[0]

    # The half-written step-4 directory exists but is not a checkpoint; `latest` still names step 2.
    partial = ckpt_dir / "iter_0000004.tmp"
    assert partial.is_dir() and any(partial.iterdir())
    assert not (ckpt_dir / "iter_0000004").exists()
    assert _latest(ckpt_dir) == 2
    from megatron_dsv3.checkpoint import dist as ckpt

    assert ckpt.list_checkpoints(ckpt_dir) == [2] and ckpt.choose_resume(ckpt_dir) == (2, [])
    crashed = _losses(run)
    assert sorted(crashed) == [1, 2, 3, 4]
    step2 = _digest(ckpt_dir / "iter_0000002")

    code, out, err = _train(capsys, *argv)
    assert code == 0, err[-3000:]
    assert f"resumed from step 2 ({ckpt_dir / 'iter_0000002'})" in out
    resumed = _losses(run)
    for step in (3, 4):  # the same state at step 2 gives the same steps 3 and 4
        assert abs(resumed[step] - crashed[step]) <= 1e-6, (step, resumed[step], crashed[step])
    assert not partial.exists(), "the leftover .tmp directory was not cleaned by the next save"
    assert _iter_dirs(ckpt_dir) == ["iter_0000002", "iter_0000004"] and _latest(ckpt_dir) == 4
    assert _digest(ckpt_dir / "iter_0000002") == step2
    _, _, common = load_checkpoint(ckpt_dir / "iter_0000004")
    assert common["step"] == 4


# ----------------------------------------------------------------------------- 3. another layout
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_checkpoint_from_two_expert_parallel_ranks_resumes_on_other_layouts(tmp_path, capsys, ranks):
    """Saved by 2 gloo ranks with expert=2 at step 2; resumed on 1 rank, on 2 ranks with tensor=2 and
    on 2 pipeline stages (1F1B; the embedding is held by both stages, for MTP, and saved once).
    Steps 3 and 4 (the first resumed forward, then one update with the resharded Adam moments) match
    the 2-rank run within 1e-6 in the loss (observed: bitwise equal) and 1e-6 relative in the grad
    norm (observed <= 1.4e-8)."""
    source = tmp_path / "ep2"
    codes, logs = ranks.run(2, _args(source, "parallel.expert=2", "train.steps=4", "checkpoint.save_interval=2"),
                            source / "logs")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "world 2 = TP1 x PP1 x DP2 (EP2)" in logs[0]
    reference = {r["step"]: r for r in metric_records(source)}
    assert sorted(reference) == [1, 2, 3, 4]

    def start_from_step_2(run_dir: Path) -> None:
        (run_dir / "ckpt").mkdir(parents=True)
        shutil.copytree(source / "ckpt" / "iter_0000002", run_dir / "ckpt" / "iter_0000002")
        (run_dir / "ckpt" / "latest").write_text("2\n")

    one = tmp_path / "one_rank"
    start_from_step_2(one)
    code, out, err = _train(capsys, *_args(one, "train.steps=4", "checkpoint.save_interval=2"))
    assert code == 0, err[-3000:]
    assert "resumed from step 2" in out and "world 1 = TP1 x PP1 x DP1 (EP1)" in out

    tp2, pp2 = tmp_path / "tp2", tmp_path / "pp2"
    for run_dir, override, layout in ((tp2, "parallel.tensor=2", "TP2 x PP1"), (pp2, "parallel.pipeline=2", "TP1 x PP2")):
        start_from_step_2(run_dir)
        codes, logs = ranks.run(2, _args(run_dir, override, "train.steps=4", "checkpoint.save_interval=2"),
                                run_dir / "logs")
        assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
        assert "resumed from step 2" in logs[0] and f"world 2 = {layout} x DP1 (EP1)" in logs[0]
    logged = {key for line in (pp2 / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    # MoE layers 1 (stage 0), 2 and the MTP block's 3 (stage 1) all reach rank 0's expert-load log
    assert {f"moe/layer_{n:02d}/max_vio" for n in (1, 2, 3)} <= logged

    for run_dir in (one, tp2, pp2):
        got = {r["step"]: r for r in metric_records(run_dir)}
        assert sorted(got) == [3, 4], run_dir.name
        for step in (3, 4):
            assert abs(got[step]["loss"] - reference[step]["loss"]) <= 1e-6, (run_dir.name, step)
            assert got[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-6)

    # The step-4 checkpoints of the three layouts, each loaded whole into one process: weights within
    # 1e-6 (observed <= 1.2e-7), Adam moments within 1e-8 (observed <= 3.7e-9), routing biases equal.
    import torch

    ref_tensors, ref_moments, _ = load_checkpoint(source / "ckpt" / "iter_0000004")
    for run_dir in (one, tp2, pp2):
        tensors, moments, common = load_checkpoint(run_dir / "ckpt" / "iter_0000004")
        assert common["optimizer_steps"] == 4 and tensors.keys() == ref_tensors.keys()
        for name, value in ref_tensors.items():
            if name.endswith("router.expert_bias"):
                assert torch.equal(tensors[name], value), f"{run_dir.name}: {name}"
            torch.testing.assert_close(tensors[name], value, rtol=0, atol=1e-6, msg=f"{run_dir.name}: {name}")
        for name, value in ref_moments.items():
            torch.testing.assert_close(moments[name], value, rtol=0, atol=1e-8, msg=f"{run_dir.name}: {name}")


# ----------------------------------------------------------------------------- 4. preemption
@pytest.mark.timeout(180)
def test_sigterm_saves_exits_75_and_the_rerun_resumes(tmp_path, capsys, ranks):
    run = tmp_path / "run"
    argv = _args(run, "train.steps=200", "checkpoint.save_interval=0")

    def signal_after_first_step(pids, logs):
        wait_for(r"^step \d+/200", logs[0])
        os.kill(pids[0], __import__("signal").SIGTERM)

    codes, logs = ranks.run(1, argv, run / "logs", on_start=signal_after_first_step)
    assert codes == [75], logs[0][-3000:]
    match = re.search(r"preempted: saved (\S+) at step (\d+); exiting with 75", logs[0])
    assert match, logs[0][-3000:]
    path, step = Path(match.group(1)), int(match.group(2))
    assert 1 <= step < 200
    assert path == run / "ckpt" / f"iter_{step:07d}" and path.is_dir() and _latest(run / "ckpt") == step
    assert max(_losses(run)) == step

    code, out, err = _train(capsys, *_args(run, f"train.steps={step + 2}", "checkpoint.save_interval=0"))
    assert code == 0, err[-3000:]
    assert f"resumed from step {step} ({path})" in out
    assert f"done: {step + 2} steps" in out
    assert sorted(_losses(run)) == list(range(1, step + 3))


@pytest.mark.timeout(180)
def test_sigusr1_to_one_rank_stops_both_ranks_and_the_rerun_resumes(tmp_path, capsys, ranks):
    """Only rank 1 is signalled: the ranks agree at the end of the step, save together and exit 75.
    With a checkpoint every step, the preemption names the step's interval checkpoint."""
    run = tmp_path / "run"
    argv = _args(run, "parallel.expert=2", "train.steps=200", "checkpoint.save_interval=1", "checkpoint.keep=2")

    def signal_rank_1(pids, logs):
        wait_for(r"^step \d+/200", logs[0])
        os.kill(pids[1], __import__("signal").SIGUSR1)

    codes, logs = ranks.run(2, argv, run / "logs", on_start=signal_rank_1)
    assert codes == [75, 75], "\n".join(log[-3000:] for log in logs)
    match = re.search(r"preempted: saved (\S+) at step (\d+)", logs[0])
    assert match, logs[0][-3000:]
    path, step = Path(match.group(1)), int(match.group(2))
    assert path == run / "ckpt" / f"iter_{step:07d}" and path.is_dir() and _latest(run / "ckpt") == step
    assert _iter_dirs(run / "ckpt") == [f"iter_{s:07d}" for s in range(max(1, step - 1), step + 1)]
    assert max(_losses(run)) == step

    # Rerun on one rank (the checkpoint reshards) to the end.
    code, out, err = _train(capsys, *_args(run, f"train.steps={step + 1}", "checkpoint.save_interval=0"))
    assert code == 0, err[-3000:]
    assert f"resumed from step {step} ({path})" in out
    assert max(_losses(run)) == step + 1


# ----------------------------------------------------------------------------- 5. refusals
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    """A byte-tokenized indexed dataset whose largest token id is above 100."""
    from megatron_dsv3.data.indexed import write_indexed

    prefix = str(tmp_path_factory.mktemp("data") / "small")
    write_indexed(["The quick brown fox jumps over the lazy dog {~}. " * 20] * 4, prefix)
    return prefix


def _unreadable(tmp_path, small_dataset, monkeypatch) -> list[str]:
    prefix = tmp_path / "locked"
    for suffix in (".bin", ".idx"):
        shutil.copy(small_dataset + suffix, str(prefix) + suffix)
    os.chmod(str(prefix) + ".bin", 0)
    if os.geteuid() == 0:  # root reads mode-000 files; emulate the permission check it bypasses
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if str(path).endswith("locked.bin")
                            else real_access(path, mode, *a, **k))
    return [f"data.paths=[{prefix}]"]


def _not_a_dataset(tmp_path, small_dataset, monkeypatch) -> list[str]:
    prefix = tmp_path / "garbage"
    for suffix in (".bin", ".idx"):
        Path(str(prefix) + suffix).write_bytes(b"this is not an indexed dataset\n" * 10)
    return [f"data.paths=[{prefix}]"]


REFUSALS = {
    "unknown-key": (lambda *_: ["train.stepz=3"], r"unknown config key 'train\.stepz'"),
    "unknown-section-key": (lambda *_: ["checkpoint.every=3"], r"unknown config key 'checkpoint\.every'"),
    "pipeline-vs-world": (lambda *_: ["parallel.pipeline=2"], r"tensor=1 x pipeline=2 does not divide the world size 1"),
    "schedule": (lambda *_: ["parallel.schedule=dualpipe"], r"dualpipe needs at least 2 pipeline ranks, got 1 "
                 r"\(parallel\.pipeline=1;"),
    "simulated-only-schedule": (lambda *_: ["parallel.schedule=zb1p"], r"parallel\.schedule='zb1p' is simulated only"),
    "fp8-as-a-model-override": (lambda *_: ["model.overrides.fp8=tile"], r"model\.overrides\.fp8 is not a model "
                                r"override: train\.fp8 is the one FP8 switch \(set train\.fp8='tile' instead\)"),
    "tensor-vs-world": (lambda *_: ["parallel.tensor=2"], r"tensor=2 x pipeline=1 does not divide the world size 1"),
    "batch": (lambda *_: ["train.global_batch_size=5"], r"global_batch_size=5 is not a multiple"),
    "recompute": (lambda *_: ["train.recompute=some"], r"train\.recompute='some' is not one of none, selective"),
    "distributed-optimizer": (lambda *_: ["parallel.distributed_optimizer=maybe"],
                              r"parallel\.distributed_optimizer='maybe' is not one of auto, true, false"),
    "bf16-weights-without-autocast": (lambda *_: ["train.param_dtype=bfloat16", "parallel.distributed_optimizer=true"],
                                      r"train\.param_dtype=bfloat16 needs train\.bf16=true"),
    "bf16-weights-without-masters": (lambda *_: ["train.param_dtype=bfloat16", "train.bf16=true",
                                                 "parallel.distributed_optimizer=false"],
                                     r"FP32 master weights in Megatron's distributed optimizer, and "
                                     r"parallel\.distributed_optimizer is false"),
    "bf16-weights-auto-on-cpu": (lambda *_: ["train.param_dtype=bfloat16", "train.bf16=true"],
                                 r"distributed_optimizer=auto picks only on GPU: set it to true"),
    "lr-not-a-number": (lambda *_: ["train.lr=fast"], r"train\.lr must be a number > 0, got 'fast'"),
    "missing-data": (lambda *_: ["data.paths=[/nonexistent/x]"], r"/nonexistent/x.*missing"),
    "unreadable-data": (_unreadable, r"locked\.bin is not readable"),
    "not-a-dataset": (_not_a_dataset, r"garbage'? is not a Megatron indexed dataset"),
    "vocab-too-small": (lambda tmp, prefix, mp: [f"data.paths=[{prefix}]", "model.overrides.vocab_size=100"],
                        r"holds token id (\d+), but the model's vocab_size is 100"),
    "negative-lr": (lambda *_: ["train.lr=-1"], r"train\.lr must be a number > 0, got -1"),
    "beta-above-1": (lambda *_: ["train.adam_beta1=2"], r"train\.adam_beta1 must be a number in \[0, 1\), got 2"),
    "boolean-steps": (lambda *_: ["train.steps=true"], r"train\.steps must be a positive integer, got True"),
    "sequence-above-positions": (lambda *_: ["train.seq_length=4096"],
                                 r"train\.seq_length=4096 is above the model's max_position_embeddings=512"),
    "save-interval-not-a-number": (lambda *_: ["checkpoint.save_interval=abc"],
                                   r"checkpoint\.save_interval must be an integer >= 0, got 'abc'"),
    "malformed-yaml": (lambda tmp, *_: ["--config", _file(tmp / "bad.yaml", "train:\n  steps: [3\n")],
                       r"bad\.yaml is not valid YAML at line \d+"),
    "section-of-wrong-type": (lambda tmp, *_: ["--config", _file(tmp / "typed.yaml", "train: 5\n")],
                              r"train must be a mapping of keys, got 5"),
    "unparseable-override": (lambda *_: ["train.lr=[1"], r"override 'train\.lr=\[1': the value is not valid YAML"),
}


def _file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # IndexedDataset.__del__
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_before_any_compute(case, tmp_path, capsys, monkeypatch, small_dataset):
    make_args, message = REFUSALS[case]
    run = tmp_path / "run"
    code, out, err = _train(capsys, *_args(run, "train.steps=3", *make_args(tmp_path, small_dataset, monkeypatch)))
    assert code == 2, (out[-2000:], err[-2000:])
    match = re.search(message, err)
    assert match, err[-2000:]
    if case == "vocab-too-small":
        assert int(match.group(1)) >= 100
    assert not re.search(r"^step \d", out, re.M) and "training tiny" not in out
    assert not run.exists(), f"refused, yet {sorted(p.name for p in run.rglob('*'))} were written"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nproc, overrides, message", [
    (2, ["parallel.tensor=4"], r"tensor=4 x pipeline=1 does not divide the world size 2"),
    (2, ["parallel.tensor=2", "parallel.expert=4"], r"expert=4 must divide tensor x data = 2"),
    (3, ["parallel.expert=3"], r"num_routed_experts=8 is not divisible by expert_parallel_size=3"),
    (4, ["parallel.pipeline=4"], r"num_layers=3 cannot fill pipeline_parallel_size=4 stages"),
    (2, ["parallel.pipeline=2", "parallel.schedule=dualpipev"],
     r"model\.num_layers=3 does not split into the 4 stages of dualpipev"),
], ids=["tensor4-on-2-ranks", "expert4-on-tp2", "8-experts-on-ep3", "pp4-for-3-layers",
        "dualpipev-more-stages-than-layers"])
def test_parallel_layout_refused_on_every_rank(nproc, overrides, message, tmp_path, ranks):
    run = tmp_path / "run"
    codes, logs = ranks.run(nproc, _args(run, "train.steps=3", *overrides), tmp_path / "logs", timeout=60)
    assert codes == [2] * nproc, "\n".join(log[-2000:] for log in logs)
    for log in logs:
        assert re.search(message, log), log[-2000:]
        assert not re.search(r"^step \d", log, re.M) and "training tiny" not in log
    assert not run.exists()


# ----------------------------------------------------------------------------- 6. divergence
def test_loss_above_max_loss_stops_before_any_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _train(capsys, *_args(run, "train.steps=3", "train.max_loss=0.5", "checkpoint.save_interval=1"))
    assert code == 3, err[-2000:]
    assert re.search(r"loss diverged at step 1: loss=\d", err), err[-2000:]
    assert "no checkpoint holds weights that gave a good loss" in err
    assert _iter_dirs(run / "ckpt") == [] and _losses(run) == {}


def test_exploding_loss_stops_and_names_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    code, _, err = _train(capsys, *_args(run, "train.steps=2", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]
    saved = _digest(ckpt_dir / "iter_0000002"), (ckpt_dir / "latest").read_text()
    # lr 1e6 from step 3 on: the update after step 3 blows the weights up; step 4's loss or gradient
    # norm is NaN (observed: the loss saturates near ln(vocab) and the gradient norm is NaN).
    code, out, err = _train(capsys, *_args(run, "train.steps=6", "checkpoint.save_interval=2", "train.lr=1e6"))
    assert code == 3, err[-2000:]
    assert "resumed from step 2" in out
    match = re.search(r"loss diverged at step (\d+): loss=(\S+), grad norm=(\S+); the last good checkpoint is (\S+),",
                      err)
    assert match, err[-2000:]
    step, loss, norm, where = int(match.group(1)), float(match.group(2)), float(match.group(3)), match.group(4)
    assert step >= 3 and (loss != loss or loss > 1e3 or norm != norm), match.group(0)
    assert Path(where) == ckpt_dir / "iter_0000002"
    assert max(_losses(run)) == step - 1, "the diverged step was logged as if it were good"
    assert _iter_dirs(ckpt_dir) == ["iter_0000002"], "a checkpoint was written after the divergence"
    assert (_digest(ckpt_dir / "iter_0000002"), (ckpt_dir / "latest").read_text()) == saved


# ----------------------------------------------------------------------------- 7. saved run config
def test_resolved_config_is_saved_beside_checkpoints_and_round_trips(tmp_path, capsys):
    from megatron_dsv3.run_config import load_run_config

    run = tmp_path / "run"
    argv = _args(run, "train.steps=1", "checkpoint.save_interval=1", "train.lr=2e-3", "train.seed=7",
                 "model.overrides.mtp_loss_weight=0.2", "logging.interval=1")
    code, _, err = _train(capsys, *argv)
    assert code == 0, err[-2000:]
    saved = run / "ckpt" / "run_config.yaml"
    assert saved.is_file()
    expected = load_run_config(None, tuple(argv))
    assert load_run_config(str(saved)) == expected
    assert expected.train.lr == 0.002 and expected.model.overrides == {"mtp_loss_weight": 0.2}

    # The saved file is a complete run config: it alone continues the run.
    code, out, err = _train(capsys, "--config", str(saved), "train.steps=2")
    assert code == 0, err[-2000:]
    assert "resumed from step 1" in out and _latest(run / "ckpt") == 2
    assert load_run_config(str(saved)).train.steps == 2


# ----------------------------------------------------------------------------- 8. recomputation
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_recompute_modes_train_to_the_same_losses_under_tp2_ep2(tmp_path, ranks):
    """Selective and full recomputation replay tensor-parallel regions (selective) and whole layers
    with their all-to-all (full) in backward; three steps give the losses of no recomputation
    (within 1e-6 relative; observed equal to print precision)."""
    losses = {}
    for mode in ("none", "selective", "full"):
        run = tmp_path / mode
        codes, logs = ranks.run(2, _args(run, "parallel.tensor=2", "parallel.expert=2", "train.steps=3",
                                         "checkpoint.save_interval=0", f"train.recompute={mode}"), run / "logs")
        assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
        losses[mode] = _losses(run)
    assert sorted(losses["none"]) == [1, 2, 3]
    for mode in ("selective", "full"):
        assert losses[mode].keys() == losses["none"].keys()
        for step, loss in losses["none"].items():
            assert losses[mode][step] == pytest.approx(loss, rel=1e-6), (mode, step)


def test_a_registered_schedule_drives_training_the_plan_and_the_memory_estimate(tmp_path, capsys):
    """Registering a schedule is registering its descriptor: one of its own here ("counting", around
    1F1B's executor, with a rule of even micro-batch counts and no operation lists) trains through
    dsv3-train in this process, and the plan and the memory estimate read its facts, with no change
    to their files: its rule refuses an odd count by name, its stage cut is the plan's, and without
    operation lists the estimate holds every micro-batch in flight (1F1B's holds PP)."""
    from megatron_dsv3 import registry
    from megatron_dsv3.pipeline import Schedule, ScheduleRefused, get_schedule, register_schedule
    from megatron_dsv3.plan import PlanError, make_plan
    from megatron_dsv3.run_config import load_run_config

    one_f_one_b = get_schedule("1f1b")
    calls, ruled, placed = [], [], []

    def counting_executor():
        inner = one_f_one_b.forward_backward_func()

        def forward_backward_func(**kwargs):
            calls.append(kwargs["num_microbatches"])
            return inner(**kwargs)

        return forward_backward_func

    def even_micro_batches(pipeline: int, micro_batches: int) -> None:
        ruled.append((pipeline, micro_batches))
        if micro_batches % 2:
            raise ScheduleRefused(f"counting needs an even number of micro-batches per step, got {micro_batches}")

    def rank_stages(pipeline: int, rank: int) -> tuple[int, ...]:
        placed.append((pipeline, rank))
        return (rank,)

    counting = Schedule("counting", executor=counting_executor, micro_batch_rule=even_micro_batches,
                        rank_stages=rank_stages)
    register_schedule(counting)
    try:
        code, out, err = _train(capsys, *_args(tmp_path, "train.steps=3", "checkpoint.save_interval=0",
                                               "parallel.schedule=counting"))
        assert code == 0, err[-3000:]
        assert calls == [2, 2, 2] and "counting over 2 micro-batches" in out
        # the plan's rule; the stages of the trainer's chunks and of the memory estimate's rank
        assert ruled == [(1, 2)] and (1, 0) in placed and set(placed) == {(1, 0)}

        code, out, err = _train(capsys, *_args(tmp_path / "odd", "train.global_batch_size=6",
                                               "parallel.schedule=counting"))
        assert code == 2 and "counting needs an even number of micro-batches per step, got 3" in err

        def plan(name: str, *extra: str):
            run = load_run_config(None, (f"parallel.schedule={name}", "parallel.pipeline=2",
                                         "train.micro_batch_size=2", "train.global_batch_size=16", *extra))
            return make_plan(run, world=2, ranks_per_node=2, cuda=False)

        ours, theirs = plan("counting"), plan("1f1b")
        assert ours.schedule is counting and ours.stage_layers == counting.stage_cut(3, 2)
        assert len(ours.stage_layers) == counting.num_stages(2) == 2
        assert (ours.memory().micro_batches_in_flight, theirs.memory().micro_batches_in_flight) == (8, 2)
        assert ours.memory().activations > theirs.memory().activations
        for rank in (0, 1):  # one copy of the model, stage r on rank r, like 1F1B
            assert ours.memory(pipeline_rank=rank).params == theirs.memory(pipeline_rank=rank).params
        with pytest.raises(PlanError, match="counting needs an even number of micro-batches per step, got 5"):
            plan("counting", "train.micro_batch_size=1", "train.global_batch_size=5")
    finally:
        registry._REGISTRY["schedule"].pop("counting", None)


# ----------------------------------------------------------------------------- 9. ZeRO-1
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero1_trains_like_the_local_optimizer_and_its_checkpoints_resume_anywhere(tmp_path, capsys, ranks):
    """Megatron-Core's DDP + distributed optimizer on DP2: each rank holds about half the Adam
    moments; 4 steps give the local optimizer's losses (1e-6 relative; observed equal to print
    precision) and grad norms (1e-5). Its step-2 checkpoint resumes under ZeRO-1 on DP2 bitwise, and
    under the local optimizer on one rank within 1e-6; the step-4 moments of all runs agree."""
    import torch

    def run(name: str, nproc: int, *extra: str) -> tuple[Path, str]:
        run_dir = tmp_path / name
        argv = _args(run_dir, "train.steps=4", "checkpoint.save_interval=2", *extra)
        if nproc == 1:
            code, out, err = _train(capsys, *argv)
            assert code == 0, err[-3000:]
            return run_dir, out
        codes, logs = ranks.run(nproc, argv, run_dir / "logs")
        assert codes == [0] * nproc, "\n".join(log[-3000:] for log in logs)
        return run_dir, logs[0]

    def from_step_2(source: Path, name: str) -> None:
        target = tmp_path / name / "ckpt"
        target.mkdir(parents=True)
        shutil.copytree(source / "ckpt" / "iter_0000002", target / "iter_0000002")
        (target / "latest").write_text("2\n")

    def moments_mib(log: str) -> float:
        return float(re.search(r"Adam moments ([\d.]+) MiB on this rank", log).group(1))

    zero1, zero1_log = run("zero1", 2, "parallel.distributed_optimizer=true")
    local, local_log = run("local", 2, "parallel.distributed_optimizer=false")
    assert "Megatron DistributedOptimizer (ZeRO-1 over DP2)" in zero1_log
    assert "AdamW, state on every data-parallel rank" in local_log
    assert 0.45 < moments_mib(zero1_log) / moments_mib(local_log) < 0.55
    reference = {r["step"]: r for r in metric_records(zero1)}
    assert sorted(reference) == [1, 2, 3, 4] and sorted(r["step"] for r in metric_records(local)) == [1, 2, 3, 4]
    for step, record in {r["step"]: r for r in metric_records(local)}.items():
        assert reference[step]["loss"] == pytest.approx(record["loss"], rel=1e-6), step
        assert reference[step]["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-5), step

    from_step_2(zero1, "zero1_again")
    again, log = run("zero1_again", 2, "parallel.distributed_optimizer=true")
    from_step_2(zero1, "local_one_rank")
    one, out = run("local_one_rank", 1, "parallel.distributed_optimizer=false")
    assert "resumed from step 2" in log and "resumed from step 2" in out
    assert sorted(r["step"] for r in metric_records(again)) == [3, 4]
    for step, record in {r["step"]: r for r in metric_records(again)}.items():
        assert (record["loss"], record["grad_norm"]) == (reference[step]["loss"], reference[step]["grad_norm"])
    for step, record in {r["step"]: r for r in metric_records(one)}.items():
        assert abs(record["loss"] - reference[step]["loss"]) <= 1e-6 * reference[step]["loss"], step
    assert sorted(r["step"] for r in metric_records(one)) == [3, 4]

    _, ref_moments, _ = load_checkpoint(zero1 / "ckpt" / "iter_0000004")
    assert all(v.abs().sum() > 0 for k, v in ref_moments.items() if k.startswith("exp_avg_sq."))
    for run_dir in (local, again, one):
        _, moments, common = load_checkpoint(run_dir / "ckpt" / "iter_0000004")
        assert common["optimizer_steps"] == 4 and moments.keys() == ref_moments.keys()
        for name, value in ref_moments.items():
            torch.testing.assert_close(moments[name], value, rtol=1e-4, atol=1e-9, msg=f"{run_dir.name}: {name}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero1_bf16_weights_keep_fp32_masters_through_a_resume(tmp_path, capsys, ranks):
    """train.param_dtype=bfloat16: BF16 weights, FP32 master slices in Megatron's optimizer. The
    checkpoint stores the masters (FP32 values no BF16 number equals), so a resume from step 2
    continues bitwise; the losses stay within 1% of FP32 weights under the same BF16 autocast."""
    import torch

    bf16 = ("parallel.distributed_optimizer=true", "train.bf16=true", "train.steps=4", "checkpoint.save_interval=2")
    straight = tmp_path / "straight"
    codes, logs = ranks.run(2, _args(straight, *bf16, "train.param_dtype=bfloat16"), straight / "logs")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "ZeRO-1 over DP2, BF16 weights with FP32 master slices" in logs[0]
    fp32 = tmp_path / "fp32_weights"
    codes, logs = ranks.run(2, _args(fp32, *bf16), fp32 / "logs")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    resumed = tmp_path / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(straight / "ckpt" / "iter_0000002", resumed / "ckpt" / "iter_0000002")
    (resumed / "ckpt" / "latest").write_text("2\n")
    codes, logs = ranks.run(2, _args(resumed, *bf16, "train.param_dtype=bfloat16"), resumed / "logs")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "resumed from step 2" in logs[0]

    reference = {r["step"]: r for r in metric_records(straight)}
    assert sorted(reference) == [1, 2, 3, 4]
    assert sorted(r["step"] for r in metric_records(resumed)) == [3, 4] and sorted(r["step"] for r in metric_records(fp32)) == [1, 2, 3, 4]
    for step, record in {r["step"]: r for r in metric_records(resumed)}.items():
        assert (record["loss"], record["grad_norm"]) == (reference[step]["loss"], reference[step]["grad_norm"]), step
    for step, record in {r["step"]: r for r in metric_records(fp32)}.items():
        assert reference[step]["loss"] == pytest.approx(record["loss"], rel=1e-2), step

    tensors, _, _ = load_checkpoint(straight / "ckpt" / "iter_0000002")
    weights = [t for name, t in tensors.items() if name.endswith(".weight")]
    assert all(w.dtype == torch.float32 for w in weights)
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights), "the checkpoint holds BF16-rounded weights"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero1_with_bf16_moments_matches_the_local_optimizer_with_half_the_moments_per_rank(tmp_path, ranks):
    """train.bf16_adam_moments under ZeRO-1 (without Transformer Engine: our AdamW inside Megatron's
    distributed optimizer) on DP2: the local optimizer's BF16-moment losses (1e-6 relative; observed
    equal) with half its moment bytes per rank, a quarter of FP32 moments without ZeRO-1; a resume
    from its step-2 checkpoint continues bitwise."""
    zero1 = ["parallel.distributed_optimizer=true", "train.bf16_adam_moments=true"]
    runs = {}
    for name, extra in (("zero1", zero1),
                        ("local", ["parallel.distributed_optimizer=false", "train.bf16_adam_moments=true"]),
                        ("local_fp32", ["parallel.distributed_optimizer=false"]), ("zero1_resumed", zero1)):
        run_dir = tmp_path / name
        if name == "zero1_resumed":
            (run_dir / "ckpt").mkdir(parents=True)
            shutil.copytree(tmp_path / "zero1" / "ckpt" / "iter_0000002", run_dir / "ckpt" / "iter_0000002")
            (run_dir / "ckpt" / "latest").write_text("2\n")
        codes, logs = ranks.run(2, _args(run_dir, "train.steps=4", "checkpoint.save_interval=2", *extra),
                                run_dir / "logs")
        assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
        mib = float(re.search(r"Adam moments ([\d.]+) MiB on this rank", logs[0]).group(1))
        runs[name] = (mib, _losses(run_dir))
    assert runs["zero1"][0] == pytest.approx(runs["local"][0] / 2, rel=0.05)
    assert runs["local"][0] == pytest.approx(runs["local_fp32"][0] / 2, rel=0.01)
    assert sorted(runs["zero1"][1]) == [1, 2, 3, 4]
    for step, loss in runs["local"][1].items():
        assert runs["zero1"][1][step] == pytest.approx(loss, rel=1e-6), step
    assert runs["local"][1][4] != runs["local_fp32"][1][4]  # BF16 moments really changed the update
    assert runs["zero1_resumed"][1] == {step: runs["zero1"][1][step] for step in (3, 4)}


# ----------------------------------------------------------------------------- 11. faults and hostile input
def test_dotted_override_changes_only_its_key(tmp_path, small_dataset):
    """A dotted override under an open section (data, model.overrides) changes that key alone."""
    from megatron_dsv3.run_config import load_run_config

    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  paths: [{small_dataset}]\nmodel:\n  overrides:\n    hidden_size: 64\n"
                      "launch:\n  env_overrides: {A: '1'}\n")
    run = load_run_config(str(config), ("data.cache_dir=/x", "model.overrides.num_layers=2",
                                        "launch.env_overrides.B=2"))
    assert run.data.paths == [small_dataset] and run.data.cache_dir == "/x"
    assert run.model.overrides == {"hidden_size": 64, "num_layers": 2}
    assert run.launch.env_overrides == {"A": "1", "B": 2}


def _set_up_steps_3_and_6(capsys, run: Path) -> None:
    code, _, err = _train(capsys, *_args(run, "train.steps=6", "checkpoint.save_interval=3"))
    assert code == 0, err[-2000:]
    assert _iter_dirs(run / "ckpt") == ["iter_0000003", "iter_0000006"]


def test_a_fresh_run_sets_earlier_saves_aside_and_keeps_its_own(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    _set_up_steps_3_and_6(capsys, run)
    code, out, err = _train(capsys, *_args(run, "train.steps=2", "checkpoint.save_interval=2",
                                           "checkpoint.resume=false", "checkpoint.keep=2"))
    assert code == 0, err[-2000:]
    assert f"saved {ckpt_dir / 'iter_0000002'}" in out
    assert _iter_dirs(ckpt_dir) == ["iter_0000002"] and _latest(ckpt_dir) == 2
    assert sorted(p.name for p in (ckpt_dir / "abandoned").iterdir()) == ["iter_0000003", "iter_0000006"]
    assert "set aside iter_0000006" in out
    code, out, err = _train(capsys, *_args(run, "train.steps=3", "checkpoint.save_interval=0"))
    assert code == 0 and "resumed from step 2" in out, (out[-2000:], err[-2000:])


def test_a_rollback_of_latest_keeps_the_new_saves_and_sets_the_abandoned_one_aside(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    _set_up_steps_3_and_6(capsys, run)
    (ckpt_dir / "latest").write_text("3\n")
    code, out, err = _train(capsys, *_args(run, "train.steps=5", "checkpoint.save_interval=1", "checkpoint.keep=2"))
    assert code == 0, err[-2000:]
    assert "resumed from step 3" in out
    assert _iter_dirs(ckpt_dir) == ["iter_0000004", "iter_0000005"] and _latest(ckpt_dir) == 5
    assert [p.name for p in (ckpt_dir / "abandoned").iterdir()] == ["iter_0000006"]


def test_keep_1_never_deletes_the_last_validated_checkpoint(tmp_path, capsys):
    """The newest save is unvalidated until the next step's loss: the one before it stays."""
    run = tmp_path / "run"
    code, _, err = _train(capsys, *_args(run, "train.steps=3", "checkpoint.save_interval=1", "checkpoint.keep=1"))
    assert code == 0, err[-2000:]
    assert _iter_dirs(run / "ckpt") == ["iter_0000002", "iter_0000003"]


def _damage_delete_shard(ckpt: Path) -> None:
    next(ckpt.glob("*.distcp")).unlink()


def _damage_truncate(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        if not (ckpt / name).exists():  # megatron-core >= 0.19 writes no common.pt: its data is in the shards
            pytest.skip(f"this megatron-core writes no {name}; a truncated shard is tested by truncated-shard")
        with open(ckpt / name, "r+b") as f:
            f.truncate((ckpt / name).stat().st_size // 2)
    return damage


def _damage_truncate_shard(ckpt: Path) -> None:
    _damage_truncate(next(ckpt.glob("*.distcp")).name)(ckpt)


@pytest.mark.parametrize("damage, skipped", [
    (_damage_delete_shard, r"__\d_\d\.distcp is missing"),
    (_damage_truncate_shard, r"__\d_\d\.distcp is truncated"),
    (_damage_truncate(".metadata"), r"unreadable"),
    (_damage_truncate("common.pt"), r"unreadable"),
], ids=["deleted-shard", "truncated-shard", "truncated-metadata", "truncated-common"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumes(damage, skipped, tmp_path, capsys):
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    code, _, err = _train(capsys, *_args(run, "train.steps=4", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]
    reference = _losses(run)
    damage(ckpt_dir / "iter_0000004")
    code, out, err = _train(capsys, *_args(run, "train.steps=4", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]
    assert re.search(rf"skipped damaged checkpoint {re.escape(str(ckpt_dir / 'iter_0000004'))}: {skipped}", out), out
    assert "resumed from step 2" in out
    assert (ckpt_dir / "abandoned" / "iter_0000004").is_dir()  # set aside, not deleted
    assert _losses(run)[4] == reference[4]  # steps 3-4 rerun from step 2 to the same loss
    assert _latest(ckpt_dir) == 4


def test_garbage_in_latest_is_named_and_the_newest_complete_checkpoint_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    code, _, err = _train(capsys, *_args(run, "train.steps=4", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]
    (ckpt_dir / "latest").write_text("\x00garbage")
    code, out, err = _train(capsys, *_args(run, "train.steps=5", "checkpoint.save_interval=0"))
    assert code == 0, err[-2000:]
    assert re.search(r"latest names '\\x00garbage', not a checkpoint here: ignored", out), out
    assert "resumed from step 4" in out


@pytest.mark.timeout(180)
def test_two_ranks_agree_on_skipping_a_damaged_checkpoint(tmp_path, capsys, ranks):
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    argv = _args(run, "train.steps=4", "checkpoint.save_interval=2", "parallel.expert=2")
    codes, logs = ranks.run(2, argv, run / "first")
    assert codes == [0, 0], logs[0][-2000:]
    reference = _losses(run)
    _damage_delete_shard(ckpt_dir / "iter_0000004")
    codes, logs = ranks.run(2, argv, run / "second")
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert "skipped damaged checkpoint" in logs[0] and "resumed from step 2" in logs[0]
    assert _losses(run)[4] == reference[4]


def test_a_crafted_metadata_file_is_refused_without_running_it(tmp_path, capsys):
    """Resuming never unpickles arbitrary objects: a .metadata that would run a command is
    named unsafe and skipped, and the command does not run, also when loaded directly."""
    import pickle

    from megatron_dsv3.checkpoint import dist as ckpt
    from megatron_dsv3.checkpoint.metadata_guard import UnsafeCheckpointError

    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    code, _, err = _train(capsys, *_args(run, "train.steps=4", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]
    marker = tmp_path / "pwned"

    class RunsACommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (ckpt_dir / "iter_0000004" / ".metadata").write_bytes(pickle.dumps(RunsACommand()))
    code, out, err = _train(capsys, *_args(run, "train.steps=4", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]
    assert re.search(r"skipped damaged checkpoint .*iter_0000004: \.metadata refers to (posix|os)\.system", out), out
    assert "resumed from step 2" in out and not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata refers to (posix|os)\.system"):
        load_checkpoint(ckpt_dir / "abandoned" / "iter_0000004")
    assert not marker.exists()
    assert ckpt.problem_with(ckpt_dir / "iter_0000002") is None


def test_after_divergence_latest_names_a_checkpoint_whose_weights_gave_a_good_loss(tmp_path, capsys):
    """lr 1e6 from the first step: the weights are ruined at once, but the loss shows it only a
    step later, so the step-2 save is poisoned; it is set aside, and `latest` never names it."""
    run = tmp_path / "run"
    ckpt_dir = run / "ckpt"
    code, out, err = _train(capsys, *_args(run, "train.steps=10", "train.lr=1e6", "train.warmup_steps=1",
                                           "checkpoint.save_interval=2"))
    assert code == 3, err[-2000:]
    bad = int(re.search(r"loss diverged at step (\d+)", err).group(1))
    losses = _losses(run)
    named = re.search(r"the last good checkpoint is (\S+),", err)
    if named:
        good = int(Path(named.group(1)).name.split("_")[1])
        assert good + 1 < bad and losses[good + 1] < 1e3 and _latest(ckpt_dir) == good
    else:
        assert "no checkpoint holds weights that gave a good loss" in err and not (ckpt_dir / "latest").exists()
    # a save at step bad - 1 (saves fall on even steps) holds the weights that gave the diverged loss
    abandoned = ckpt_dir / "abandoned"
    set_aside = sorted(int(p.name.split("_")[1]) for p in abandoned.iterdir()) if abandoned.exists() else []
    assert set_aside == ([bad - 1] if bad % 2 else []), (bad, set_aside)
    assert all(int(name.split("_")[1]) + 1 < bad for name in _iter_dirs(ckpt_dir))
    code, out, err = _train(capsys, *_args(run, "train.steps=4", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]  # a rerun with a sane lr starts from good weights, not the poisoned save


@pytest.mark.parametrize("change, field", [("model.overrides.num_layers=2", "num_layers"),
                                           ("model.overrides.mtp_num_modules=0", "mtp_num_modules")])
def test_resume_refuses_another_model_and_names_the_fields(change, field, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _train(capsys, *_args(run, "train.steps=2", "checkpoint.save_interval=2"))
    assert code == 0, err[-2000:]
    saved = (run / "ckpt" / "run_config.yaml").read_text()
    code, out, err = _train(capsys, *_args(run, "train.steps=4", change))
    assert code == 2, err[-2000:]
    assert re.search(rf"iter_0000002 was saved with another model \({field}: \d+ saved, \d+ now\)", err), err
    assert (run / "ckpt" / "run_config.yaml").read_text() == saved and _latest(run / "ckpt") == 2
    # A schedule changing the MTP weight lambda is not a change of model.
    code, out, err = _train(capsys, *_args(run, "train.steps=3", "train.mtp_loss_weight_schedule=[[0, 0.1]]"))
    assert code == 0 and "resumed from step 2" in out, err[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_stalled_rank_fails_the_job_within_the_collective_timeout(tmp_path, ranks):
    """SIGSTOP one of two ranks mid-run: the other leaves its collective after parallel.timeout_s
    with exit 4 and a message naming the bound, instead of waiting for Megatron's 30 minutes."""
    import signal

    run = tmp_path / "run"
    argv = _args(run, "train.steps=100000", "checkpoint.save_interval=0", "parallel.timeout_s=5")

    def stall_rank_1(pids: list[int], logs: list[Path]) -> None:
        wait_for(r"^step 2/", logs[0])
        os.kill(pids[1], signal.SIGSTOP)
        wait_for(r"outlasted parallel\.timeout_s=5 s", logs[0], timeout=120)  # fails the test past 120 s
        os.kill(pids[1], signal.SIGKILL)

    codes, logs = ranks.run(2, argv, run / "logs", timeout=150, on_start=stall_rank_1)
    assert codes[0] == 4, logs[0][-3000:]
