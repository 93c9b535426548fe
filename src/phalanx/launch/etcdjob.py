"""`phalanx run --etcd`: the launcher's side of keeping the job's membership in etcd.

Parses the --etcd options into `EtcdSettings`, and makes this launcher's coordinator the job's
leader there before any worker starts (so an unreachable etcd fails the job at once, with the
endpoints and the fix, instead of after the workers started).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from ..coord.durable import DurableRecord, EtcdSettings, parse_endpoints
from ..errors import ConfigError, EtcdUnavailable, LeadershipLost, PhalanxError


def settings(endpoints: str | None, cacert: str | None, cert: str | None,
             key: str | None) -> EtcdSettings | None:
    """The --etcd options as settings (None without --etcd); TLS files must exist."""
    if endpoints is None:
        if any((cacert, cert, key)):
            raise ConfigError("--etcd-cacert/--etcd-cert/--etcd-key need --etcd HOST:PORT,...")
        return None
    for flag, path in (("--etcd-cacert", cacert), ("--etcd-cert", cert), ("--etcd-key", key)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path!r}: no such file; give the PEM file etcdctl would "
                              f"be given as --{flag.removeprefix('--etcd-')}")
    if (cert is None) != (key is None):
        raise ConfigError("--etcd-cert and --etcd-key go together (a client certificate and "
                          "its key): pass both or neither")
    return EtcdSettings(endpoints=parse_endpoints(endpoints), cacert=cacert, cert=cert, key=key)


def lead(s: EtcdSettings, *, job_id: str, host: str, address: str,
         job: dict[str, Any]) -> DurableRecord:
    """Make this coordinator the job's leader in etcd and write the job record; a PhalanxError
    saying what to fix when etcd cannot be used."""
    record = DurableRecord(s.client(job_id), ttl=s.ttl)
    leader = {"host": host, "pid": os.getpid(), "address": address,
              "nonce": secrets.token_hex(8)}
    try:
        record.start(leader, {**job, "host": host, "started": time.time()}, timeout=s.timeout)
    except EtcdUnavailable as e:
        raise PhalanxError(f"--etcd: {e}") from None
    except LeadershipLost as e:
        raise PhalanxError(f"--etcd: job {job_id} already has a coordinator there ({e})") from None
    return record


def outcome(rc: int, summary: str) -> str:
    """The job's outcome record."""
    return json.dumps({"rc": rc, "summary": summary, "ended": time.time()})
