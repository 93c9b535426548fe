"""phalanx: fault-tolerant ring-allreduce data parallelism for PyTorch and NumPy.

    import phalanx as px
    px.init()
    y = px.allreduce(x, op="avg")

Run a script on N workers with ``phalanx run -np N script.py``; run it plainly and it is a
one-worker job with the same API. Nothing happens at import time: names load on first use, so
the launcher and coordinator never pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    **{n: "phalanx.api" for n in (
        "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size", "generation", "allreduce", "allreduce_",
        "allreduce_async", "allreduce_async_", "allgather", "allgather_async", "broadcast",
        "broadcast_", "reducescatter", "alltoall", "barrier", "broadcast_object",
        "allgather_object", "metrics")},
    **{n: "phalanx.runtime" for n in ("init", "shutdown", "is_initialized")},
    **{n: "phalanx.subgroups" for n in ("new_group", "Subgroup")},
    "DistributedDataParallel": "phalanx.train.ddp",
    "Handle": "phalanx.comm.work",
    "Config": "phalanx.config",
    **{n: "phalanx.errors" for n in ("PhalanxError", "WorkerLost", "CollectiveMismatch",
                                      "RendezvousError", "ConfigError")},
    **{n: "phalanx.train" for n in ("DistributedOptimizer", "broadcast_parameters",
                                     "broadcast_optimizer_state")},
}
_SUBMODULES = ("elastic", "data", "train", "comm", "coord", "launch", "observe", "bench", "ray",
               "spark", "horovod")

__all__ = [
    "CollectiveMismatch", "Config", "ConfigError", "DistributedDataParallel",
    "DistributedOptimizer", "Handle",
    "PhalanxError", "RendezvousError", "Subgroup", "WorkerLost", "allgather", "allgather_async",
    "allgather_object", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "alltoall", "barrier", "broadcast", "broadcast_", "broadcast_object",
    "broadcast_optimizer_state", "broadcast_parameters", "cross_rank", "cross_size", "data",
    "elastic", "generation", "init",
    "is_initialized", "local_rank", "local_size", "metrics", "new_group", "rank",
    "reducescatter", "shutdown",
    "size",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"phalanx.{name}")
    raise AttributeError(f"module 'phalanx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


if TYPE_CHECKING:  # static names for type checkers and IDEs
    from .api import (allgather, allgather_async, allgather_object, allreduce, allreduce_,
                      allreduce_async, allreduce_async_, alltoall, barrier, broadcast, broadcast_,
                      broadcast_object, cross_rank, cross_size, generation, local_rank,
                      local_size, metrics, rank, reducescatter, size)
    from .comm.work import Handle
    from .config import Config
    from .errors import (CollectiveMismatch, ConfigError, PhalanxError, RendezvousError,
                         WorkerLost)
    from .runtime import init, is_initialized, shutdown
    from .train import DistributedOptimizer, broadcast_optimizer_state, broadcast_parameters
    from .train.ddp import DistributedDataParallel
