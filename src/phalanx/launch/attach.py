"""`phalanx attach --etcd H:P,... [JOB]`: follow a job recorded in etcd, from any host.

Without JOB it lists the jobs under /phalanx/jobs/ (leader, workers, step, outcome). With JOB it
prints the job's state, then one line per new generation and a progress line while steps move,
and at the end the job's one-line summary; it exits with the job's exit status. If the job's
coordinator goes away without recording an outcome (its lease lapses), it says so and exits 1.
It reads the record only: the job's output stays with its launcher.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from ..coord.durable import JOBS_PREFIX, EtcdSettings
from ..coord.etcd import EtcdClient
from ..errors import ConfigError, EtcdUnavailable

PROGRESS_EVERY = 5.0
"""Seconds between progress lines while the job's step moves."""


def main(parser: argparse.ArgumentParser, s: EtcdSettings, job: str | None) -> int:
    """List the jobs (job None) or follow one; the exit status is the job's."""
    try:
        if job is None:
            return _list(s)
        return _follow(s, job)
    except EtcdUnavailable as e:
        sys.stderr.write(f"phalanx attach: error: {e}\n")
        return 1
    except ConfigError as e:
        parser.error(str(e))
        return 2


def _client(s: EtcdSettings, prefix: str) -> EtcdClient:
    return EtcdClient(list(s.endpoints), prefix=prefix, timeout=s.timeout, cacert=s.cacert,
                      cert=s.cert, key=s.key)


def _state(keys: dict[str, bytes]) -> str:
    """One line about a job from its keys."""
    gen = json.loads(keys["generation"]) if "generation" in keys else None
    parts = ["running" if "leader" in keys else ("ended" if "outcome" in keys else "no leader")]
    if gen is not None:
        parts.append(f"generation {gen['generation']} with {len(gen['workers'])} worker(s)")
    if "step" in keys:
        parts.append(f"step {int(keys['step'])}")
    if "outcome" in keys:
        parts.append(json.loads(keys["outcome"]).get("summary", ""))
    return ", ".join(p for p in parts if p)


def _list(s: EtcdSettings) -> int:
    client = _client(s, JOBS_PREFIX)
    jobs: dict[str, dict[str, bytes]] = {}
    for key, value, _ in client.get_prefix(""):
        job, _, name = key.decode(errors="replace").partition("/")
        jobs.setdefault(job, {})[name] = value
    client.close()
    if not jobs:
        print(f"no phalanx job recorded in etcd at {','.join(s.endpoints)}")
    for job, keys in sorted(jobs.items()):
        print(f"{job}: {_state(keys)}")
    return 0


def _follow(s: EtcdSettings, job: str) -> int:
    client = _client(s, f"{JOBS_PREFIX}{job}/")
    kvs, revision = client.range_prefix("")
    keys = {kv.key.decode(errors="replace"): kv.value for kv in kvs}
    if not keys:
        raise ConfigError(f"no job {job!r} in etcd at {','.join(s.endpoints)}; "
                          "`phalanx attach --etcd ...` without a job lists them")
    print(f"[phalanx] job {job}: {_state(keys)}", flush=True)
    if "outcome" in keys:
        return _ended(keys["outcome"])
    done = threading.Event()
    result: dict[str, Any] = {}
    last = [time.monotonic(), int(keys.get("step", b"-1"))]

    def on_event(ev: Any) -> None:
        name = ev.key.decode(errors="replace") if isinstance(ev.key, bytes) else str(ev.key)
        if ev.type == "put" and name == "generation":
            gen = json.loads(ev.value)
            print(f"[phalanx] generation {gen['generation']} formed with "
                  f"{len(gen['workers'])} worker(s): {gen.get('reason', '')}", flush=True)
        elif ev.type == "put" and name == "step":
            step = int(ev.value)
            if time.monotonic() - last[0] >= PROGRESS_EVERY and step > last[1]:
                print(f"[phalanx] step {step}", flush=True)
                last[:] = [time.monotonic(), step]
        elif ev.type == "put" and name == "outcome":
            result["outcome"] = ev.value
            done.set()
        elif ev.type == "delete" and name == "leader":
            done.set()

    watch = client.watch("", revision + 1, on_event)
    try:
        done.wait()
    finally:
        watch.cancel()
    if "outcome" in result:
        return _ended(result["outcome"])
    outcome = client.get("outcome")
    if outcome is not None:
        return _ended(outcome[0])
    print(f"[phalanx] job {job}: its coordinator is gone and recorded no outcome (the "
          "launcher died, or lost etcd for longer than its lease)", flush=True)
    return 1


def _ended(raw: bytes) -> int:
    outcome = json.loads(raw)
    print(f"[phalanx] {outcome.get('summary', '')}", flush=True)
    return int(outcome.get("rc", 1))
