"""Horovod's basics: init/shutdown, ranks and sizes, reduction ops and capability queries.

Ranks and sizes are those of the current phalanx generation (they change after a re-form in
an elastic job). `shutdown()` is a soft shutdown: the facade stops accepting calls until the
next `init()`, but the worker stays a member of its phalanx job until the process exits,
because a phalanx worker that leaves a launched job cannot rejoin it under the same id.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ... import env
from ...errors import PhalanxError, WorkerLost
from . import handles
from . import process_sets as _ps

HorovodInternalError = WorkerLost
"""What Horovod raises when a collective fails because a peer was lost (phalanx's WorkerLost)."""


class OperationError(PhalanxError):
    """An operation Horovod's core refuses when it is enqueued (e.g. reducescatter with an op
    other than Average or Sum). Horovod raises these as HorovodInternalError, a RuntimeError;
    phalanx raises a RuntimeError too, but keeps HorovodInternalError (WorkerLost) for lost
    peers, so that an elastic loop does not re-form on a programming error."""

# Reduction ops, with Horovod's numeric values (scripts compare and sometimes pass them as ints).
Average = 0
Sum = 1
Adasum = 2
Min = 3
Max = 4
Product = 5
OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max",
            Product: "Product"}

_initialized = False


def init(comm: Sequence[int] | None = None, process_sets: Any = None) -> None:
    """Join the phalanx job (started by `phalanx run`, or a 1-worker job when run plainly).

    `comm` may be None or a list of every rank (MPI communicators and sub-communicators are
    not supported); `process_sets` may be None, "dynamic" or a list of `ProcessSet`s that
    `add_process_set` accepts.
    """
    global _initialized
    if comm is not None and (isinstance(comm, (str, bytes)) or not isinstance(comm, Sequence)):
        raise ValueError(f"init(comm={comm!r}): phalanx has no MPI; pass comm=None (all ranks) "
                         "or a list of every rank")
    import phalanx as px
    px.init()
    n = px.size()
    if comm is not None and len(comm) and sorted(int(r) for r in comm) != list(range(n)):
        raise NotImplementedError(
            f"init(comm={list(comm)}): running on a subset of the job's {n} ranks is not "
            "supported; start only the workers you need (phalanx run -np K) and pass comm=None")
    handles.reset()
    dynamic = (isinstance(process_sets, str) and process_sets.lower() == "dynamic") or \
        os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "") not in ("", "0")
    _ps.setup(n, _wanted_sets(process_sets), dynamic)
    # Scripts (and their child processes) read these as they would under horovodrun.
    os.environ.update(env.horovod_vars(px.rank(), n, px.local_rank(), px.local_size()))
    _initialized = True


def _wanted_sets(sets: Any) -> list[_ps.ProcessSet]:
    if sets is None or (isinstance(sets, str) and sets.lower() == "dynamic"):
        return []
    if isinstance(sets, str):
        raise ValueError(f"init(process_sets={sets!r}): pass None, 'dynamic' or a list of "
                         "hvd.ProcessSet")
    return list(sets)


def shutdown() -> None:
    """Stop the facade until the next `init()` (handles are forgotten; operations still
    queued are dropped, never run).

    The phalanx worker stays in its job until the process exits (see the module docstring),
    so `init()` after `shutdown()` works in launched jobs too."""
    global _initialized
    _initialized = False
    handles.reset()
    _ps.teardown()


def is_initialized() -> bool:
    """True between `init()` and `shutdown()`."""
    return _initialized


def require_init(what: str) -> None:
    """Raise ValueError (as Horovod does) if `what` is called before `init()`."""
    if not _initialized:
        raise ValueError(f"hvd.{what}() called before hvd.init() (or after hvd.shutdown()); "
                         "call hvd.init() first")


def size() -> int:
    """Number of workers in the job (the current generation)."""
    require_init("size")
    import phalanx as px
    return int(px.size())


def rank() -> int:
    """This worker's rank."""
    require_init("rank")
    import phalanx as px
    return int(px.rank())


def local_size() -> int:
    """Number of workers on this host."""
    require_init("local_size")
    import phalanx as px
    return int(px.local_size())


def local_rank() -> int:
    """This worker's rank among the workers of its host."""
    require_init("local_rank")
    import phalanx as px
    return int(px.local_rank())


def cross_size() -> int:
    """Number of hosts with a worker of this worker's local rank."""
    require_init("cross_size")
    import phalanx as px
    return int(px.cross_size())


def cross_rank() -> int:
    """This worker's host among the hosts with a worker of its local rank."""
    require_init("cross_rank")
    import phalanx as px
    return int(px.cross_rank())


# ---- capability queries: what this build can do (answerable before init) ----
def mpi_built(verbose: bool = False) -> bool:
    """False: phalanx does not use MPI."""
    return False


def mpi_enabled() -> bool:
    """False: phalanx does not use MPI."""
    return False


def mpi_threads_supported() -> bool:
    """False: there is no MPI (Horovod raises in Gloo mode; answering False is friendlier)."""
    return False


def gloo_built(verbose: bool = False) -> bool:
    """True: phalanx's CPU transport is Gloo."""
    return True


def gloo_enabled() -> bool:
    """True: phalanx's CPU transport is Gloo."""
    return True


def nccl_built(verbose: bool = False) -> int:
    """NCCL's version code (e.g. 22105 for 2.21.5) when torch was built with NCCL, else 0."""
    try:
        import torch.distributed as dist
        if not dist.is_nccl_available():
            return 0
        major, minor, patch = (int(v) for v in torch.cuda.nccl.version()[:3])
    except (AttributeError, RuntimeError):  # torch without CUDA/NCCL raises one of these
        return 0
    # NCCL's own NCCL_VERSION_CODE encoding, which changed at 2.9.
    if major <= 2 and minor <= 8:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def ddl_built(verbose: bool = False) -> bool:
    """False: IBM DDL is not supported."""
    return False


def ccl_built(verbose: bool = False) -> bool:
    """False: oneCCL is not supported."""
    return False


def cuda_built(verbose: bool = False) -> bool:
    """True when torch was built with CUDA (CUDA tensors then go through NCCL)."""
    return torch.version.cuda is not None


def rocm_built(verbose: bool = False) -> bool:
    """True when torch was built with ROCm."""
    return getattr(torch.version, "hip", None) is not None


def gpu_available(ext_base_name: str = "torch", verbose: bool = False) -> bool:
    """True when a CUDA (or ROCm) device is usable from torch."""
    return bool(torch.cuda.is_available())


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Not supported: warns and records nothing (phalanx has no Horovod timeline yet)."""
    require_init("start_timeline")
    warnings.warn(f"hvd.start_timeline({file_path!r}): phalanx does not write Horovod "
                  "timelines; nothing will be recorded", stacklevel=2)


def stop_timeline() -> None:
    """Not supported: does nothing (see `start_timeline`)."""
    require_init("stop_timeline")
