"""Leader election on one etcd key, with fencing: the coordinator of a job is whoever holds it.

Any agent may campaign; the first to create `<prefix><name>` (with its own lease) leads. The
key's create revision is the leader's fencing token: it is unique to this tenure, and it changes
whenever the key is deleted (resign, lease expiry) and created again by someone else. Every write
a leader makes to the job's state goes through `fenced_put` / `guarded_txn`, a transaction that
applies only while the leader key still has that create revision, so a coordinator that lost
leadership (paused, partitioned, its lease expired) can never write, even before it notices.

A Leadership's `lost` event is set as soon as its holder can tell it may no longer lead: its lease
could not be kept alive, or a watch saw the key deleted or replaced.
"""

from __future__ import annotations

import threading
import time

from ..errors import LeadershipLost
from .etcd import Cmp, EtcdClient, EtcdIndeterminate, KeyValue, Op, TxnResult
from .etcd_lease import Lease
from .etcd_watch import Watch, WatchEvent


def holds(kv: KeyValue | None, lease: int) -> bool:
    """Whether the leader key `kv` was written with our lease (a campaign whose answer was lost
    may have won: this is how it finds out)."""
    return kv is not None and kv.lease == lease


def still_leads(kv_create_revision: int | None, token: int) -> bool:
    """Whether a leader whose fencing token is `token` still leads, given the leader key's
    current create revision (None: no key)."""
    return kv_create_revision is not None and kv_create_revision == token


def ends_tenure(event: WatchEvent, token: int) -> bool:
    """Whether a change to the leader key ends the tenure of `token`."""
    return event.type == "delete" or not still_leads(event.create_revision, token)


class Leadership:
    """A won election: `revision` is the fencing token, `lost` is set when it may be over."""

    def __init__(self, election: Election, value: bytes, revision: int, lease: Lease) -> None:
        self.election, self.value, self.revision, self.lease = election, value, revision, lease
        self.lost = threading.Event()
        self.reason = ""
        lease.on_lost = self._lose
        if lease.lost.is_set():
            self._lose(lease.reason)
        self._watch = Watch(election.client, election.key, revision + 1, self._changed,
                            prefix=False, on_error=lambda e: self._lose(f"watch failed: {e}"))
        self._watch.start()

    def __repr__(self) -> str:
        state = f"lost: {self.reason}" if self.lost.is_set() else "leading"
        return f"<Leadership {self.election.key!r} token={self.revision} {state}>"

    def _changed(self, event: WatchEvent) -> None:
        if ends_tenure(event, self.revision):
            self._lose(f"the leader key was {'deleted' if event.type == 'delete' else 'replaced'}"
                       f" at revision {event.mod_revision}")

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()

    def resign(self) -> None:
        """Give up leadership: delete the key if it is still ours, end the lease. Idempotent."""
        self._watch.cancel()
        client, key = self.election.client, self.election.key
        if not self.lost.is_set():
            try:
                client.txn([Cmp(key, "CREATE", self.revision)], [Op("delete", key)])
            finally:
                self._lose("resigned")
        self.lease.stop(revoke=True)


class Election:
    """A leader election on the key `<client prefix><name>`; the leader's lease lasts `ttl`
    seconds (whole seconds, at least 1) past its last acknowledged keepalive."""

    def __init__(self, client: EtcdClient, name: str = "leader", ttl: float = 5.0) -> None:
        self.client, self.key, self.ttl = client, name, ttl

    def leader(self) -> tuple[bytes, int] | None:
        """(value, fencing token) of the current leader, or None when there is none."""
        kv = self.client.get_kv(self.key)
        return None if kv is None else (kv.value, kv.create_revision)

    def campaign(self, value: bytes, timeout: float | None = None) -> Leadership:
        """Become the leader, waiting while another one leads (forever with timeout=None).
        Raises LeadershipLost if `timeout` passes first (its message names the current leader)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lease = Lease(self.client, self.ttl).start()
        try:
            while True:
                won, kv = self._try(value, lease.id)
                if won is not None:
                    return Leadership(self, value, won, lease)
                if kv is not None:
                    self._wait_gone(kv, deadline, lease)
        except BaseException:
            lease.stop(revoke=True)
            raise

    def _try(self, value: bytes, lease: int) -> tuple[int | None, KeyValue | None]:
        """One attempt to create the key: (our fencing token or None, the current leader)."""
        try:
            r: TxnResult = self.client.txn([Cmp(self.key, "CREATE", 0)],
                                           [Op("put", self.key, value, lease)],
                                           [Op("get", self.key)])
        except EtcdIndeterminate:
            kv = self.client.get_kv(self.key)
            return (kv.create_revision if holds(kv, lease) else None), kv  # type: ignore[union-attr]
        if r.succeeded:
            return r.revision, None
        kv = r.gets[0][0] if r.gets and r.gets[0] else None
        return (kv.create_revision if holds(kv, lease) else None), kv  # type: ignore[union-attr]

    def _wait_gone(self, kv: KeyValue, deadline: float | None, lease: Lease) -> None:
        """Wait until the leader key `kv` is deleted (or changes hands), the deadline passes
        (LeadershipLost), or our own lease is lost."""
        gone = threading.Event()
        watch = Watch(self.client, self.key, kv.mod_revision + 1,
                      lambda ev: gone.set() if ends_tenure(ev, kv.create_revision) else None,
                      prefix=False, on_error=lambda e: gone.set()).start()
        try:
            while not gone.wait(0.1):
                if lease.lost.is_set():
                    raise LeadershipLost(f"campaign for {self.key!r}: {lease.reason}")
                if deadline is not None and time.monotonic() >= deadline:
                    raise LeadershipLost(
                        f"campaign for {self.key!r} timed out: {kv.value!r} still leads "
                        f"(token {kv.create_revision}); wait longer or check that leader")
        finally:
            watch.cancel()

    def guarded_txn(self, leadership: Leadership, success: list[Op],
                    failure: list[Op] = ()) -> TxnResult:
        """Run `success` only while `leadership` still holds the leader key; LeadershipLost
        (and `leadership.lost` set) otherwise."""
        r = self.client.txn([Cmp(self.key, "CREATE", leadership.revision)], success, failure)
        if not r.succeeded:
            leadership._lose("a fenced write was refused: the leader key changed hands")
            raise LeadershipLost(
                f"not the leader of {self.key!r} any more (token {leadership.revision} is "
                "stale): the write was refused; stop coordinating and campaign again")
        return r

    def fenced_put(self, leadership: Leadership, key: bytes | str, value: bytes) -> int:
        """Write `key` only while `leadership` still leads; the revision of the write."""
        return self.guarded_txn(leadership, [Op("put", key, value)]).revision
