"""The coordinator: an authenticated TCP service for rendezvous, membership and heartbeats.

Hosted by the launcher (so a worker's death never takes it down). It holds the process-group
bootstrap keys (namespaced by generation), the member list, and the generation number that
changes whenever membership changes. Connections whose frames fail the HMAC check are logged
and dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthenticationError
from . import policy
from .protocol import NONCE_BYTES, Channel, connection_key

log = logging.getLogger("phalanx.coord")

FenceFn = Callable[[str, int, bool], None]


@dataclass(kw_only=True, slots=True)
class World:
    """One generation: who is in it, in rank order."""

    generation: int
    workers: list[str]
    hosts: list[str]
    steps: list[int]
    formed_at: float = field(default_factory=time.monotonic)


class CoordServer:
    """Serves one job's coordinator on (host, port); port 0 picks a free one."""

    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0,
                 target_np: int = 1, min_np: int | None = None, max_np: int | None = None,
                 heartbeat_timeout: float = 3.0, settle: float = 1.0,
                 fence: FenceFn | None = None,
                 probe_stopped: Callable[[str, int], bool] | None = None,
                 stopped_timeout: float = 0.5) -> None:
        self._secret = secret
        self.target_np = target_np
        self.min_np = min_np if min_np is not None else target_np
        self.max_np = max_np if max_np is not None else target_np
        self.heartbeat_timeout = heartbeat_timeout
        self.settle = settle
        self.fence = fence
        self.probe_stopped = probe_stopped
        self.stopped_timeout = stopped_timeout
        self._cv = threading.Condition()
        self._kv: dict[str, bytes] = {}
        self._members: dict[str, policy.MemberStatus] = {}
        self._pids: dict[str, int] = {}
        self._world: World | None = None
        self._wait_since: float | None = None
        self._broken: set[int] = set()
        self.events: list[dict[str, Any]] = []
        self.rejected = 0
        self._stop = threading.Event()
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=256)
        self.host, self.port = self._sock.getsockname()[:2]
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- lifecycle
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> CoordServer:
        for target in (self._accept_loop, self._monitor_loop):
            t = threading.Thread(target=target, name=f"phalanx-coord-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._cv:
            conns = list(self._conns)
            self._cv.notify_all()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> CoordServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- public state
    @property
    def generation(self) -> int:
        with self._cv:
            return self._world.generation if self._world else 0

    def world(self) -> World | None:
        with self._cv:
            return self._world

    def declare_lost(self, worker: str, reason: str, *, urgent: bool = True) -> None:
        """Mark a worker lost, break its generation, and fence it (its launcher kills it).

        `urgent` fences at once (a silent but live process); otherwise the launcher kills it
        only if it is still running a moment later (its socket closed because it is exiting).
        """
        with self._cv:
            m = self._members.get(worker)
            if m is None or not m.alive:
                return
            m.alive = False
            m.waiting = False
            pid = self._pids.get(worker, -1)
            if self._world and worker in self._world.workers:
                self._broken.add(self._world.generation)
            self._event("lost", worker=worker, reason=reason)
            self._cv.notify_all()
        log.warning("worker %s lost: %s", worker, reason)
        if self.fence is not None:
            try:
                self.fence(worker, pid, urgent)
            except Exception:  # fencing is best effort; the peer may be gone already
                log.exception("fencing worker %s failed", worker)

    def _event(self, kind: str, **info: Any) -> None:
        self.events.append({"t": time.time(), "event": kind, **info})

    # ----------------------------------------------------------------- threads
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cv:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                                 name="phalanx-coord-conn")
            t.start()

    def _monitor_loop(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._cv:
                # Probe only workers already silent for a while: a /proc read each, cheap.
                quiet = [(m.worker, self._pids.get(m.worker, -1)) for m in self._members.values()
                         if m.alive and m.last_heartbeat
                         and now - m.last_heartbeat > self.stopped_timeout]
            stopped = ({w for w, pid in quiet if pid > 0 and self.probe_stopped(w, pid)}
                       if self.probe_stopped is not None else set())
            with self._cv:
                decision = policy.find_lost(list(self._members.values()), time.monotonic(),
                                            self.heartbeat_timeout, stopped=stopped,
                                            stopped_timeout=self.stopped_timeout)
                self._maybe_form()
            if decision.act:
                for w in decision.members:
                    self.declare_lost(w, decision.reason)

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        nonce = os.urandom(NONCE_BYTES)
        worker: str | None = None
        beating = False
        try:
            conn.sendall(nonce)
            chan = Channel(conn, connection_key(self._secret, nonce), is_server=True)
            while not self._stop.is_set():
                header, payload = chan.recv()
                op = header.get("op")
                if op == "hello":
                    worker = str(header.get("worker", ""))
                    beating = bool(header.get("heartbeat", False))
                    chan.send({"ok": True})
                    continue
                reply, data = self._dispatch(str(op), header, payload)
                chan.send(reply, data)
        except AuthenticationError as e:
            with self._cv:
                self.rejected += 1
            log.warning("rejected connection from %s:%s: %s", addr[0], addr[1], e)
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            with self._cv:
                self._conns.discard(conn)
            conn.close()
            # A heartbeat connection closing without a goodbye means the process died.
            if beating and worker and not self._stop.is_set():
                with self._cv:
                    m = self._members.get(worker)
                    gone = m is not None and m.alive
                if gone:
                    self.declare_lost(worker, "heartbeat connection closed (process exited)",
                                      urgent=False)

    # ----------------------------------------------------------------- requests
    def _dispatch(self, op: str, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}, b""
        return handler(h, payload)

    def _op_set(self, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        with self._cv:
            self._kv[h["key"]] = payload
            self._cv.notify_all()
        return {"ok": True}, b""

    def _op_get(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        key, deadline = h["key"], time.monotonic() + float(h.get("timeout", 30.0))
        with self._cv:
            while key not in self._kv:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return {"ok": False, "error": f"timed out waiting for key {key!r}"}, b""
                self._cv.wait(left)
            return {"ok": True}, self._kv[key]

    def _op_add(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        with self._cv:
            value = int(self._kv.get(h["key"], b"0")) + int(h["amount"])
            self._kv[h["key"]] = str(value).encode()
            self._cv.notify_all()
        return {"ok": True, "value": value}, b""

    def _op_check(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        with self._cv:
            return {"ok": True, "value": all(k in self._kv for k in h["keys"])}, b""

    def _op_wait(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        keys, deadline = h["keys"], time.monotonic() + float(h.get("timeout", 30.0))
        with self._cv:
            while not all(k in self._kv for k in keys):
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    missing = [k for k in keys if k not in self._kv]
                    return {"ok": False, "error": f"timed out waiting for keys {missing}"}, b""
                self._cv.wait(left)
        return {"ok": True}, b""

    def _op_compare_set(self, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        expected = bytes.fromhex(h["expected"])
        with self._cv:
            cur = self._kv.get(h["key"])
            if (cur is None and not expected) or cur == expected:
                self._kv[h["key"]] = payload
                self._cv.notify_all()
                return {"ok": True}, payload
            return {"ok": True}, cur if cur is not None else expected

    def _op_delete(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        with self._cv:
            return {"ok": True, "value": self._kv.pop(h["key"], None) is not None}, b""

    def _op_num_keys(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        with self._cv:
            return {"ok": True, "value": len(self._kv)}, b""

    def _op_join(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        worker = str(h["worker"])
        with self._cv:
            m = self._members.get(worker)
            if m is not None and not m.alive:
                return {"ok": False, "error": f"worker {worker} was declared lost; "
                        "a lost worker cannot rejoin under the same id"}, b""
            if m is None:
                m = policy.MemberStatus(worker=worker, host=str(h.get("host", "")),
                                        rank_hint=int(h.get("rank_hint", -1)))
                self._members[worker] = m
                self._event("joined", worker=worker, host=m.host)
            m.last_heartbeat = time.monotonic()
            self._pids[worker] = int(h.get("pid", -1))
            self._cv.notify_all()
        return {"ok": True}, b""

    def _op_heartbeat(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        worker = str(h["worker"])
        with self._cv:
            m = self._members.get(worker)
            if m is None or not m.alive:
                return {"ok": False, "fenced": True,
                        "error": f"worker {worker} is not a live member"}, b""
            m.last_heartbeat = time.monotonic()
            if "step" in h:
                m.step = int(h["step"])
            return self._status_reply(int(h.get("generation", 0))), b""

    def _status_reply(self, generation: int) -> dict[str, Any]:
        world = self._world
        current = world.generation if world else 0
        lost: list[int] = []
        if world and world.generation == generation:
            lost = [r for r, w in enumerate(world.workers) if not self._members[w].alive]
        waiting_outside = sum(1 for m in self._members.values()
                              if m.alive and m.waiting and (not world or m.worker not in world.workers))
        return {"ok": True, "generation": current, "lost_ranks": lost,
                "broken": generation in self._broken, "newcomers": waiting_outside}

    def _op_status(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        with self._cv:
            return self._status_reply(int(h.get("generation", 0))), b""

    def _op_leave(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        worker = str(h["worker"])
        with self._cv:
            m = self._members.get(worker)
            if m is not None and m.alive:
                m.alive = False
                m.waiting = False
                self._event("left", worker=worker)
                self._cv.notify_all()
        return {"ok": True}, b""

    def _op_rendezvous(self, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        worker, after = str(h["worker"]), int(h.get("after", 0))
        deadline = time.monotonic() + float(h.get("timeout", 60.0))
        with self._cv:
            m = self._members.get(worker)
            if m is None or not m.alive:
                return {"ok": False, "error": f"worker {worker} is not a live member; join first"}, b""
            m.waiting = True
            m.step = int(h.get("step", m.step))
            if self._wait_since is None:
                self._wait_since = time.monotonic()
            self._cv.notify_all()
            while True:
                self._maybe_form()
                w = self._world
                if w is not None and w.generation > after and worker in w.workers:
                    return self._assignment(w, worker), b""
                if not m.alive:
                    return {"ok": False, "error": f"worker {worker} was declared lost"}, b""
                if w is not None and worker not in w.workers and self._finished(w):
                    m.waiting = False
                    return {"ok": False, "finished": True,
                            "error": "the job finished before this worker could join"}, b""
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    m.waiting = False
                    n = sum(1 for x in self._members.values() if x.alive and x.waiting)
                    return {"ok": False, "error": f"rendezvous timed out: {n} worker(s) waiting, "
                            f"need {self.target_np if w is None else self.min_np}"}, b""
                self._cv.wait(min(left, 0.05))

    def _finished(self, w: World) -> bool:
        """Every member of the current generation left cleanly: the job is over."""
        left = {e["worker"] for e in self.events if e["event"] == "left"}
        return all(x in left for x in w.workers)

    def _maybe_form(self) -> None:
        """Form the next generation if the policy says so (caller holds the lock)."""
        members = list(self._members.values())
        if not any(m.waiting for m in members):
            return
        waited = time.monotonic() - (self._wait_since or time.monotonic())
        decision = policy.should_form(members, first=self._world is None, target_np=self.target_np,
                                      min_np=self.min_np, max_np=self.max_np, waited=waited,
                                      settle=self.settle,
                                      current=self._world.workers if self._world else None)
        if not decision.act:
            return
        prev = self._world.workers if self._world else []
        chosen = [self._members[w] for w in decision.members]
        order = policy.order_world(chosen, prev)
        gen = (self._world.generation if self._world else 0) + 1
        self._world = World(generation=gen, workers=order,
                            hosts=[self._members[w].host for w in order],
                            steps=[self._members[w].step for w in order])
        for w in order:
            self._members[w].waiting = False
        self._wait_since = None
        # Bootstrap keys of older generations are dead weight now.
        for k in [k for k in self._kv if k.startswith("g") and k.split("/", 1)[0][1:].isdigit()
                  and int(k.split("/", 1)[0][1:]) < gen - 1]:
            del self._kv[k]
        self._event("generation", generation=gen, workers=order, reason=decision.reason)
        log.info("generation %d formed with %d workers: %s", gen, len(order), decision.reason)
        self._cv.notify_all()

    def _assignment(self, w: World, worker: str) -> dict[str, Any]:
        rank = w.workers.index(worker)
        host = w.hosts[rank]
        local = [i for i, h in enumerate(w.hosts) if h == host]
        return {"ok": True, "generation": w.generation, "rank": rank, "size": len(w.workers),
                "local_rank": local.index(rank), "local_size": len(local),
                "hosts": w.hosts, "workers": w.workers, "steps": w.steps,
                "pids": [self._pids.get(x, -1) for x in w.workers]}
