"""Worker processes as a starter (the launcher, `phalanx join`) holds them: spawn one with its
output rank-prefixed, read its state from /proc, kill its process group, read its error record.

No torch, no coordinator: plain subprocess and /proc, shared by every kind of starter.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from . import oom

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")


@dataclass(kw_only=True, slots=True)
class Worker:
    """One worker process this starter spawned."""

    slot: int
    worker_id: str
    proc: subprocess.Popen[bytes]
    pumps: list[threading.Thread]
    error_file: str
    fenced: bool = False
    started: float = 0.0
    """time.monotonic() when it was started."""
    cgroup: str | None = None
    """Its memory cgroup, and that cgroup's OOM-kill count when it started (see oom.py)."""
    oom_kills: int | None = None

    def oom_note(self, code: int) -> str:
        """Why a SIGKILL came, when the OOM killer dealt it; '' otherwise."""
        if code != -signal.SIGKILL:
            return ""
        return oom.why_killed(self.proc.pid, self.started, self.cgroup, self.oom_kills)


def proc_state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, Z, ...), or '' if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def is_stopped(pid: int) -> bool:
    """True while the process is stopped (SIGSTOP, state T)."""
    return proc_state(pid) in ("T", "t")


def exiting(pid: int) -> bool:
    """True if the process is already a zombie or gone (it exited; nothing to fence)."""
    return proc_state(pid) in ("Z", "X", "")


def kill_group(pid: int, sig: int) -> None:
    """Signal the worker's whole process group (it runs in a session of its own)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def read_error(path: str) -> dict[str, Any] | None:
    """The exception record the worker wrote before exiting (see child.py), if any."""
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


Sink = Callable[[bytes], None]
Prefix = Callable[[], bytes]

MAX_LINE = 64 * 1024
"""Longest piece of output passed on as one line: a longer line (a 100 MB line with no newline)
is split, so the starter's memory stays bounded whatever a worker prints."""


def pump(stream: IO[bytes], sink: Sink, prefix: Prefix) -> None:
    """Copy a worker's output to `sink`, each line prefixed (with its rank, asked anew for each
    line: ranks change when the job shrinks). A carriage return ends a piece too, so progress
    bars that redraw a line with '\r' (tqdm) pass through as they come, not at the next '\n'."""
    fd, pending = stream.fileno(), b""
    while True:
        try:
            chunk = os.read(fd, MAX_LINE)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending = _emit(pending + chunk, sink, prefix)
    if pending:
        sink(prefix() + pending.rstrip(b"\r") + b"\n")
    stream.close()


def _emit(buf: bytes, sink: Sink, prefix: Prefix) -> bytes:
    """Send every complete piece of `buf` ('\n', '\r\n' or '\r' ended; long lines split);
    return what is left for later."""
    start = 0
    while True:
        nl, cr = buf.find(b"\n", start), buf.find(b"\r", start)
        end = min(i for i in (nl, cr, len(buf)) if i >= 0)
        if end - start >= MAX_LINE:
            sink(prefix() + buf[start:start + MAX_LINE] + b"\n")
            start += MAX_LINE
            continue
        if end == len(buf) or (end == cr and cr == len(buf) - 1):
            return buf[start:]      # no terminator yet (or a '\r' that may start a '\r\n')
        if end == cr and buf[cr + 1:cr + 2] == b"\n":
            piece, start = buf[start:cr] + b"\n", cr + 2
        else:
            piece, start = buf[start:end + 1], end + 1
        if piece != b"\r":         # a bare '\r' before a bar's first draw says nothing
            sink(prefix() + piece)


def spawn(*, slot: int, worker_id: str, prefix: str | Callable[[], str], argv: list[str],
          env: dict[str, str], error_file: str, out: Sink, err: Sink) -> Worker:
    """Start `python child.py ARGV...` in a new session, pumping its output to out/err with
    `prefix` (a string, or a function asked for the current one at each line)."""
    proc = subprocess.Popen([sys.executable, CHILD, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    if isinstance(prefix, str):
        fixed = prefix.encode()
        make: Prefix = lambda: fixed  # noqa: E731
    else:
        make = lambda: prefix().encode()  # noqa: E731
    pumps = [threading.Thread(target=pump, args=(s, k, make), daemon=True)
             for s, k in ((proc.stdout, out), (proc.stderr, err))]
    for t in pumps:
        t.start()
    cgroup = oom.memory_cgroup(proc.pid)
    return Worker(slot=slot, worker_id=worker_id, proc=proc, pumps=pumps, error_file=error_file,
                  started=time.monotonic(), cgroup=cgroup, oom_kills=oom.oom_kills(cgroup))


def write_join_file(path: str, address: str, secret: str, job_id: str, host: str) -> None:
    """What a worker needs to join this job from outside the launcher; readable by owner only.

    Written to a private temporary file in the same directory (`tempfile.mkstemp`: a random
    name, O_EXCL, 0600) and renamed into place: no fixed name another user could create first
    to read the secret, or plant as a link to make us overwrite some other file."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"address": address, "secret": secret, "job_id": job_id, "host": host}, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_private(path: str, what: str) -> str:
    """The text of a file holding a job secret (`what` names it in errors), only if it is a
    regular file of our own user that nobody else can read or write, opened without following
    a link: a planted file could point a worker at an attacker's coordinator."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{what} {path!r} cannot be opened ({e.strerror}; a symbolic link is "
                         "refused)") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ValueError(f"{what} {path!r} is not private: owned by uid {st.st_uid} (this "
                             f"user is uid {os.geteuid()}), mode {oct(st.st_mode & 0o777)}; it "
                             "must be a file of yours with mode 0600 (chmod 600), or someone "
                             "else could have written it")
        return f.read()


def stop_all(workers: list[Worker], grace: float) -> None:
    """SIGTERM every worker, wait up to `grace` seconds, then SIGKILL what is left."""
    for w in workers:
        if w.proc.poll() is None:
            kill_group(w.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for w in workers:
        if w.proc.poll() is None:
            kill_group(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
