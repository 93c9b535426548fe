"""Was a worker killed by the kernel's out-of-memory killer? (A SIGKILL alone does not say.)

Two sources, the exact one first: the kernel log (`/dev/kmsg`, readable by root or where
`dmesg_restrict` is 0) names the pid it killed ("Killed process 4242 (python3)"); else the
OOM-kill counter of the worker's memory cgroup (cgroup v2 `memory.events`, v1
`memory.oom_control`), read when the worker started and again after it died. A counter that
moved says some process of that cgroup was OOM-killed, so that answer is worded as likely.
No torch, no coordinator: plain files, read only for workers that died of SIGKILL.
"""

from __future__ import annotations

import os
import re

_RECORD = re.compile(rb"^\d+,\d+,(\d+),[^;]*;.*?(?:Killed process |oom-kill:.*?pid=)(\d+)",
                     re.MULTILINE)


def memory_cgroup(pid: int) -> str | None:
    """The directory of `pid`'s memory cgroup (v1 memory controller, else the v2 one)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":", 2)[1:2] == ["memory"]]
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    for rel, roots in ((v1, ("/sys/fs/cgroup/memory",)),
                       (v2, ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"))):
        for root in roots:
            if rel and os.path.isdir(root + rel[0]):
                return os.path.normpath(root + rel[0])
    return None


def oom_kills(cgroup: str | None) -> int | None:
    """The cgroup's count of OOM kills so far, or None if it cannot be read."""
    if cgroup is None:
        return None
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(cgroup, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def kernel_killed(pid: int, since: float, log: bytes | None = None) -> bool | None:
    """True if the kernel log says it OOM-killed `pid` after `since` (time.monotonic() seconds,
    the clock /dev/kmsg stamps records with; so an old record of a reused pid does not count);
    None if the log cannot be read."""
    if log is None:
        log = _read_kmsg()
        if log is None:
            return None
    return any(int(m.group(2)) == pid and int(m.group(1)) >= (since - 1.0) * 1e6
               for m in _RECORD.finditer(log))


def _read_kmsg(limit: int = 4 << 20) -> bytes | None:
    """The kernel's log buffer as it stands (non-blocking; at most `limit` bytes)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    records, size = [], 0
    try:
        while size < limit:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten while reading; go on
                continue
            if not rec:
                break
            records.append(rec)
            size += len(rec)
    finally:
        os.close(fd)
    return b"".join(records)


def why_killed(pid: int, started: float, cgroup: str | None, kills_at_start: int | None) -> str:
    """Words for a SIGKILL that the OOM killer dealt ('' when there is no sign of it)."""
    exact = kernel_killed(pid, started)
    if exact:
        return "out of memory: the kernel's OOM killer ended it (kernel log)"
    if exact is None and kills_at_start is not None:
        now = oom_kills(cgroup)
        if now is not None and now > kills_at_start:
            return (f"probably out of memory: its memory cgroup's OOM-kill count went from "
                    f"{kills_at_start} to {now} ({cgroup})")
    return ""
