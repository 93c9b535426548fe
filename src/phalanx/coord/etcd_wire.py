"""The wire vocabulary of phalanx's etcd client: key-value records, transaction comparisons and
operations, base64 and key-range helpers, endpoint parsing, and the TLS context (as etcdctl's
--cacert/--cert/--key build it). Pure data and pure functions; nothing here talks to etcd.
"""

from __future__ import annotations

import base64
import os
import ssl
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd holds it; `key` is relative to the client's prefix."""
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class Cmp:
    """One comparison of a transaction: `target` of `key` `result` `value`.
    target: "VALUE", "VERSION", "CREATE" (create revision), "MOD" (mod revision), "LEASE";
    result: "EQUAL", "NOT_EQUAL", "GREATER", "LESS". A key that does not exist has create,
    mod revision and version 0."""
    key: bytes | str
    target: str
    value: int | bytes
    result: str = "EQUAL"


@dataclass(frozen=True, slots=True)
class Op:
    """One request of a transaction: kind "put", "get" or "delete"; `prefix` makes get and delete
    cover every key starting with `key`."""
    kind: str
    key: bytes | str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class TxnResult:
    """What a transaction did: which branch ran, the store revision after it, and the keys each
    get of the branch read (one list per get op, in order)."""
    succeeded: bool
    revision: int
    gets: list[list[KeyValue]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def parse_endpoint(endpoint: str, tls: bool) -> tuple[str, str, int]:
    """'host:port' or 'http(s)://host:port' -> (scheme, host, port); ConfigError otherwise."""
    scheme, _, rest = endpoint.rpartition("://")
    scheme = scheme or ("https" if tls else "http")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("http", "https") or not sep or not host or not port.isdigit():
        raise ConfigError(f"etcd endpoint {endpoint!r} (--etcd) is not 'host:port' or "
                          "'http(s)://host:port'; e.g. --etcd 10.0.0.1:2379,10.0.0.2:2379")
    return scheme, host.strip("[]"), int(port)


def _check_file(option: str, path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{option} {path!r}: no such file; pass the PEM file etcdctl would "
                          f"take as {option.replace('etcd-', '')}")


def tls_context(cacert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A client TLS context as etcdctl's --cacert/--cert/--key build it; clear errors."""
    for option, path in (("--etcd-cacert", cacert), ("--etcd-cert", cert), ("--etcd-key", key)):
        _check_file(option, path)
    if (cert is None) != (key is None):
        raise ConfigError("--etcd-cert and --etcd-key go together: pass both or neither")
    try:
        ctx = ssl.create_default_context(cafile=cacert)
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load the etcd TLS files (--etcd-cacert {cacert!r}, "
                          f"--etcd-cert {cert!r}, --etcd-key {key!r}): {e}") from None
    return ctx
