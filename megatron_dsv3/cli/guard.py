"""The last line of every entry point: an expected failure has already been said in one sentence
(exit 2, or the code `exit_status` names); anything that escapes is a bug, and says so.

    @entry_point("dsv3-report")
    def main(argv=None) -> int: ...

An exception that reaches the decorator prints its traceback, then one line naming it a bug in
megatron_dsv3, and the command exits `exit_status.BUG` (1). Ctrl-C prints one line and exits
`exit_status.INTERRUPTED` (130). argparse's own exits (usage errors: 2) pass through.
"""
from __future__ import annotations

import functools
import sys
import traceback
from typing import Callable

from megatron_dsv3 import exit_status


def bug_line(prog: str, error: BaseException) -> str:
    return (f"{prog}: the traceback above is a bug in megatron_dsv3 ({type(error).__name__} escaped every "
            "check), not a problem with your input: please report it with the traceback")


def entry_point(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
                return exit_status.INTERRUPTED
            except Exception as error:  # noqa: BLE001 - the one place a bug is reported as such
                traceback.print_exc()
                print(bug_line(prog, error), file=sys.stderr, flush=True)
                return exit_status.BUG
        return guarded
    return wrap
