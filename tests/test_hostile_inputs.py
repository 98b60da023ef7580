"""Hostile inputs at every entry point: each case is refused with its exit code and one line on
stderr naming the input, within a stated time (a bound that catches a hang, not a benchmark).

The cases run in this process through each command's `main(argv)` (argparse's own refusals exit
through SystemExit(2)); the one kind that could hang the loader, YAML alias bombs, runs in a
subprocess with a hard timeout and must be refused in under BOMB_LIMIT_S. Entry points:
dsv3-train, dsv3-launch, dsv3-torchrun, dsv3-convert (all four directions), dsv3-report,
dsv3-schedule, dsv3-prepare.

The crafted checkpoint that would run a command is built by tests/helpers/crafted_checkpoint.py,
which tests/test_checkpoint_safety.py shares.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch

from helpers.crafted_checkpoint import crafted_copy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIMIT_S = 60  # any in-process case: a refusal takes well under a second or two; past this it hangs
BOMB_LIMIT_S = 5
SMALL = ["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "logging.interval=1",
         "train.warmup_steps=2", "logging.jsonl=false", "logging.console=true", "logging.wandb=false",
         "parallel.timeout_s=60"]


# ----------------------------------------------------------------------------- checkpoints to damage
def _rewrite_metadata(folder: Path, edit: Callable) -> None:
    from megatron_dsv3.checkpoint import metadata_guard

    meta = metadata_guard.read_metadata(folder)
    edit(meta)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _rehash(folder: Path) -> None:
    """The manifest of `folder` as its writer would have made it: the checkpoint was written so."""
    from megatron_dsv3.checkpoint import manifest

    manifest.write(folder, {name: manifest.digest(folder / name) for name in manifest.files_to_list(folder)})


def _common_without_model_config(folder: Path) -> None:
    common = torch.load(folder / "common.pt", weights_only=True)
    del common["common"]["model_config"]
    torch.save(common, folder / "common.pt")
    _rehash(folder)


def _storage_outside(folder: Path) -> None:
    def edit(meta):
        index = next(iter(meta.storage_data))
        info = meta.storage_data[index]
        meta.storage_data[index] = type(info)("../../outside.distcp", info.offset, info.length)
    _rewrite_metadata(folder, edit)


def _shard(folder: Path) -> Path:
    return sorted(folder.glob("*.distcp"))[0]


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (damage, what the refusal names)
    "flipped-shard-header": (lambda f: _flip(_shard(f), 40), r"__0_0\.distcp does not match its checksum"),
    "flipped-weight-byte": (lambda f: _flip(_shard(f), _shard(f).stat().st_size // 2),
                            r"__0_0\.distcp does not match its checksum"),
    "zero-filled-shard": (lambda f: _shard(f).write_bytes(bytes(_shard(f).stat().st_size)),
                          r"__0_0\.distcp does not match its checksum"),
    "empty-metadata": (lambda f: (f / ".metadata").write_bytes(b""), r"\.metadata|unreadable"),
    "metadata-json-list": (lambda f: (f / "metadata.json").write_text("[]"),
                           r"metadata\.json holds a JSON list, not an object"),
    "unknown-backend": (lambda f: (f / "metadata.json").write_text('{"sharded_backend": "zarr"}'),
                        r"metadata\.json names the format 'zarr'"),
    "common-without-model-config": (_common_without_model_config, r"holds no model_config"),
    "storage-outside-the-folder": (_storage_outside, r"stores .* in '\.\./\.\./outside\.distcp', not a \*\.distcp file"),
    "shard-appended-to": (lambda f: open(_shard(f), "ab").write(b"x"), r"__0_0\.distcp is \d+ bytes, manifest\.json says"),
}


def damaged_copy(source: Path, target: Path, how: str) -> Path:
    shutil.copytree(source, target)
    DAMAGES[how][0](target)
    return target


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """iter_0000002 of a tiny run (saved at the end: save_interval 0)."""
    from megatron_dsv3.train import main

    run = tmp_path_factory.mktemp("trained")
    assert main([*SMALL, "train.steps=2", "checkpoint.save_interval=0", f"checkpoint.dir={run / 'ckpt'}"]) == 0
    return run / "ckpt" / "iter_0000002"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, trained) -> Path:
    """The trained checkpoint as a Hugging Face folder (config.json, index, shards)."""
    from megatron_dsv3.convert import dist_to_hf

    out = tmp_path_factory.mktemp("hf") / "export"
    dist_to_hf(trained, out, max_shard_bytes=2**20)
    return out


def _one_line(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _run(main: Callable, argv: list[str], capsys) -> tuple[int, str, float]:
    capsys.readouterr()
    start = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse's usage errors
        code = exited.code
    elapsed = time.monotonic() - start
    return code, capsys.readouterr().err, elapsed


def _assert_refused(code: int, err: str, elapsed: float, want_code: int, pattern: str, usage: bool = False) -> None:
    lines = _one_line(err)
    assert code == want_code, err[-3000:]
    if usage:  # argparse: a usage line, then one line naming the problem
        lines = lines[-1:]
    assert len(lines) == 1, f"expected one line, got:\n{err[-3000:]}"
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert elapsed < LIMIT_S


def _file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- dsv3-train
def _live_lock(tmp: Path) -> list[str]:
    """checkpoint.dir locked by a live process: this one."""
    ckpt = tmp / "locked"
    ckpt.mkdir()
    import socket

    (ckpt / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                            "started": psutil.Process().create_time(), "since": "then"}))
    return [f"checkpoint.dir={ckpt}"]


TRAIN: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "duplicate-key": (lambda t, c: ["--config", _file(t / "r.yaml", "train:\n  steps: 1\n  steps: 2\n")],
                      r"r\.yaml: key 'steps' at line 3 repeats the one at line 2"),
    "duplicate-section": (lambda t, c: ["--config", _file(t / "r.yaml", "train: {steps: 1}\ntrain: {steps: 2}\n")],
                          r"r\.yaml: key 'train' at line 2 repeats the one at line 1"),
    "self-referencing-anchor": (lambda t, c: ["--config", _file(t / "r.yaml", "model: &a {overrides: *a}\n")],
                                r"r\.yaml: the anchor at line 1 refers to itself"),
    "deep-nesting": (lambda t, c: ["--config", _file(t / "r.yaml", "train: " + "[" * 3000 + "]" * 3000 + "\n")],
                     r"r\.yaml nests deeper than a config can"),
    "huge-config-file": (lambda t, c: ["--config", _file(t / "r.yaml", "# x\n" * 2_000_000)],
                         r"r\.yaml is \d+ bytes, above the \d+ a config may have"),
    "timeout-10^30": (lambda t, c: ["parallel.timeout_s=1e30"], r"parallel\.timeout_s must be a number in \(0, 86400\]"),
    "save-timeout-10^30": (lambda t, c: ["checkpoint.save_timeout_s=1e30"], r"checkpoint\.save_timeout_s must be a number"),
    "timeout-nan": (lambda t, c: ["parallel.timeout_s=.nan"], r"parallel\.timeout_s must be a number"),
    "seed-2^32": (lambda t, c: ["train.seed=4294967296"], r"train\.seed must be at most 4294967295"),
    "steps-10^30": (lambda t, c: ["train.steps=1000000000000000000000000000000"], r"train\.steps must be at most"),
    "split-abc": (lambda t, c: ["data.split=abc"], r"data\.split='abc' is not train,valid,test weights"),
    "split-inf": (lambda t, c: ["data.split=1,inf,0"], r"data\.split='1,inf,0' is not train,valid,test weights"),
    "tokenizer-not-json": (lambda t, c: [f"data.tokenizer={_file(t / 'tok.json', 'not a tokenizer')}"],
                           r"cannot read tokenizer file .*tok\.json"),
    "hidden-size-64.5": (lambda t, c: ["model.overrides.hidden_size=64.5"],
                         r"hidden_size must be an integer in \[0, \d+\], got 64\.5"),
    "hidden-size-string": (lambda t, c: ["model.overrides.hidden_size='64'"], r"hidden_size must be an integer"),
    "vocab-size-true": (lambda t, c: ["model.overrides.vocab_size=true"], r"vocab_size must be an integer"),
    "yarn-unknown-field": (lambda t, c: ["model.overrides.yarn={factor: 4, wrong: 1}"],
                           r"unknown yarn field\(s\): wrong"),
    "yarn-not-a-mapping": (lambda t, c: ["model.overrides.yarn=7"], r"yarn must be a mapping"),
    "unknown-model-field": (lambda t, c: ["model.overrides.hiden_size=64"], r"unknown model field\(s\): hiden_size"),
    "norm-eps-inf": (lambda t, c: ["model.overrides.norm_eps=.inf"], r"norm_eps must be a finite number"),
    "blend-weight-inf": (lambda t, c: [f"data.paths=[.inf, {t / 'x'}]"],
                         r"data\.paths weights must be finite numbers >= 0"),
    "schedule-value-inf": (lambda t, c: ["train.mtp_loss_weight_schedule=[[0, .inf]]"],
                           r"train\.mtp_loss_weight_schedule must be null or a list of \[tokens_from, value\] pairs "
                           r"of finite numbers"),
    "seq-length-1": (lambda t, c: ["train.seq_length=1"], r"train\.seq_length must be an integer >= 2, got 1"),
    "global-batch-10^8": (lambda t, c: ["train.global_batch_size=100000000"],
                          r"train\.global_batch_size=100000000 makes 50000000 micro-batches per rank"),
    "micro-batch-10^6": (lambda t, c: ["train.micro_batch_size=1000000", "train.global_batch_size=1000000"],
                         r"memory estimate.*train\.micro_batch_size=1000000 x train\.seq_length=32\).*is above"),
    "container-mount-with-comma": (lambda t, c: ["launch.container_mounts=['/a:/a,/b:/b']"],
                                   r"launch\.container_mounts\[0\]='/a:/a,/b:/b' must not contain ','"),
    "non-ascii-time-digits": (lambda t, c: ["launch.time=١٢:00:00"], r"launch\.time='١٢:00:00' is not a Slurm time"),
    "checkpoint-dir-a-file": (lambda t, c: [f"checkpoint.dir={_file(t / 'afile', 'x')}"],
                              r"checkpoint\.dir .*afile (is not a folder|cannot be written)"),
    "checkpoint-dir-locked": (lambda t, c: _live_lock(t),
                              rf"checkpoint\.dir .*locked is in use by the run of PID {os.getpid()} on host "),
    "load-weights-crafted": (lambda t, c: [f"checkpoint.load_weights={crafted_copy(c, t / 'crafted', t / 'pwned')}"],
                             r"load_weights=.*crafted: \.metadata declares item model\.embed_tokens\.weight as bytes"),
    "load-weights-missing": (lambda t, c: [f"checkpoint.load_weights={t / 'nowhere'}"],
                             r"load_weights=.*nowhere: it is not a folder"),
    **{f"load-weights-{how}": ((lambda how: lambda t, c: [f"checkpoint.load_weights={damaged_copy(c, t / 'd', how)}"])(how),
                               r"checkpoint\.load_weights=.*/d: .*" + DAMAGES[how][1])
       for how in DAMAGES},
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", list(TRAIN))
def test_dsv3_train_refuses(case, tmp_path, capsys, trained):
    from megatron_dsv3.train import main

    make, pattern = TRAIN[case]
    run = tmp_path / "run"
    argv = [*SMALL, "train.steps=2", f"checkpoint.dir={run / 'ckpt'}", *make(tmp_path, trained)]
    code, err, elapsed = _run(main, argv, capsys)
    _assert_refused(code, err, elapsed, 2, pattern)
    assert not run.exists(), f"refused, yet {sorted(p.name for p in run.rglob('*'))} were written"
    assert not (tmp_path / "pwned").exists()


def test_accepted_inputs_mean_what_they_say(tmp_path, monkeypatch):
    """The other half of the table: `~` is the home folder, an override of a whole mapping replaces
    it, and yarn given as a mapping is YaRN."""
    from megatron_dsv3.run_config import load_run_config

    monkeypatch.setenv("HOME", str(tmp_path))
    yaml_file = _file(tmp_path / "r.yaml", "model: {overrides: {num_layers: 2, mtp_num_modules: 0}}\n")
    run = load_run_config(yaml_file, ("checkpoint.dir=~/x", "model.overrides={}", "train.steps=5"))
    assert run.checkpoint.dir == str(tmp_path / "x") and run.model.overrides == {}
    run = load_run_config(yaml_file, ("model.overrides.yarn={factor: 4}",))
    assert run.model.overrides["num_layers"] == 2 and run.model_config().yarn.factor == 4
    assert load_run_config(None, ("launch.time=12:00:00",)).launch.time == "12:00:00"
    # a save waits at most 3 x the step's stall limit, whatever checkpoint.save_timeout_s says
    assert load_run_config(None, ("parallel.timeout_s=20", "checkpoint.save_timeout_s=1800")).checkpoint.save_timeout_s == 60
    assert load_run_config(None, ("parallel.timeout_s=20",)).checkpoint.save_timeout_s == 60
    assert load_run_config(None, ("checkpoint.save_timeout_s=100",)).checkpoint.save_timeout_s == 100


# ----------------------------------------------------------------------------- YAML alias bombs
BOMB = "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 10) + "]\n" for i in range(9))
BOMB_PROBE = r"""
import json, sys, time
from megatron_dsv3.run_config import RunConfigError, load_run_config
from megatron_dsv3.launch.run import LaunchConfigError, load_run
results = {}
for name, (path, overrides, loader) in json.loads(sys.argv[1]).items():
    start = time.monotonic()
    try:
        (load_run if loader == "launch" else load_run_config)(path, tuple(overrides))
        results[name] = ["accepted", time.monotonic() - start]
    except (RunConfigError, LaunchConfigError) as error:
        results[name] = [str(error), time.monotonic() - start]
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_yaml_alias_bombs_are_refused_in_under_5_s(tmp_path):
    """About 10^9 values once expanded, as a section, in model.overrides, in launch.env_overrides (all
    dsv3-train's and dsv3-launch's loader) and inline in a dotted override. The probe runs in a
    subprocess with a hard timeout: a regression hangs there, not in pytest."""
    section = _file(tmp_path / "section.yaml", BOMB + "train: *a8\n")
    overrides = _file(tmp_path / "overrides.yaml", "model:\n  overrides:\n    " + BOMB.replace("\n", "\n    ")
                      + "deep: *a8\n")
    env = _file(tmp_path / "env.yaml", "launch:\n  env_overrides:\n    " + BOMB.replace("\n", "\n    ") + "X: *a8\n")
    inline = "{" + ", ".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 10) + "]"
                             for i in range(9)) + "}"
    cases = {"section": [section, [], "train"], "model.overrides": [overrides, [], "train"],
             "launch.env_overrides": [env, [], "launch"], "inline": [None, [f"model.overrides={inline}"], "train"]}
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BOMB_PROBE, json.dumps(cases)], env=env_vars, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (message, seconds) in results.items():
        assert re.search(r"expands to more than 100000 values|key 'a\d' at line", message), (name, message)
        assert seconds < BOMB_LIMIT_S, (name, seconds)


# ----------------------------------------------------------------------------- dsv3-launch
def _launch_yaml(tmp: Path, **launch) -> str:
    text = ("model: {preset: tiny}\nlaunch: {nodes: 1, cpu: true, env_preset: cpu, " +
            ", ".join(f"{k}: {json.dumps(v)}" for k, v in launch.items()) + "}\n")
    return _file(tmp / "run.yaml", text)


LAUNCH: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "duplicate-section": (lambda t: [_file(t / "run.yaml", "launch: {nodes: 1}\nlaunch: {nodes: 2}\n"), "--dry-run"],
                          r"run\.yaml: key 'launch' at line 2 repeats"),
    "non-ascii-time": (lambda t: [_launch_yaml(t, time="١٢:00:00"), "--dry-run"], r"launch\.time='١٢:00:00' is not"),
    "fullwidth-time-override": (lambda t: [_launch_yaml(t), "launch.time=１２:00:00", "--dry-run"],
                                r"launch\.time='１２:00:00' is not a Slurm time"),
    "mount-with-comma": (lambda t: [_launch_yaml(t, container_mounts=["/a:/a,/b:/b"]), "--dry-run"],
                         r"container_mounts\[0\]='/a:/a,/b:/b' must not contain ','"),
    "timeout-10^30": (lambda t: [_launch_yaml(t), "parallel.timeout_s=1e30", "--dry-run"],
                      r"parallel\.timeout_s must be a number in"),
    "seed-2^32": (lambda t: [_launch_yaml(t), "train.seed=4294967296", "--dry-run"], r"train\.seed must be at most"),
    "missing-config": (lambda t: [str(t / "nope.yaml"), "--dry-run"], r"config file .*nope\.yaml does not exist"),
    "script-folder-is-a-file": (lambda t: [_launch_yaml(t, output_dir=_file(t / "afile", "x") + "/sub")],
                                r"cannot write the batch script .*afile/sub"),
}


@pytest.mark.parametrize("case", list(LAUNCH))
def test_dsv3_launch_refuses(case, tmp_path, capsys):
    from megatron_dsv3.cli.launch import main

    code, err, elapsed = _run(main, LAUNCH[case][0](tmp_path), capsys)
    _assert_refused(code, err, elapsed, 2, LAUNCH[case][1])


def test_dsv3_launch_refuses_a_preset_with_a_repeated_key(tmp_path, capsys, monkeypatch):
    from megatron_dsv3.cli.launch import main
    from megatron_dsv3.launch.presets import launch_dir

    site = tmp_path / "site"
    shutil.copytree(launch_dir(), site)
    (site / "presets" / "cpu.yaml").write_text((site / "presets" / "cpu.yaml").read_text() + "env: {}\nenv: {}\n")
    monkeypatch.setenv("DSV3_LAUNCH_DIR", str(site))
    code, err, elapsed = _run(main, [_launch_yaml(tmp_path), "--dry-run"], capsys)
    _assert_refused(code, err, elapsed, 2, r"launch preset .*cpu\.yaml: key 'env' at line \d+ repeats")


# ----------------------------------------------------------------------------- dsv3-torchrun
def test_dsv3_torchrun_refuses_an_unusable_tmpdir(capsys, monkeypatch):
    import tempfile

    from megatron_dsv3.cli.torchrun import main

    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/tmp")
    monkeypatch.setenv("TMPDIR", "/nonexistent/tmp")
    code, err, elapsed = _run(main, ["--nproc-per-node", "1", "-m", "megatron_dsv3.train"], capsys)
    _assert_refused(code, err, elapsed, 2, r"cannot make a folder for the ranks' exit codes in TMPDIR=/nonexistent")


@pytest.mark.parametrize("torchrun_code, rank_codes, expected", [
    (1, {"rank-0": 2, "rank-1": 2}, 2),  # refused input on every rank: 2, not torchrun's 1
    (1, {"rank-0": 130}, 130),  # Ctrl-C: saved and stopped
    (1, {"rank-0": 5, "rank-1": 5}, 5),  # a checkpoint could not be written
    (1, {"rank-0": 3, "rank-1": 4}, 1),  # ranks disagree: torchrun's
])
def test_dsv3_torchrun_relays_the_code_the_ranks_agree_on(torchrun_code, rank_codes, expected):
    from megatron_dsv3.cli.torchrun import exit_code

    assert exit_code(torchrun_code, rank_codes) == expected


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dsv3_torchrun_exits_2_with_the_ranks_sentence_when_they_refuse(tmp_path):
    """torchrun reports a failed worker as 1; the wrapper relays the ranks' 2 and their one line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "megatron_dsv3.cli.torchrun", "--nproc-per-node", "1", "-m",
                           "megatron_dsv3.train", "train.seed=4294967296", f"checkpoint.dir={tmp_path / 'c'}"],
                          env=env, capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(r"^dsv3-train: train\.seed must be at most 4294967295", done.stderr, re.M), done.stderr[-3000:]
    assert "Traceback" not in done.stderr.split("dsv3-train:")[-1] and time.monotonic() - start < 200


# ----------------------------------------------------------------------------- dsv3-convert
def _hf_copy(hf: Path, t: Path, edit: Callable[[Path], None]) -> str:
    target = t / "hf"
    shutil.copytree(hf, target)
    edit(target)
    return str(target)


def _index(folder: Path) -> Path:
    return folder / "model.safetensors.index.json"


def _set_index(folder: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(_index(folder).read_text())
    data = edit(data) or data
    _index(folder).write_text(json.dumps(data))


def _rewrite_header(folder: Path, edit: Callable[[dict], object], raw: bytes = b"") -> None:
    import struct

    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    text = raw or json.dumps(edit(header) or header).encode()
    text += b" " * (length - len(text)) if len(text) <= length else b""
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def _negative_offsets(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [-4, header[name]["data_offsets"][1]]


def _overlapping(header: dict) -> None:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]


def _config(folder: Path, **changes) -> None:
    values = json.loads((folder / "config.json").read_text())
    values.update(changes)
    (folder / "config.json").write_text(json.dumps(values))


def _full_output(t: Path) -> str:
    out = t / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    return str(out)


CONVERT: dict[str, tuple[Callable[[Path, Path, Path], list[str]], int, str]] = {
    # hf-to-dist
    "config-not-json": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: (f / "config.json").write_text("{x")),
                                         str(t / "o")], 2, r"config\.json .*config\.json is not JSON"),
    "config-a-list": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: (f / "config.json").write_text("[1]")),
                                       str(t / "o")], 2, r"config\.json .* holds a JSON list, not an object"),
    "hidden-size-string": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _config(f, hidden_size="128")),
                                            str(t / "o")], 2, r"hidden_size must be an integer in .*got '128'"),
    "rope-not-an-object": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _config(
        f, rope_parameters=[1], rope_scaling=None)), str(t / "o")], 2, r"config\.json: rope_parameters must be a mapping, got \[1\]"),
    "index-not-json": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _index(f).write_text("{")),
                                        str(t / "o")], 2, r"model\.safetensors\.index\.json is not JSON"),
    "index-without-weight-map": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _index(f).write_text("{}")),
                                                  str(t / "o")], 2, r"index\.json has no weight_map"),
    "index-entry-outside": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _set_index(
        f, lambda d: d["weight_map"].update({"x": "../../etc/passwd"}))), str(t / "o")], 2,
        r"names the shard '\.\./\.\./etc/passwd', which is not a file of"),
    "header-garbage": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _rewrite_header(
        f, None, raw=b"\xff\xfe" * 2**19)), str(t / "o")], 2, r"safetensors: the header is not JSON|not plausible"),
    "header-a-list": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _rewrite_header(
        f, lambda header: [1, 2])), str(t / "o")], 2, r"the header is a JSON list, not an object"),
    "negative-offsets": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _rewrite_header(f, _negative_offsets)),
                                          str(t / "o")], 2, r"the header entry of .* is not \{dtype, shape, data_offsets\}"),
    "overlapping-offsets": (lambda t, h, c: ["hf-to-dist", _hf_copy(h, t, lambda f: _rewrite_header(f, _overlapping)),
                                             str(t / "o")], 2, r"overlap those of"),
    "hf-to-dist-output-holds-files": (lambda t, h, c: ["hf-to-dist", str(h), _full_output(t)], 2,
                                      r"out exists and holds files: give --replace"),
    "max-file-gb-nan": (lambda t, h, c: ["hf-to-dist", str(h), str(t / "o"), "--max-file-gb", "nan"], 2,
                        r"--max-file-gb must be a number"),
    "tensor-0": (lambda t, h, c: ["hf-to-dist", str(h), str(t / "o"), "--tensor", "0"], 2,
                 r"--tensor, --pipeline and --expert must be in \[1, 65536\]"),
    # dist-to-hf and dist-to-mcore read our checkpoints
    "dist-to-hf-crafted": (lambda t, h, c: ["dist-to-hf", str(crafted_copy(c, t / "cr", t / "pwned")), str(t / "o")], 2,
                           r"cr: declares item model\.embed_tokens\.weight as bytes|lacks 1 tensor"),
    "dist-to-mcore-crafted": (lambda t, h, c: ["dist-to-mcore", str(crafted_copy(c, t / "cr", t / "pwned")),
                                               str(t / "o")], 2, r"holds no tensor model\.embed_tokens\.weight|cr: "),
    "dist-to-hf-output-holds-files": (lambda t, h, c: ["dist-to-hf", str(c), _full_output(t)], 2,
                                      r"out exists and holds files: give --replace"),
    **{f"dist-to-hf-{how}": ((lambda how: lambda t, h, c: ["dist-to-hf", str(damaged_copy(c, t / "d", how)),
                                                           str(t / "o")])(how), 2,
                             r"/d\b.*(" + DAMAGES[how][1] + r"|is damaged)")
       for how in ("flipped-weight-byte", "zero-filled-shard", "empty-metadata", "common-without-model-config",
                   "storage-outside-the-folder", "shard-appended-to")},
    # mcore-to-dist reads a config JSON and a native checkpoint
    "model-config-not-json": (lambda t, h, c: ["mcore-to-dist", str(c), str(t / "o"), "--model-config",
                                               _file(t / "m.json", "{nope")], 2, r"--model-config .*m\.json is not JSON"),
    "model-config-unknown-field": (lambda t, h, c: ["mcore-to-dist", str(c), str(t / "o"), "--model-config",
                                                    _file(t / "m.json", '{"hidden": 1}')], 2,
                                   r"unknown model config field\(s\): hidden"),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", list(CONVERT))
def test_dsv3_convert_refuses(case, tmp_path, capsys, trained, hf_folder):
    from megatron_dsv3.cli.convert import main

    make, want, pattern = CONVERT[case]
    argv = make(tmp_path, hf_folder, trained)
    code, err, elapsed = _run(main, argv, capsys)
    _assert_refused(code, err, elapsed, want, pattern, usage=code == 2 and "usage:" in err)
    out = Path(argv[2])
    assert not out.with_name(out.name + ".tmp").exists()
    assert not (tmp_path / "pwned").exists()
    if case.endswith("output-holds-files"):
        assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    else:
        assert not out.exists()


# ----------------------------------------------------------------------------- dsv3-report
def _metrics(t: Path, *lines: str) -> str:
    path = t / "metrics.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


REPORT: dict[str, tuple[Callable[[Path], list[str]], int, str]] = {
    "missing": (lambda t: [str(t / "nope")], 2, r"no metrics file at .*nope"),
    "step-infinity": (lambda t: [_metrics(t, '{"step": Infinity, "loss": 1}')], 2,
                      r"metrics\.jsonl holds no metrics records: none of its 1 line"),
    "step-negative": (lambda t: [_metrics(t, '{"step": -3, "loss": 1}')], 2, r"holds no metrics records"),
    "step-a-string": (lambda t: [_metrics(t, '{"step": "7", "loss": 1}')], 2, r"holds no metrics records"),
    "deeply-nested": (lambda t: [_metrics(t, '{"step": 1, "x": ' + "[" * 100000 + "]" * 100000 + "}")], 2,
                      r"holds no metrics records"),
    "binary": (lambda t: [_file(t / "metrics.jsonl", "\x00\xff" * 1000)], 2, r"holds no metrics records"),
    "over-long-line": (lambda t: [_metrics(t, '{"step": 1, "pad": "' + "x" * (17 * 2**20) + '"}')], 2,
                       r"holds no metrics records"),
    "load-a-string": (lambda t: [_metrics(t, '{"step": 1, "loss": 2.0, "moe/layer1/load": "abc"}')], 0,
                      r"^$"),
    "load-nested": (lambda t: [_metrics(t, '{"step": 1, "loss": 2.0, "moe/layer1/load": [[0.5], [0.5]]}')], 0, r"^$"),
    "load-nan": (lambda t: [_metrics(t, '{"step": 1, "loss": 2.0, "moe/layer1/load": [NaN, 0.5]}')], 0, r"^$"),
    "starved-below-nan": (lambda t: [_metrics(t, '{"step": 1, "loss": 1}'), "--html", str(t / "r.html"),
                                     "--starved-below", "nan"], 2, r"--starved-below must be between 0 and 1"),
    "out-in-missing-folder": (lambda t: [_metrics(t, '{"step": 1, "loss": 1}'), "--out", str(t / "no" / "r.md")], 2,
                              r"cannot write the report to .*no/r\.md"),
}


@pytest.mark.parametrize("case", list(REPORT))
def test_dsv3_report_refuses_or_skips(case, tmp_path, capsys):
    from megatron_dsv3.cli.report import main

    make, want, pattern = REPORT[case]
    capsys.readouterr()
    start = time.monotonic()
    code = main(make(tmp_path))
    out, err = capsys.readouterr()
    if want:
        _assert_refused(code, err, time.monotonic() - start, want, pattern)
    else:  # a malformed value in a good record is skipped and counted, not fatal
        assert code == 0 and err == "", err
        assert "skipped 1 malformed line(s) or value(s)" in out and "| loss | 2 (step 1)" in out
        assert time.monotonic() - start < LIMIT_S


def test_dsv3_report_refuses_more_records_than_its_bound(tmp_path, capsys, monkeypatch):
    from megatron_dsv3.cli import report

    monkeypatch.setattr(report, "MAX_RECORDS", 3)
    path = _metrics(tmp_path, *(json.dumps({"step": s, "loss": 1.0}) for s in range(5)))
    code, err, elapsed = _run(report.main, [path], capsys)
    _assert_refused(code, err, elapsed, 2, r"metrics\.jsonl holds more than 3 logged steps")


# ----------------------------------------------------------------------------- dsv3-schedule
SCHEDULE: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "pp-10^6": (lambda t: ["--pp", "1000000", "--micro-batches", "8"], r"--pp must be in \[1, 256\]"),
    "micro-batches-10^7": (lambda t: ["--pp", "4", "--micro-batches", "10000000"], r"--micro-batches in \[1, 16384\]"),
    "pp-0": (lambda t: ["--pp", "0", "--micro-batches", "8"], r"--pp must be in"),
    "work-above-bound": (lambda t: ["--pp", "256", "--micro-batches", "256"], r"= 65536 is above 32768"),
    "f-inf": (lambda t: ["--pp", "4", "--micro-batches", "8", "--f", "inf"], r"--f must be finite"),
    "b-nan": (lambda t: ["--pp", "4", "--micro-batches", "8", "--b", "nan"], r"--b must be finite"),
    "w-above-b": (lambda t: ["--pp", "4", "--micro-batches", "8", "--w", "3"], r"costs must be >= 0 with W <= B"),
    "png-missing-folder": (lambda t: ["--pp", "4", "--micro-batches", "8", "--png", str(t / "no" / "x.png")],
                           r"--png .*x\.png: the folder .*no does not exist"),
    "png-a-folder": (lambda t: ["--pp", "4", "--micro-batches", "8", "--png", str(t)], r"--png .* is a folder"),
    "png-too-large": (lambda t: ["--pp", "128", "--micro-batches", "8", "--png", str(t / "x.png")],
                      r"--png draws up to --pp 64"),
}


@pytest.mark.parametrize("case", list(SCHEDULE))
def test_dsv3_schedule_refuses(case, tmp_path, capsys):
    from megatron_dsv3.cli.schedule import main

    code, err, elapsed = _run(main, SCHEDULE[case][0](tmp_path), capsys)
    _assert_refused(code, err, elapsed, 2, SCHEDULE[case][1], usage=True)


# ----------------------------------------------------------------------------- dsv3-prepare
def _jsonl(t: Path, text: str) -> str:
    return _file(t / "docs.jsonl", text)


PREPARE: dict[str, tuple[Callable[[Path, object], list[str]], str]] = {
    "input-missing": (lambda t, m: ["--input", str(t / "nope.txt")], r"input not found: .*nope\.txt"),
    "jsonl-invalid": (lambda t, m: ["--input", _jsonl(t, '{"text": "a"}\n{nope\n')], r"docs\.jsonl:2: invalid JSON"),
    "jsonl-deeply-nested": (lambda t, m: ["--input", _jsonl(t, "[" * 100000 + "]" * 100000 + "\n")],
                            r"docs\.jsonl:1: invalid JSON"),
    "jsonl-without-key": (lambda t, m: ["--input", _jsonl(t, '{"body": "a"}\n')], r"docs\.jsonl:1: no key 'text'"),
    "document-too-large": (lambda t, m: (m.setattr("megatron_dsv3.data.indexed.MAX_DOCUMENT_BYTES", 100),
                                         ["--input", _file(t / "big.txt", "x" * 200)])[1],
                           r"big\.txt is 200 bytes, above the 100 one document may have"),
    "jsonl-line-too-long": (lambda t, m: (m.setattr("megatron_dsv3.data.indexed.MAX_DOCUMENT_BYTES", 100),
                                          ["--input", _jsonl(t, '{"text": "' + "x" * 200 + '"}\n')])[1],
                            r"docs\.jsonl:1: a line of more than 100 characters"),
    "tokenizer-not-a-tokenizer": (lambda t, m: ["--input", _file(t / "a.txt", "hello"), "--tokenizer",
                                                _file(t / "tok.json", "{}")], r"cannot read tokenizer file .*tok\.json"),
    "tokenizer-too-large": (lambda t, m: (m.setattr("megatron_dsv3.data.tokenizer.MAX_TOKENIZER_BYTES", 10),
                                          ["--input", _file(t / "a.txt", "hello"), "--tokenizer",
                                           _file(t / "tok.json", "{" + " " * 20 + "}")])[1],
                            r"tokenizer .*tok\.json is \d+ bytes, not a tokenizer\.json"),
    "prefix-an-existing-folder": (lambda t, m: ["--input", _file(t / "a.txt", "hello"), "--output-prefix", str(t)],
                                  r"--output-prefix .* is an existing directory"),
    "prefix-under-a-file": (lambda t, m: ["--input", _file(t / "a.txt", "hello"), "--output-prefix",
                                          _file(t / "f", "x") + "/data"], r"is a file, not a directory"),
    "empty-input": (lambda t, m: ["--input", _file(t / "a.txt", ""), "--no-append-eod"], r"no tokens to write"),
}


@pytest.mark.parametrize("case", list(PREPARE))
def test_dsv3_prepare_refuses(case, tmp_path, capsys, monkeypatch):
    from megatron_dsv3.cli.prepare import main

    argv = PREPARE[case][0](tmp_path, monkeypatch)
    if "--output-prefix" not in argv:
        argv += ["--output-prefix", str(tmp_path / "out" / "data")]
    code, err, elapsed = _run(main, argv, capsys)
    _assert_refused(code, err, elapsed, 2, PREPARE[case][1])


# ----------------------------------------------------------------------------- a bug says so
def test_an_unexpected_error_prints_its_traceback_then_a_line_calling_it_a_bug(capsys, monkeypatch):
    from megatron_dsv3.cli import report

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(report, "build_report", broken)
    path = str(HERE / "conftest.py")  # any existing file: the report fails inside build_report
    code = report.main([path])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(
        "dsv3-report: the traceback above is a bug in megatron_dsv3 (ZeroDivisionError")
