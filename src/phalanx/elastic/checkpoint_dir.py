"""The checkpoint directory: trust checks, the job's lock, atomic 0600 files, rotation.

Loading a checkpoint is only as safe as the directory it comes from, so the directory must be
owned by the job's user and not writable by others (created 0700 when missing). One job at a
time writes it: rank 0 holds an `flock` on `phalanx.lock` for the job's life, with the job id,
host and pid written in it, so a second job fails at start naming the first. No torch here:
the launcher imports `failed_saves_note` for its final summary.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterable
from typing import Any

from .. import env
from ..errors import CheckpointError

NAME = re.compile(r"ckpt-(\d{9})\.pt$")
TEMP = re.compile(r"ckpt-\d{9}\.pt(\.json)?\.tmp")
LOCK_NAME = "phalanx.lock"
EVENT = "checkpoint"
"""The kind of the event a worker reports for a failed save (the launcher sees
'worker-checkpoint')."""




def prepare(directory: str) -> None:
    """Create `directory` 0700 if missing; refuse one this user does not own or others may
    write (whoever can write there could make the job run code)."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint directory {directory!r} exists but is not a "
                              "directory; pass a directory path")
    me = os.geteuid()
    if st.st_uid != me:
        raise CheckpointError(
            f"checkpoint directory {directory!r} is owned by uid {st.st_uid}, not by this job's "
            f"user (uid {me}); whoever owns it could plant a checkpoint that runs code in the "
            "job. Use a directory you own (mkdir -m 700 DIR) or `chown` this one")
    if st.st_mode & 0o022:
        raise CheckpointError(
            f"checkpoint directory {directory!r} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); anyone who can write there could plant a "
            f"checkpoint. Run `chmod go-w {directory}` or use a directory made with mkdir -m 700")


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` (0600) through an exclusive temporary file, fsync, rename, fsync
    the directory; on any error the temporary file is removed and the error raised."""
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove(*paths: str) -> None:
    """Unlink each path that exists."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def remove_temps(directory: str) -> list[str]:
    """Remove the temporary files of interrupted writes (call only while holding the lock)."""
    gone = [n for n in os.listdir(directory) if TEMP.match(n)]
    remove(*(os.path.join(directory, n) for n in gone))
    return gone


def read_owned(path: str) -> bytes:
    """The file's bytes, if this user owns it (OSError otherwise: treated as unusable)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, f"owned by uid {st.st_uid}, not this job's user")
        return f.read()


def short_of_space(directory: str, nbytes: int) -> str:
    """Why free space is below twice what the next write needs (room for it plus slack), or
    "" if it is not."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if free >= 2 * nbytes + (64 << 10):
        return ""
    return f"free space is short ({free} bytes free; the next checkpoint takes {nbytes})"


class DirLock:
    """An exclusive `flock` on DIR/phalanx.lock naming its holder (job id, host, pid).

    A process of the same job (a respawned or renumbered rank 0) may write while another
    process of that job still holds it; any other holder is an error naming it."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self.job = env.get_str(env.JOB_ID) or ""
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock (True), or find it held by this job (False); raise if another holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        if busy:
            os.close(fd)
            return self._held_by_us(self._holder())
        me = {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
              "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking would race)
            self._fd = None

    def _holder(self) -> dict[str, Any]:
        """What the holder wrote; it writes right after locking, so wait for it briefly."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                with open(self.path) as f:
                    info = json.loads(f.read() or "null")
                if isinstance(info, dict):
                    return info
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.05)

    def _held_by_us(self, holder: dict[str, Any]) -> bool:
        same_process = holder.get("pid") == os.getpid() and holder.get(
            "host") == socket.gethostname()
        if same_process or (self.job and holder.get("job") == self.job):
            return False
        who = (f"job {holder.get('job') or '(none: not started by phalanx run)'} on host "
               f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}") if holder else \
            "another process (it wrote no details)"
        raise CheckpointError(
            f"checkpoint directory {os.path.dirname(self.path)!r} is in use by {who}: two jobs "
            "writing one directory would replace each other's checkpoints. Wait for that job to "
            "end (or stop it), or give this job its own directory")


def failed_saves_note(events: Iterable[dict[str, Any]]) -> str | None:
    """The launcher's summary line for checkpoint saves that failed, or None if none did."""
    failed = [e for e in events if e.get("event") == f"worker-{EVENT}"]
    if not failed:
        return None
    last = failed[-1].get("info", {})
    total = max(int(e.get("info", {}).get("total", 1)) for e in failed)
    durable = last.get("durable")
    return (f"checkpoints: {total} save(s) failed in {last.get('dir', '?')} (last at step "
            f"{last.get('step', '?')}: {last.get('error', '?')}); newest durable checkpoint: "
            f"{'step ' + str(durable) if durable is not None else 'none'}")
