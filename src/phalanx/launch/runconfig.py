"""What `phalanx run` was asked to do (`RunConfig`): the launcher's settings, with every
default once and checked when made."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import env
from ..config import HEARTBEAT_TIMEOUT, TIMEOUT
from ..coord.durable import EtcdSettings
from ..errors import ConfigError
from .hosts import HostSlots
from .remote import AgentStarter


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """What `phalanx run` was asked to do."""

    np: int
    """Workers to start."""
    script: str
    """Python script each worker runs."""
    args: list[str] = field(default_factory=list)
    """Arguments passed to the script."""
    min_np: int | None = None
    """Fewest workers the job may continue with (elastic when below np)."""
    max_np: int | None = None
    """Most workers a generation may hold (newcomers beyond it wait)."""
    max_restarts: int = 0
    """How many times lost workers are respawned in total."""
    retry_errors: int = 0
    """How many exceptions raised by workers are treated as faults (default 0: a bug fails)."""
    timeout: float = TIMEOUT
    """Collective timeout in seconds (PHALANX_TIMEOUT); also how long peers may wait in a
    collective for a live worker that never arrives before it is declared hung and fenced."""
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    """Seconds of heartbeat silence before a worker is declared lost and fenced."""
    chaos: str | None = None
    """Fault-injection spec handed to workers (PHALANX_CHAOS)."""
    bind: str = "127.0.0.1"
    """Address the coordinator listens on."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """More environment for the workers."""
    join_file: str | None = None
    """Write the coordinator address and job secret here (mode 0600) for `phalanx join`."""
    hosts: list[HostSlots] = field(default_factory=list)
    """Hosts to run on (one `phalanx agent` each); empty: every worker is a local child."""
    ssh_config: str | None = None
    """An ssh_config file for reaching the hosts (ssh -F)."""
    agent_starter: AgentStarter | None = None
    """How each host's agent is started (None: over SSH; `slurm.SrunStarter` in an allocation)."""
    host_cooldown: float = 60.0
    """Seconds a lost host is blacklisted (no replacement placed there), doubled at each
    further loss of the same host; past it, a replacement may start the host's agent again."""

    timeline: str | None = None
    """Write a Chrome-trace timeline of every worker here (merged at the end of the job)."""
    metrics: str | None = None
    """Append every worker's per-step metrics here, as JSON lines."""
    progress: float | None = None
    """Print a progress line every this many seconds."""
    etcd: EtcdSettings | None = None
    """Keep the job's membership in this etcd (`--etcd`); None: the embedded coordinator only."""

    def __post_init__(self) -> None:
        if self.progress is not None and not self.progress > 0:
            raise ConfigError(f"progress must be > 0 seconds, got {self.progress}")
        for name in ("timeline", "metrics"):
            path = getattr(self, name)
            if path:
                path = os.path.abspath(path)
                setattr(self, name, path)
                self.extra_env[env.TIMELINE if name == "timeline" else env.METRICS] = path
        if self.host_cooldown < 0:
            raise ConfigError(f"host_cooldown must be >= 0 seconds, got {self.host_cooldown} "
                              "(0: a lost host may be used again at once)")

    @property
    def can_grow(self) -> bool:
        """Workers may join mid-job (respawns or --max-np above -np)."""
        return self.max_restarts > 0 or (self.max_np is not None and self.max_np > self.np)

    @property
    def elastic(self) -> bool:
        return (self.min_np is not None and self.min_np < self.np) or self.max_restarts > 0 or (
            self.max_np is not None and self.max_np > self.np)
