"""The one place PHALANX_* environment variables are named and read.

The launcher writes these for each worker; `phalanx.init()` reads them. Nothing else in the
package touches os.environ for phalanx settings. The variables other starters' scripts read
(Horovod's HOROVOD_RANK..., torchrun's RANK, MASTER_ADDR...) are named and built here too.
"""

from __future__ import annotations

import os

from .errors import ConfigError

RANK = "PHALANX_RANK"
SIZE = "PHALANX_SIZE"
LOCAL_RANK = "PHALANX_LOCAL_RANK"
LOCAL_SIZE = "PHALANX_LOCAL_SIZE"
WORKER_ID = "PHALANX_WORKER_ID"
COORD_ADDR = "PHALANX_COORD_ADDR"
SECRET = "PHALANX_SECRET"
JOB_ID = "PHALANX_JOB_ID"
HOST = "PHALANX_HOST"
BIND_ADDR = "PHALANX_BIND_ADDR"
TIMEOUT = "PHALANX_TIMEOUT"
HEARTBEAT_INTERVAL = "PHALANX_HEARTBEAT_INTERVAL"
HEARTBEAT_TIMEOUT = "PHALANX_HEARTBEAT_TIMEOUT"
STARTER = "PHALANX_STARTER"
ERROR_FILE = "PHALANX_ERROR_FILE"
ALLREDUCE_ALGO = "PHALANX_ALLREDUCE"
SHM_MAX_BYTES = "PHALANX_SHM_MAX_BYTES"
HIER_MIN_BYTES = "PHALANX_HIER_MIN_BYTES"
CHECK_COLLECTIVES = "PHALANX_CHECK_COLLECTIVES"
CHAOS = "PHALANX_CHAOS"
ELASTIC = "PHALANX_ELASTIC"
GROWTH = "PHALANX_GROWTH"
TIMELINE = "PHALANX_TIMELINE"
METRICS = "PHALANX_METRICS"
FRESH = "PHALANX_FRESH"
"""1 (`phalanx run --fresh`): checkpointers start from step 0 instead of resuming."""
CHECKPOINT_ERRORS = "PHALANX_CHECKPOINT_ERRORS"
"""`phalanx run --checkpoint-errors`: 'fail' (default) or 'warn' when checkpoint saves fail."""
HOROVOD_TIMELINE = "HOROVOD_TIMELINE"
"""Horovod's name for the timeline file; honoured when PHALANX_TIMELINE is unset."""
TORCH_RANK = "RANK"
TORCH_WORLD_SIZE = "WORLD_SIZE"
TORCH_LOCAL_RANK = "LOCAL_RANK"
TORCH_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
TORCH_MASTER_ADDR = "MASTER_ADDR"
TORCH_MASTER_PORT = "MASTER_PORT"
"""torch.distributed's env:// rendezvous variables, as torchrun sets them (`torch_vars`). Under
`phalanx run` they never decide what `px.init()` does: PHALANX_COORD_ADDR is read first."""

ALL = (RANK, SIZE, LOCAL_RANK, LOCAL_SIZE, WORKER_ID, COORD_ADDR, SECRET, JOB_ID, HOST,
       BIND_ADDR, TIMEOUT, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, STARTER, ERROR_FILE, ALLREDUCE_ALGO, SHM_MAX_BYTES,
       CHECK_COLLECTIVES, CHAOS, ELASTIC, GROWTH, HIER_MIN_BYTES, TIMELINE, METRICS, FRESH,
       CHECKPOINT_ERRORS)

FORWARDED = (HEARTBEAT_INTERVAL, ALLREDUCE_ALGO, SHM_MAX_BYTES, HIER_MIN_BYTES, CHECK_COLLECTIVES,
             TIMELINE, METRICS, CHECKPOINT_ERRORS)
"""Job-wide settings always passed on to workers elsewhere: other hosts (with the rest of the
launcher's environment, on each agent's stdin: launch/remote.py), Ray actors, Spark tasks."""


def forwarded(extra: dict[str, str]) -> dict[str, str]:
    """What a remote host's workers must see: `extra` plus the FORWARDED variables set here."""
    out = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    out.update(extra)
    if SECRET in out:
        raise ConfigError(f"{SECRET} may not be forwarded on a command line; agents get the "
                          "secret on stdin or from a 0600 file")
    return out


def get_str(name: str, default: str | None = None) -> str | None:
    """The variable's value, or `default` when unset or empty."""
    value = os.environ.get(name)
    return value if value else default


def get_int(name: str, default: int) -> int:
    """The variable as an int; a non-integer value is a ConfigError naming it."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; unset it or set a whole number") from None


def get_float(name: str, default: float) -> float:
    """The variable as a float; a bad value is a ConfigError naming it."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; unset it or set e.g. {default}") from None


def get_bool(name: str, default: bool) -> bool:
    """The variable as a bool (1/0, true/false, yes/no, on/off)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def launched() -> bool:
    """True when this process was started by `phalanx run` (a coordinator address is set)."""
    return bool(os.environ.get(COORD_ADDR))


def timeline_path() -> str | None:
    """Where this worker's timeline goes: PHALANX_TIMELINE, else Horovod's HOROVOD_TIMELINE."""
    return get_str(TIMELINE) or get_str(HOROVOD_TIMELINE)


def horovod_vars(rank: int, size: int, local_rank: int, local_size: int) -> dict[str, str]:
    """The rank variables Horovod scripts read before `hvd.init()` (HOROVOD_RANK, ...), for the
    slot a worker was started in; phalanx may number ranks differently after a fault, and
    `phalanx.horovod.torch.init()` rewrites them with the job's real placement."""
    return {"HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(size),
            "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(local_size)}


def torch_vars(rank: int, size: int, local_rank: int, local_size: int, *, master_addr: str,
               master_port: int) -> dict[str, str]:
    """What torchrun sets for a worker, so `dist.init_process_group("gloo")` (env://) works
    unchanged: the rank it was started as, and where rank 0's process hosts the TCPStore.

    Static only: they describe the job as launched. A script that rendezvous through them has a
    fixed membership, so a lost worker fails its job, as under torchrun; the elastic path is
    `px.init()`, which ignores them under `phalanx run`."""
    return {TORCH_RANK: str(rank), TORCH_WORLD_SIZE: str(size), TORCH_LOCAL_RANK: str(local_rank),
            TORCH_LOCAL_WORLD_SIZE: str(local_size), TORCH_MASTER_ADDR: master_addr,
            TORCH_MASTER_PORT: str(master_port)}
