"""The coordinator's side of remote starters: agents (`phalanx agent`) and `phalanx join`.

A starter spawns workers on its host. It long-polls `watch` for orders (fence these workers,
spawn those), reports which of its workers are stopped (SIGSTOP is visible only on their
host), and reports each worker's exit with `exited`; the launcher reads those exits as it reads
its own children's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .store_ops import BadRequest, _int, _seconds, _str
from .waits import WORLD, Answer, Reply, Wait, starter_topic


class StarterOps:
    """Orders for starters and their reports, guarded by the membership's `cv`."""

    cv: threading.Condition
    _stop: threading.Event
    starters: dict[str, str]
    orders: dict[str, list[tuple[str, int]]]
    spawns: dict[str, list[tuple[int, str]]]
    exits: list[dict[str, Any]]
    stopped_reports: dict[str, float]
    starter_seen: dict[str, float]
    """Starter -> when it last asked for orders or reported an exit (time.monotonic())."""
    failed: str | None
    ranks: dict[str, int]
    world: Any
    wake: Callable[[tuple[str, ...]], None]

    def order_spawn(self, starter: str, slot: int, worker: str) -> None:
        """Ask `starter` to start a worker for rank slot `slot` under id `worker`."""
        with self.cv:
            self.spawns.setdefault(starter, []).append((slot, worker))
            self.starters[worker] = starter
            self.wake((starter_topic(starter),))

    def last_contact(self, starter: str) -> float | None:
        """When `starter` last asked for orders or reported an exit (time.monotonic()), or
        None if never: an agent silent while all its workers are lost is a cut-off host."""
        with self.cv:
            return self.starter_seen.get(starter)

    def forget_starter(self, starter: str) -> None:
        """Drop orders still queued for a starter that ended, so the next agent started under
        the same name (its host came back) does not act on them."""
        with self.cv:
            self.orders.pop(starter, None)
            self.spawns.pop(starter, None)

    def take_exits(self) -> list[dict[str, Any]]:
        """Worker exits starters reported since the last call."""
        with self.cv:
            out, self.exits = self.exits, []
            return out

    def _op_watch(self, h: dict[str, Any], _: bytes) -> Answer:
        """A starter elsewhere (an agent, `phalanx join`) waits for fence orders for its
        workers and reports which of them are stopped (SIGSTOP: state T)."""
        starter, stopped = _str(h, "starter", 256), h.get("stopped", [])
        mine, known = h.get("workers", []), _int(h, "generation", -1)
        for name, ids in (("stopped", stopped), ("workers", mine)):
            if not isinstance(ids, list) or not all(isinstance(w, str) for w in ids):
                raise BadRequest(f"field {name!r} must be a list of worker ids")
        deadline = time.monotonic() + min(_seconds(h, "timeout", 1.0), 5.0)
        with self.cv:
            now = time.monotonic()
            self.starter_seen[starter] = now
            for w in stopped[:1024]:
                if self.starters.get(w) == starter:
                    self.stopped_reports[w] = now

        def retry() -> Reply | None:
            with self.cv:
                news = self.orders.get(starter) or self.spawns.get(starter) or (
                    mine and self.world is not None and self.world.generation != known)
                return self._watch_reply(starter, mine, known) if news else None

        def expire() -> Reply:
            with self.cv:
                return self._watch_reply(starter, mine, known)

        return retry() or Wait(retry, expire, deadline, (starter_topic(starter), WORLD))

    def _watch_reply(self, starter: str, mine: list[str], known: int) -> Reply:
        """Hand a starter its orders, and its workers' ranks if its generation is old (lock
        held)."""
        self.starter_seen[starter] = time.monotonic()  # it was connected all along
        orders = self.orders.pop(starter, [])
        spawns = self.spawns.pop(starter, [])
        generation = self.world.generation if self.world is not None else 0
        reply = {"ok": True, "fence": [list(o) for o in orders],
                 "spawn": [list(s) for s in spawns], "failed": self.failed,
                 "generation": generation}
        if generation != known:  # ranks change only with the generation
            reply["ranks"] = {w: self.ranks[w] for w in mine[:1024] if w in self.ranks}
        return reply, b""

    def _op_exited(self, h: dict[str, Any], _: bytes) -> Reply:
        """A starter's worker exited: its code, and the exception it reported, if any."""
        starter, worker = _str(h, "starter", 256), _str(h, "of", 256)
        code, slot, pid = _int(h, "code"), _int(h, "slot", -1), _int(h, "pid", -1)
        error, oom = h.get("error"), str(h.get("oom", ""))[:512]
        if error is not None and (not isinstance(error, dict) or len(str(error)) > 32768):
            raise BadRequest("field 'error' must be a small object or null")
        with self.cv:
            # A worker that died before it joined (during its imports, say) is known to no
            # one yet: its starter's word is all there is, and the launcher must hear of it.
            if self.starters.setdefault(worker, starter) != starter:
                raise BadRequest(f"worker {worker!r} was not started by {starter!r}")
            self.starter_seen[starter] = time.monotonic()
            self.exits.append({"worker": worker, "slot": slot, "pid": pid, "code": code,
                               "fenced": bool(h.get("fenced")), "error": error,
                               "oom": oom, "seen": time.time()})
        return {"ok": True}, b""
