"""Which hosts a job runs on: `-H a:4,b:4`, `--hostfile FILE` (`host slots=N`, as Horovod and
Open MPI write it), and the addresses to use. Parsing and placement are pure.

Ranks are packed host by host, in the order the hosts are given: with `-H a:2,b:2`, ranks 0-1
run on a and 2-3 on b. A host's identity is the name it was given here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(kw_only=True, slots=True, frozen=True)
class HostSlots:
    """One host of the job and how many workers it runs."""

    name: str
    """How the launcher reaches it (ssh destination) and its identity in the job."""
    slots: int
    """Workers to start there."""
    first_rank: int = 0
    """Rank of its first worker (ranks are packed host by host)."""


def _entry(text: str, where: str) -> tuple[str, int]:
    name, sep, slots = text.strip().rpartition(":")
    if not sep:
        name, slots = text.strip(), "1"
    if not name or not slots.isdigit() or int(slots) < 1:
        raise ValueError(f"{where}: {text.strip()!r} is not HOST or HOST:SLOTS with SLOTS >= 1 "
                         "(e.g. node1:4)")
    return name, int(slots)


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """'a:4,b:4' -> [('a', 4), ('b', 4)]; a bare name has one slot."""
    entries = [_entry(part, "-H") for part in spec.split(",") if part.strip()]
    if not entries:
        raise ValueError("-H is empty; e.g. -H node1:4,node2:4")
    return _unique(entries, "-H")


def parse_hostfile(text: str, path: str = "hostfile") -> list[tuple[str, int]]:
    """Lines 'host slots=N' (or 'host:N', or 'host'); '#' starts a comment."""
    entries = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        where = f"{path}:{n}"
        if len(words) == 1:
            entries.append(_entry(words[0], where))
        elif len(words) == 2 and words[1].startswith("slots=") and words[1][6:].isdigit() \
                and int(words[1][6:]) >= 1:
            entries.append((words[0], int(words[1][6:])))
        else:
            raise ValueError(f"{where}: {line!r} is not 'HOST slots=N'")
    if not entries:
        raise ValueError(f"{path} lists no hosts; write one 'HOST slots=N' line per host")
    return _unique(entries, path)


def _unique(entries: list[tuple[str, int]], where: str) -> list[tuple[str, int]]:
    names = [n for n, _ in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: host(s) {dup} listed twice; give each host once with its "
                         "total slots")
    return entries


def place(entries: list[tuple[str, int]], np: int) -> list[HostSlots]:
    """Pack `np` ranks onto the hosts in order; hosts left without a rank are dropped."""
    total = sum(s for _, s in entries)
    if np > total:
        raise ValueError(f"-np {np} needs more slots than the hosts have ({total}); add hosts "
                         "or slots, or lower -np")
    out, rank = [], 0
    for name, slots in entries:
        take = min(slots, np - rank)
        if take:
            out.append(HostSlots(name=name, slots=take, first_rank=rank))
        rank += take
    return out


def is_local(name: str) -> bool:
    """True if `name` is this machine (the launcher starts its agent without ssh)."""
    return name in LOCAL_NAMES or name == socket.gethostname()


def route_address(dest: str, port: int = 9) -> str:
    """The local address the kernel would use to reach `dest` (no packet is sent): the
    interface a process should bind to so `dest`'s side can reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(dest), port))
        except OSError as e:
            raise ValueError(f"no route to host {dest!r}: {e}") from None
        return str(s.getsockname()[0])
