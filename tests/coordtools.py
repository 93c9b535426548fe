"""Helpers for the coordinator hardening tests: live servers, raw and authenticated
connections, process and log probes."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phalanx.coord import CoordClient, CoordServer, new_secret
from phalanx.coord import protocol
from phalanx.coord.protocol import NONCE_BYTES, Channel, connection_key, recv_exact
from phalanx.coord.server import ConnectionLimits
from phalanx.errors import ConfigError, RendezvousError

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers
@contextmanager
def serving(**limits: float) -> Iterator[CoordServer]:
    srv = CoordServer(new_secret(), target_np=2, heartbeat_timeout=1.0,
                      limits=ConnectionLimits(**limits))  # type: ignore[arg-type]
    with srv:
        yield srv


def raw(srv: CoordServer, source: str = HOST) -> socket.socket:
    return socket.create_connection((srv.host, srv.port), timeout=5, source_address=(source, 0))


def authed(srv: CoordServer, worker: str = "x") -> Channel:
    """An authenticated connection that has said hello."""
    sock = raw(srv)
    key = connection_key(srv._secret, recv_exact(sock, NONCE_BYTES))
    chan = Channel(sock, key, is_server=False)
    chan.send({"op": "hello", "worker": worker})
    assert chan.recv(deadline=time.monotonic() + 5)[0]["ok"]
    return chan


def send_raw(chan: Channel, head: bytes, payload: bytes = b"") -> None:
    """A frame with a valid tag around arbitrary header bytes (not necessarily JSON)."""
    codec = chan.codec
    tag = codec._tag(codec._send_dir, codec._send_seq, head, payload)
    codec._send_seq += 1
    chan.sock.sendall(struct.pack("!II", len(head), len(payload)) + head + payload + tag)


def ask(chan: Channel, header: dict, payload: bytes = b"") -> dict:
    chan.send(header, payload)
    return chan.recv(deadline=time.monotonic() + 5)[0]


def hung_up(sock: socket.socket, within: float) -> bool:
    """Did the server close this connection within `within` seconds (reading what it sends)?"""
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return False


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def conn_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "phalanx-coord-conn")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and Threads of a process, from /proc (VmRSS is absent once it is a zombie)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def logged(caplog: pytest.LogCaptureFixture, reason: str) -> int:
    """How many drops for `reason` the rate-limited log lines account for."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(reason)]
    return sum(int(m[1]) if (m := re.search(r": (\d+) times in the last", x)) else 1 for x in lines)


def closing(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


