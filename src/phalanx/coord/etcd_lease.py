"""An etcd lease kept alive from a daemon thread, and the pure rules that say when it is lost.

Keys written with a lease vanish when it expires, which is how a dead agent or coordinator leaves
the job's control plane without anyone cleaning up after it. The holder must also learn that its
lease is gone (or may be gone) *before* acting on what it wrote with it: the keepalive thread sets
`lost` as soon as etcd says the lease has expired, or as soon as the time since the last keepalive
etcd acknowledged reaches the lease's TTL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ConfigError
from .etcd import EtcdClient, EtcdError

log = logging.getLogger("phalanx.coord")


def keepalive_interval(ttl: float) -> float:
    """Seconds between keepalives: a third of the TTL, so two may fail before it expires."""
    return max(0.05, ttl / 3)


def lease_deadline(sent_at: float, granted_ttl: float) -> float:
    """When a lease refreshed by a keepalive *sent* at `sent_at` may expire at the earliest
    (etcd counts the TTL from when it received it, which is later)."""
    return sent_at + granted_ttl


def lease_lost(now: float, deadline: float, *, server_ttl: int | None = None) -> bool:
    """Whether the holder must consider its lease lost: etcd said it is gone (server_ttl <= 0)
    or the deadline of the last acknowledged keepalive has passed."""
    return (server_ttl is not None and server_ttl <= 0) or now >= deadline


class Lease:
    """A lease of `ttl` seconds (whole seconds, at least 1, as etcd counts), granted at once and
    kept alive by start() until stop(). `lost` is set, and `on_lost(reason)` called once, when
    it expires or cannot be refreshed in time; `reason` says why."""

    def __init__(self, client: EtcdClient, ttl: float, *,
                 on_lost: Callable[[str], None] | None = None) -> None:
        if not ttl >= 1:
            raise ConfigError(f"etcd lease ttl {ttl!r} must be at least 1 second (etcd counts "
                              "TTLs in whole seconds); e.g. ttl=5")
        self.client, self.on_lost = client, on_lost
        self.ttl = float(int(-(-ttl // 1)))
        sent = time.monotonic()
        self.id = client.grant(self.ttl)
        self.deadline = lease_deadline(sent, self.ttl)
        self.lost = threading.Event()
        self.reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"etcd-lease {self.id:x}")

    def start(self) -> Lease:
        self._thread.start()
        return self

    def stop(self, *, revoke: bool = True) -> None:
        """Stop refreshing; with revoke=True also end the lease now (its keys are deleted)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.client.timeout + 1)
        if revoke and not self.lost.is_set():
            try:
                self.client.revoke(self.id)
            except EtcdError as e:  # it expires on its own within ttl
                log.warning("could not revoke etcd lease %x (%s); it expires in %gs",
                            self.id, e, self.ttl)
        self._lose("stopped by its holder" if revoke else "keepalive stopped by its holder")

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.reason = reason
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost(reason)

    def _run(self) -> None:
        interval, last_error = keepalive_interval(self.ttl), "none"
        wait = interval
        while not self._stop.wait(wait):
            sent = time.monotonic()
            server_ttl: int | None = None
            try:
                server_ttl = self.client.keepalive_once(
                    self.id, timeout=max(0.05, min(self.client.timeout, self.deadline - sent)))
                if server_ttl > 0:
                    self.deadline = lease_deadline(sent, server_ttl)
                wait = interval
            except EtcdError as e:
                last_error, wait = str(e), min(interval, 0.2)
            if self._stop.is_set():
                return
            if lease_lost(time.monotonic(), self.deadline, server_ttl=server_ttl):
                why = ("etcd says it has expired" if server_ttl is not None and server_ttl <= 0
                       else f"no keepalive was acknowledged for {self.ttl:g}s "
                            f"(last error: {last_error})")
                log.warning("etcd lease %x lost: %s", self.id, why)
                self._lose(f"lease {self.id:x} lost: {why}")
                return
