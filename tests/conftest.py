"""Shared fixtures: leak checks for every test, and helpers to run real multi-process jobs.

Every test fails if it leaves a child process, a non-daemon thread, a PHALANX_* variable or a
phalanx shared-memory segment behind (the style of torchft's and Lightning Fabric's suites).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECKS = r'''
fails, checks = [], [0]
def check(label, ok, detail=""):
    checks[0] += 1
    if not ok:
        fails.append(f"{label}: {detail}")

def raises(label, exc, fn):
    try:
        fn()
    except exc as e:
        check(label, True)
        return str(e)
    except Exception as e:
        check(label, False, f"raised {type(e).__name__}: {e}")
        return ""
    check(label, False, f"did not raise {exc.__name__}")
    return ""
'''
"""Worker-script preamble for jobs that run many checks and report failures as data:
`check(label, ok, detail)` and `raises(label, exc, fn)` (the message, or "")."""


def _children() -> set[int]:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


def _segments() -> set[str]:
    try:
        # Segments of phalanx jobs are named phalanx-<job>-g<generation>[-h<host index>]-<token>,
        # their buffers <segment>.b<local rank>.<seq>-<token>, a segment being made
        # <segment>.new-<random> (see phalanx.comm.shmnames).
        return {n for n in os.listdir("/dev/shm") if re.fullmatch(
            r"phalanx-[\w-]+-g\d+(-h\d+)?-[0-9a-f]{16}"
            r"(\.b\d+\.\d+-[0-9a-f]{16}|\.new-[0-9a-f]{16})?", n)}
    except FileNotFoundError:
        return set()


XDIST = "PYTEST_XDIST_WORKER" in os.environ
"""Under pytest-xdist (`-n 2`) several tests run at once on this machine: /dev/shm is shared
between them, so segments are checked once for the whole session (`pytest_sessionfinish`)
instead of per test; every other check stays per test (it is per process)."""

# Tests that must not overlap run on one xdist worker at a time (`--dist loadgroup`): the Slurm
# cluster (one slurmctld on this machine), the other simulated-hosts tests (link shaping and
# timing-sensitive host losses), and the engines (a local Ray, a Spark local-cluster).
_ENGINE_FILES = ("test_ray.py", "test_spark.py", "test_spark_standalone.py",
                 "test_bench_iterative.py", "test_bench_recovery_engines.py")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"slurm_cluster", "own_slurm_cluster"} or item.path.name == "test_slurm.py":
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif "simhosts" in names:
            item.add_marker(pytest.mark.xdist_group("hosts"))
        elif item.path.name in _ENGINE_FILES:
            item.add_marker(pytest.mark.xdist_group("engines"))


def pytest_sessionstart(session) -> None:
    session.config._phalanx_segments = _segments()


def pytest_sessionfinish(session, exitstatus) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller checks once for all of them
    deadline = time.monotonic() + 5
    left = _segments() - session.config._phalanx_segments
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _segments() - session.config._phalanx_segments
    if left:
        session.config.get_terminal_writer().line(
            f"the test session left shared-memory segments {sorted(left)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def no_leaks():
    env_before = {k: v for k, v in os.environ.items() if k.startswith("PHALANX_")}
    threads_before = {t.ident for t in threading.enumerate()}
    kids_before, segs_before = _children(), _segments()
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = _children() - kids_before
        threads = [t for t in threading.enumerate()
                   if t.ident not in threads_before and t.is_alive() and not t.daemon]
        if not kids and not threads:
            break
        time.sleep(0.05)
    env_after = {k: v for k, v in os.environ.items() if k.startswith("PHALANX_")}
    segs = _segments() - segs_before
    assert not kids, f"test left child processes {sorted(kids)}"
    assert not threads, f"test left threads {threads}"
    assert env_after == env_before, "test changed PHALANX_* environment variables"
    assert XDIST or not segs, f"test left shared-memory segments {sorted(segs)}"


def run_job(tmp_path: Path, script: str, np: int, *launcher_args: str, script_args: tuple[str, ...] = (),
            timeout: float = 90, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Write `script` to tmp_path and run it under `phalanx run -np N`; never hangs."""
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(script))
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(np), *launcher_args,
           str(path), *script_args]
    return run_cmd(cmd, tmp_path, timeout, full_env)


def run_cmd(cmd: list[str], cwd: Path, timeout: float,
            env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in its own session; past `timeout` kill the whole session and fail with what
    it printed. Never hangs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} did not finish within {timeout}s\n"
                             f"stdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def job(tmp_path):
    """`job(script, np, *launcher_args, ...)` runs a real multi-process job in tmp_path."""
    def _run(script: str, np: int, *args: str, **kw):
        return run_job(tmp_path, script, np, *args, **kw)
    return _run


def run_bench(args: list[str], cwd: Path, timeout: float) -> str:
    """`phalanx bench ARGS` with this tree's phalanx; its output. Past `timeout` it gets a
    SIGTERM (the benchmarks stop their jobs on it) and the test fails with what it printed."""
    import signal
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep +
           os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.cli", "bench", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            text, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        pytest.fail(f"phalanx bench {' '.join(args)} did not finish in {timeout:.0f}s:\n{text}")
    assert proc.returncode == 0, text
    return text
