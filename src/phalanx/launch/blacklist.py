"""Lost hosts and where replacements go: a host blacklist with a cooldown, and the choice of a
host for a replacement worker. Pure: the clock is an argument, nothing here starts or stops a
process, and every decision carries the reason the launcher logs (the style of Ray Train's
failure policies).

A host is lost when its agent ends (the host crashed, its SSH session or srun step broke) or
falls silent while every worker on it is lost (its network is cut). It is then blacklisted: no
replacement is placed there for `cooldown_s`, and each further loss of the same host doubles
that (up to `max_cooldown_s`), so a flapping host is tried ever more rarely. Past its cooldown
the host may be used again: the launcher starts its agent anew when a replacement goes there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class _Entry:
    losses: int
    cooldown: float
    until: float
    reason: str
    announced: bool = False


class HostBlacklist:
    """Hosts lost during the job and until when each is kept out (see the module docstring)."""

    def __init__(self, cooldown_s: float, *, growth: float = 2.0,
                 max_cooldown_s: float = 3600.0) -> None:
        if cooldown_s < 0 or growth < 1 or max_cooldown_s < cooldown_s:
            raise ValueError(f"host cooldown must be >= 0 s with growth >= 1 and a cap >= it; got "
                             f"cooldown_s={cooldown_s}, growth={growth}, "
                             f"max_cooldown_s={max_cooldown_s}")
        self.cooldown_s, self.growth, self.max_cooldown_s = cooldown_s, growth, max_cooldown_s
        self._hosts: dict[str, _Entry] = {}

    def mark_lost(self, host: str, now: float, reason: str) -> float:
        """Blacklist `host` from `now`; returns its cooldown in seconds (longer at each loss)."""
        e = self._hosts.get(host)
        losses = 1 if e is None else e.losses + 1
        cooldown = min(self.cooldown_s * self.growth ** (losses - 1), self.max_cooldown_s)
        self._hosts[host] = _Entry(losses=losses, cooldown=cooldown, until=now + cooldown,
                                   reason=reason)
        return cooldown

    def usable(self, host: str, now: float) -> bool:
        """May a replacement be placed on `host` now (never lost, or past its cooldown)?"""
        e = self._hosts.get(host)
        return e is None or now >= e.until

    def losses(self, host: str) -> int:
        """How many times `host` was lost in this job."""
        e = self._hosts.get(host)
        return 0 if e is None else e.losses

    def why(self, host: str, now: float | None = None) -> str:
        """Why `host` is (or was) kept out, for a log line; '' if it was never lost."""
        e = self._hosts.get(host)
        if e is None:
            return ""
        text = (f"host {host} lost {e.losses} time(s), last: {e.reason}; cooldown "
                f"{e.cooldown:g}s")
        if now is not None:
            text += f", usable again in {e.until - now:.1f}s" if now < e.until else ", over"
        return text

    def cooled(self, now: float) -> list[str]:
        """Hosts whose cooldown ended since the last call (each reported once per loss)."""
        out = []
        for host, e in self._hosts.items():
            if not e.announced and now >= e.until:
                e.announced = True
                out.append(host)
        return out


@dataclass(kw_only=True, slots=True, frozen=True)
class HostView:
    """What the launcher knows about one host when placing a replacement."""

    name: str
    """The host's name in the job (-H, hostfile or Slurm)."""
    slots: int
    """Workers it was given at the start."""
    load: int
    """Workers of the job running there now."""
    agent: bool
    """Its agent is running (a host without one can only be used by starting it again)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Placement:
    """Where a replacement goes, and why."""

    host: str | None
    """The chosen host; None: nowhere (every host is lost or blacklisted)."""
    restart: bool
    """Start the host's agent again first: it was lost and is past its cooldown."""
    reason: str


def place_replacement(home: str, hosts: list[HostView], blacklist: HostBlacklist,
                      now: float) -> Placement:
    """Choose the host for a replacement of a worker whose rank slot belongs to `home`.

    In order: `home` if its agent runs and it is not blacklisted; else the least-loaded live,
    usable host with a free slot; else a lost host past its cooldown (home first: its agent is
    started again, and it has all its slots free); else the least-loaded live, usable host,
    above its slots. Blacklisted hosts are never chosen.
    """
    usable = [h for h in hosts if blacklist.usable(h.name, now)]
    live = [h for h in usable if h.agent]
    for h in live:
        if h.name == home:
            return Placement(host=h.name, restart=False, reason=f"its own host {home}")
    kept_out = "; ".join(blacklist.why(h.name, now) for h in hosts
                         if not blacklist.usable(h.name, now))
    why_not_home = f"host {home} is blacklisted ({kept_out})" if kept_out else \
        f"host {home} has no agent"
    free = [h for h in live if h.load < h.slots]
    if free:
        h = min(free, key=lambda h: h.load)
        return Placement(host=h.name, restart=False,
                         reason=f"{why_not_home}; host {h.name} has a free slot")
    back = sorted((h for h in usable if not h.agent), key=lambda h: h.name != home)
    if back:
        h = back[0]
        return Placement(host=h.name, restart=True,
                         reason=f"host {h.name} is past its cooldown; starting its agent again")
    if live:
        h = min(live, key=lambda h: h.load)
        return Placement(host=h.name, restart=False,
                         reason=f"{why_not_home}; host {h.name} runs the fewest workers "
                                f"({h.load} on {h.slots} slot(s))")
    return Placement(host=None, restart=False,
                     reason=f"no usable host: {kept_out or 'every agent has ended'}")
