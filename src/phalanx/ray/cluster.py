"""The Ray cluster as a job's driver uses it: where to listen, how actors find phalanx, the
placement group, killing actors and waiting until they are gone, shared-memory cleanup.

Thin wrappers over Ray calls with the errors that matter turned into messages; the job logic
lives in `driver.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from ..launch.shmfiles import cleanup as shm_cleanup

log = logging.getLogger("phalanx.ray")

_probed: dict[tuple[str, str], bool] = {}
"""(Ray session, job id) -> whether its default workers import the driver's phalanx."""


def phalanx_file() -> str | None:
    """Where this process imports phalanx from (also run as a probe task on a Ray worker)."""
    spec = importlib.util.find_spec("phalanx")  # finds the package without importing its API
    return os.path.abspath(spec.origin) if spec is not None and spec.origin else None


class Cluster:
    """The Ray calls of one job's driver (Ray is initialised in this process)."""

    def __init__(self, ray: ModuleType) -> None:
        self.ray = ray
        self.errors: tuple[type[BaseException], ...] = (ray.exceptions.RayError, ValueError,
                                                        RuntimeError)
        """What Ray raises when an actor is gone already or Ray is shutting down."""
        self.node: str = ray.get_runtime_context().get_node_id()
        """The driver's node."""
        alive = [n for n in ray.nodes() if n.get("Alive")]
        self.single_node = all(n.get("NodeID") == self.node for n in alive)
        """Every node is the driver's: the job stays on loopback, as `phalanx run` does."""

    def bind_address(self) -> str:
        """Where the coordinator listens: loopback on one node, else the node's address."""
        return "127.0.0.1" if self.single_node else str(self.ray.util.get_node_ip_address())

    def runtime_env(self) -> dict[str, Any] | None:
        """The actors' runtime_env: None when Ray's default workers already import the
        driver's phalanx (an actor then starts in a pooled worker, ~1 s); else PYTHONPATH with
        the driver's copy first (a source checkout), at the cost of a fresh worker process per
        actor (~5 s on a small machine)."""
        mine = phalanx_file()
        if mine is None:  # cannot happen: this module is part of phalanx
            raise ConfigError("phalanx is not importable in the driver")
        ctx = self.ray.get_runtime_context()
        job = (ctx.get_session_name(), ctx.get_job_id())
        if job not in _probed:
            probe = self.ray.remote(num_cpus=0)(phalanx_file)
            try:
                theirs = self.ray.get(probe.remote(), timeout=30.0)
            except self.ray.exceptions.RayError:  # phalanx does not unpickle there, or busy
                theirs = None
            _probed[job] = theirs == mine
        if _probed[job]:
            return None
        root = os.path.dirname(os.path.dirname(mine))
        return {"env_vars": {"PYTHONPATH": f"{root}{os.pathsep}${{PYTHONPATH}}"}}

    def place(self, bundle: dict[str, float], count: int, *, timeout: float, name: str) -> Any:
        """A placement group of `count` equal bundles (PACK: as few nodes as possible), ready."""
        from ray.util.placement_group import placement_group, remove_placement_group
        pg = placement_group([bundle] * count, strategy="PACK", name=name)
        try:
            self.ray.get(pg.ready(), timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            have = {k: v for k, v in self.ray.cluster_resources().items()
                    if k in ("CPU", "GPU", "memory") or k in bundle}
            raise ConfigError(
                f"Ray could not place num_workers={count} bundles of resources_per_worker="
                f"{bundle} within placement_timeout={timeout:g}s; the cluster has {have}. "
                "Lower num_workers or resources_per_worker, or add nodes") from None
        return pg

    def release(self, pg: Any) -> None:
        from ray.util.placement_group import remove_placement_group
        try:
            remove_placement_group(pg)
        except self.errors:  # Ray is shutting down: it removes the group itself
            log.debug("placement group already gone")

    def kill(self, handle: Any) -> None:
        """Kill an actor now (SIGKILL on its node; no Ray restart)."""
        try:
            self.ray.kill(handle, no_restart=True)
        except self.errors:  # already gone
            log.debug("actor already gone")

    def wait_gone(self, names: list[str], limit: float = 10.0) -> None:
        """ray.kill returns at once; wait until the named actors are dead."""
        deadline = time.monotonic() + limit
        want = set(names)
        while want and time.monotonic() < deadline:
            try:
                named = {a["name"] for a in self.ray.util.list_named_actors()}
            except self.errors:  # Ray is shutting down: the actors go with it
                return
            want &= named
            if want:
                time.sleep(0.05)
        if want:
            log.warning("actor(s) %s still alive %.0fs after ray.kill", sorted(want), limit)

    def clean_shm(self, job_id: str, nodes: set[str], runtime_env: dict[str, Any] | None,
                  limit: float = 10.0) -> None:
        """Remove the job's shared-memory segments killed workers left, here and on `nodes`."""
        shm_cleanup(job_id)
        others = nodes - {self.node}
        if not others:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        task = self.ray.remote(num_cpus=0)(shm_cleanup)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False),
                             runtime_env=runtime_env).remote(job_id) for n in others]
        try:
            self.ray.wait(refs, num_returns=len(refs), timeout=limit)
        except self.errors:  # a node went away: its /dev/shm went with it
            log.debug("shared-memory cleanup did not reach every node")
