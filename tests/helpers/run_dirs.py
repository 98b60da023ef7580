"""Reading what a dsv3-train run left behind: its metric records, a checkpoint loaded into one
process, a line awaited in a rank's log. Shared by the test files that train."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_dsv3.checkpoint import dist as ckpt
from megatron_dsv3.compat.megatron_cpu import cpu_shims
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.gpt import build_model
from megatron_dsv3.optim import LocalOptimizer
from megatron_dsv3.parallel.sharding import named_tensors
from megatron_dsv3.train import init_distributed


def metric_records(run_dir: Path) -> list[dict]:
    """The per-step metric records of the run's JSONL log (expert-load records have no "loss")."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def load_checkpoint(path: Path):
    """A checkpoint loaded into a one-process model: ({name: tensor}, {moment.name: tensor}, common)."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    model = build_model(DSV3Config.from_dict(common["common"]["model_config"]))
    optimizer = LocalOptimizer(model, lr=1.0)
    init_distributed("cpu")
    try:
        with cpu_shims():
            common = ckpt.load(path, model, optimizer)
    finally:
        dist.destroy_process_group()
    tensors = {name: t.detach().clone() for name, t in named_tensors(model).items()}
    moments = {f"{moment}.{name}": value.clone() for name, states in optimizer.param_states().items()
               for moment, value in states.items()}
    return tensors, moments, common


def wait_for(pattern: str, log: Path, timeout: float = 60) -> re.Match:
    """The first match of `pattern` (multi-line) in `log` once it appears; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(), re.M) if log.exists() else None
        if match:
            return match
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} did not appear in {log} within {timeout} s:\n"
                         + (log.read_text()[-3000:] if log.exists() else "(no log)"))
