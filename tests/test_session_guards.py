"""tests/conftest.py's guards, on a pytest session of their own: HOME is a temporary folder removed
at the end, a `system` test skips naming DSV3_SYSTEM_TESTS, and a process left running (here an
orphan that left pytest's process tree) is named, killed, and fails the session."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent

INNER_TESTS = '''
import os
import subprocess
from pathlib import Path

import pytest

OUT = Path(os.environ["GUARD_OUT"])


def test_home_is_a_temporary_folder():
    (OUT / "home").write_text(os.path.expanduser("~"))


@pytest.mark.system
def test_marked_system():
    (OUT / "system-ran").write_text("yes")


def test_leaves_an_orphan():
    # `sh` starts the sleep in the background and exits: the sleep is reparented away from pytest.
    subprocess.run(["sh", "-c", "sleep 300 & echo $! > " + str(OUT / "orphan.pid")], check=True)
'''


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_the_session_skips_system_tests_isolates_home_and_fails_on_a_leftover_process(tmp_path):
    inner, out = tmp_path / "inner", tmp_path / "out"
    inner.mkdir()
    out.mkdir()
    (inner / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (inner / "test_inner.py").write_text(INNER_TESTS)
    (inner / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: x\n    slow: x\n    system: x\n")
    env = {k: v for k, v in os.environ.items() if k != "DSV3_SYSTEM_TESTS"}
    env["GUARD_OUT"] = str(out)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(inner)],
                          cwd=inner, env=env, capture_output=True, text=True, timeout=120)
    report = done.stdout + done.stderr

    orphan = int((out / "orphan.pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(orphan):  # the guard failed: do not leave it behind either
        psutil.Process(orphan).kill()
        raise AssertionError(f"the orphan sleep (pid {orphan}) outlived the session:\n{report}")
    assert done.returncode == 1, report
    assert "still running at the end" in report and f"pid {orphan}: sleep 300" in report, report
    assert "2 passed, 1 skipped" in report, report

    assert not (out / "system-ran").exists()
    assert "set DSV3_SYSTEM_TESTS=1 to run it" in report, report

    home = Path((out / "home").read_text())
    assert home.is_relative_to(tempfile.gettempdir()) and str(home) != env["HOME"], home
    assert not home.exists(), "the session's HOME was not removed"
