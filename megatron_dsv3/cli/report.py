"""dsv3-report: a markdown summary of a run's metrics.jsonl, expert load included.

    dsv3-report runs/tiny            # or runs/tiny/metrics.jsonl
    dsv3-report runs/tiny --out report.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Optional

from megatron_dsv3.monitor.logger import METRICS_FILENAME

TRAIN_KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s")
_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)(?P<layer>layer_\d+)/(?P<stat>[a-z0-9_]+)$")
SPARK = " .:-=+*#%@"  # 0 .. 2x the balanced load, one character per expert


class ReportError(ValueError):
    """A metrics file that cannot be reported on; the message names the file and the problem."""


def read_records(path: str) -> tuple[list[dict[str, Any]], int]:
    """Records merged per step, in step order; returns (records, malformed line count).

    A line that is not a JSON object with a step (one torn by a kill, or not text at all) is
    counted and skipped. A step lower than the previous line's means the run resumed from a
    checkpoint: the records of the abandoned steps from that step on are dropped.
    """
    by_step: dict[int, dict[str, Any]] = {}
    bad, last = 0, None
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if last is not None and step < last:
                by_step = {s: r for s, r in by_step.items() if s < step}
            by_step.setdefault(step, {}).update(rec)
            last = step
    return [by_step[s] for s in sorted(by_step)], bad


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def _series(records: list[dict], key: str) -> list[tuple[int, Any]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def training_table(records: list[dict]) -> list[str]:
    lines = ["| metric | first | last | min | mean |", "|---|---|---|---|---|"]
    for key in TRAIN_KEYS:
        s = _series(records, key)
        if s:
            vals = [v for _, v in s]
            lines.append(f"| {key} | {_fmt(vals[0])} (step {s[0][0]}) | {_fmt(vals[-1])} (step {s[-1][0]}) "
                         f"| {_fmt(min(vals))} | {_fmt(sum(vals) / len(vals))} |")
    return lines if len(lines) > 2 else []


def _layers(records: list[dict]) -> dict[str, str]:
    """layer name -> its key prefix (``moe/``), in layer order."""
    found = {}
    for r in records:
        for key in r:
            m = _LAYER_KEY.match(key)
            if m:
                found.setdefault(m["layer"], m["prefix"])
    return dict(sorted(found.items(), key=lambda kv: int(kv[0].split("_")[1])))


def expert_table(records: list[dict], layers: dict[str, str]) -> list[str]:
    lines = ["| layer | MaxVio start | MaxVio end | MaxVio batch end | CV end | load p99 end "
             "| dead experts end | bias min | bias max |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [(layer, f"{prefix}{layer}/") for layer, prefix in layers.items()]
    if layers:
        rows.append(("**all**", next(iter(layers.values()))))
    for label, p in rows:
        vio = _series(records, p + ("max_vio" if label != "**all**" else "max_vio_mean"))
        last = lambda k: (_series(records, p + k) or [(None, None)])[-1][1]  # noqa: E731
        batch = last("max_vio_batch" if label != "**all**" else "max_vio_batch_mean")
        cv = last("load_cv" if label != "**all**" else "load_cv_mean")
        lines.append(f"| {label} | {_fmt(vio[0][1] if vio else None)} | {_fmt(vio[-1][1] if vio else None)} "
                     f"| {_fmt(batch)} | {_fmt(cv)} | {_fmt(last('load_p99'))} | {_fmt(last('dead_experts'))} "
                     f"| {_fmt(last('bias_min'))} | {_fmt(last('bias_max'))} |")
    return lines


def _spark(style: str, num_experts: int) -> bool:
    return style == "spark" or (style == "auto" and num_experts > 32)


def load_chart(layer: str, step: int, load: list[float], style: str, width: int = 40) -> list[str]:
    """ASCII chart of one layer's per-expert load, relative to balanced (1.00 = 1/E)."""
    rel = [v * len(load) for v in load]
    if _spark(style, len(load)):
        spark = "".join(SPARK[min(len(SPARK) - 1, round(min(r, 2.0) / 2.0 * (len(SPARK) - 1)))] for r in rel)
        return [f"{layer} step {step} |{spark}| min {min(rel):.2f} max {max(rel):.2f}"]
    top = max(rel) or 1.0
    digits = len(str(len(load) - 1))
    out = [f"{layer} step {step} (load / balanced load)"]
    out += [f"  e{e:0{digits}d} |{'#' * round(r / top * width):<{width}}| {r:.2f}" for e, r in enumerate(rel)]
    return out


def build_report(path: str, style: str = "auto") -> str:
    """The markdown report of the metrics file at ``path``; ReportError if it holds no records."""
    try:
        records, bad = read_records(path)
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror or err}") from err
    if not records:
        raise ReportError(f"{path} holds no metrics records" + (
            f": none of its {bad} line(s) is a JSON object with a step (is it a metrics JSONL file?)"
            if bad else ""))
    md = ["# dsv3 run report", "", f"- source: `{path}`",
          f"- steps: {records[0]['step']} .. {records[-1]['step']} ({len(records)} logged steps)"]
    if bad:
        md.append(f"- skipped {bad} malformed line(s)")
    train = training_table(records)
    if train:
        md += ["", "## Training", ""] + train
    layers = _layers(records)
    if layers:
        md += ["", "## Expert load", "",
               "MaxVio = max load / mean load - 1 (0 = balanced); start/end = first/last logged "
               "interval; bias = the aux-loss-free balancing bias b_i.", ""]
        md += expert_table(records, layers)
        charts, sparks = [], False
        for layer, prefix in layers.items():
            loads = [(r["step"], r[f"{prefix}{layer}/load"]) for r in records
                     if isinstance(r.get(f"{prefix}{layer}/load"), list)]
            if loads and loads[-1][1]:
                charts += load_chart(layer, *loads[-1], style)
                sparks |= _spark(style, len(loads[-1][1]))
        if charts:
            legend = (f"One character per expert, '{SPARK}' from 0 to 2x the balanced load 1/E." if sparks else
                      "One bar per expert, scaled to the layer's busiest; numbers are load / (1/E).")
            md += ["", "## Per-expert load (last logged step)", "", legend, "", "```"] + charts + ["```"]
    return "\n".join(md) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3-report", description=__doc__.splitlines()[0])
    parser.add_argument("path", metavar="RUN_DIR_OR_JSONL", help=f"run directory (holding {METRICS_FILENAME}) "
                        "or a metrics JSONL file")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--chart", choices=("auto", "bars", "spark"), default="auto",
                        help="per-expert chart: one bar per expert, or one character per expert "
                             "(auto: bars up to 32 experts)")
    args = parser.parse_args(argv)
    path = os.path.join(args.path, METRICS_FILENAME) if os.path.isdir(args.path) else args.path
    try:
        if not os.path.isfile(path):
            raise ReportError(f"no metrics file at {path} "
                              f"(give a JSONL file or a run directory holding {METRICS_FILENAME})")
        report = build_report(path, args.chart)
        if args.out:
            _write(args.out, report)
    except ReportError as err:
        print(f"dsv3-report: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(report)
    return 0


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise ReportError(f"cannot write the report to {path}: {err.strerror or err}") from err


if __name__ == "__main__":
    sys.exit(main())
