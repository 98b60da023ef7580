"""YaRN from the command line and the report's long-context stages (section 4.3) as a resumable
recipe: examples/long-context/ trains at 64 tokens, then resumes at 128 with YaRN."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dsv3.checkpoint import dist as ckpt

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "long-context"
SMALL = ["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=2",
         "train.warmup_steps=1", "checkpoint.save_interval=0", "logging.jsonl=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module", autouse=True)
def _one_checkpoint_writer_manager():
    """One signal-safe Manager for the checkpoint writer of every run here (as tests/test_train.py)."""
    from megatron_dsv3.compat.megatron_checkpoint import signal_safe_checkpoint_writer

    with signal_safe_checkpoint_writer():
        yield


def _train(capsys, *argv: str) -> tuple[int, str, str]:
    from megatron_dsv3.train import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _saved_model(ckpt_dir: Path) -> dict:
    return ckpt.load_common(ckpt.checkpoint_path(ckpt_dir, int((ckpt_dir / "latest").read_text())))["model_config"]


@pytest.mark.slow
def test_a_yarn_override_from_the_command_line_trains(tmp_path, cache, capsys):
    code, out, err = _train(capsys, *SMALL, f"data.cache_dir={cache}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                            "model.overrides.yarn={factor: 4.0, original_max_position_embeddings: 16, beta_fast: 1e1}")
    assert code == 0, err
    assert "done: 2 steps" in out
    assert _saved_model(tmp_path / "ckpt")["yarn"] == {
        "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 10.0, "beta_slow": 1.0, "mscale": 1.0,
        "mscale_all_dim": 1.0}


@pytest.mark.parametrize("value, message", [
    ("{factor: 0.5}", "yarn.factor must be >= 1, got 0.5"),
    ("{factor: abc}", "yarn.factor must be a finite number, got 'abc'"),
    ("{factor: 2, beta_slow: 0}", "yarn.beta_slow must be positive, got 0.0"),
    ("{factor: 2, original_max_position_embeddings: 0}", "yarn.original_max_position_embeddings must be positive"),
    ("{factor: 2, beta_fast: 1, beta_slow: 2}", "yarn.beta_fast=1.0 must exceed yarn.beta_slow=2.0"),
    ("{scale: 40}", "unknown yarn field(s): scale"),
    ("40", "yarn must be a mapping of factor, original_max_position_embeddings"),
])
def test_a_bad_yarn_override_exits_2_naming_it(value, message, tmp_path, capsys):
    code, out, err = _train(capsys, *SMALL, f"checkpoint.dir={tmp_path / 'ckpt'}", f"model.overrides.yarn={value}")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ckpt").exists()


def test_the_two_stage_extension_recipe_resumes_and_trains(tmp_path, cache, capsys):
    """Stage 1 at 64 tokens, then stage 2 at 128 with YaRN factor 2 resumes its checkpoint and trains;
    any other model change, or dropping YaRN again, is still refused."""
    where = [f"data.cache_dir={cache}", f"checkpoint.dir={tmp_path / 'ckpt'}", "train.eval_iters=1"]
    code, out, err = _train(capsys, "--config", str(RECIPE / "stage1-pretrain-cpu.yaml"), *where, "train.steps=2")
    assert code == 0, err
    assert _saved_model(tmp_path / "ckpt")["yarn"] is None

    stage2 = ["--config", str(RECIPE / "stage2-extend-cpu.yaml"), *where, "train.steps=4",
              "model.overrides.yarn.factor=2.0", "model.overrides.max_position_embeddings=128"]
    code, out, err = _train(capsys, *stage2, "model.overrides.num_layers=4")
    assert code == 2 and "num_layers: 3 saved, 4 now" in err, err

    code, out, err = _train(capsys, *stage2)
    assert code == 0, err
    assert f"resumed from step 2 ({tmp_path / 'ckpt' / 'iter_0000002'})" in out
    assert ("context extension: max_position_embeddings 64 -> 128, YaRN factor 2 over 64 positions "
            "(YaRN before: none)") in out
    assert "1f1b over 2 micro-batches of 2x128" in out and "step 4/4 | loss" in out and "valid loss" in out
    saved = _saved_model(tmp_path / "ckpt")
    assert saved["yarn"]["factor"] == 2.0 and saved["max_position_embeddings"] == 128

    code, out, err = _train(capsys, "--config", str(RECIPE / "stage1-pretrain-cpu.yaml"), *where, "train.steps=6",
                            "model.overrides.max_position_embeddings=128")
    assert code == 2 and "yarn: {" in err and "keeps YaRN on" in err, err
