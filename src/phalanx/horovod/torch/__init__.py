"""Horovod's PyTorch API on phalanx: change ``import horovod.torch as hvd`` to
``import phalanx.horovod.torch as hvd`` and run the script with ``phalanx run -np N``.

    import phalanx.horovod.torch as hvd
    hvd.init()
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

Everything named in `__all__` follows Horovod's documented signatures and behaviour, with
these differences (each module's docstring has the details):

- operations are matched by name as in Horovod (ranks may submit them in different orders),
  but negotiated when a result is needed (`synchronize`, `poll`, the synchronous forms,
  `barrier`, `join`) rather than by a background thread; ranks wait for each other in the
  coordinator, not in a collective, and `poll()` never waits (see `gate`); a stall (ranks
  waiting for operations other ranks never submit) raises `StallError` after
  HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (default 120) instead of waiting forever (see
  `handles` and `negotiate`); `DistributedOptimizer` and `SyncBatchNorm` reduce through
  phalanx directly;
- process sets run on phalanx subgroups, renumbered after a re-formation (see
  `process_sets`);
- `join()` stands in for allreduces and DistributedOptimizer steps, as Horovod's does (see
  `joining`); broadcast/alltoall/reducescatter run synchronously once negotiated (their
  `*_async` forms do not overlap with computation);
- `shutdown()` is soft (the worker stays in its phalanx job until exit), so `init()` works
  again afterwards;
- `HOROVOD_TIMELINE=FILE` (or `phalanx run --timeline FILE`) writes phalanx's Chrome trace,
  whose events differ from Horovod's (no NEGOTIATE_* per tensor; signature negotiation, queue
  and run spans per collective, step phases, recoveries);
- elastic jobs heal forward from the most advanced rank instead of rolling back to the last
  commit (see `phalanx.horovod.torch.elastic`).
"""

from __future__ import annotations

from . import elastic
from .compression import Compression
from .functions import (
                        allgather_object,
                        broadcast_object,
                        broadcast_optimizer_state,
                        broadcast_parameters,
)
from .mpi_ops import (
                        Adasum,
                        Average,
                        HorovodInternalError,
                        Max,
                        Min,
                        ProcessSet,
                        Product,
                        Sum,
                        add_process_set,
                        allgather,
                        allgather_async,
                        allreduce,
                        allreduce_,
                        allreduce_async,
                        allreduce_async_,
                        alltoall,
                        alltoall_async,
                        barrier,
                        broadcast,
                        broadcast_,
                        broadcast_async,
                        broadcast_async_,
                        ccl_built,
                        cross_rank,
                        cross_size,
                        cuda_built,
                        ddl_built,
                        global_process_set,
                        gloo_built,
                        gloo_enabled,
                        gpu_available,
                        grouped_allgather,
                        grouped_allgather_async,
                        grouped_allreduce,
                        grouped_allreduce_,
                        grouped_allreduce_async,
                        grouped_allreduce_async_,
                        grouped_reducescatter,
                        grouped_reducescatter_async,
                        init,
                        is_initialized,
                        join,
                        local_rank,
                        local_size,
                        mpi_built,
                        mpi_enabled,
                        mpi_threads_supported,
                        nccl_built,
                        poll,
                        rank,
                        reducescatter,
                        reducescatter_async,
                        remove_process_set,
                        rocm_built,
                        shutdown,
                        size,
                        start_timeline,
                        stop_timeline,
                        synchronize,
)
from .optimizer import DistributedOptimizer
from .sparse import sparse_allreduce_async
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "Adasum", "Average", "Compression", "DistributedOptimizer", "HorovodInternalError", "Max",
    "Min", "ProcessSet", "Product", "Sum", "SyncBatchNorm", "add_process_set", "allgather", "allgather_async",
    "allgather_object", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "alltoall", "alltoall_async", "barrier", "broadcast", "broadcast_", "broadcast_async",
    "broadcast_async_", "broadcast_object", "broadcast_optimizer_state", "broadcast_parameters",
    "ccl_built", "cross_rank", "cross_size", "cuda_built", "ddl_built", "elastic",
    "global_process_set", "gloo_built", "gloo_enabled", "gpu_available", "grouped_allgather",
    "grouped_allgather_async", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "grouped_reducescatter",
    "grouped_reducescatter_async", "init", "is_initialized", "join", "local_rank", "local_size",
    "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll", "rank",
    "reducescatter", "reducescatter_async", "remove_process_set", "rocm_built", "shutdown",
    "size", "sparse_allreduce_async", "start_timeline", "stop_timeline", "synchronize",
]
