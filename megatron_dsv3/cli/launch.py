"""dsv3-launch RUN.yaml: preflight, render the sbatch script for dsv3-train, submit it (or print it).

Exit codes: 0 submitted (or printed), 2 refused (one line naming the setting or file), 1 sbatch
refused the job, or a bug (its traceback, then a line saying so).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_dsv3.cli.guard import entry_point
from megatron_dsv3.launch.preflight import PreflightError, preflight
from megatron_dsv3.launch.render import render_sbatch
from megatron_dsv3.launch.run import LaunchConfigError, load_run
from megatron_dsv3.launch.submit import SubmitError, submit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3-launch", description=__doc__)
    parser.add_argument("config", help="run YAML (the file dsv3-train reads)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides; launch.* shape the job, the others are also passed to dsv3-train")
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    parser.add_argument("--script", help="where to write the script (default: launch.output_dir/JOB_NAME.sbatch)")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="report the memory estimate but do not refuse on it")
    return parser


@entry_point("dsv3-launch")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        run = load_run(args.config, args.overrides)
        report = preflight(run, check_memory=not args.skip_memory_check)
        script = render_sbatch(run, args.config, args.overrides, report=report)
    except (LaunchConfigError, PreflightError, FileNotFoundError) as error:
        print(f"dsv3-launch: refused: {error}", file=sys.stderr)
        return 2
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
