"""phalanx: fault-tolerant ring-allreduce data parallelism for PyTorch and NumPy.

    import phalanx as px
    px.init()
    y = px.allreduce(x, op="avg")

Run a script on N workers with ``phalanx run -np N script.py``; run it plainly and it is a
one-worker job with the same API. Nothing happens at import time.
"""

from .api import (allgather, allgather_async, allgather_object, allreduce, allreduce_,
                  allreduce_async, allreduce_async_, alltoall, barrier, broadcast, broadcast_,
                  broadcast_object, generation, local_rank, local_size, rank, reducescatter, size)
from .comm.work import Handle
from .config import Config
from .errors import (CollectiveMismatch, ConfigError, PhalanxError, RendezvousError,
                     WorkerLost)
from .runtime import init, is_initialized, shutdown

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
    "generation", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "allgather",
    "allgather_async", "broadcast", "broadcast_", "reducescatter", "alltoall", "barrier",
    "broadcast_object", "allgather_object", "Handle", "Config", "PhalanxError", "WorkerLost",
    "CollectiveMismatch", "RendezvousError", "ConfigError",
]
