"""Other local users are not trusted (DESIGN.md, "Trust boundaries"): a real unprivileged user,
created for each test, plants files where phalanx makes its own, and gains nothing.

- shared memory: names the job would use under the old, guessable scheme (files it can write,
  links to a file of root's) are ignored by a real 2-worker job, whose sums stay exact; the
  exact (secret-keyed) names, planted as a file or a link, fail the job with an error naming
  the path, and no link is followed;
- the join file: a planted ``FILE.tmp`` (a file or a link) neither reveals the secret nor makes
  the launcher write through it; the file written is root's, mode 0600.

The attacker runs in a forked child that drops to the user's uid (no interpreter of the
user's own is needed). Needs root (useradd); skipped otherwise.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from phalanx.comm.group import Group, Placement
from phalanx.comm.shmbuf import SharedBuffers
from phalanx.comm.shmnames import buffer_path, segment_path
from phalanx.config import Config
from phalanx.errors import ConfigError
from phalanx.launch import child
from phalanx.launch.procs import write_join_file
from phalanx.launch.shmfiles import cleanup

REPO = Path(__file__).resolve().parent.parent
SHM = "/dev/shm"
VICTIM = b"root's precious file\n"


# ------------------------------------------------------------------------ the other user
@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def _useradd(name: str) -> None:
    for _ in range(20):       # /etc/passwd may be locked by a concurrent useradd/userdel
        r = subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name],
                           capture_output=True, text=True, timeout=30, check=False)
        if r.returncode == 0:
            return
        time.sleep(0.25)
    pytest.fail(f"useradd {name} failed: {r.stderr}")


@pytest.fixture
def attacker() -> Iterator[User]:
    """A fresh unprivileged user, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test creates an unprivileged user (useradd) to play "
                    "another local user")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel to create another local user")
    name = f"advuser-{os.urandom(3).hex()}"
    _useradd(name)
    try:
        pw = pwd.getpwnam(name)
        yield User(name, pw.pw_uid, pw.pw_gid)
    finally:
        for _ in range(20):
            subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30, check=False)
            try:
                pwd.getpwnam(name)
            except KeyError:
                break
            time.sleep(0.25)


def _fork_as(user: User, fn: Callable[..., Any], *args: Any) -> tuple[int, int]:
    """Run fn(*args, out_fd) in a forked child as `user`; (pid, fd to read what it writes)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:            # the child: drop to the user, run, never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            fn(*args, w)
        except BaseException as e:  # noqa: BLE001 (reported to the parent, which fails the test)
            os.write(w, f"\nCHILD ERROR {type(e).__name__}: {e}\n".encode())
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int, timeout: float, kill: bool = False) -> str:
    """What the child wrote until it exited (after SIGKILL with `kill`); reaps it."""
    if kill:
        os.kill(pid, signal.SIGKILL)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"attacker child {pid} did not finish in {timeout}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert "CHILD ERROR" not in out, out
    return out


def _as_user(user: User, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) run as `user`; its JSON-able return value."""
    def body(*a: Any) -> None:
        *call, w = a
        os.write(w, json.dumps(fn(*call)).encode())
    pid, r = _fork_as(user, body, *args)
    return json.loads(_collect(pid, r, 20.0))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of root's that planted links point at; it must never change."""
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp, that the attacker can plant in."""
    path = Path(tempfile.mkdtemp(prefix="phalanx-test-shared-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------ attacker actions
def _plant(files: list[str], links: list[str], target: str) -> list[str]:
    """Create `files` (mode 0666) and `links` (to `target`); the paths made."""
    made = []
    for path in files:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        os.fchmod(fd, 0o666)
        os.close(fd)
        made.append(path)
    for path in links:
        os.symlink(target, path)
        made.append(path)
    return made


def _scribble(job_id: str, out: int) -> None:
    """Open every file of the job that we can and keep writing into its data area; report each
    name opened. Runs until killed."""
    prefix, fds = f"phalanx-{job_id}-", {}
    junk = memoryview(b"\x41" * (16 << 20))
    while True:
        for name in os.listdir(SHM):
            if name.startswith(prefix) and name not in fds:
                try:
                    fds[name] = os.open(os.path.join(SHM, name), os.O_RDWR | os.O_NOFOLLOW)
                except OSError:
                    continue
                os.write(out, f"OPENED {name}\n".encode())
        for fd in fds.values():
            size = min(os.fstat(fd).st_size, len(junk))
            if size > 4096:     # past the flags and signatures: the data slots and result
                with mmap.mmap(fd, size) as mm:
                    mm[4096:size] = junk[:size - 4096]
        time.sleep(0.002)


def _old_names(job_id: str) -> tuple[list[str], list[str]]:
    """(files, links) at every name the job would use under the old scheme
    ``phalanx-<job>-g<N>``: this generation's segment as a file the attacker can write, every
    later one and those of the subgroup of ranks (0, 1) as links to root's file."""
    sub = f"{job_id}-set" + hashlib.sha256(repr((0, 1)).encode()).hexdigest()[:12]
    files = [f"{SHM}/phalanx-{job_id}-g1"]
    links = [f"{SHM}/phalanx-{job_id}-g{g}" for g in range(2, 5)]
    links += [f"{SHM}/phalanx-{sub}-g{g}" for g in range(1, 5)]
    return files, links


# ------------------------------------------------------------------------ shared memory
_JOB = """
import os, sys, time
from pathlib import Path
import numpy as np
import phalanx as px
from phalanx import runtime

out = Path(sys.argv[1])
if os.environ["PHALANX_RANK"] == "0":  # the job id is public: /tmp/phalanx-<job>-* shows it
    (out / "jobid.tmp").write_text(os.environ["PHALANX_JOB_ID"])
    (out / "jobid.tmp").rename(out / "jobid")
deadline = time.monotonic() + 60
while not (out / "planted").exists():
    if time.monotonic() > deadline:
        sys.exit("the test never planted the attacker's files")
    time.sleep(0.02)
px.init()
pair = px.new_group([0, 1])
base = np.arange(100_000, dtype=np.float64)
bad = 0
for i in range(40):
    for group in (None, pair):
        got = px.allreduce(base * (px.rank() + 1) + i, group=group)
        want = np.sum([base * (r + 1) + i for r in range(px.size())], axis=0)
        bad += not np.array_equal(got, want)
print(f"SUMS rank={px.rank()} shm={runtime.current().group.shm is not None} bad={bad}",
      flush=True)
"""


def _wait_file(path: Path, proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.02)
    return path.read_text()


@pytest.mark.timeout(120)
def test_job_ignores_files_planted_at_old_guessable_names(attacker, victim, tmp_path):
    (tmp_path / "job.py").write_text(textwrap.dedent(_JOB))
    env = {**os.environ, "PHALANX_SHM_MAX_BYTES": str(1 << 20),
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "2",
                             str(tmp_path / "job.py"), str(tmp_path)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    planted: list[str] = []
    sizes: dict[str, int] = {}
    spy: tuple[int, int] | None = None
    try:
        job_id = _wait_file(tmp_path / "jobid", proc, 60)
        files, links = _old_names(job_id)
        planted = _as_user(attacker, _plant, files, links, str(victim))
        spy = _fork_as(attacker, _scribble, job_id)
        (tmp_path / "planted").touch()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        opened = _collect(*spy, timeout=10, kill=True) if spy is not None else ""
        for path in planted:
            try:
                sizes[path] = os.lstat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                pass
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    for rank in (0, 1):
        assert f"SUMS rank={rank} shm=True bad=0" in out, f"stdout:\n{out}\nstderr:\n{err}"
    assert victim.read_bytes() == VICTIM, "a planted link made the job write root's file"
    assert sizes.get(files[0], 0) == 0, "the job used the attacker's file"
    # The attacker could open only what it planted itself: the job's files are 0600.
    mine = {os.path.basename(p) for p in planted}
    assert {ln.split()[1] for ln in opened.splitlines()} <= mine, opened


def _thread_groups(job_id: str, secret: str) -> list[Any]:
    """Two thread-ranks build generation 1's Group on one host; each one's result or error."""
    store, results = dist.HashStore(), [None, None]
    config = Config(allreduce_algo="shm", timeout=5.0)

    def body(r: int) -> None:
        place = Placement(generation=1, rank=r, size=2, local_rank=r, local_size=2,
                          hosts=["h", "h"], pids=[os.getpid()] * 2)
        try:
            g = Group(place, store, config, job_id=job_id, secret=secret)
            g.close()
            results[r] = "ok"
        except Exception as e:  # noqa: BLE001 (the test asserts on it)
            results[r] = e
    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "thread ranks hung"
    return results


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["file", "link"])
def test_planted_exact_segment_name_fails_with_the_path(attacker, victim, kind):
    job_id, secret = f"lu{os.urandom(4).hex()}", os.urandom(16).hex()
    path = segment_path(job_id, 1, secret=secret)
    files, links = ([path], []) if kind == "file" else ([], [path])
    planted = _as_user(attacker, _plant, files, links, str(victim))
    threads_before = {t.ident for t in threading.enumerate()}
    try:
        results = _thread_groups(job_id, secret)
    finally:
        for p in planted:
            os.unlink(p)
    for r, res in enumerate(results):
        assert isinstance(res, ConfigError), f"rank {r}: {res!r}"
        assert repr(path) in str(res) and "rm -f" in str(res), f"rank {r}: {res}"
    assert "already exists" in str(results[0])
    assert ("symbolic link" if kind == "link" else f"owned by uid {attacker.uid}") in str(
        results[1])
    assert victim.read_bytes() == VICTIM
    # A refused group leaves no comm thread behind (the Gloo group and executor are closed).
    assert not [t.name for t in threading.enumerate() if t.name.startswith("phalanx-comm")
                and t.is_alive() and t.ident not in threads_before]
    assert _thread_groups(job_id, secret) == ["ok", "ok"]   # once removed, the job runs


@pytest.mark.timeout(60)
def test_planted_buffer_name_is_refused_and_not_followed(attacker, victim):
    secret, seg = os.urandom(16).hex(), f"{SHM}/phalanx-lu{os.urandom(4).hex()}-g1-x"
    path = buffer_path(seg, 0, 0, secret=secret)
    planted = _as_user(attacker, _plant, [], [path], str(victim))
    try:
        with pytest.raises(ConfigError, match="already exists"):
            SharedBuffers(seg, 0, secret=secret).empty(1000, torch.float32)
        peer = SharedBuffers(seg, 1, secret=secret)
        with pytest.raises(ConfigError, match="symbolic link"):
            peer.peer(0, 0, 10, torch.float32)
    finally:
        for p in planted:
            os.unlink(p)
    assert victim.read_bytes() == VICTIM


def _crash_and_clean(job_id: str, secret: str) -> dict[str, Any]:
    """As a launcher run by an ordinary user: leave a segment and a buffer as a crashed job
    would, then clean up; what was removed and what is left."""
    seg = segment_path(job_id, 3, secret=secret)
    for path in (seg, buffer_path(seg, 1, 0, secret=secret)):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    removed = cleanup(job_id)
    return {"removed": removed, "left": sorted(n for n in os.listdir(SHM)
                                               if n.startswith(f"phalanx-{job_id}-"))}


@pytest.mark.timeout(60)
def test_cleanup_removes_own_files_and_leaves_other_users_names(attacker):
    job_id = f"lu{os.urandom(4).hex()}"
    other = f"{SHM}/phalanx-{job_id}-g1"      # a name with the job's prefix, not the user's
    Path(other).write_bytes(b"")
    try:
        got = _as_user(attacker, _crash_and_clean, job_id, os.urandom(16).hex())
    finally:
        os.unlink(other)
    assert got == {"removed": 2, "left": [os.path.basename(other)]}, got


# ------------------------------------------------------------------------ the join file
def _read_all(paths: list[str]) -> dict[str, str]:
    """What the attacker can read at each path (or the error it gets)."""
    got = {}
    for p in paths:
        try:
            with open(p) as f:
                got[p] = f.read()
        except OSError as e:
            got[p] = type(e).__name__
    return got


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["file", "link"])
def test_join_file_secret_stays_private(attacker, victim, shared_dir, kind):
    path, secret = str(shared_dir / "join.json"), os.urandom(16).hex()
    files, links = ([path + ".tmp"], []) if kind == "file" else ([], [path + ".tmp"])
    _as_user(attacker, _plant, files, links, str(victim))
    write_join_file(path, "127.0.0.1:1", secret, "job", "host")
    seen = _as_user(attacker, _read_all, [path, path + ".tmp", str(victim)])
    assert not any(secret in text for text in seen.values()), seen
    assert seen[path] == "PermissionError", seen
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid(), st
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert json.loads(Path(path).read_text())["secret"] == secret
    assert victim.read_bytes() == VICTIM
    assert sorted(os.listdir(shared_dir)) == ["join.json", "join.json.tmp"]  # no temp left


@pytest.mark.timeout(60)
def test_error_report_does_not_write_through_a_planted_link(attacker, victim, shared_dir,
                                                            monkeypatch, capsys):
    path = str(shared_dir / "w0.json")
    _as_user(attacker, _plant, [], [path + ".tmp"], str(victim))
    monkeypatch.setenv(child.ERROR_FILE, path)
    child.report(ValueError("boom"))
    assert "boom" in capsys.readouterr().err
    assert victim.read_bytes() == VICTIM
    assert json.loads(Path(path).read_text())["message"] == "boom"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def _plant_join_file(path: str) -> None:
    """A join file of the attacker's own, private to them, pointing at their 'coordinator'."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, json.dumps({"address": "127.0.0.1:9", "secret": "known-to-the-attacker",
                             "job_id": "fake", "host": "h"}).encode())
    os.close(fd)


@pytest.mark.timeout(60)
def test_phalanx_join_and_agent_refuse_secret_files_others_wrote(attacker, shared_dir):
    from phalanx.launch.procs import read_private
    planted = str(shared_dir / "job.json")
    _as_user(attacker, _plant_join_file, planted)
    res = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "join", planted,
                          __file__], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert res.returncode == 2, res.stderr
    assert f"join file {planted!r} is not private: owned by uid {attacker.uid}" in res.stderr
    # The agent's --secret-file goes through the same check; a link is refused too.
    os.symlink(planted, shared_dir / "link")
    with pytest.raises(ValueError, match="symbolic link is refused"):
        read_private(str(shared_dir / "link"), "--secret-file")
    mine = shared_dir / "mine"
    mine.write_text("s3cret")
    mine.chmod(0o644)
    with pytest.raises(ValueError, match=r"mode 0o644.*chmod 600"):
        read_private(str(mine), "--secret-file")
    mine.chmod(0o600)
    assert read_private(str(mine), "--secret-file") == "s3cret"
