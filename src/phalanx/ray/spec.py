"""What `phalanx.ray.run` was asked to do, checked before anything starts.

Every bad argument fails here with a `ConfigError` that names it, shows the value received and
suggests a fix; so does a process where Ray is missing or not initialised. Nothing in this
module starts Ray or imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .. import env
from ..config import HEARTBEAT_TIMEOUT, TIMEOUT
from ..errors import ConfigError

DEFAULT_RESOURCES: dict[str, float] = {"CPU": 1.0}
"""What each worker's placement-group bundle holds unless `resources_per_worker` says more."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_seconds(name: str, value: object, example: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive number of seconds, "
                          f"e.g. {name}={example}")


@dataclass(kw_only=True, slots=True)
class RunSpec:
    """The shape of one job on Ray: how many workers, how elastic, what each one holds."""

    num_workers: int
    """Actors started at once; the first generation forms when all of them have joined."""
    min_workers: int | None = None
    """Fewest workers the job may continue with; None: all `num_workers` (not elastic
    unless `max_restarts` > 0)."""
    max_restarts: int = 0
    """Replacement actors started in all for workers that were lost (faults only)."""
    resources_per_worker: dict[str, float] | None = None
    """Ray resources of each worker's bundle, e.g. {'CPU': 4, 'GPU': 1}; CPU defaults to 1."""
    timeout: float = TIMEOUT
    """Collective timeout in seconds (PHALANX_TIMEOUT), as `phalanx run --timeout`."""
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    """Seconds of heartbeat silence before the coordinator declares a worker lost."""
    placement_timeout: float = 120.0
    """Seconds to wait for the placement group (and the first actors) to be placed."""

    def __post_init__(self) -> None:
        n = self.num_workers
        if not _is_int(n) or n < 1:
            raise ConfigError(f"num_workers={n!r} must be an integer >= 1 (the number of Ray "
                              "actors to start), e.g. num_workers=2")
        m = self.min_workers
        if m is not None:
            if not _is_int(m) or m < 1:
                raise ConfigError(f"min_workers={m!r} must be an integer >= 1, or None to "
                                  f"require all {n} workers")
            if m > n:
                raise ConfigError(f"min_workers={m} exceeds num_workers={n}; use a value from 1 "
                                  f"to {n}, or None to require all of them")
        if not _is_int(self.max_restarts) or self.max_restarts < 0:
            raise ConfigError(f"max_restarts={self.max_restarts!r} must be an integer >= 0 "
                              "(0: lost workers are not replaced)")
        self.resources_per_worker = _check_resources(self.resources_per_worker)
        _positive_seconds("timeout", self.timeout, 30.0)
        _positive_seconds("heartbeat_timeout", self.heartbeat_timeout, 3.0)
        beat = env.get_float(env.HEARTBEAT_INTERVAL, 0.25)
        if self.heartbeat_timeout <= beat:
            raise ConfigError(f"heartbeat_timeout={self.heartbeat_timeout!r} must exceed the "
                              f"heartbeat interval ({beat}s, {env.HEARTBEAT_INTERVAL}), or a "
                              "worker would be declared lost between two beats; e.g. 3.0")
        _positive_seconds("placement_timeout", self.placement_timeout, 120.0)

    @property
    def min_np(self) -> int:
        return self.min_workers if self.min_workers is not None else self.num_workers

    @property
    def elastic(self) -> bool:
        """Survivors continue after a loss (fewer workers allowed, or replacements coming)."""
        return self.min_np < self.num_workers or self.max_restarts > 0

    @property
    def can_grow(self) -> bool:
        """Workers may join mid-job (replacements), so survivors look for newcomers."""
        return self.max_restarts > 0

    @property
    def bundle(self) -> dict[str, float]:
        """One worker's placement-group bundle (resources of amount 0 left out)."""
        merged = {**DEFAULT_RESOURCES, **(self.resources_per_worker or {})}
        return {k: float(v) for k, v in merged.items() if v > 0}

    @property
    def gpus(self) -> float:
        return self.bundle.get("GPU", 0.0)

    def actor_options(self) -> dict[str, Any]:
        """The same resources, as `ActorClass.options()` takes them."""
        b = dict(self.bundle)
        opts: dict[str, Any] = {"num_cpus": b.pop("CPU", 0.0), "num_gpus": b.pop("GPU", 0.0)}
        if "memory" in b:
            opts["memory"] = b.pop("memory")
        if b:
            opts["resources"] = b
        return opts


def _check_resources(res: object) -> dict[str, float] | None:
    if res is None:
        return None
    example = "e.g. resources_per_worker={'CPU': 2, 'GPU': 1}"
    if not isinstance(res, dict):
        raise ConfigError(f"resources_per_worker={res!r} must be a dict of Ray resource name -> "
                          f"amount, {example}")
    out: dict[str, float] = {}
    for k, v in res.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"resources_per_worker has key {k!r}; resource names are strings "
                              f"such as 'CPU', 'GPU' or a custom resource, {example}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ConfigError(f"resources_per_worker[{k!r}]={v!r} must be a number >= 0, "
                              f"{example}")
        out[k] = float(v)
    if not any(v > 0 for v in {**DEFAULT_RESOURCES, **out}.values()):
        raise ConfigError(f"resources_per_worker={res!r} asks for nothing; a worker's bundle "
                          f"needs at least one resource, {example}")
    return out


def check_call(fn: object, args: object, kwargs: object) -> None:
    """The function and its arguments, as `run` received them."""
    if not callable(fn):
        raise ConfigError(f"fn={fn!r:.120} is not callable; pass the function each worker runs, "
                          "e.g. phalanx.ray.run(train, num_workers=2)")
    if not isinstance(args, (tuple, list)):
        raise ConfigError(f"args={args!r:.120} must be a tuple of positional arguments for fn, "
                          "e.g. args=(0.1,)")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"kwargs={kwargs!r:.120} must be a dict of keyword arguments for fn "
                          "or None, e.g. kwargs={'lr': 0.1}")


def require_ray() -> ModuleType:
    """The `ray` module, once it is known to be installed and initialised in this process."""
    try:
        import ray
    except ImportError:
        raise ConfigError("phalanx.ray.run needs Ray, which is not installed in this Python; "
                          "install it with `pip install 'phalanx[ray]'` (or `pip install ray`)"
                          ) from None
    if not ray.is_initialized():
        raise ConfigError("Ray is not initialised in this process (ray.is_initialized() is "
                          "False); call ray.init() first, or ray.init(address='auto') to join a "
                          "running cluster")
    try:
        from ray.util.client import ray as client
        remote_client = bool(client.is_connected())
    except (ImportError, AttributeError):  # the module moved: assume a driver on the cluster
        remote_client = False
    if remote_client:
        raise ConfigError("phalanx.ray.run hosts the job's coordinator in the driver, which "
                          "workers must reach; a Ray Client driver (ray.init('ray://...')) runs "
                          "off the cluster. Submit the script as a Ray job or run it on a node")
    return ray
