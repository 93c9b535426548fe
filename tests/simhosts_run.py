"""Run one command against freshly made simulated hosts, then tear them down.

For benchmarks and manual experiments that need the multi-host fixture outside pytest:

    python3 tests/simhosts_run.py -n 2 --rate 2gbit -- \\
        phalanx bench allreduce -H {hosts:2} --ssh-config {ssh_config} --link-gbit 2

Placeholders in the command: {hosts:K} becomes "addr1:K,addr2:K,..." (every host with K slots),
{ssh_config} the generated ssh_config, {addrs} the comma-separated addresses. The command runs in
the root namespace (where a launcher would run); its exit status is returned. Needs root and
what .ci/setup-hosts.sh installs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from simhosts import SimHosts


def expand(arg: str, hosts: SimHosts) -> str:
    """Replace the placeholders (see the module docstring) in one argument."""
    addrs = [h.addr for h in hosts]
    arg = re.sub(r"\{hosts:(\d+)\}", lambda m: ",".join(f"{a}:{m.group(1)}" for a in addrs), arg)
    return arg.replace("{ssh_config}", str(hosts.ssh_config)).replace("{addrs}", ",".join(addrs))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2, help="hosts (default 2)")
    p.add_argument("--rate", default=None, help="tbf rate of every link, e.g. 2gbit")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give a command after --")
    with SimHosts(n=a.n, rate=a.rate, prefix="phxb") as hosts:
        print(f"simhosts: {', '.join(f'{h.name}={h.addr}' for h in hosts)}"
              + (f", links shaped to {a.rate}" if a.rate else ""), file=sys.stderr, flush=True)
        return subprocess.call([expand(c, hosts) for c in cmd])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
