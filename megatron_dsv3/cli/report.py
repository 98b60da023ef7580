"""dsv3-report: a markdown summary of a run's metrics.jsonl, expert load included, or an HTML page of plots.

    dsv3-report runs/tiny            # or runs/tiny/metrics.jsonl
    dsv3-report runs/tiny --out report.md
    dsv3-report runs/tiny --html report.html   # one self-contained page, PNG plots embedded

Bounds: a line longer than MAX_LINE_BYTES is skipped as malformed (unread past the limit), and a
file of more than MAX_RECORDS logged steps is refused; a value that is not what the logger
writes (a step that is not a count, a list of non-numbers or non-finite numbers) is skipped and
counted. Exit codes: 0 done, 2 an unusable file or option (one line), 1 a bug.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from typing import Any, Optional

from megatron_dsv3.cli.guard import entry_point
from megatron_dsv3.monitor import plots
from megatron_dsv3.monitor.logger import METRICS_FILENAME

TRAIN_KEYS = ("loss", "mtp_loss", "valid/loss", "valid/mtp_loss", "mtp/acceptance", "balance_loss", "grad_norm", "lr",
              "tokens_per_s")  # valid/*: the held-out split's, at each evaluation (train.eval_interval)
SPARK = " .:-=+*#%@"  # 0 .. 2x the balanced load, one character per expert
MAX_LINE_BYTES = 16 * 2**20  # a record of 61 MoE layers x 256 experts is about 1 MB
MAX_RECORDS = 1_000_000  # logged steps
PER_EXPERT = ("/load", "/tokens", "/starved_steps", "/bias")  # lists of numbers, one per expert (ExpertLoadTracker)


class ReportError(ValueError):
    """A metrics file that cannot be reported on; the message names the file and the problem."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lines(f) -> Any:
    """The lines of a binary file, each at most MAX_LINE_BYTES; a longer one is skipped to its end
    and yields None."""
    while line := f.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            yield None
        else:
            yield line


def _parse(line: bytes) -> tuple[Optional[dict[str, Any]], int]:
    """(the record of one line or None, the number of malformed values dropped from it). A record
    is a JSON object whose step is a count; list values must be lists of finite numbers."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None, 0
    step = rec.get("step") if isinstance(rec, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
        return None, 0
    dropped = [key for key, value in rec.items() if isinstance(value, dict) or (
        (isinstance(value, list) or key.endswith(PER_EXPERT)) and not (
            isinstance(value, list) and all(_number(v) for v in value)))]
    for key in dropped:
        del rec[key]
    return rec, len(dropped)


def read_records(path: str) -> tuple[list[dict[str, Any]], int]:
    """Records merged per step, in step order; returns (records, malformed line and value count).

    A line that is not a JSON object with a step (one torn by a kill, or not text at all) is
    counted and skipped, and so is a malformed value in a good line. A step lower than the
    previous line's means the run resumed from a checkpoint: the records of the abandoned steps
    from that step on are dropped. More than MAX_RECORDS steps: ReportError.
    """
    by_step: dict[int, dict[str, Any]] = {}
    bad, last = 0, None
    with open(path, "rb") as f:
        for line in _lines(f):
            if line is not None and not line.strip():
                continue
            rec, dropped = _parse(line) if line is not None else (None, 0)
            bad += dropped if rec is not None else 1
            if rec is None:
                continue
            step = rec["step"]
            if last is not None and step < last:
                by_step = {s: r for s, r in by_step.items() if s < step}
            by_step.setdefault(step, {}).update(rec)
            last = step
            if len(by_step) > MAX_RECORDS:
                raise ReportError(f"{path} holds more than {MAX_RECORDS} logged steps: report on a part of it "
                                  "(e.g. `tail -n 100000`)")
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


def load_records(path: str) -> tuple[list[dict[str, Any]], int]:
    """`read_records`, with a ReportError naming the file when it is unreadable or holds no records."""
    try:
        records, bad = read_records(path)
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror or err}") from err
    if not records:
        raise ReportError(f"{path} holds no metrics records" + (
            f": none of its {bad} line(s) is a JSON object with a step (is it a metrics JSONL file?)"
            if bad else ""))
    return records, bad


def build_report(path: str, style: str = "auto") -> str:
    """The markdown report of the metrics file at ``path``; ReportError if it holds no records."""
    records, bad = load_records(path)
    md = ["# dsv3 run report", "", f"- source: `{path}`",
          f"- steps: {records[0]['step']} .. {records[-1]['step']} ({len(records)} logged steps)"]
    if bad:
        md.append(f"- skipped {bad} malformed line(s) or value(s)")
    train = training_table(records)
    if train:
        md += ["", "## Training", ""] + train
    layers = plots.layers(records)
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


STARVED_ROWS = 30  # the HTML's starved-experts table shows this many, longest starved first
HTML_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.2em .6em;"
              "text-align:right}th{background:#eee}figure{margin:1.5em 0}img{max-width:100%}"
              "figcaption{font-weight:bold;margin-bottom:.3em}")


def _html_table(header: list[str], rows: list[list[str]], cell_attrs: Optional[list[list[str]]] = None) -> str:
    """An HTML table of escaped cell texts; `cell_attrs[i][j]` is written into row i's cell j's tag."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{(cell_attrs[i][j] if cell_attrs else '')}>{html.escape(c)}</td>"
                                    for j, c in enumerate(row)) + "</tr>" for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def build_html(path: str, starved_fraction: float = plots.STARVED_FRACTION) -> str:
    """A self-contained HTML page of the metrics file at ``path``: summary tables and PNG plots
    embedded as data: URIs; ReportError if it holds no records."""
    records, bad = load_records(path)
    try:
        images = plots.all_plots(records, starved_fraction)
    except ImportError as err:
        raise ReportError(str(err)) from err
    parts = [f"<h1>dsv3 run report</h1><p>source: <code>{html.escape(path)}</code><br>steps "
             f"{records[0]['step']} .. {records[-1]['step']} ({len(records)} logged steps)"
             + (f"<br>skipped {bad} malformed line(s) or value(s)" if bad else "") + "</p>"]
    rows, attrs = [], []
    for key in TRAIN_KEYS:
        steps, values = plots.series(records, key)
        if values:
            rows.append([key, _fmt(values[0]), _fmt(values[-1]), str(steps[-1]), _fmt(min(values)),
                         _fmt(sum(values) / len(values))])
            attrs.append(["", "", f' data-metric="{key}" data-last="{values[-1]!r}"', "", "", ""])
    if rows:
        parts.append("<h2>Training</h2>" + _html_table(["metric", "first", "last", "last step", "min", "mean"],
                                                       rows, attrs))
    moe_layers = plots.layers(records)
    if moe_layers:
        vio = [[layer, _fmt(v[0]), _fmt(v[-1]), _fmt(max(v))] for layer, prefix in moe_layers.items()
               for _, v in [plots.series(records, f"{prefix}{layer}/max_vio")] if v]
        parts.append("<h2>Expert load</h2><p>MaxVio = max load / mean load - 1 (0 = balanced); bias = the "
                     "aux-loss-free balancing bias b_i.</p>"
                     + _html_table(["layer", "MaxVio first", "MaxVio last", "MaxVio max"], vio))
        starved = plots.starved_experts(records, moe_layers, starved_fraction)
        ranked = sorted(((count, layer, expert) for layer, counts in starved.items()
                         for expert, count in counts.items()), key=lambda t: -t[0])
        rows = [[layer, str(expert), str(count)] for count, layer, expert in ranked[:STARVED_ROWS]]
        more = f"<p>{len(ranked) - STARVED_ROWS} more not shown.</p>" if len(ranked) > STARVED_ROWS else ""
        parts.append(f"<h3>Starved experts</h3><p>Load below {starved_fraction:g} x the mean load, "
                     "counted over the logged steps; the longest starved first.</p>"
                     + (_html_table(["layer", "expert", "steps starved"], rows) + more if rows
                        else "<p>No expert was starved.</p>"))
    for caption, png in images.items():
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><figcaption>{html.escape(caption)}</figcaption>"
                     f"<img src=\"{uri}\" alt=\"{html.escape(caption)}\"></figure>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dsv3 run report</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


@entry_point("dsv3-report")
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3-report", description=__doc__.splitlines()[0])
    parser.add_argument("path", metavar="RUN_DIR_OR_JSONL", help=f"run directory (holding {METRICS_FILENAME}) "
                        "or a metrics JSONL file")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--out", help="also write the markdown report to this file")
    output.add_argument("--html", metavar="OUT.html", help="write an HTML page of PNG plots (embedded) "
                        "here instead of printing the markdown report")
    parser.add_argument("--starved-below", type=float, default=plots.STARVED_FRACTION, metavar="FRACTION",
                        help="HTML: an expert is starved when its load is below FRACTION x the mean load "
                             "(default %(default)s)")
    parser.add_argument("--chart", choices=("auto", "bars", "spark"), default="auto",
                        help="per-expert chart: one bar per expert, or one character per expert "
                             "(auto: bars up to 32 experts)")
    args = parser.parse_args(argv)
    path = os.path.join(args.path, METRICS_FILENAME) if os.path.isdir(args.path) else args.path
    try:
        if not os.path.isfile(path):
            raise ReportError(f"no metrics file at {path} "
                              f"(give a JSONL file or a run directory holding {METRICS_FILENAME})")
        if not 0 < args.starved_below < 1:  # NaN fails too
            raise ReportError(f"--starved-below must be between 0 and 1, got {args.starved_below}")
        if args.html:
            _write(args.html, build_html(path, args.starved_below))
            print(f"dsv3-report: wrote {args.html}")
            return 0
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
