"""Typed settings for a phalanx job, validated when built.

Each field has a default, may be overridden from the environment (see `env.py`) by
`Config.from_env()`, and is checked in `__post_init__` so a bad value fails early with a message
that names it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import env
from .errors import ConfigError

ALLREDUCE_ALGOS = ("auto", "shm", "hier", "gloo", "nccl")
CHECKPOINT_ERROR_POLICIES = ("fail", "warn")
"""What failed checkpoint saves do: fail the job after CHECKPOINT_MAX_FAILURES in a row, or warn."""
CHECKPOINT_MAX_FAILURES = 3
"""Checkpoint saves that may fail in a row before the job fails (with 'fail')."""
TIMEOUT = 30.0
"""Default seconds a collective (or a coordinator request) waits on a peer: `Config.timeout`."""
HEARTBEAT_TIMEOUT = 3.0
"""Default seconds without a heartbeat before a worker is lost: `Config.heartbeat_timeout`."""


@dataclass(kw_only=True, slots=True)
class Config:
    """Runtime settings every worker of a job shares."""

    timeout: float = TIMEOUT
    """Seconds a collective may wait on a peer before it is declared lost (backstop for hangs)."""

    heartbeat_interval: float = 0.25
    """Seconds between a worker's heartbeats to the coordinator."""

    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    """Seconds without a heartbeat after which the coordinator declares a worker lost and fences it."""

    allreduce_algo: str = "auto"
    """'auto': shared memory when every rank is on one host; hierarchical (shared memory inside
    each host, Gloo between hosts) when the hosts have the same number (>1) of ranks each; else
    flat Gloo. 'shm', 'hier' or 'gloo' force one where the placement allows it; CUDA tensors
    always go through NCCL."""

    shm_max_bytes: int = 64 << 20
    """Bytes of shared memory per rank for the intra-host path; larger tensors go in chunks."""

    hier_min_bytes: int = 4 << 20
    """With 'auto', tensors smaller than this take flat Gloo even where the hierarchical path
    exists: below it the extra shared-memory stages cost more than the host links save
    (measured crossover between 1 and 16 MB on 2 x 2 simulated hosts, BENCHMARKS.md)."""

    check_collectives: bool = True
    """Compare op, shape, dtype and name across ranks before each collective (CollectiveMismatch)."""

    bind_addr: str = "127.0.0.1"
    """Address this worker's process-group sockets bind to."""

    def __post_init__(self) -> None:
        if self.allreduce_algo not in ALLREDUCE_ALGOS:
            raise ConfigError(
                f"allreduce_algo={self.allreduce_algo!r} is not one of {ALLREDUCE_ALGOS}; "
                f"set {env.ALLREDUCE_ALGO} to one of them")
        for name in ("timeout", "heartbeat_interval", "heartbeat_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name}={value!r} must be a positive number of seconds")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout={self.heartbeat_timeout} must exceed heartbeat_interval="
                f"{self.heartbeat_interval}; a worker would be declared lost between two beats")
        if self.hier_min_bytes < 0:
            raise ConfigError(f"hier_min_bytes={self.hier_min_bytes} must be >= 0 (0: every "
                              f"size goes hierarchical); set {env.HIER_MIN_BYTES}")
        if self.shm_max_bytes < 4096:
            raise ConfigError(f"shm_max_bytes={self.shm_max_bytes} is too small; use at least 4096")

    @property
    def backstop(self) -> float:
        """How long the data plane itself waits for a peer. The coordinator declares a peer
        that never arrives lost after `timeout` (and fences it); this later deadline is only
        the fallback for when the coordinator cannot help."""
        return self.timeout + self.heartbeat_timeout

    @classmethod
    def from_env(cls, **overrides: object) -> Config:
        """Defaults, then PHALANX_* environment variables, then explicit keyword overrides."""
        values: dict[str, object] = {
            "timeout": env.get_float(env.TIMEOUT, TIMEOUT),
            "heartbeat_interval": env.get_float(env.HEARTBEAT_INTERVAL, 0.25),
            "heartbeat_timeout": env.get_float(env.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT),
            "allreduce_algo": env.get_str(env.ALLREDUCE_ALGO, "auto"),
            "shm_max_bytes": env.get_int(env.SHM_MAX_BYTES, 64 << 20),
            "hier_min_bytes": env.get_int(env.HIER_MIN_BYTES, 4 << 20),
            "check_collectives": env.get_bool(env.CHECK_COLLECTIVES, True),
            "bind_addr": env.get_str(env.BIND_ADDR, "127.0.0.1"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
