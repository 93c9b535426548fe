"""Run N ranks as threads over real Gloo (and the real shared-memory engine) in one process.

Collectives are exercised at the `Group` level with one `Group` per thread: fast enough to
test every op x dtype x size, while multi-process tests cover the launcher and public API.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from phalanx.comm.group import Group, Placement
from phalanx.config import Config


def run_ranks(n: int, fn: Callable[[Group], Any], *, algo: str = "gloo", timeout: float = 60,
              generation: int = 1, hosts: list[str] | None = None, **cfg: Any) -> list[Any]:
    """Call fn(group) on n thread-ranks; return per-rank results (exceptions are returned).

    `hosts` names each rank's host (default: all on one), packed host by host as the launcher
    places them; names stand for hosts even though every thread shares this machine.
    `coll_timeout` sets the collectives' timeout; other keywords go to Config."""
    hosts = hosts or ["h"] * n
    store = dist.HashStore()
    job = f"test{uuid.uuid4().hex[:8]}"
    results: list[Any] = [None] * n
    config = Config(allreduce_algo=algo, timeout=cfg.pop("coll_timeout", 20.0), **cfg)

    def body(r: int) -> None:
        group = None
        try:
            mine = [i for i, h in enumerate(hosts) if h == hosts[r]]
            place = Placement(generation=generation, rank=r, size=n, local_rank=mine.index(r),
                              local_size=len(mine), hosts=hosts, pids=[os.getpid()] * n)
            group = Group(place, store, config, job_id=job, secret=job)
            results[r] = fn(group)
        except BaseException as e:  # returned to the test, which asserts on it
            results[r] = e
        finally:
            if group is not None:
                group.close()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise AssertionError(f"thread ranks did not finish within {timeout}s")
    return results
