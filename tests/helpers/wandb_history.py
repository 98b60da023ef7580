"""The history rows of an offline wandb run, read from its run-*.wandb file."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_dsv3.monitor import wandb_log


def history(run_file: str | Path) -> dict[int, dict]:
    """step -> {key: value} of every history row (nested keys joined with '/')."""
    rows = {}
    for rec in wandb_log.read_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            rows[rec.history.step.num] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                          for item in rec.history.item}
    return rows
