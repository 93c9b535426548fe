"""Worker processes as a starter (the launcher, `phalanx join`) holds them: spawn one with its
output rank-prefixed, read its state from /proc, kill its process group, read its error record.

No torch, no coordinator: plain subprocess and /proc, shared by every kind of starter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

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


def pump(stream: IO[bytes], sink: Sink, prefix: bytes) -> None:
    """Copy lines from a worker's pipe to `sink`, each prefixed with its rank."""
    for line in iter(stream.readline, b""):
        sink(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
    stream.close()


def spawn(*, slot: int, worker_id: str, prefix: str, argv: list[str], env: dict[str, str],
          error_file: str, out: Sink, err: Sink) -> Worker:
    """Start `python child.py ARGV...` in a new session, pumping its output to out/err."""
    proc = subprocess.Popen([sys.executable, CHILD, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    pumps = [threading.Thread(target=pump, args=(s, k, prefix.encode()), daemon=True)
             for s, k in ((proc.stdout, out), (proc.stderr, err))]
    for t in pumps:
        t.start()
    return Worker(slot=slot, worker_id=worker_id, proc=proc, pumps=pumps, error_file=error_file)


def write_join_file(path: str, address: str, secret: str, job_id: str, host: str) -> None:
    """What a worker needs to join this job from outside the launcher; readable by owner only."""
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "secret": secret, "job_id": job_id, "host": host}, f)
    os.replace(path + ".tmp", path)


def stop_all(workers: list[Worker], grace: float) -> None:
    """SIGTERM every worker, wait up to `grace` seconds, then SIGKILL what is left."""
    import time
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
