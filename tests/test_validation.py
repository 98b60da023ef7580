"""Validation (`train.eval_interval`, `train.eval_iters`, `Trainer.evaluate`): the LM and MTP loss on the
held-out split through the schedule's forward-only pass, the same on every parallel layout, leaving
every bit of the training state as it was, logged to every sink and the report.

The layout runs go through the rank job server (tests/helpers/train_ranks.py).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch

from helpers.rank_server import RankServer
from helpers.wandb_history import history as wandb_history
from megatron_dsv3.run_config import RunConfigError, load_run_config

# 4 layers (DualPipeV on 2 ranks cuts 4 stages), 4 micro-batches of 2 x 32 tokens a step; 2 held-out
# global batches per evaluation, after the first step and at the end.
BASE = ["model.overrides.num_layers=4", "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.steps=2", "train.warmup_steps=1", "train.eval_interval=1", "train.eval_iters=2", "data.split=90,10,0",
        "logging.interval=1", "logging.wandb=false", "checkpoint.save_interval=0", "parallel.timeout_s=60",
        "checkpoint.save_timeout_s=120"]


def _records(run_dir: Path, key: str) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if key in r}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    server = RankServer(tmp_path_factory.mktemp("rank_server"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


def _run(ranks: RankServer, nproc: int, run_dir: Path, cache: Path, *extra: str) -> dict[int, dict]:
    argv = [*BASE, f"data.cache_dir={cache}", f"checkpoint.dir={run_dir / 'ckpt'}", *extra]
    codes, logs = ranks.run(nproc, argv, run_dir / "logs", timeout=150)
    assert codes == [0] * nproc, "\n".join(log[-3000:] for log in logs)
    return _records(run_dir, "valid/loss")


@pytest.fixture(scope="module")
def one_rank(ranks, cache, tmp_path_factory) -> Path:
    """The single-process run (its folder), evaluated after each of its two steps."""
    run_dir = tmp_path_factory.mktemp("one_rank")
    _run(ranks, 1, run_dir, cache)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.pipeline=1"], id="dp2"),
    pytest.param(["parallel.pipeline=2"], id="pp2-1f1b"),
    pytest.param(["parallel.pipeline=2", "parallel.schedule=dualpipe"], id="pp2-dualpipe"),
    pytest.param(["parallel.pipeline=2", "parallel.schedule=dualpipev"], id="pp2-dualpipev"),
])
def test_validation_loss_is_the_same_on_every_layout(layout, one_rank, ranks, cache, tmp_path):
    """The held-out LM and MTP losses after one training step and at the end equal the single
    process's within 1e-5 (the training step itself differs by rounding between layouts)."""
    got, expected = _run(ranks, 2, tmp_path, cache, *layout), _records(one_rank, "valid/loss")
    assert sorted(got) == sorted(expected) == [1, 2]
    for step, want in expected.items():
        assert 3.0 < want["valid/loss"] < 7.0 and "valid/mtp_loss" in want
        for key in ("valid/loss", "valid/mtp_loss"):
            assert abs(got[step][key] - want[key]) < 1e-5, (step, key, got[step][key], want[key])


def test_training_with_evaluations_takes_the_same_steps_bitwise(one_rank, ranks, cache, tmp_path):
    """Evaluations consume no training batch and change no state: without them the training losses
    and gradient norms are bitwise the same."""
    _run(ranks, 1, tmp_path, cache, "train.eval_interval=0")
    without, evaluated = _records(tmp_path, "loss"), _records(one_rank, "loss")
    assert not _records(tmp_path, "valid/loss") and sorted(without) == [1, 2]
    for step in (1, 2):
        assert (without[step]["loss"], without[step]["grad_norm"]) == \
            (evaluated[step]["loss"], evaluated[step]["grad_norm"])


# ----------------------------------------------------------------------------- in this process
@pytest.fixture(scope="module", autouse=True)
def _one_checkpoint_writer_manager():
    """One signal-safe Manager for the checkpoint writer of every in-process run (as tests/test_train.py)."""
    from megatron_dsv3.compat.megatron_checkpoint import signal_safe_checkpoint_writer

    with signal_safe_checkpoint_writer():
        yield


IN_PROCESS = ["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=4",
              "train.warmup_steps=1", "data.split=90,10,0", "logging.interval=2", "train.eval_interval=3",
              "train.eval_iters=2", "checkpoint.save_interval=0", "train.device=cpu"]


def _training_state(trainer) -> dict:
    """Every bit an evaluation could disturb: parameters, gradients, buffers (routing bias, the routers'
    token counters, MTP statistics), Adam moments and step, the expert-load tracker, the RNG, the
    step and data position, and train mode."""
    model = trainer.model
    state = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    state |= {f"grad {n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state |= {f"buffer {n}": b.clone() for n, b in model.named_buffers()}
    state |= {f"{m} {n}": v.clone() for n, moments in trainer.optimizer.param_states().items()
              for m, v in moments.items()}
    state |= {f"entropy {i}": r.routing_entropy.clone() for i, r in enumerate(model.routers())}
    state["rng"] = torch.get_rng_state()
    state["other"] = (trainer.optimizer.step_count, trainer.step, trainer.consumed_samples, model.training,
                      json.dumps(trainer.tracker.state(), sort_keys=True, default=str))
    return state


def test_an_evaluation_leaves_the_training_state_bitwise_unchanged_and_is_logged_everywhere(tmp_path, monkeypatch,
                                                                                          cache, capsys):
    """Around each evaluation (step 3 and the end) every parameter, gradient, buffer, Adam moment, the
    expert-load monitor and the RNG stay bitwise as they were; valid/loss and valid/mtp_loss reach
    the console, metrics.jsonl, wandb, TensorBoard and dsv3-report's markdown and HTML (the console's
    validation lines carry no training numbers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_dsv3 import train
    from megatron_dsv3.cli import report

    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    evaluate, seen = train.Trainer.evaluate, []

    def checked(self):
        before = _training_state(self)
        if self.step == 3:  # counts since the step-2 log: an evaluation in train mode would add to them
            assert any(b.abs().sum() > 0 for k, b in before.items() if k.endswith(".stats")) and self.tracker.state()
        metrics = evaluate(self)
        after = _training_state(self)
        assert before.keys() == after.keys()
        same = lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # noqa: E731
        changed = [key for key in before if not same(before[key], after[key])]
        assert not changed, changed
        seen.append((self.step, metrics))
        return metrics

    monkeypatch.setattr(train.Trainer, "evaluate", checked)
    run = tmp_path / "run"
    code = train.main([*IN_PROCESS, "logging.wandb=true", "logging.tensorboard=true", f"data.cache_dir={cache}",
                       f"checkpoint.dir={run / 'checkpoints'}"])
    assert code == 0 and [step for step, _ in seen] == [3, 4]
    for _, metrics in seen:
        assert set(metrics) == {"valid/loss", "valid/mtp_loss"} and all(3 < v < 7 for v in metrics.values())
    console = [line for line in capsys.readouterr().out.splitlines() if "valid" in line]
    assert console == [f"step {s}/4 | valid loss {m['valid/loss']:.3f} | valid mtp {m['valid/mtp_loss']:.3f}"
                       for s, m in seen]

    records = _records(run, "valid/loss")
    assert {s: (r["valid/loss"], r["valid/mtp_loss"]) for s, r in records.items()} == \
        {s: (m["valid/loss"], m["valid/mtp_loss"]) for s, m in seen}
    (wandb_file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(wandb_file)
    assert [history[s]["valid/loss"] for s in (3, 4)] == pytest.approx([m["valid/loss"] for _, m in seen])
    assert "train/loss" in history[4] and "valid/loss" not in history[2]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars("valid/mtp_loss")
    assert [e.step for e in scalars] == [3, 4]
    assert [e.value for e in scalars] == pytest.approx([m["valid/mtp_loss"] for _, m in seen])

    markdown = report.build_report(str(run / "metrics.jsonl"))
    first, last = seen[0][1]["valid/loss"], seen[1][1]["valid/loss"]
    assert f"| valid/loss | {first:.4g} (step 3) | {last:.4g} (step 4)" in markdown
    page = report.build_html(str(run / "metrics.jsonl"))
    assert f'data-metric="valid/loss" data-last="{seen[1][1]["valid/loss"]!r}"' in page


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_interval=5"], "data.split='100,0,0' gives it no weight"),
    (["train.eval_interval=5", "data.split=98,2,0", "parallel.schedule=zb1p"],
     "forward-only pass, which parallel.schedule='zb1p' does not have"),
    (["train.eval_interval=5", "data.split=98,2,0", "train.eval_iters=4", "data.valid_samples=10"],
     "data.valid_samples=10 is less than the train.eval_iters x train.global_batch_size = 64"),
    (["train.eval_iters=0"], "train.eval_iters must be a positive integer"),
    (["train.eval_interval=-1"], "train.eval_interval must be an integer >= 0"),
])
def test_evaluation_settings_are_checked(overrides, message):
    with pytest.raises(RunConfigError) as error:
        load_run_config(None, tuple(overrides))
    assert message in str(error.value)


def test_a_split_whose_validation_part_holds_no_sample_is_refused_by_name(tmp_path, capsys):
    from megatron_dsv3 import train
    from megatron_dsv3.data.indexed import write_indexed

    prefix = str(tmp_path / "docs")
    write_indexed(["a short document " * 20] * 3, prefix)  # 3 documents: a 1% split gives validation none
    code = train.main([*IN_PROCESS, "data.split=99,1,0", f"data.paths=[{prefix}]", f"data.cache_dir={tmp_path}",
                       f"checkpoint.dir={tmp_path / 'ckpt'}"])
    err = capsys.readouterr().err
    assert code == 2 and "leaves no validation samples" in err, err
