"""Horovod's allgather, broadcast, alltoall, reducescatter, barrier and join over phalanx.

The out-of-place forms are differentiable with Horovod's gradient rules: allgather's gradient
is this rank's slice of the averaged incoming gradient; broadcast's is the averaged gradient on
the root and zero elsewhere; alltoall's sends the gradient back along the received splits;
reducescatter's is the allgather of the gradient (times the rank count for Sum, and the scale
factors). Every operation, barrier and join included, is queued and matched across ranks by
name (see `handles`). Allgather's async forms overlap; broadcast, alltoall and reducescatter
run synchronously once negotiated (phalanx has no async form of them yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import handles
from . import reduce as R
from .allreduce_ops import allreduce, check_tensor, check_tensors, fresh
from .basics import OP_NAMES, Average, OperationError, Sum, require_init
from .compression import Compression, Compressor
from .negotiate import tensor_sig, tensors_sig
from .process_sets import ProcessSet, check, global_process_set, set_of


def _px() -> Any:
    import phalanx as px
    return px


def _prepare(what: str, process_set: ProcessSet) -> Any:
    """The communicator of `process_set` (`process_sets.check`), after the usual checks."""
    require_init(what)
    return check(process_set, what)


# ---------------------------------------------------------------- allgather
def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start concatenating every rank's `tensor` along dim 0 (first dims may differ)."""
    comm = _prepare("allgather_async", process_set)
    t = fresh(check_tensor(tensor, "allgather_async"))
    return handles.start("allgather", name, lambda: comm.allgather_async(t, name=name),
                         tensor_sig(t, dim0_free=True), comm)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, comm: Any) -> torch.Tensor:
        ctx.shape, ctx.comm = tensor.shape, comm
        t = fresh(tensor)
        return handles.run("allgather", name, lambda: comm.allgather_async(t, name=name),
                           tensor_sig(t, dim0_free=True), comm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        ps = set_of(ctx.comm)
        rows = ctx.shape[0] if len(ctx.shape) else 1
        reduced = allreduce(grad, op=Average, process_set=ps)
        counts = allgather(torch.tensor([rows], dtype=torch.int64), process_set=ps)
        offset = int(counts[:ctx.comm.rank()].sum())
        return reduced.narrow(0, offset, rows).reshape(ctx.shape), None, None


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order; differentiable."""
    comm = _prepare("allgather", process_set)
    return _Allgather.apply(check_tensor(tensor, "allgather"), name, comm)


def grouped_allgather_async(tensors: list[torch.Tensor], name: str | None = None,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start allgathering each tensor of the list; the handle yields a list."""
    comm = _prepare("grouped_allgather_async", process_set)
    ts = [fresh(t) for t in check_tensors(tensors, "grouped_allgather_async")]

    def make() -> handles.Waitable:
        inner = [comm.allgather_async(t, name=f"{name}.{i}" if name else None)
                 for i, t in enumerate(ts)]
        return handles.Chain(inner, lambda outs: outs)

    return handles.start("grouped_allgather", name, make, tensors_sig(ts, dim0_free=True), comm)


def grouped_allgather(tensors: list[torch.Tensor], name: str | None = None,
                      process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    """`allgather` of each tensor of the list; differentiable."""
    _prepare("grouped_allgather", process_set)
    return [allgather(t, f"{name}.{i}" if name else None, process_set)
            for i, t in enumerate(check_tensors(tensors, "grouped_allgather"))]


# ---------------------------------------------------------------- broadcast
def _check_root(root_rank: Any, what: str, comm: Any) -> int:
    """`root_rank` (a job rank, also within a process set, as in Horovod) if valid."""
    ranks = set_of(comm).ranks or list(range(_px().size()))
    if isinstance(root_rank, bool) or not isinstance(root_rank, int) or root_rank not in ranks:
        where = (f"this job (size {len(ranks)}); use 0..{len(ranks) - 1}" if comm is _px()
                 else f"the process set (ranks {ranks}); use one of them")
        raise ValueError(f"{what}: root_rank={root_rank!r} is not a rank of {where}")
    return root_rank


def _bcast_sig(t: torch.Tensor, root: int) -> tuple[tuple[str, Any], ...]:
    return (*tensor_sig(t), ("root_rank", root))


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Queue broadcasting root's `tensor`; the handle yields a new tensor."""
    comm = _prepare("broadcast_async", process_set)
    root = _check_root(root_rank, "broadcast_async", comm)
    t = fresh(check_tensor(tensor, "broadcast_async"))
    return handles.start("broadcast", name,
                         lambda: handles.Done(comm.broadcast_(t, root, name=name)),
                         _bcast_sig(t, root), comm)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> int:
    """Queue overwriting `tensor` with root's on every rank; the handle yields it."""
    comm = _prepare("broadcast_async_", process_set)
    root = _check_root(root_rank, "broadcast_async_", comm)
    t = check_tensor(tensor, "broadcast_async_")
    return handles.start("broadcast", name,
                         lambda: handles.Done(comm.broadcast_(t, root, name=name)),
                         _bcast_sig(t, root), comm)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Overwrite `tensor` with root's on every rank and return it."""
    return handles.synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root: int, name: str | None,
                comm: Any) -> torch.Tensor:
        ctx.root, ctx.comm = root, comm
        t = fresh(tensor)
        return handles.run("broadcast", name,
                           lambda: handles.Done(comm.broadcast_(t, root, name=name)),
                           _bcast_sig(t, root), comm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        reduced = allreduce(grad, op=Average, process_set=set_of(ctx.comm))
        if _px().rank() != ctx.root:
            reduced = torch.zeros_like(reduced)
        return reduced, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Root's `tensor` on every rank, as a new tensor; differentiable."""
    comm = _prepare("broadcast", process_set)
    root = _check_root(root_rank, "broadcast", comm)
    return _Broadcast.apply(check_tensor(tensor, "broadcast"), root, name, comm)


# ---------------------------------------------------------------- alltoall
def _splits(splits: Any, what: str) -> list[int] | None:
    if splits is None:
        return None
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.reshape(-1).tolist()]
    if isinstance(splits, Sequence) and not isinstance(splits, (str, bytes)):
        return [int(s) for s in splits]
    raise ValueError(f"{what}: splits={splits!r} must be None, a list of ints or an int tensor "
                     "(rows for rank 0, rank 1, ...)")


def _alltoall(t: torch.Tensor, splits: list[int] | None, name: str | None, comm: Any) -> Any:
    return comm.alltoall(t, splits=splits, name=name, return_splits=True)


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Queue an alltoall; the handle yields (output, received_splits)."""
    comm = _prepare("alltoall_async", process_set)
    t = fresh(check_tensor(tensor, "alltoall_async"))
    send, dtype = _splits(splits, "alltoall_async"), _splits_dtype(splits)

    def make() -> handles.Waitable:
        out, recv = _alltoall(t, send, name, comm)
        return handles.Done((out, torch.tensor(recv, dtype=dtype)))

    return handles.start("alltoall", name, make, tensor_sig(t, dim0_free=True), comm)


def _splits_dtype(splits: Any) -> torch.dtype:
    return splits.dtype if isinstance(splits, torch.Tensor) else torch.int32


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: list[int] | None, dtype: torch.dtype,
                name: str | None, comm: Any) -> Any:
        t = fresh(tensor)
        out, recv = handles.run("alltoall", name,
                                lambda: handles.Done(_alltoall(t, splits, name, comm)),
                                tensor_sig(t, dim0_free=True), comm)
        ctx.recv, ctx.comm = recv, comm
        if splits is None:
            return out
        received = torch.tensor(recv, dtype=dtype)
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        back, _ = alltoall(grad, splits=ctx.recv, process_set=set_of(ctx.comm))
        return back, None, None, None, None


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """Send `splits[j]` rows of dim 0 to rank j (equal parts when None); return what arrived
    in rank order, and with `splits` given also a tensor of rows received from each rank."""
    comm = _prepare("alltoall", process_set)
    t = check_tensor(tensor, "alltoall")
    return _Alltoall.apply(t, _splits(splits, "alltoall"), _splits_dtype(splits), name, comm)


# ---------------------------------------------------------------- reducescatter
def _rs_op(op: Any, what: str) -> int:
    op = R.check_op(op, what)
    if op not in (Average, Sum):
        raise OperationError(f"{what}: op=hvd.{OP_NAMES[op]} is not supported: reducescatter "
                             "currently only supports AVERAGE and SUM (as in Horovod, which "
                             "raises this RuntimeError too); use op=hvd.Average or hvd.Sum")
    return op


def _reducescatter(t: torch.Tensor, op: int, pre: float, post: float,
                   name: str | None, comm: Any) -> torch.Tensor:
    R.scale_(t, pre)
    out = comm.reducescatter(t, op="sum", name=name)
    R.scale_(out, R.post_factor(op, post, comm.size()))
    return out


def _rs_sig(t: torch.Tensor | list[torch.Tensor], op: int, pre: float,
            post: float) -> tuple[tuple[str, Any], ...]:
    head = tensors_sig(t) if isinstance(t, list) else tensor_sig(t)
    return (*head, ("op", OP_NAMES[op]), ("prescale_factor", pre), ("postscale_factor", post))


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, name: str | None, pre: float,
                post: float, comm: Any) -> torch.Tensor:
        ctx.op, ctx.pre, ctx.post, ctx.comm = op, pre, post, comm
        t = fresh(tensor)
        return handles.run("reducescatter", name,
                           lambda: handles.Done(_reducescatter(t, op, pre, post, name, comm)),
                           _rs_sig(t, op, pre, post), comm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        factor = (ctx.comm.size() if ctx.op == Sum else 1) * ctx.pre * ctx.post
        return (allgather(grad * factor if factor != 1 else grad, process_set=set_of(ctx.comm)),
                None, None, None, None, None)


def reducescatter(tensor: torch.Tensor, name: str | None = None,
                  compression: type[Compressor] | Compressor = Compression.none,
                  op: int = Average, process_set: ProcessSet = global_process_set,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce across ranks and keep this rank's rows of dim 0 (the first `dim0 % size` ranks
    get one row more); differentiable."""
    comm = _prepare("reducescatter", process_set)
    op = _rs_op(op, "reducescatter")
    pre = R.check_factor(prescale_factor, "prescale_factor", "reducescatter")
    post = R.check_factor(postscale_factor, "postscale_factor", "reducescatter")
    compressed, cctx = compression.compress(check_tensor(tensor, "reducescatter"))
    return compression.decompress(_Reducescatter.apply(compressed, op, name, pre, post, comm),
                                  cctx)


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: int = Average,
                        process_set: ProcessSet = global_process_set,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> int:
    """Queue a `reducescatter`; the handle yields the result."""
    comm = _prepare("reducescatter_async", process_set)
    op = _rs_op(op, "reducescatter_async")
    pre = R.check_factor(prescale_factor, "prescale_factor", "reducescatter_async")
    post = R.check_factor(postscale_factor, "postscale_factor", "reducescatter_async")
    t = fresh(check_tensor(tensor, "reducescatter_async"))
    return handles.start("reducescatter", name,
                         lambda: handles.Done(_reducescatter(t, op, pre, post, name, comm)),
                         _rs_sig(t, op, pre, post), comm)


def grouped_reducescatter(tensors: list[torch.Tensor], name: str | None = None,
                          compression: type[Compressor] | Compressor = Compression.none,
                          op: int = Average, process_set: ProcessSet = global_process_set,
                          prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """`reducescatter` of each tensor of the list; differentiable."""
    return [reducescatter(t, f"{name}.{i}" if name else None, compression, op, process_set,
                          prescale_factor, postscale_factor)
            for i, t in enumerate(check_tensors(tensors, "grouped_reducescatter"))]


def grouped_reducescatter_async(tensors: list[torch.Tensor], name: str | None = None,
                                op: int = Average, process_set: ProcessSet = global_process_set,
                                prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    """`grouped_reducescatter` as one queued operation; the handle yields the list."""
    comm = _prepare("grouped_reducescatter_async", process_set)
    op = _rs_op(op, "grouped_reducescatter_async")
    pre = R.check_factor(prescale_factor, "prescale_factor", "grouped_reducescatter_async")
    post = R.check_factor(postscale_factor, "postscale_factor", "grouped_reducescatter_async")
    ts = [fresh(t) for t in check_tensors(tensors, "grouped_reducescatter_async")]

    def make() -> handles.Waitable:
        return handles.Done([_reducescatter(t, op, pre, post, f"{name}.{i}" if name else None,
                                            comm) for i, t in enumerate(ts)])

    return handles.start("grouped_reducescatter", name, make, _rs_sig(ts, op, pre, post), comm)


# ---------------------------------------------------------------- barrier
def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Block until every rank reaches the barrier (operations every rank submitted before it
    start first, as the barrier is negotiated like them)."""
    comm = _prepare("barrier", process_set)
    handles.run("barrier", None, lambda: handles.Done(comm.barrier()), (), comm)
