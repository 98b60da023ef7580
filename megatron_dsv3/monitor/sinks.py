"""Where metrics go: JSONL file, wandb, TensorBoard, console.

Every sink has ``write(step, scalars, arrays=None)`` and ``close()``. ``scalars`` maps
names to numbers; ``arrays`` maps names to per-expert lists (``moe/layer_NN/load``, ``.../tokens``,
``.../starved_steps`` and ``.../bias``, see ``ExpertLoadTracker.histograms``). The dashboards
(wandb, TensorBoard) also have ``write_images(step, images)`` for the heatmaps, and file the
trainer's plain keys under ``train/``, ``moe/`` and ``mtp/`` (``dashboard_key``); the JSONL file
and the console keep the plain keys.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, BinaryIO, Optional, TextIO

import numpy as np

from . import wandb_log

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)(?P<layer>layer_\d+)/(?P<stat>load|tokens|bias)$")
DASHBOARD_GROUPS = {"mtp_loss": "mtp/loss", "mtp_loss_weight": "mtp/loss_weight",
                    "balance_loss": "moe/balance_loss", "bias_update_rate": "moe/bias_update_rate"}


def dashboard_key(key: str) -> str:
    """A key as the dashboards show it: grouped keys as they are, the trainer's plain ones under
    ``train/`` (``loss`` -> ``train/loss``), or ``mtp/`` and ``moe/`` for theirs."""
    return key if "/" in key else DASHBOARD_GROUPS.get(key, "train/" + key)


def _last_line_start(f: BinaryIO, end: int) -> int:
    """Offset of the first byte after the last newline before ``end`` (0 if none)."""
    start = end
    while start > 0:
        read_from = max(0, start - 65536)
        f.seek(read_from)
        newline = f.read(start - read_from).rfind(b"\n")
        if newline >= 0:
            return read_from + newline + 1
        start = read_from
    return 0


def end_torn_line(path: str | os.PathLike) -> None:
    """Make the JSONL file at ``path`` end with a newline, as appending to it needs.

    A last line without its newline was being written when its writer was killed. If it is a
    complete JSON object it is kept and terminated; otherwise it is cut off: its record is lost
    either way, and cutting keeps the file valid JSONL for readers that do not skip bad lines.
    """
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        start = _last_line_start(f, end)
        f.seek(start)
        try:
            complete = isinstance(json.loads(f.read()), dict)
        except ValueError:
            complete = False
        if complete:
            f.write(b"\n")
        else:
            f.truncate(start)


class JsonlSink:
    """One JSON object per line, ``{"step": .., "time": .., **scalars, **arrays}``.

    Opens in append mode, so a resumed run continues the same file, after ending a line torn
    by a kill (``end_torn_line``); flushes every line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.isfile(self.path):
            end_torn_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, Any], arrays: Optional[dict[str, list]] = None) -> None:
        record = {"step": int(step), "time": time.time(), **scalars, **(arrays or {})}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """Scalars as wandb history (keys grouped by ``dashboard_key``); per-expert load and bias as one
    ``wandb.Table`` per step; heatmaps as ``wandb.Image``.

    The table is long-format (step, layer, expert, load, tokens, bias), ready for custom charts and
    heatmaps; ``bar_charts=True`` also logs a ``wandb.plot.bar`` per layer
    (``{prefix}layer_NN/load_bar``). ``mode="offline"`` writes under ``dir`` without an
    account; ``mode=None`` leaves it to ``WANDB_MODE``. ``close`` of an offline run returns once
    wandb has written the whole run, so ``wandb sync`` can follow at once.
    """

    def __init__(self, project: str, run_name: Optional[str] = None, config: Optional[dict] = None,
                 mode: Optional[str] = None, dir: Optional[str | os.PathLike] = None,
                 bar_charts: bool = False, **init_kwargs: Any):
        import wandb  # imported when logging.wandb asks for it: its import takes about a second

        self._wandb = wandb
        self.bar_charts = bar_charts
        if dir is not None:
            os.makedirs(dir, exist_ok=True)
            dir = os.fspath(dir)
        self.run = wandb.init(project=project, name=run_name, config=config, mode=mode, dir=dir,
                              **init_kwargs)
        self._offline_run_file = self.run.settings.sync_file if self.run.offline else None
        self._pending_step: Optional[int] = None
        self._pending: dict[str, Any] = {}

    def write(self, step: int, scalars: dict[str, Any], arrays: Optional[dict[str, list]] = None) -> None:
        """Everything written for one step goes to wandb as a single history row."""
        if self._pending_step is not None and int(step) != self._pending_step:
            self._flush()
        self._pending_step = int(step)
        self._pending.update({dashboard_key(k): v for k, v in scalars.items()})
        if arrays:
            self._pending.update(self._expert_tables(step, arrays))

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        """RGB arrays [H, W, 3] as images of this step's history row."""
        if self._pending_step is not None and int(step) != self._pending_step:
            self._flush()
        self._pending_step = int(step)
        self._pending.update({key: self._wandb.Image(rgb, caption=f"step {step}") for key, rgb in images.items()})

    def _flush(self) -> None:
        if self._pending_step is not None:
            self.run.log(self._pending, step=self._pending_step)
        self._pending_step, self._pending = None, {}

    def _expert_tables(self, step: int, arrays: dict[str, list]) -> dict[str, Any]:
        wandb = self._wandb
        layers: dict[tuple[str, str], dict[str, list]] = {}
        for key, values in arrays.items():
            m = _LAYER_KEY.match(key)
            if m:
                layers.setdefault((m["prefix"], m["layer"]), {})[m["stat"]] = values
        rows, out = [], {}
        for (prefix, layer), stats in layers.items():
            load, tokens, bias = stats.get("load"), stats.get("tokens"), stats.get("bias")
            n = len(load if load is not None else bias)
            layer_rows = [[int(step), layer, e, load[e] if load else None, tokens[e] if tokens else None,
                           bias[e] if bias else None] for e in range(n)]
            rows += layer_rows
            if self.bar_charts and load is not None:
                table = wandb.Table(columns=["expert", "load"], data=[[r[2], r[3]] for r in layer_rows])
                out[f"{prefix}{layer}/load_bar"] = wandb.plot.bar(
                    table, "expert", "load", title=f"{layer} expert load (step {step})")
        if rows:
            prefix = next(iter(layers))[0]
            out[f"{prefix}expert_load"] = wandb.Table(
                columns=["step", "layer", "expert", "load", "tokens", "bias"], data=rows)
        return out

    def close(self) -> None:
        self._flush()
        self.run.finish()
        if self._offline_run_file:  # finish() returns before wandb's service has flushed the file
            wandb_log.wait_for_exit_record(self._offline_run_file)


class TensorBoardSink:
    """Scalars via ``add_scalar`` (keys grouped by ``dashboard_key``); per-expert arrays via
    ``add_histogram``; heatmaps via ``add_image``. The writer's thread flushes to disk every
    ``flush_secs`` (not the training step); ``close`` flushes the rest."""

    def __init__(self, logdir: str | os.PathLike, flush_secs: float = 30):
        try:  # optional dependency (tensorboard), needed only with logging.tensorboard
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoard logging needs the `tensorboard` package "
                              "(pip install tensorboard), or set logging.tensorboard: false") from e
        self.writer = SummaryWriter(log_dir=os.fspath(logdir), flush_secs=flush_secs)

    def write(self, step: int, scalars: dict[str, Any], arrays: Optional[dict[str, list]] = None) -> None:
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(dashboard_key(key), value, int(step))
        for key, values in (arrays or {}).items():
            self.writer.add_histogram(key, np.asarray(values, dtype=np.float64), int(step))

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        for key, rgb in images.items():
            self.writer.add_image(key, rgb, int(step), dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


CONSOLE_FIELDS = (  # key, format of the console line
    ("loss", "loss {:.3f}"),
    ("mtp_loss", "mtp {:.3f}"),
    ("balance_loss", "bal {:.2g}"),
    ("tokens_per_s", "{:.0f} tok/s"),
    ("grad_norm", "grad {:.2f}"),
    ("lr", "lr {:.1e}"),
    ("moe/max_vio_mean", "maxvio {:.2f}"),
    ("mtp/acceptance", "mtp acc {:.2f}"),
    ("valid/loss", "valid loss {:.3f}"),  # an evaluation's record (Trainer.evaluate)
    ("valid/mtp_loss", "valid mtp {:.3f}"),
)


def format_console_line(step: int, metrics: dict[str, Any], total_steps: Optional[int] = None) -> str:
    """``step 10/200 | loss 4.512 | mtp 4.801 | ... | maxvio 0.42`` from the keys present."""
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    parts += [fmt.format(float(metrics[key])) for key, fmt in CONSOLE_FIELDS if metrics.get(key) is not None]
    return " | ".join(parts)


class ConsoleSink:
    """Prints the compact line for plain metric records.

    Expert-load records print nothing; their ``max_vio_mean`` joins the next line, so call
    ``log_expert_load`` before ``log`` for the same step.
    """

    def __init__(self, total_steps: Optional[int] = None, stream: Optional[TextIO] = None,
                 max_vio_key: str = "moe/max_vio_mean"):
        self.total_steps = total_steps
        self.stream = stream
        self.max_vio_key = max_vio_key
        self._max_vio: Optional[float] = None

    def write(self, step: int, scalars: dict[str, Any], arrays: Optional[dict[str, list]] = None) -> None:
        if arrays is not None:
            self._max_vio = scalars.get(self.max_vio_key, self._max_vio)
            return
        metrics = dict(scalars)
        if self._max_vio is not None and "loss" in metrics:  # a training record, not an evaluation's
            metrics.setdefault("moe/max_vio_mean", self._max_vio)
        stream = self.stream or sys.stdout
        print(format_console_line(step, metrics, self.total_steps), file=stream, flush=True)

    def close(self) -> None:
        pass
