"""A small etcd v3 client over etcd's JSON gateway (HTTP, optionally TLS), standard library only.

The durable part of a job's control plane (job, generation, members, step watermark, leader)
lives in etcd when the job runs with `--etcd`. This client is what the coordinator and agents use
to reach it: key-value reads and writes, compare-and-set transactions, leases, and watches
(`etcd_watch.py`), all confined to one per-job key prefix, so jobs that share an etcd cluster
never see each other's keys.

Failover: endpoints are tried in order, starting from the last one that answered; a connection
error or a member that has lost its leader moves on to the next. An operation that reaches no
working member within `timeout` raises `EtcdUnavailable`, naming every endpoint tried and the last
error. Every request carries gRPC metadata `hasleader=true`, so a member cut off from the quorum
refuses at once instead of stalling until its own request timeout.

Trust: the cluster is the job's own infrastructure, but its answers are still bounded (a response
over `max_response` bytes is an error, never read into memory) and checked (keys outside the
prefix are refused).
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, EtcdError, EtcdIndeterminate, EtcdUnavailable
from .etcd_wire import (
    Cmp,
    KeyValue,
    Op,
    TxnResult,
    b64,
    parse_endpoint,
    range_end,
    tls_context,
    unb64,
)

__all__ = ["Cmp", "EtcdClient", "EtcdError", "EtcdIndeterminate", "EtcdUnavailable", "KeyValue",
           "Op", "TxnResult", "range_end"]

MAX_RESPONSE = 64 << 20
"""Largest response body read into memory (bytes); a larger one is an error."""

UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED = 14, 4, 16
"""gRPC status codes the gateway reports in its error bodies that decide a retry."""

FIX_HINT = ("start etcd there, or check --etcd (host:port,...) and, for TLS, "
            "--etcd-cacert/--etcd-cert/--etcd-key")


class _Retry(Exception):
    """This endpoint could not serve the request; try the next one. `sent`: it may have run."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.sent = sent


class EtcdClient:
    """Key-value, transaction and lease calls on one job's prefix; thread-safe (one HTTP
    connection per thread and endpoint)."""

    def __init__(self, endpoints: list[str], *, prefix: str, timeout: float = 5.0,
                 cacert: str | None = None, cert: str | None = None, key: str | None = None,
                 user: str | None = None, password: str | None = None,
                 attempt_timeout: float = 1.0, max_response: int = MAX_RESPONSE) -> None:
        if not endpoints:
            raise ConfigError("no etcd endpoint given: pass --etcd host:port[,host:port...]")
        if not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) < 3:
            raise ConfigError(f"etcd key prefix {prefix!r} must start and end with '/' and name "
                              "the job, e.g. '/phalanx/<job-id>/'")
        if timeout <= 0:
            raise ConfigError(f"etcd timeout {timeout!r} must be > 0 seconds")
        if (user is None) != (password is None):
            raise ConfigError("etcd user and password go together: pass both or neither")
        tls = any(p is not None for p in (cacert, cert, key))
        self.endpoints = list(endpoints)
        self._parsed = [parse_endpoint(e, tls) for e in endpoints]
        self._ssl = tls_context(cacert, cert, key) if tls or any(
            s == "https" for s, _, _ in self._parsed) else None
        self.prefix = prefix.encode()
        self.timeout, self.max_response = float(timeout), int(max_response)
        # One member may hold a request forever (a write forwarded to a leader that just died
        # waits for etcd's own 5 s request timeout): give up on it after this and resend.
        self.attempt_timeout = float(attempt_timeout)
        self._user, self._password = user, password
        self._token: str | None = None
        self._current = 0  # index of the endpoint that last answered
        self._local = threading.local()

    # -- keys: every key is relative to the prefix, and nothing outside it is ever touched
    def full_key(self, key: bytes | str) -> bytes:
        return self.prefix + (key.encode() if isinstance(key, str) else key)

    def relative(self, key: bytes) -> bytes:
        if not key.startswith(self.prefix):
            raise EtcdError(f"etcd returned key {key!r} outside this job's prefix "
                            f"{self.prefix!r}; refusing it")
        return key[len(self.prefix):]

    def _kv(self, raw: dict[str, Any]) -> KeyValue:
        return KeyValue(self.relative(unb64(raw.get("key"))), unb64(raw.get("value")),
                        int(raw.get("mod_revision", 0)), int(raw.get("create_revision", 0)),
                        int(raw.get("version", 0)), int(raw.get("lease", 0)))

    # -- key-value
    def get(self, key: bytes | str) -> tuple[bytes, int] | None:
        """(value, mod_revision) of `key`, or None when it does not exist."""
        kv = self.get_kv(key)
        return None if kv is None else (kv.value, kv.mod_revision)

    def get_kv(self, key: bytes | str) -> KeyValue | None:
        out = self.call("kv/range", {"key": b64(self.full_key(key))})
        kvs = out.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def get_prefix(self, key_prefix: bytes | str = b"") -> list[tuple[bytes, bytes, int]]:
        """Every (key, value, mod_revision) whose key starts with `key_prefix`, sorted by key."""
        return [(kv.key, kv.value, kv.mod_revision) for kv in self.range_prefix(key_prefix)[0]]

    def range_prefix(self, key_prefix: bytes | str = b"") -> tuple[list[KeyValue], int]:
        """Every key under `key_prefix`, and the store revision the read saw."""
        full = self.full_key(key_prefix)
        out = self.call("kv/range", {"key": b64(full), "range_end": b64(range_end(full))})
        return [self._kv(kv) for kv in out.get("kvs") or []], self._revision(out)

    def put(self, key: bytes | str, value: bytes, lease: int | None = None) -> int:
        """Write `key`; the store revision of the write."""
        body: dict[str, Any] = {"key": b64(self.full_key(key)), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return self._revision(self.call("kv/put", body))

    def delete(self, key: bytes | str, *, prefix: bool = False) -> int:
        """Delete `key` (or every key under it with prefix=True); how many were deleted."""
        full = self.full_key(key)
        body = {"key": b64(full), **({"range_end": b64(range_end(full))} if prefix else {})}
        return int(self.call("kv/deleterange", body).get("deleted", 0))

    def put_if(self, key: bytes | str, value: bytes, *, mod_revision: int,
               lease: int | None = None) -> bool:
        """Compare-and-set: write `key` only if its mod revision is `mod_revision` (0: only if
        it does not exist). True if written."""
        return self.txn([Cmp(key, "MOD", mod_revision)],
                        [Op("put", key, value, lease or 0)]).succeeded

    def txn(self, compare: list[Cmp], success: list[Op], failure: list[Op] = ()) -> TxnResult:
        """One atomic transaction. Raises EtcdIndeterminate if its answer was lost."""
        body = {"compare": [self._cmp(c) for c in compare],
                "success": [self._op(o) for o in success],
                "failure": [self._op(o) for o in failure]}
        out = self.call("kv/txn", body, idempotent=False)
        gets = [[self._kv(kv) for kv in (r["response_range"].get("kvs") or [])]
                for r in out.get("responses") or [] if "response_range" in r]
        return TxnResult(bool(out.get("succeeded")), self._revision(out), gets)

    def _cmp(self, c: Cmp) -> dict[str, Any]:
        field = {"VALUE": "value", "VERSION": "version", "CREATE": "create_revision",
                 "MOD": "mod_revision", "LEASE": "lease"}.get(c.target)
        if field is None:
            raise ConfigError(f"Cmp target {c.target!r} is not VALUE, VERSION, CREATE, MOD or LEASE")
        value = b64(c.value) if isinstance(c.value, bytes) else str(c.value)
        return {"key": b64(self.full_key(c.key)), "target": c.target, "result": c.result,
                field: value}

    def _op(self, o: Op) -> dict[str, Any]:
        full = self.full_key(o.key)
        req: dict[str, Any] = {"key": b64(full)}
        if o.prefix:
            req["range_end"] = b64(range_end(full))
        if o.kind == "put":
            req["value"] = b64(o.value)
            if o.lease:
                req["lease"] = str(o.lease)
            return {"request_put": req}
        if o.kind in ("get", "delete"):
            return {"request_range" if o.kind == "get" else "request_delete_range": req}
        raise ConfigError(f"Op kind {o.kind!r} is not 'put', 'get' or 'delete'")

    # -- leases
    def grant(self, ttl: float) -> int:
        """A new lease of `ttl` seconds (rounded up to whole seconds, as etcd counts); its id."""
        out = self.call("lease/grant", {"TTL": str(max(1, int(-(-ttl // 1))))})
        if out.get("error"):
            raise EtcdError(f"etcd refused a lease of {ttl}s: {out['error']}")
        return int(out["ID"])

    def keepalive_once(self, lease: int, timeout: float | None = None) -> int:
        """Refresh `lease`; its remaining TTL in seconds (0: the lease has expired or is gone)."""
        out = self.call("lease/keepalive", {"ID": str(lease)}, timeout=timeout)
        return int((out.get("result") or {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End `lease` now, deleting every key attached to it (a missing lease is not an error)."""
        try:
            self.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if e.code != 5:  # NotFound: already expired
                raise

    def watch(self, key_prefix: bytes | str, start_revision: int,
              on_event: Callable[[Any], None], stop: threading.Event | None = None,
              **kw: Any) -> Any:
        """Start a streaming watch of the keys under `key_prefix` from `start_revision` (0: now)
        in a daemon thread; it runs until `stop` is set. See etcd_watch.Watch (returned)."""
        from .etcd_watch import Watch  # the watch module builds on this one
        return Watch(self, key_prefix, start_revision, on_event, stop, **kw).start()

    def status(self) -> dict[str, Any]:
        """The status of the first member that answers (version, leader, raft indices...)."""
        return self.call("maintenance/status", {})

    @staticmethod
    def _revision(out: dict[str, Any]) -> int:
        return int((out.get("header") or {}).get("revision", 0))

    # -- transport
    def call(self, path: str, body: dict[str, Any], *, idempotent: bool = True,
             timeout: float | None = None) -> dict[str, Any]:
        """POST `body` to /v3/`path` on the first endpoint that serves it within `timeout`."""
        start = time.monotonic()
        deadline = start + (self.timeout if timeout is None else timeout)
        payload = json.dumps(body).encode()
        errors: dict[str, str] = {}  # endpoint -> its last error, in the order tried
        pause, n = 0.02, len(self.endpoints)
        while True:
            for i in range(n):
                idx = (self._current + i) % n
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    out = self._request(idx, path, payload,
                                        min(self.attempt_timeout, max(0.05, left / (n - i))))
                except _Retry as e:
                    errors[self.endpoints[idx]] = str(e)
                    if e.sent and not idempotent:
                        raise EtcdIndeterminate(
                            f"etcd /v3/{path} was sent to {self.endpoints[idx]} but its answer "
                            f"was lost ({e}); it may have been applied: read the keys to learn "
                            "the outcome") from None
                    continue
                self._current = idx
                return out
            if time.monotonic() + pause >= deadline:
                raise EtcdUnavailable(
                    f"no etcd endpoint answered /v3/{path} within {deadline - start:.1f}s; "
                    f"tried {', '.join(f'{ep} ({err})' for ep, err in errors.items()) or 'none'}"
                    f". Fix: {FIX_HINT}", code=UNAVAILABLE)
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _connection(self, idx: int, timeout: float) -> http.client.HTTPConnection:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(idx)
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            # An idle keep-alive connection the member closed (it died, or restarted): a request
            # on it would fail after being "sent", and a transaction would look indeterminate.
            self._drop(idx)
            conn = None
        if conn is None:
            scheme, host, port = self._parsed[idx]
            conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
                    if scheme == "https" else http.client.HTTPConnection(host, port,
                                                                         timeout=timeout))
            conns[idx] = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, idx: int) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(idx, None)
        if conn is not None:
            conn.close()

    def headers(self) -> dict[str, str]:
        """Headers of every request: JSON, the leader requirement, the auth token if any."""
        h = {"Content-Type": "application/json", "Grpc-Metadata-hasleader": "true"}
        if self._token:
            h["Authorization"] = self._token
        return h

    def _request(self, idx: int, path: str, payload: bytes, timeout: float, *,
                 reauth: bool = True) -> dict[str, Any]:
        """One attempt on one endpoint; _Retry when another endpoint might do better."""
        if self._user is not None and self._token is None and path != "auth/authenticate":
            self._authenticate(idx, timeout)
        conn = self._connection(idx, timeout)
        sent = False
        try:
            if conn.sock is None:
                conn.connect()
            conn.request("POST", "/v3/" + path, payload, self.headers())
            sent = True
            resp = conn.getresponse()
            data = read_bounded(resp.read, self.max_response, f"/v3/{path}")
        except EtcdError:
            self._drop(idx)
            raise
        except (OSError, http.client.HTTPException) as e:
            self._drop(idx)
            raise _Retry(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                         sent=sent) from None
        out = self._decode(idx, path, resp.status, data)
        if out is None and reauth:  # our token expired: authenticate again, retry here once
            self._token = None
            return self._request(idx, path, payload, timeout, reauth=False)
        if out is None:
            raise EtcdError(f"etcd {self.endpoints[idx]} refused our fresh auth token for user "
                            f"{self._user!r}", code=UNAUTHENTICATED)
        return out

    def _decode(self, idx: int, path: str, status: int, data: bytes) -> dict[str, Any] | None:
        """The answer, _Retry, or EtcdError; None: the auth token must be renewed."""
        try:
            out = json.loads(data) if data else {}
        except ValueError:
            raise EtcdError(f"{self.endpoints[idx]} answered /v3/{path} with HTTP {status} and "
                            f"non-JSON {data[:200]!r}: is it an etcd 3.4+ client URL?") from None
        if status == 200 and isinstance(out, dict):
            return out
        code = int(out.get("code", 0)) if isinstance(out, dict) else 0
        msg = (out.get("error") or out.get("message")) if isinstance(out, dict) else None
        msg = msg or f"HTTP {status} {data[:200]!r}"
        if code == UNAVAILABLE or code == DEADLINE_EXCEEDED or status in (502, 503, 504):
            ambiguous = "no leader" not in msg and "not capable" not in msg
            raise _Retry(msg, sent=ambiguous)
        if code == UNAUTHENTICATED and self._user is not None and self._token is not None:
            return None
        raise EtcdError(f"etcd {self.endpoints[idx]} refused /v3/{path}: {msg}", code=code)

    def ensure_token(self, idx: int) -> None:
        """With user/password: get an auth token from endpoint `idx` unless we hold one."""
        if self._user is not None and self._token is None:
            try:
                self._authenticate(idx, self.attempt_timeout)
            except _Retry as e:
                raise EtcdUnavailable(f"cannot authenticate at {self.endpoints[idx]}: {e}. "
                                      f"Fix: {FIX_HINT}") from None

    def _authenticate(self, idx: int, timeout: float) -> None:
        body = json.dumps({"name": self._user, "password": self._password}).encode()
        out = self._request(idx, "auth/authenticate", body, timeout)
        self._token = out.get("token") or None
        if self._token is None:
            raise EtcdError(f"etcd {self.endpoints[idx]} gave no token for user {self._user!r}")

    def close(self) -> None:
        """Close this thread's connections (others close when their threads end)."""
        for idx in list(self._local.__dict__.get("conns", {})):
            self._drop(idx)


def read_bounded(read: Callable[[int], bytes], limit: int, what: str) -> bytes:
    """Read a whole body through `read(n)`, failing clearly past `limit` bytes."""
    data = read(limit + 1)
    if len(data) > limit:
        raise EtcdError(f"etcd's answer to {what} is over {limit} bytes; refusing to read it "
                        "(raise max_response, or read fewer keys at once)")
    return data
