"""Wall-clock chaos rules (`--chaos kill:rank=1,after=5s`), fired by a worker's starter.

Step rules need the elastic API (they fire at the State's step boundaries, inside the
worker). A timed rule needs nothing from the program: the process that started the worker
(the launcher for local workers, a host's agent for its own) sends the real signal to it, so a
plain script, a torchrun-style static job or any `exec` program can be tested. Each rule fires
once per job; which worker it hits is decided by `elastic.chaos.timed_victims` (pure).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..elastic.chaos import SIGNALS, ChaosRule, parse_chaos, timed_victims
from . import procs


class TimedChaos:
    """The timed rules of a spec, for the workers one starter holds. `tick()` in the starter's
    loop; `pid_of(worker_id)` finds a running worker of this starter (None: not ours, or gone);
    `on_fire(rule, line)` is told of each rule just before its signal is sent."""

    def __init__(self, spec: str | None, *, np: int, pid_of: Callable[[str], int | None],
                 on_fire: Callable[[ChaosRule, str], None]) -> None:
        self.rules: list[ChaosRule] = [r for r in parse_chaos(spec) if r.after is not None] \
            if spec else []
        self.np = np
        self.fired: set[int] = set()
        self._pid_of = pid_of
        self._on_fire = on_fire
        self._t0 = time.monotonic()

    def tick(self) -> None:
        """Fire every rule that is due and whose victim runs here."""
        if not self.rules:
            return
        elapsed = time.monotonic() - self._t0
        for rule, victim in timed_victims(self.rules, elapsed=elapsed, fired=self.fired,
                                          np=self.np):
            pid = self._pid_of(victim)
            if pid is None:
                continue  # another starter's worker, or gone: the rule may fire elsewhere
            self.fired.add(rule.index)
            sig = SIGNALS[rule.kind]
            self._on_fire(rule, f"[chaos] sending {sig.name} to worker {victim} (pid {pid}) "
                                f"{elapsed:.1f}s into the job (rule {rule.text!r})")
            procs.kill_group(pid, sig)
