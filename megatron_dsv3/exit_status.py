"""The exit codes of dsv3-train (and of the commands that relay them), and their record for
dsv3-torchrun: torchrun reports any failed worker as 1, so the wrapper learns from these files
that the ranks saved and exited 75 (preempted).

    record(75)                    # in each rank, as it exits: $DSV3_EXIT_STATUS_DIR/rank-<RANK>
    recorded(directory)           # in the wrapper: {"rank-0": 75, "rank-1": 75}

Without $DSV3_EXIT_STATUS_DIR (dsv3-train alone, under srun or plain torchrun) nothing is written.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "DSV3_EXIT_STATUS_DIR"

DONE = 0
BUG = 1  # an unexpected error: its traceback, then a line saying it is a bug (`cli.guard`)
REFUSED = 2  # bad input, named in the message, before any compute
DIVERGED = 3  # NaN or a loss above train.max_loss
TIMED_OUT = 4  # a collective or a checkpoint write outlasted its bound: a rank stalled or died
# A checkpoint (dsv3-train) or a converter's output (dsv3-convert) could not be written: disk full,
# an I/O error. The partial folder is removed; the previous checkpoint, `latest` and an existing
# output folder are as they were.
WRITE_FAILED = 5
PREEMPTED = 75  # SIGTERM / SIGUSR1 after saving a checkpoint (EX_TEMPFAIL: Slurm requeues on it)
INTERRUPTED = 130  # Ctrl-C (SIGINT, 128 + 2): saved at the end of the step, or said why not


def record(code: int) -> None:
    """Write this process's exit code into $DSV3_EXIT_STATUS_DIR, if set; a failure only warns."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    name = f"rank-{os.environ['RANK']}" if "RANK" in os.environ else f"pid-{os.getpid()}"
    partial = Path(directory) / f".{name}.partial"
    try:
        partial.write_text(f"{code}\n")
        os.replace(partial, partial.with_name(name))  # the reader never sees half a file
    except OSError as error:
        print(f"dsv3-train: could not record exit code {code} in {ENV}={directory}: {error}", file=sys.stderr)


def recorded(directory: str | Path) -> dict[str, int]:
    """The exit codes written into `directory`, by file name."""
    return {path.name: int(path.read_text()) for path in Path(directory).iterdir() if not path.name.startswith(".")}
