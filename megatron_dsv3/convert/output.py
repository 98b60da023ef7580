"""A converter's output folder: refused when it holds files (unless replacing), written as
`OUT.tmp`, and put in place only once complete.

    tmp = begin(out, replace=False)   # OutputExistsError if OUT holds files and replace is False
    ...write into tmp...
    finish(tmp, out)                  # OUT now holds exactly what was written; the old files are gone
    abort(tmp)                        # on any failure: OUT is as it was

A write that fails (disk full, an I/O error) becomes `OutputWriteError` after `abort`: one
sentence naming OUT, the cause and the free space, and saying OUT was left as it was.

    with writing(out, tmp): ...       # any failure of a write (an OSError in its chain) becomes that sentence
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator, Optional

from megatron_dsv3.checkpoint.dist import os_error_in


class OutputExistsError(FileExistsError):
    """The output folder holds files and replacing it was not asked for."""


class OutputWriteError(RuntimeError):
    """Writing the output failed; its partial folder is removed, an existing output is untouched."""


def _tmp(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def begin(out: str | Path, replace: bool) -> Path:
    """Check `out` may be written and make its empty `.tmp` folder (a leftover one is removed)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise OutputExistsError(f"{out} exists and holds files: give --replace to replace it (its old files are "
                                "removed once the new output is complete), or choose another folder")
    tmp = _tmp(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as error:
        raise failed(out, error) from None
    return tmp


def finish(tmp: Path, out: str | Path) -> Path:
    """Put the complete `tmp` in place of `out`; an old `out` is removed only after the swap."""
    out = Path(out)
    old = out.with_name(out.name + ".replaced")
    try:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
    except OSError as error:
        if old.exists() and not out.exists():
            old.rename(out)
        abort(tmp)
        raise failed(out, error) from None
    shutil.rmtree(old, ignore_errors=True)
    return out


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writing(out: str | Path, tmp: Path) -> Iterator[None]:
    """Inside, a failure is aborted (`tmp` removed) and re-raised; one caused by an OSError (disk
    full, an I/O error; torch.save wraps it in a RuntimeError) becomes OutputWriteError."""
    try:
        yield
    except BaseException as error:
        abort(tmp)
        cause = os_error_in(error)
        if cause is None or isinstance(error, OutputWriteError):
            raise
        raise failed(out, cause, tmp) from None


def failed(out: str | Path, error: OSError, tmp: Optional[Path] = None) -> OutputWriteError:
    """The sentence for a failed write of `out` (after `abort`)."""
    out = Path(out)
    try:
        usage = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd())
        free = f"; {usage.free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    state = "is as it was" if out.exists() else "was not created"
    return OutputWriteError(f"could not write {out} ({error.strerror or error}{free}): removed the partial "
                            f"{(tmp or _tmp(out)).name}; {out} {state}")
