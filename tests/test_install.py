"""`pip install .` (not editable) works on its own: from a folder outside the repository, nothing
resolves from the source tree, yet `dsv3-launch --dry-run` renders a copy of an example (its
templates and presets are package data) and `dsv3-train` trains.

The new virtual environment gets the plugin from a wheel built here, and its dependencies
(torch, megatron-core, ...) from this environment's site-packages through a `.pth` path line: an
added path is searched but its own `.pth` files (the editable install's finder) are not run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_non_editable_install_launches_and_trains_from_outside_the_repository(tmp_path):
    env_dir, outside = tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # a copy: building writes build/ beside the sources
    shutil.copytree(ROOT / "megatron_dsv3", source / "megatron_dsv3", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, cwd=outside, capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-compile", *map(str, wheels.glob("*.whl"))], check=True, cwd=outside, capture_output=True)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean_env.update(OMP_NUM_THREADS="1", PATH=f"{env_dir / 'bin'}{os.pathsep}{clean_env['PATH']}")

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=outside, env=clean_env, capture_output=True, text=True, timeout=300)

    where = run(str(python), "-c", "import megatron_dsv3; print(megatron_dsv3.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # the installed copy, not the source

    example = outside / "lite.yaml"
    shutil.copy(ROOT / "examples" / "lite-4node.yaml", example)
    launch = run("dsv3-launch", str(example), "--dry-run")
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert launch.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=4" in launch.stdout

    train = run("dsv3-train", "train.steps=5", "train.device=cpu", "train.seq_length=32",
                "train.micro_batch_size=2", "train.global_batch_size=4", "logging.interval=1",
                f"data.cache_dir={outside / 'cache'}", "data.corpus_max_bytes=200000",
                f"checkpoint.dir={outside / 'run' / 'checkpoints'}")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "done: 5 steps" in train.stdout and (outside / "run" / "checkpoints" / "iter_0000005").is_dir()
