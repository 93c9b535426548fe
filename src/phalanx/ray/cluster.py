"""The Ray cluster as a job's driver uses it: where to listen, how actors find phalanx, the
placement group, killing actors and waiting until they are gone, shared-memory cleanup.

Thin wrappers over Ray calls with the errors that matter turned into messages; the job logic
lives in `driver.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from ..launch.shmfiles import cleanup as shm_cleanup

log = logging.getLogger("phalanx.ray")

PROBE_TIMEOUT = 1.0
"""Seconds a node's raylet has to accept a TCP connection before the node counts as
unreachable. A live raylet's kernel answers within milliseconds, even on a loaded node; the
driver waits this long once per lost node."""

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

    def only_here(self, pg: Any) -> bool:
        """Every bundle of the ready placement group `pg` is on the driver's node.

        Decided once the group is placed, not from the nodes alive before: a cluster that
        grows (an autoscaler's worker group at min_workers 0) places bundles on nodes that did
        not exist when the job began. Bundles stay on their node while it lives (Ray moves
        them only off a dead node, and the driver's node dying ends the job), so the answer
        holds for the job's life, replacements included."""
        from ray.util import placement_group_table
        placed = placement_group_table(pg).get("bundles_to_node_id") or {}
        return bool(placed) and set(placed.values()) == {self.node}

    def bind_address(self, local: bool) -> str:
        """Where the coordinator listens: loopback when every worker is on the driver's node
        (as `phalanx run` does), else the node's address (HMAC-authenticated, as always)."""
        return "127.0.0.1" if local else str(self.ray.util.get_node_ip_address())

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

    def dead_nodes(self) -> set[str]:
        """The nodes Ray reports dead (none if Ray cannot say: it is shutting down)."""
        try:
            return {str(n.get("NodeID")) for n in self.ray.nodes() if not n.get("Alive")}
        except self.errors:
            return set()

    def node_lost(self, node_id: str) -> str | None:
        """Why node `node_id` is lost, or None when its raylet answers. A node cut off the
        network looks alive to Ray until its health checks run out; a TCP
        connection to its raylet tells at once."""
        try:
            info = next((n for n in self.ray.nodes() if n.get("NodeID") == node_id), None)
        except self.errors:  # Ray is shutting down: nothing to tell
            return None
        if info is None or not info.get("Alive"):
            return "Ray reports it dead"
        addr = (str(info.get("NodeManagerAddress")), int(info.get("NodeManagerPort") or 0))
        try:
            with socket.create_connection(addr, timeout=PROBE_TIMEOUT):
                return None
        except TimeoutError:
            return (f"unreachable: its raylet at {addr[0]}:{addr[1]} did not answer within "
                    f"{PROBE_TIMEOUT:g}s")
        except OSError as e:
            return f"unreachable: connecting to its raylet at {addr[0]}:{addr[1]} failed ({e})"

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
