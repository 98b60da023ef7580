"""dsv3-torchrun [torchrun options] COMMAND ...: torchrun whose ranks a preemption stops cleanly.

torchrun itself cannot take Slurm's preemption signals: SIGUSR1 kills it at once while its ranks
train on as orphans, and on SIGTERM it stops the ranks (SIGKILL after its 30 s shutdown timeout)
and exits 1 whatever they returned, never dsv3-train's 75. Its exit code cannot be changed, so
this wrapper runs `python -m torch.distributed.run ARGS` as a child (without the traceback torchrun
prints when a worker failed: the ranks have said why) and

- starts it in a session of its own with SIGUSR1 ignored, a disposition the ranks inherit until
  dsv3-train installs its handler: a signal to the wrapper's process group, or srun's to every
  process of the step, leaves torchrun running;
- on SIGUSR1 or SIGTERM sends SIGUSR1 to the ranks (torchrun's children), never to torchrun, and
  again every REPEAT_SECONDS until torchrun exits (a rank still starting up ignores it); SIGINT,
  SIGHUP and SIGQUIT go to torchrun, which stops the ranks as usual;
- gives the ranks a temporary folder in $DSV3_EXIT_STATUS_DIR, where dsv3-train records its exit
  code (megatron_dsv3.exit_status), and exits with the ranks' code when the ranks that recorded
  one all recorded the same non-zero code (75 preempted, 130 Ctrl-C, 2 refused input, ...),
  torchrun's own code otherwise (128 + N when signal N ended it); the folder is then removed;
- on Linux adopts what a dead rank leaves behind (child subreaper: a checkpoint writer that was
  mid-save, the resource tracker it keeps alive) and kills it once torchrun has exited.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import psutil

from megatron_dsv3 import exit_status
from megatron_dsv3.cli.guard import entry_point

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
REPEAT_SECONDS = 5.0
POLL_SECONDS = 0.5
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
# `python -m torch.distributed.run`, but a failed worker ends it with exit 1 and no traceback of
# its own: the ranks have said why (one line each), and the wrapper says which code it relays.
TORCHRUN = ("import sys\nfrom torch.distributed.elastic.multiprocessing.errors import ChildFailedError\n"
            "from torch.distributed.run import main\ntry:\n    main()\nexcept ChildFailedError:\n    sys.exit(1)\n")


def _log(message: str) -> None:
    print(f"dsv3-torchrun: {message}", file=sys.stderr, flush=True)


def _torchrun_signals() -> None:
    """In the torchrun child before exec: default dispositions, SIGUSR1 ignored, nothing blocked."""
    for sig in (signal.SIGTERM, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*PREEMPTION_SIGNALS, *STOP_SIGNALS))


class Relay:
    """The wrapper's signal handlers and its wait for torchrun."""

    def __init__(self) -> None:
        self.torchrun: Optional[subprocess.Popen] = None
        self.preempted = False
        self.next_forward = 0.0

    def start(self, args: Sequence[str], status_dir: str) -> None:
        """Install the handlers, then start torchrun with the signals held until `self.torchrun` is set."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self.preempt)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.stop)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, (*PREEMPTION_SIGNALS, *STOP_SIGNALS))
        try:
            self.torchrun = subprocess.Popen([sys.executable, "-c", TORCHRUN, *args],
                                             env={**os.environ, exit_status.ENV: status_dir},
                                             start_new_session=True, preexec_fn=_torchrun_signals)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def preempt(self, signum: int, frame) -> None:
        if not self.preempted:
            _log(f"received {signal.Signals(signum).name}; asking the ranks to checkpoint and stop")
        self.preempted = True
        self.next_forward = 0.0

    def stop(self, signum: int, frame) -> None:
        self.torchrun.send_signal(signum)

    def wait(self) -> int:
        """torchrun's exit code, signalling the ranks meanwhile once preempted."""
        while True:
            try:
                return self.torchrun.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            if self.preempted and time.monotonic() >= self.next_forward:
                self.signal_ranks()
                self.next_forward = time.monotonic() + REPEAT_SECONDS

    def signal_ranks(self) -> None:
        try:
            ranks = psutil.Process(self.torchrun.pid).children()
        except psutil.NoSuchProcess:
            return
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.send_signal(signal.SIGUSR1)


def adopt_orphans() -> None:
    """Become the parent of processes orphaned below this one (Linux), so `end_leftovers` sees them."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)


def end_leftovers() -> None:
    """Kill and reap what still runs below the wrapper once torchrun is gone: orphans of dead ranks
    (they block or ignore SIGTERM, so SIGKILL)."""
    leftovers = psutil.Process().children(recursive=True)
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            _log(f"killing pid {process.pid} left behind by a rank: {' '.join(process.cmdline())[:160]}")
            process.kill()
    psutil.wait_procs(leftovers, timeout=10)


def exit_code(torchrun_code: int, rank_codes: dict[str, int]) -> int:
    """The ranks' code when every rank that recorded one recorded the same non-zero code (torchrun
    reports any failed worker as 1); else torchrun's code (128 + N for signal N)."""
    codes = set(rank_codes.values())
    if len(codes) == 1 and codes != {exit_status.DONE}:
        return codes.pop()
    return 128 - torchrun_code if torchrun_code < 0 else torchrun_code


@entry_point("dsv3-torchrun")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        status_dir = tempfile.mkdtemp(prefix="dsv3-exit-status-")
    except OSError as error:
        _log(f"cannot make a folder for the ranks' exit codes in TMPDIR={os.environ.get('TMPDIR', '/tmp')}: "
             f"{error.strerror or error}")
        return exit_status.REFUSED
    try:
        adopt_orphans()
        relay = Relay()
        relay.start(args, status_dir)
        torchrun_code = relay.wait()
        end_leftovers()
        code = exit_code(torchrun_code, exit_status.recorded(status_dir))
        if code == exit_status.PREEMPTED != torchrun_code:
            _log(f"the ranks saved a checkpoint and exited {code} (torchrun exited {torchrun_code}); exiting {code}")
        elif code != torchrun_code and torchrun_code >= 0:
            _log(f"the ranks exited {code} (torchrun exited {torchrun_code}); exiting {code}")
        return code
    finally:
        # Python resets its handlers to the default while the interpreter exits, and SIGUSR1's default
        # is to die: a warning still repeated by the batch script must not turn 75 into a kill.
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
