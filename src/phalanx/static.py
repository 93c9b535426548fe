"""Static jobs started by torchrun, Spark's TorchDistributor or anything else that sets the
torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

Such a job has no phalanx coordinator: membership is fixed, so it is not elastic (a lost worker
fails the job, as it would under plain DDP) but every collective, the shared-memory path and
DistributedOptimizer work as usual. The store is the one the starter provides: torchrun's agent
store when TORCHELASTIC_USE_AGENT_STORE is set, else a TCPStore hosted by rank 0.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .errors import ConfigError

VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(kw_only=True, slots=True, frozen=True)
class StaticEnv:
    """What the starter told this process."""

    rank: int
    size: int
    master: str
    port: int
    agent_store: bool
    run_id: str


def detect() -> StaticEnv | None:
    """The torch.distributed environment, if every variable of it is set; else None."""
    values = {k: os.environ.get(k, "") for k in VARS}
    if not all(values.values()):
        return None
    try:
        rank, size, port = int(values["RANK"]), int(values["WORLD_SIZE"]), int(values["MASTER_PORT"])
    except ValueError:
        raise ConfigError(f"torch.distributed environment is malformed: {values}; RANK, "
                          "WORLD_SIZE and MASTER_PORT must be integers") from None
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={size})")
    run = os.environ.get("TORCHELASTIC_RUN_ID") or f"port{port}"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return StaticEnv(rank=rank, size=size, master=values["MASTER_ADDR"], port=port,
                     agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                     run_id=f"{run}-r{restart}")


def store(e: StaticEnv, timeout: float) -> dist.Store:
    """The starter's store, under a 'phalanx/' prefix."""
    base = dist.TCPStore(e.master, e.port, e.size if not e.agent_store else None,
                         is_master=not e.agent_store and e.rank == 0,
                         timeout=timedelta(seconds=timeout))
    return dist.PrefixStore(f"phalanx/{e.run_id}", base)


def exchange(s: dist.Store, e: StaticEnv, host: str) -> tuple[list[str], list[int], bytes]:
    """Every rank's host name and pid, and an object-HMAC key made by rank 0."""
    s.set(f"who/{e.rank}", f"{host}\n{os.getpid()}")
    if e.rank == 0:
        s.set("object-key", os.urandom(32))
    who = [s.get(f"who/{r}").decode().split("\n") for r in range(e.size)]
    return [w[0] for w in who], [int(w[1]) for w in who], s.get("object-key")


def bind_address(e: StaticEnv) -> str:
    """The local address that routes to MASTER_ADDR (what the data plane binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((socket.gethostbyname(e.master), e.port))
            return str(sock.getsockname()[0])
        except OSError:
            return "127.0.0.1"
