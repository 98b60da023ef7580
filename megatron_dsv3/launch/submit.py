"""Hand a rendered script to sbatch."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class SubmitError(RuntimeError):
    """sbatch is missing or refused the script."""


def submit(script: str | Path) -> int:
    """`sbatch --parsable SCRIPT` from the current directory; returns the job id."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH; use --dry-run to print the script instead")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SubmitError(f"sbatch refused {script}: {done.stderr.strip() or done.stdout.strip()}")
    return int(done.stdout.strip().split(";")[0])
