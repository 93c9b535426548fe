"""Which hosts a job runs on: `-H a:4,b:4`, `--hostfile FILE` (`host slots=N`, as Horovod and
Open MPI write it), and the addresses to use. Parsing and placement are pure.

Ranks are packed host by host, in the order the hosts are given: with `-H a:2,b:2`, ranks 0-1
run on a and 2-3 on b. A host's identity is the name it was given here.

A host is a DNS name (RFC 1123 labels: letters, digits and inner hyphens), an IPv4 address, an
IPv6 address (in brackets when slots follow: `[fe80::1]:4`), each optionally as `user@host`.
Anything else is refused before it reaches a command line: a name starting with `-` would be
read by ssh as an option (`-oProxyCommand=...` runs a command on this machine).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
HOST_FORMS = ("a DNS name (node1, node1.example.com), an IPv4 address, an IPv6 address "
              "([fe80::1]:4 with slots), or user@host")


@dataclass(kw_only=True, slots=True, frozen=True)
class HostSlots:
    """One host of the job and how many workers it runs."""

    name: str
    """How the launcher reaches it (ssh destination) and its identity in the job."""
    slots: int
    """Workers to start there."""
    first_rank: int = 0
    """Rank of its first worker (ranks are packed host by host)."""


def _why_not_host(host: str) -> str | None:
    """Why `host` (no user part) is not a DNS name or an IP address; None if it is one."""
    if host.startswith("-"):
        return "it starts with '-', which ssh would read as an option"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if ":" in host:
        return "it holds ':' but is not an IPv6 address"
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        return "a DNS name has 1 to 253 characters"
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return (f"its label {label!r} is not 1-63 letters, digits or inner hyphens "
                    "(RFC 1123)")
    return None


def check_host(name: str, where: str = "host") -> str:
    """`name` if it is a host phalanx may put on a command line (see the module docstring);
    else ValueError naming `where`, the host and why."""
    user, at, host = name.rpartition("@")
    why = _why_not_host(host)
    if at and why is None and not _USER.fullmatch(user):
        why = (f"its user {user!r} is not a user name (a letter or '_', then letters, "
               "digits, '_', '.' or '-')")
    if why:
        raise ValueError(f"{where}: host {name!r} is not valid: {why}; give {HOST_FORMS}")
    return name


def host_part(name: str) -> str:
    """'user@node1' -> 'node1' (the address to reach, without the ssh login)."""
    return name.rpartition("@")[2]


def _entry(text: str, where: str) -> tuple[str, int]:
    text = text.strip()
    user, at, rest = text.rpartition("@")
    if rest.startswith("["):  # [IPv6] or [IPv6]:SLOTS
        addr, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ValueError(f"{where}: {text!r} is not [IPV6] or [IPV6]:SLOTS (e.g. [fe80::1]:4)")
        name, slots = addr, tail[1:] if tail else "1"
    elif rest.count(":") > 1:
        raise ValueError(f"{where}: {text!r} looks like an IPv6 address: write it in brackets, "
                         f"[{rest}] or [{rest}]:SLOTS")
    else:
        name, sep, slots = rest.rpartition(":")
        if not sep:
            name, slots = rest, "1"
    if not name or not slots.isdigit() or int(slots) < 1:
        raise ValueError(f"{where}: {text!r} is not HOST or HOST:SLOTS with SLOTS >= 1 "
                         "(e.g. node1:4)")
    return check_host(user + at + name, where), int(slots)


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
            host = words[0][1:-1] if words[0][:1] == "[" and words[0][-1:] == "]" else words[0]
            entries.append((check_host(host, where), int(words[1][6:])))
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


def describe(hosts: list[HostSlots]) -> str:
    """'a:2 (ranks 0-1), b:1 (rank 2)': where each rank runs, for the launcher's first line."""
    def ranks(h: HostSlots) -> str:
        last = h.first_rank + h.slots - 1
        return f"rank {last}" if h.slots == 1 else f"ranks {h.first_rank}-{last}"
    return ", ".join(f"{h.name}:{h.slots} ({ranks(h)})" for h in hosts)


def placement_line(source: str, hosts: list[HostSlots], how: str) -> str:
    """The launcher's first line for a job on many hosts (-H, --hostfile, Slurm)."""
    n = sum(h.slots for h in hosts)
    return f"using {source}: {n} worker(s) on {describe(hosts)}, agents started {how}"


def is_local(name: str) -> bool:
    """True if `name` is this machine (the launcher starts its agent without ssh)."""
    return name in LOCAL_NAMES or name == socket.gethostname()


def route_address(dest: str, port: int = 9) -> str:
    """The local address the kernel would use to reach `dest` (a host name, an address, or
    user@host; no packet is sent): the interface a process should bind to so `dest`'s side
    can reach it."""
    host = host_part(dest)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first, as before IPv6 hosts
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return str(s.getsockname()[0])
    except (OSError, IndexError) as e:
        raise ValueError(f"no route to host {dest!r}: {e}") from None
