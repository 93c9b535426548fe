"""Names of a job's intra-host shared-memory files (no torch: the launcher imports this).

One segment per membership generation (and host, for the hierarchical path), plus the gradient
buffers a rank shares next to it::

    /dev/shm/phalanx-<job>-g<generation>[-h<host>]-<token>
    /dev/shm/phalanx-<job>-g<generation>[-h<host>]-<token>.b<local rank>.<seq>-<token>

Every name starts with `job_prefix(job_id)`, so the launcher can remove a crashed job's files.
Each ends with its own token, ``HMAC(job key, name)``: every worker of the job holds the key and
no other local user does, so nobody else can plant a file at a name the job will use, and seeing
one name (``ls /dev/shm``) tells nothing about the next generation's or the next buffer's.
"""

from __future__ import annotations

import hashlib
import hmac
import os

SHM_DIR = "/dev/shm"
TOKEN_HEX = 16
"""Hex digits of a name's token (64 bits: far beyond what planting files can guess)."""


def job_prefix(job_id: str) -> str:
    """The file-name prefix every shared-memory file of job `job_id` starts with."""
    return f"phalanx-{job_id}-"


def name_token(secret: str | bytes, label: str) -> str:
    """The token that ends the name `label`: unguessable without the job's `secret`."""
    key = secret.encode() if isinstance(secret, str) else secret
    if not key:
        raise ValueError("name_token: the job secret is empty; shared-memory names must be "
                         "keyed by the job's secret (PHALANX_SECRET, or the static job's key)")
    mac = hmac.new(key, b"phalanx-shm-name\0" + label.encode(), hashlib.sha256)
    return mac.hexdigest()[:TOKEN_HEX]


def _keyed(label: str, secret: str | bytes) -> str:
    return f"{label}-{name_token(secret, label)}"


def segment_path(job_id: str, generation: int, *, secret: str | bytes,
                 host: int | None = None) -> str:
    """Path of one generation's intra-host segment (`host`: the host's index, hierarchical
    path only, so hosts that share a /dev/shm never collide)."""
    label = f"{job_prefix(job_id)}g{generation}" + ("" if host is None else f"-h{host}")
    return os.path.join(SHM_DIR, _keyed(label, secret))


def buffer_path(segment: str, local_rank: int, seq: int, *, secret: str | bytes) -> str:
    """Path of local rank `local_rank`'s `seq`-th shared buffer next to `segment`."""
    return _keyed(f"{segment}.b{local_rank}.{seq}", secret)
