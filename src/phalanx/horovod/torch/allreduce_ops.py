"""Horovod's allreduce family: allreduce, allreduce_, *_async(_), grouped_allreduce*.

Out-of-place forms leave the input alone and are differentiable: the gradient of an
allreduce is the allreduce of the incoming gradient with the same op and scale factors (as
in Horovod, also for Min, Max and Product). In-place and async forms move data only. Async
forms return an int handle for `hvd.synchronize()` / `hvd.poll()`. Every form is queued and
matched across ranks by name (see `handles`): dtype, device, shape, op and the scale factors
must agree between ranks for the same name.
"""

from __future__ import annotations

from typing import Any

import torch

from . import handles
from . import negotiate as N
from . import reduce as R
from .basics import OP_NAMES, Adasum, require_init
from .compression import Compression, Compressor
from .process_sets import ProcessSet, check, global_process_set, set_of


def fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t`'s data that a collective may overwrite."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def check_tensor(t: Any, what: str, *, contiguous: bool = False) -> torch.Tensor:
    """`t` if it is a (contiguous, when asked) torch.Tensor, else ValueError naming `what`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: tensor must be a torch.Tensor, got {type(t).__name__}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{what}: the tensor must be contiguous for an in-place operation; "
                         "call .contiguous() first or use the out-of-place form")
    return t


def check_tensors(ts: Any, what: str, *, contiguous: bool = False) -> list[torch.Tensor]:
    """A non-empty list of tensors, or ValueError naming `what`."""
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)) or not ts:
        raise ValueError(f"{what}: tensors must be a non-empty list of torch.Tensor, got "
                         f"{type(ts).__name__}")
    return [check_tensor(t, f"{what}[{i}]", contiguous=contiguous) for i, t in enumerate(ts)]


def _sig(t: torch.Tensor | list[torch.Tensor], op: int, pre: float,
         post: float) -> tuple[tuple[str, Any], ...]:
    """What ranks must agree on for an allreduce of `t` (a tensor or a grouped list)."""
    head = N.tensors_sig(t) if isinstance(t, list) else N.tensor_sig(t)
    return (*head, ("op", OP_NAMES[op]), ("prescale_factor", pre), ("postscale_factor", post))


def _prepare(what: str, op: Any, average: bool | None, pre: Any, post: Any,
             process_set: ProcessSet) -> tuple[int, float, float, Any]:
    require_init(what)
    comm = check(process_set, what)
    op = R.resolve_op(op, average, what)
    if op == Adasum:   # Horovod raises these at the call, not at synchronize()
        R.check_adasum(comm.size(), [], what)
    return (op, R.check_factor(pre, "prescale_factor", what),
            R.check_factor(post, "postscale_factor", what), comm)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start reducing a copy of `tensor`; `synchronize(handle)` returns the result."""
    op, pre, post, comm = _prepare("allreduce_async", op, average, prescale_factor,
                                   postscale_factor, process_set)
    out = fresh(check_tensor(tensor, "allreduce_async"))
    return handles.start("allreduce", name,
                         lambda: R.start_allreduce_(out, op, pre, post, name, comm),
                         _sig(out, op, pre, post), comm)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """Start reducing contiguous `tensor` in place; `synchronize(handle)` returns it."""
    op, pre, post, comm = _prepare("allreduce_async_", op, average, prescale_factor,
                                   postscale_factor, process_set)
    t = check_tensor(tensor, "allreduce_async_", contiguous=True)
    return handles.start("allreduce", name,
                         lambda: R.start_allreduce_(t, op, pre, post, name, comm),
                         _sig(t, op, pre, post), comm)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: int | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce contiguous `tensor` in place and return it."""
    return handles.synchronize(allreduce_async_(tensor, average, name, op, prescale_factor,
                                                postscale_factor, process_set))


class _Allreduce(torch.autograd.Function):
    """allreduce whose backward is the allreduce of the gradient (same op and factors)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, name: str | None, pre: float,
                post: float, comm: Any) -> torch.Tensor:
        ctx.op, ctx.pre, ctx.post, ctx.comm = op, pre, post, comm
        out = fresh(tensor)
        return handles.run("allreduce", name,
                           lambda: R.start_allreduce_(out, op, pre, post, name, comm),
                           _sig(out, op, pre, post), comm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (allreduce(grad, op=ctx.op, prescale_factor=ctx.pre, postscale_factor=ctx.post,
                          process_set=set_of(ctx.comm)), None, None, None, None, None)


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: type[Compressor] | Compressor = Compression.none, op: int | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce `tensor` across ranks (Average by default) and return the result; differentiable.

    `average=` is the deprecated spelling of `op=` (both: ValueError). `compression` wraps the
    reduction (`Compression.fp16` sends float16)."""
    op, pre, post, comm = _prepare("allreduce", op, average, prescale_factor, postscale_factor,
                                   process_set)
    compressed, cctx = compression.compress(check_tensor(tensor, "allreduce"))
    out = _Allreduce.apply(compressed, op, name, pre, post, comm)
    return compression.decompress(out, cctx)


# ---------------------------------------------------------------- grouped
def grouped_allreduce_async(tensors: list[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: int | None = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start reducing copies of `tensors` as one fused operation; the handle yields a list."""
    op, pre, post, comm = _prepare("grouped_allreduce_async", op, average, prescale_factor,
                                   postscale_factor, process_set)
    outs = [fresh(t) for t in check_tensors(tensors, "grouped_allreduce_async")]
    return handles.start("grouped_allreduce", name,
                         lambda: R.start_grouped_(outs, op, pre, post, name, comm),
                         _sig(outs, op, pre, post), comm)


def grouped_allreduce_async_(tensors: list[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: int | None = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: ProcessSet = global_process_set) -> int:
    """Start reducing contiguous `tensors` in place; the handle yields the same list."""
    op, pre, post, comm = _prepare("grouped_allreduce_async_", op, average, prescale_factor,
                                   postscale_factor, process_set)
    ts = check_tensors(tensors, "grouped_allreduce_async_", contiguous=True)
    return handles.start("grouped_allreduce", name,
                         lambda: R.start_grouped_(ts, op, pre, post, name, comm),
                         _sig(ts, op, pre, post), comm)


def grouped_allreduce_(tensors: list[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: int | None = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    """Reduce contiguous `tensors` in place (fused) and return them."""
    return handles.synchronize(grouped_allreduce_async_(
        tensors, average, name, op, prescale_factor, postscale_factor, process_set))


class _GroupedAllreduce(torch.autograd.Function):
    """grouped_allreduce whose backward is the grouped allreduce of the gradients."""

    @staticmethod
    def forward(ctx: Any, op: int, name: str | None, pre: float, post: float, comm: Any,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.op, ctx.pre, ctx.post, ctx.comm = op, pre, post, comm
        outs = [fresh(t) for t in tensors]
        return tuple(handles.run("grouped_allreduce", name,
                                 lambda: R.start_grouped_(outs, op, pre, post, name, comm),
                                 _sig(outs, op, pre, post), comm))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        reduced = grouped_allreduce(list(grads), op=ctx.op, prescale_factor=ctx.pre,
                                    postscale_factor=ctx.post, process_set=set_of(ctx.comm))
        return (None, None, None, None, None, *reduced)


def grouped_allreduce(tensors: list[torch.Tensor], average: bool | None = None,
                      name: str | None = None,
                      compression: type[Compressor] | Compressor = Compression.none,
                      op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0,
                      process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    """Reduce every tensor of the list as one fused operation; differentiable."""
    op, pre, post, comm = _prepare("grouped_allreduce", op, average, prescale_factor,
                                   postscale_factor, process_set)
    pairs = [compression.compress(t) for t in check_tensors(tensors, "grouped_allreduce")]
    outs = _GroupedAllreduce.apply(op, name, pre, post, comm, *(c for c, _ in pairs))
    return [compression.decompress(o, cctx) for o, (_, cctx) in zip(outs, pairs)]
