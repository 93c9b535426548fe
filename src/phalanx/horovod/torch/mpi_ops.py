"""Horovod's `horovod.torch.mpi_ops` namespace: every collective, handle and basic query.

The implementations live in `basics`, `process_sets`, `handles`, `allreduce_ops` and
`gather_ops`; this module gathers them under the name Horovod scripts import from.
"""

from __future__ import annotations

from .allreduce_ops import (
                            allreduce,
                            allreduce_,
                            allreduce_async,
                            allreduce_async_,
                            grouped_allreduce,
                            grouped_allreduce_,
                            grouped_allreduce_async,
                            grouped_allreduce_async_,
)
from .basics import (
                            Adasum,
                            Average,
                            HorovodInternalError,
                            Max,
                            Min,
                            Product,
                            Sum,
                            ccl_built,
                            cross_rank,
                            cross_size,
                            cuda_built,
                            ddl_built,
                            gloo_built,
                            gloo_enabled,
                            gpu_available,
                            init,
                            is_initialized,
                            local_rank,
                            local_size,
                            mpi_built,
                            mpi_enabled,
                            mpi_threads_supported,
                            nccl_built,
                            rank,
                            rocm_built,
                            shutdown,
                            size,
                            start_timeline,
                            stop_timeline,
)
from .compression import Compression
from .gather_ops import (
                            allgather,
                            allgather_async,
                            alltoall,
                            alltoall_async,
                            barrier,
                            broadcast,
                            broadcast_,
                            broadcast_async,
                            broadcast_async_,
                            grouped_allgather,
                            grouped_allgather_async,
                            grouped_reducescatter,
                            grouped_reducescatter_async,
                            reducescatter,
                            reducescatter_async,
)
from .handles import poll, synchronize
from .joining import join
from .process_sets import ProcessSet, add_process_set, global_process_set, remove_process_set
from .sparse import sparse_allreduce_async

__all__ = [
    "Adasum", "Average", "Compression", "HorovodInternalError", "Max", "Min", "ProcessSet",
    "Product", "Sum", "add_process_set", "allgather", "allgather_async", "allreduce",
    "allreduce_", "allreduce_async", "allreduce_async_", "alltoall", "alltoall_async",
    "barrier", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "ccl_built",
    "cross_rank", "cross_size", "cuda_built", "ddl_built", "global_process_set", "gloo_built",
    "gloo_enabled", "gpu_available", "grouped_allgather", "grouped_allgather_async",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async",
    "grouped_allreduce_async_", "grouped_reducescatter", "grouped_reducescatter_async", "init",
    "is_initialized", "join", "local_rank", "local_size", "mpi_built", "mpi_enabled",
    "mpi_threads_supported", "nccl_built", "poll", "rank", "reducescatter",
    "reducescatter_async", "remove_process_set", "rocm_built", "shutdown", "size",
    "sparse_allreduce_async", "start_timeline", "stop_timeline", "synchronize",
]
