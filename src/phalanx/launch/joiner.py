"""`phalanx join FILE script.py`: start one more worker in a running job, and stay its starter.

Whoever starts a worker must be able to fence it: this process spawns the worker, reports to
the coordinator when the worker is stopped (SIGSTOP: state T, which only its host can see),
and kills it when the coordinator orders it fenced (declared lost), so its peers fail fast.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from typing import Any

from .. import env
from ..coord.client import CoordClient
from ..errors import RendezvousError
from . import procs


def _write(stream: Any) -> procs.Sink:
    def sink(line: bytes) -> None:
        stream.write(line)
        stream.flush()
    return sink


def run_joined(info: dict[str, str], script: str, args: list[str]) -> int:
    """Run one worker of the job described by a join file until it exits; return its status."""
    worker_id = f"joined-{uuid.uuid4().hex[:8]}"
    starter = f"starter-{worker_id}"
    client = CoordClient(info["address"], info["secret"], starter)
    wenv = {**os.environ, env.COORD_ADDR: info["address"], env.SECRET: info["secret"],
            env.JOB_ID: info["job_id"], env.HOST: info.get("host") or os.uname().nodename,
            env.WORKER_ID: worker_id, env.STARTER: starter, env.ELASTIC: "1", env.GROWTH: "1",
            "PYTHONUNBUFFERED": "1"}
    w = procs.spawn(slot=-1, worker_id=worker_id, prefix=f"[{worker_id}]: ",
                    argv=[script, *args], env=wenv, error_file="",
                    out=_write(sys.stdout.buffer), err=_write(sys.stderr.buffer))
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(client, starter, w, done), daemon=True,
                               name="phalanx-join-watch")
    watcher.start()
    try:
        code = w.proc.wait()
    except KeyboardInterrupt:
        procs.kill_group(w.proc.pid, signal.SIGTERM)
        code = w.proc.wait()
    done.set()
    watcher.join(timeout=3)
    for t in w.pumps:
        t.join(timeout=2)
    client.close(leave=False)
    if w.fenced:
        sys.stderr.write(f"[phalanx] worker {worker_id} was declared lost by the coordinator "
                         "and fenced\n")
    return code if code >= 0 else 128 - code


def _watch(client: CoordClient, starter: str, w: procs.Worker, done: threading.Event) -> None:
    """Report a stopped worker; kill it when ordered to fence it."""
    while not done.is_set() and w.proc.poll() is None:
        stopped = [w.worker_id] if procs.is_stopped(w.proc.pid) else []
        try:
            reply = client.watch(starter, stopped, timeout=0.25 if stopped else 1.0)
        except RendezvousError:
            if done.wait(0.5):
                return
            continue
        if any(order and order[0] == w.worker_id for order in reply.get("fence", [])):
            w.fenced = True
            procs.kill_group(w.proc.pid, signal.SIGKILL)
            return
