"""dsv3-launch RUN.yaml: preflight, render the sbatch script for dsv3-train, submit it (or print it).

dsv3-launch RUN.yaml --rehearse [--rank R ...] [--json] [--routing balanced|maxvio=X]

rehearses ranks of the run on this machine's CPU instead (`megatron_dsv3.rehearse`: one training
step of the rank at full size on the meta device, under a fake process group of the job's world):
a table (or JSON) of its peak device memory by kind beside the analytic estimate. Exit 2 when a
rank's peak and the preset's reserve exceed the GPU's memory, 1 when the step fails (a tensor on
the CPU, a host read it cannot answer). `--rehearsal-check` runs the same before submitting, for
the first, middle and last pipeline ranks.

Exit codes: 0 submitted (or printed), 2 refused (one line naming the setting or file), 1 sbatch
refused the job, or a bug (its traceback, then a line saying so).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_dsv3.cli.guard import entry_point
from megatron_dsv3.launch.preflight import PreflightError, preflight
from megatron_dsv3.launch.presets import gpu_memory_gib, load_preset
from megatron_dsv3.launch.render import render_sbatch
from megatron_dsv3.launch.run import LaunchConfigError, load_run, tasks_per_node, world_size
from megatron_dsv3.launch.submit import SubmitError, submit
from megatron_dsv3.rehearse import RehearsalError, RoutingError, rehearse
from megatron_dsv3.run_config import RunConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3-launch", description=__doc__)
    parser.add_argument("config", help="run YAML (the file dsv3-train reads)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides; launch.* shape the job, the others are also passed to dsv3-train")
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    parser.add_argument("--script", help="where to write the script (default: launch.output_dir/JOB_NAME.sbatch)")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="report the memory estimate but do not refuse on it")
    rehearsal = parser.add_argument_group("rehearsal (one training step of a rank on the meta device; no GPU)")
    rehearsal.add_argument("--rehearse", action="store_true", help="rehearse --rank(s) and report; submit nothing")
    rehearsal.add_argument("--rank", type=int, action="append", metavar="R",
                           help="global rank to rehearse (repeatable; default 0)")
    rehearsal.add_argument("--routing", default="balanced",
                           help="expert counts the dispatcher assumes: balanced, or maxvio=X (one expert of the "
                                "rank at (1+X) x the mean load)")
    rehearsal.add_argument("--json", action="store_true", help="print the rehearsals as JSON")
    rehearsal.add_argument("--rehearsal-check", action="store_true",
                           help="before submitting, rehearse the first, middle and last pipeline ranks and refuse "
                                "the job if one does not fit (minutes per rank at full size)")
    return parser


def pipeline_heads(run: RunConfig) -> list[int]:
    """The global rank of data rank 0 of the first, middle and last pipeline stages (Megatron-Core's
    order tp-cp-ep-dp-pp puts the pipeline rank outermost)."""
    pipeline = run.parallel.pipeline
    per_stage = world_size(run) // pipeline
    return sorted({p * per_stage for p in (0, pipeline // 2, pipeline - 1)})


def run_rehearsals(run: RunConfig, ranks: list[int], routing: str) -> list:
    """Each rank rehearsed (RehearsalError: the step failed; RoutingError, PreflightError: refused)."""
    preset = load_preset(run.launch.env_preset)
    capacity = gpu_memory_gib(preset)
    reserve = float(preset.get("reserve_gib", 0)) if capacity is not None else 0.0
    return [rehearse(run, rank, world_size(run), tasks_per_node(run), routing, capacity, reserve) for rank in ranks]


def rehearse_main(run: RunConfig, ranks: list[int], routing: str, as_json: bool) -> int:
    """Print the rehearsals of `ranks`; 2 when one does not fit."""
    rehearsals = run_rehearsals(run, ranks, routing)
    if as_json:
        print(json.dumps([r.to_dict() for r in rehearsals], indent=1))
    else:
        print("\n\n".join(r.table() for r in rehearsals))
    too_big = [r for r in rehearsals if r.fits is False]
    for r in too_big:
        print(f"dsv3-launch: refused: {r.refusal()}", file=sys.stderr)
    return 2 if too_big else 0


@entry_point("dsv3-launch")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        run = load_run(args.config, args.overrides)
        if args.rehearse:
            preflight(run, check_memory=False)  # the plan's refusals first, by name
            return rehearse_main(run, args.rank or [0], args.routing, args.json)
        report = preflight(run, check_memory=not args.skip_memory_check)
        script = render_sbatch(run, args.config, args.overrides, report=report)
        if args.rehearsal_check:
            too_big = [r for r in run_rehearsals(run, pipeline_heads(run), args.routing) if r.fits is False]
            if too_big:
                raise PreflightError("; ".join(r.refusal() for r in too_big))
    except (LaunchConfigError, PreflightError, FileNotFoundError, RoutingError) as error:
        print(f"dsv3-launch: refused: {error}", file=sys.stderr)
        return 2
    except RehearsalError as error:
        print(f"dsv3-launch: the rehearsed step failed: {error}", file=sys.stderr)
        return 1
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    output_dir = Path(run.launch.output_dir)
    path = Path(args.script) if args.script else output_dir / f"{run.launch.job_name}.sbatch"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
        path.write_text(script)
    except OSError as error:
        print(f"dsv3-launch: refused: cannot write the batch script {path} (launch.output_dir={output_dir}): "
              f"{error.strerror or error}", file=sys.stderr)
        return 2
    try:
        job_id = submit(path)
    except SubmitError as error:
        print(f"dsv3-launch: {error}", file=sys.stderr)
        return 1
    print(f"dsv3-launch: submitted job {job_id} ({path}); per-rank logs in {output_dir}/{job_id}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
