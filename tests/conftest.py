"""What every test shares: CPU unless marked `gpu`, a fixed seed, and a session that leaves the
machine as it found it.

- HOME is a temporary folder for the session (removed at its end), so the corpus cache
  (~/.cache/megatron_dsv3, which real runs use), matplotlib's and wandb's settings and pip's cache
  land there and not in the user's home.
- Tests marked `system` (they install system packages, write outside the repository and
  temporary folders, or start daemons) run only when DSV3_SYSTEM_TESTS=1; .ci/run sets it.
- A process the tests started that is still running when the session ends is listed, killed,
  and fails the session: it is found as a child of pytest or, if it left the tree, by a marker
  in its environment that every process started from here inherits. wandb's service is torn down
  first; helpers that end with pytest itself (multiprocessing's resource tracker and Manager
  servers) are not counted.
"""
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import resource_tracker

import psutil
import pytest

SYSTEM_TESTS = "DSV3_SYSTEM_TESTS"
SESSION_MARKER = "DSV3_TEST_SESSION"

# Before torch or anything else reads HOME.
_HOME = tempfile.mkdtemp(prefix="dsv3-tests-home-")
os.environ["HOME"] = _HOME
os.environ[SESSION_MARKER] = f"{os.getpid()}-{os.path.basename(_HOME)}"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402  (after HOME is set)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """On a CUDA host the CPU tests still run on the CPU: CUDA is hidden from this process and from
    the processes a test starts, except in tests marked `gpu`, which use it."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get(SYSTEM_TESTS) == "1":
        return
    skip = pytest.mark.skip(reason=f"changes the machine (system packages, files outside the repository "
                                   f"and temporary folders, or daemons): set {SYSTEM_TESTS}=1 to run it")
    for item in items:
        if item.get_closest_marker("system") is not None:
            item.add_marker(skip)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _started_here() -> list[psutil.Process]:
    """Live processes started by this session: pytest's descendants, and any process that carries
    this session's marker in its environment (a daemon or an orphan that left the tree)."""
    me = psutil.Process()
    # What multiprocessing ends when this process exits: its resource tracker (it reads a pipe from
    # here) and the children it started here (Manager servers, such as the one Megatron-Core's
    # checkpoint writer keeps for the life of the process, are shut down by their finalizers).
    exempt = {me.pid, getattr(resource_tracker._resource_tracker, "_pid", None),
              *(child.pid for child in multiprocessing.active_children())}
    found = {p.pid: p for p in me.children(recursive=True) if p.pid not in exempt}
    marker = os.environ[SESSION_MARKER]
    for process in psutil.process_iter():
        if process.pid in exempt or process.pid in found:
            continue
        try:
            if process.environ().get(SESSION_MARKER) == marker:
                found[process.pid] = process
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
    return [p for p in found.values() if _running(p)]


def _still_running(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    processes = [p for p in processes if _running(p)]
    while processes and time.monotonic() < deadline:
        time.sleep(0.1)
        processes = [p for p in processes if _running(p)]
    return processes


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200] or process.name()}"
    except psutil.Error:
        return f"pid {process.pid}"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if "wandb" in sys.modules:  # its service process lives as long as this one unless torn down
        sys.modules["wandb"].teardown()
    # A helper that ends with its parent (a browser's crash handler) may take a moment to go.
    leftovers = _still_running(_started_here(), seconds=5)
    if leftovers:
        listing = "\n".join(f"  {_describe(p)}" for p in leftovers)
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                pass
        _still_running(leftovers, seconds=10)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"processes started by the tests were still running at the end (killed now):\n{listing}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(_HOME, ignore_errors=True)
