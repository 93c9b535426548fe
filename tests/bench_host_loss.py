"""`phalanx bench recovery`'s host-loss rows (crash, cut) on simulated hosts, on one machine.

Makes 2 simulated hosts (tests/simhosts.py: network namespaces with their own sshd) and runs
the host-loss benchmark (phalanx/bench/recovery_hosts.py) on them with 2 workers each; the
last host is crashed (every process SIGKILLed; restarted afterwards) or cut off (its link down;
up again afterwards) through the simulated hosts' own API. Needs root and what
.ci/setup-hosts.sh installs. Options are the benchmark's, less -H and the fault commands:

    python3 tests/bench_host_loss.py --repeat 3 --json host_loss.json
"""

from __future__ import annotations

import sys

from simhosts import SimHosts

from phalanx.bench.recovery_hosts import HostFaults, main


class SimFaults(HostFaults):
    """Crash / cut a simulated host by its address (its name in -H), and bring it back."""

    def __init__(self, hosts: SimHosts) -> None:
        self.by_addr = {h.addr: h for h in hosts}

    def inject(self, kind: str, host: str) -> None:
        h = self.by_addr[host]
        h.crash() if kind == "crash" else h.cut()

    def restore(self, kind: str, host: str) -> None:
        h = self.by_addr[host]
        if kind == "crash" and not h.alive:
            h.restart()
        elif kind == "cut":
            h.uncut()


def bench_args(hosts: SimHosts, slots: int = 2) -> list[str]:
    """The -H and --ssh-config arguments for these hosts."""
    return ["-H", ",".join(f"{h.addr}:{slots}" for h in hosts), "--ssh-config",
            str(hosts.ssh_config)]


def run(argv: list[str], hosts: SimHosts) -> int:
    return main([*bench_args(hosts), *argv], faults=SimFaults(hosts))


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        raise SystemExit(main(["-H", "a:2,b:2", "--help"]))
    with SimHosts(n=2, prefix="phxb") as sim:
        print(f"simhosts: {', '.join(f'{h.name}={h.addr}' for h in sim)}", file=sys.stderr,
              flush=True)
        raise SystemExit(run(sys.argv[1:], sim))
