"""Plumbing of the simulated hosts (tests/simhosts.py): shell helpers, namespace ids, link
shaping, teardown, leak checks, and the reaper that tears hosts down if their owner dies.

Run as a script (`simhosts_net.py --reap MANIFEST`) it is that reaper; it needs only the stdlib.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
"""RFC 2544 benchmark range; each SimHosts takes one /24 of it (512 of them)."""
BRIDGE_HOST = 254
"""The bridge (root namespace) is .254 of the subnet; hosts are .1 .. .n."""
IFNAMSIZ = 15
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,7}")


class SimHostsError(RuntimeError):
    """Setting up or using simulated hosts failed."""


class SimHostsUnavailable(SimHostsError):
    """This machine cannot simulate hosts (not root, a tool missing...): a reason to skip."""


# ----------------------------------------------------------------------------- small helpers
def _sh(*argv: str, input: str | None = None, check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                       check=False)
    if check and p.returncode != 0:
        raise SimHostsError(f"{shlex.join(argv)} failed ({p.returncode}): "
                            f"{(p.stderr or p.stdout).strip()}")
    return p


def _ip_batch(lines: Sequence[str], *, netns: str | None = None, force: bool = False,
              tool: str = "ip") -> subprocess.CompletedProcess[str]:
    """Run several ip/tc commands in one process (-batch); -force goes on past errors."""
    argv = [tool, *(["-n", netns] if netns else []), *(["-force"] if force else []), "-batch", "-"]
    return _sh(*argv, input="".join(line + "\n" for line in lines), check=not force)


def _ns_id(pid: int | str, kind: str) -> int | None:
    """Inode of /proc/PID/ns/KIND (None for a process gone or, except for pid, a zombie)."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    m = re.fullmatch(rf"{kind}:\[(\d+)\]", link)
    return int(m.group(1)) if m else None


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _members(net_ids: set[int], pid_ids: set[int]) -> list[int]:
    """Root-namespace pids of every live process in one of these network or PID namespaces."""
    found = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        if (net_ids and _ns_id(d, "net") in net_ids) or (pid_ids and _ns_id(d, "pid") in pid_ids):
            try:
                with open(f"/proc/{d}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                        continue  # dead already, only not reaped yet (its parent will)
            except OSError:
                continue
            found.append(int(d))
    return found


def _kill_members(net_ids: set[int], pid_ids: set[int], timeout: float = 10) -> list[int]:
    """SIGKILL every process in these namespaces until none is left; returns the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _members(net_ids, pid_ids)
        if not pids or time.monotonic() > deadline:
            return pids
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _parse_rate(rate: str | int) -> float:
    """A tc rate ("100mbit", "2gbit", "10mbps" = bytes, bare number = bit/s) in bytes/s."""
    if isinstance(rate, int):
        return rate / 8
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]i?)?(bit|bps)?\s*", rate.lower())
    if not m:
        raise ValueError(f"cannot parse rate {rate!r} (use tc units: 100mbit, 2gbit, 10mbps)")
    num, mult, unit = float(m.group(1)), m.group(2) or "", m.group(3) or "bit"
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[mult]
    return num * scale / (8 if unit == "bit" else 1)


def _tbf(rate: str | int, burst: int | None, latency: str) -> str:
    if burst is None:  # at least 256 KiB, and 4 ms worth of traffic so fast links are not starved
        burst = max(256 * 1024, int(_parse_rate(rate) * 0.004))
    return f"root tbf rate {rate} burst {burst} latency {latency}"


def sshd_binary() -> str | None:
    for c in SSHD_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def _root_locked() -> bool:
    """Whether root's password is locked ('!...'): then sshd needs UsePAM for key logins."""
    try:
        with open("/etc/shadow") as f:
            for line in f:
                user, _, rest = line.partition(":")
                if user == "root":
                    return rest.startswith("!")
    except OSError:
        pass
    return False


# ----------------------------------------------------------------------------- teardown
def _teardown(manifest: dict, unshares: Sequence[subprocess.Popen] = ()) -> list[str]:
    """Remove everything a manifest names; idempotent. Returns what could not be removed."""
    problems = []
    net_ids = {i for i in (_netns_inode(ns) for ns in manifest.get("netns", [])) if i}
    pid_ids = set(manifest.get("pidns", []))
    # The hosts' PID namespaces first (killing an init kills its namespace), so that each
    # unshare can reap its init; then whatever else is inside the network namespaces.
    _kill_members(set(), pid_ids)
    for p in unshares:  # an init whose namespace was not known yet (interrupted while booting)
        for child in _children(p.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in unshares:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    left = _kill_members(net_ids, pid_ids)
    if left:
        problems.append(f"processes that would not die: {left}")
    for p in unshares:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            problems.append(f"unshare {p.pid} did not exit")
    cmds = [f"link del {v}" for v in manifest.get("veths", [])]
    cmds += [f"netns del {ns}" for ns in manifest.get("netns", [])]
    if manifest.get("bridge"):
        cmds.append(f"link del {manifest['bridge']}")
    if cmds:
        _ip_batch(cmds, force=True)  # "does not exist" for what was never made is fine
    problems += _leftovers(manifest, with_dir=False)
    tmp = manifest.get("tmpdir")
    if tmp and os.path.isdir(tmp) and not problems:  # else keep the manifest for another try
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(tmp):
            problems.append(f"dir {tmp}")
    return problems


def _link_names() -> set[str]:
    out = _sh("ip", "-o", "link", "show", check=False).stdout
    return {m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.MULTILINE)}


def _netns_names() -> set[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _leftovers(manifest: dict, with_dir: bool = True) -> list[str]:
    links = _link_names() & (set(manifest.get("veths", [])) | {manifest.get("bridge")})
    nss = _netns_names() & set(manifest.get("netns", []))
    tmp = manifest.get("tmpdir")
    return ([f"link {x}" for x in sorted(links)] + [f"netns {x}" for x in sorted(nss)]
            + ([f"dir {tmp}"] if with_dir and tmp and os.path.exists(tmp) else []))


def leftovers(prefix: str = "phxt") -> list[str]:
    """Links and namespaces that look like SimHosts' with this prefix (for leak checks)."""
    pat = re.compile(rf"{re.escape(prefix)}[0-9a-f]{{3}}(br|v\d+|-\d+)")
    return sorted([f"link {x}" for x in _link_names() if pat.fullmatch(x)]
                  + [f"netns {x}" for x in _netns_names() if pat.fullmatch(x)])


def _reaper_main(manifest_path: str) -> None:
    """Run as `python3 simhosts.py --reap MANIFEST` with a pipe on stdin: when the pipe closes
    without the word "done" (the owner died), tear down what the manifest names."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.chdir("/")
    data = b""
    while chunk := os.read(0, 4096):
        data += chunk
    if data.strip() == b"done":
        return
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return  # the owner got as far as removing its directory: nothing left to do
    problems = _teardown(manifest)
    if problems:
        print(f"simhosts reaper: left behind: {problems}", file=sys.stderr)


# ----------------------------------------------------------------------------- hosts


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reap":
        _reaper_main(sys.argv[2])
    else:
        print("usage: simhosts.py --reap MANIFEST (internal)", file=sys.stderr)
        sys.exit(2)
