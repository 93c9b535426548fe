"""The coordinator's side of what workers report for the launcher: events for its summary
(a chaos rule about to fire, a failed checkpoint save), a worker's first step, an exception that fails the job, a
resume from a checkpoint. Guarded by the membership's `cv`, like `StarterOps`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .policy import MemberStatus
from .store_ops import BadRequest, Reply, _int, _str
from .waits import WORLD

log = logging.getLogger("phalanx.coord")


class ReportOps:
    """Workers' reports, answered under the membership's lock."""

    cv: threading.Condition
    members: dict[str, MemberStatus]
    world: Any
    broken: set[int]
    errors: dict[str, dict[str, Any]]
    seen_keys: set[str]
    fail_on_error: bool
    failed: str | None
    max_step: int
    ranks: dict[str, int]
    _quiet: bool
    wake: Callable[[tuple[str, ...]], None]
    _event: Callable[..., None]
    """Membership's: record an event for the launcher."""
    _members_changed: Callable[..., None]
    """Membership's: a member left the books; rendezvous and formation look again."""

    def _op_event(self, h: dict[str, Any], _: bytes) -> Reply:
        """A worker reports something for the launcher's summary (e.g. a chaos rule about to
        fire). `first` in the reply says whether this `key` was reported before, so a rule
        fires once per job even when a replacement passes the same step again."""
        worker, kind = _str(h, "worker", 256), _str(h, "kind", 64)
        info, key = h.get("info", {}), h.get("key")
        if not isinstance(info, dict) or len(str(info)) > 4096:
            raise BadRequest("field 'info' must be a small object")
        with self.cv:
            first = key is None or f"{kind}/{key}" not in self.seen_keys
            if key is not None:
                self.seen_keys.add(f"{kind}/{str(key)[:256]}")
            if first:
                self._event(f"worker-{kind}", news=False, worker=worker, info=info)
        return {"ok": True, "first": first}, b""

    def _op_failed(self, h: dict[str, Any], _: bytes) -> Reply:
        """A worker is exiting on an exception (a bug, not a fault): it is gone, its
        generation is broken, and nobody needs to fence it."""
        worker, error = _str(h, "worker", 256), h.get("error")
        if not isinstance(error, dict) or len(str(error)) > 8192:
            raise BadRequest("field 'error' must be a small object")
        with self.cv:
            m = self.members.get(worker)
            if m is None or not m.alive:
                return {"ok": True}, b""
            m.alive = m.waiting = False
            if self.world and worker in self.ranks:
                self.broken.add(self.world.generation)
            self.errors[worker] = {str(k): v for k, v in error.items()}
            self._event("error", worker=worker, error=self.errors[worker])
            if self.fail_on_error and not error.get("cascade") and self.failed is None:
                self.failed = f"worker {worker} raised {error.get('type')}"
                self.wake((WORLD,))
            self._members_changed(worker)
        if not self._quiet and not error.get("cascade"):
            log.warning("worker %s raised %s at %s", worker, error.get("type"), error.get("where"))
        return {"ok": True}, b""

    def _op_progress(self, h: dict[str, Any], _: bytes) -> Reply:
        """A worker completed its first step: heard at once rather than with its next beat, so
        the job knows it has trained even if every worker dies before beating again."""
        worker, step = _str(h, "worker", 256), _int(h, "step")
        with self.cv:
            m = self.members.get(worker)
            if m is not None and m.alive:
                m.step = max(m.step, step)
                self.max_step = max(self.max_step, step)
        return {"ok": True}, b""

    def _op_rebase(self, h: dict[str, Any], _: bytes) -> Reply:
        """The job resumed from a checkpoint at `step`: steps after it are gone for good."""
        step = _int(h, "step")
        with self.cv:
            self.max_step = step
            self._event("rebased", news=False, step=step)
        return {"ok": True}, b""
