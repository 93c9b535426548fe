"""Horovod's `DistributedOptimizer` on phalanx's fused, overlapped one.

`hvd.DistributedOptimizer(opt, named_parameters=..., ...)` returns a phalanx
`DistributedOptimizer` subclass: gradients are fused into buckets and reduced during backward;
`step()`, `synchronize()`, `skip_synchronize()`, `zero_grad()`, `param_groups`, `state_dict()`
and `load_state_dict()` behave as in Horovod, and an elastic State sees its step boundary.

Differences from Horovod, by argument:

- the result wraps the optimizer instead of being an instance of a subclass built at runtime
  from its class, so ``isinstance(opt, torch.optim.SGD)`` is False (use ``opt.optimizer``);
- `groups` / `num_groups` are validated and otherwise ignored: phalanx fuses by bucket size,
  which changes speed, never results;
- sparse gradients are reduced as dense ones (Horovod's `sparse_as_dense=True` path, used
  whatever the flag) and handed back to the optimizer as sparse tensors;
- `op=hvd.Adasum` is supported on one rank only (where it is the identity); Horovod's Adasum
  optimizer (reducing parameter deltas) is not implemented;
- `gradient_predivide_factor` f divides each fused bucket by f before the averaging reduction
  (before an fp16 cast, so it guards against overflow as Horovod's does) and multiplies by f
  after it: Horovod's f/size postscale, up to rounding;
- `step(closure)` is refused; `compression` takes `Compression.none`, `Compression.fp16` or a
  phalanx compression name ("bf16", "1bit", "topk"), not a user-defined Compressor.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from ...train.optimizer import DistributedOptimizer as _PxOptimizer
from . import announce, handles
from .basics import OP_NAMES, Adasum, Average, Max, Min, Product, Sum, require_init, size
from .compression import Compression, Compressor
from .process_sets import ProcessSet, check, global_process_set

_PX_OPS = {Average: "avg", Sum: "sum", Min: "min", Max: "max", Product: "prod"}
_PX_COMPRESSIONS = ("none", "fp16", "bf16", "1bit", "topk")


class _Rescaled:
    """Wait for a bucket's reduction, then multiply its gradients by `factor`."""

    def __init__(self, pending: Any, grads: torch.Tensor, factor: float) -> None:
        self._pending, self._grads, self._factor = pending, grads, factor

    def wait(self) -> None:
        self._pending.wait()
        self._grads.mul_(self._factor)


class _Predivided:
    """A compressor wrapper for `gradient_predivide_factor`: gradients are divided by the
    factor before the (averaging) reduction and multiplied by it after."""

    def __init__(self, inner: Any, factor: float) -> None:
        self._inner, self._factor = inner, factor

    @property
    def group(self) -> Any:
        """The wrapped compressor's subgroup (see `train.compression`)."""
        return self._inner.group

    @group.setter
    def group(self, value: Any) -> None:
        self._inner.group = value

    def start(self, bucket: Any, op: str) -> _Rescaled:
        grads = bucket.buffer[:bucket.numel]
        grads.mul_(1.0 / self._factor)
        return _Rescaled(self._inner.start(bucket, op), grads, self._factor)


class HorovodDistributedOptimizer(_PxOptimizer):
    """What `hvd.DistributedOptimizer` returns (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *,
                 named_parameters: list[tuple[str, torch.nn.Parameter]] | None, op: str,
                 compression: str, backward_passes_per_step: int,
                 gradient_predivide_factor: float, comm: Any = None) -> None:
        if comm is None:
            import phalanx as comm
        self._hvd_comm = comm
        """The process set's communicator (`process_sets.check`)."""
        super().__init__(optimizer, named_parameters=named_parameters, op=op,
                         compression=compression,
                         backward_passes_per_step=backward_passes_per_step,
                         group=getattr(comm, "group", None))
        self.gradient_predivide_factor = gradient_predivide_factor
        if gradient_predivide_factor != 1.0:
            self._compressor = _Predivided(self._compressor, gradient_predivide_factor)
        self._compression_name = compression
        self.register_step_start_hook(HorovodDistributedOptimizer._announce)

    def _announce(self) -> None:
        """Before each reduction: announce the bucket layout, so a rank that called
        `hvd.join()` can take part with zeros (`joining.optimizer_step`): one small
        asynchronous allreduce (see `announce`), or a negotiation round where the layout does
        not fit it."""
        from ...train import _comm
        comm = self._hvd_comm
        if comm.size() == 1:
            return
        buckets = tuple((b.numel + len(b.params), str(b.dtype).removeprefix("torch."),
                         b.params[0].device.type) for b in self.buckets)
        check = _comm.generation() != self._checked_generation
        if announce.fits(buckets, self.op, self._compression_name):
            # asynchronous: backward goes on; a joined rank reads the layout from it
            comm.allreduce_async_(announce.encode(buckets, self.op, self._compression_name,
                                                  check), op="max")
            return
        sig = (("buckets", buckets), ("op", self.op), ("compression", self._compression_name),
               ("layout check", check))
        handles.run("optimizer", "step", lambda: handles.Done(None), sig, comm)

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change how many backward passes accumulate before a reduction (between steps)."""
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"set_backward_passes_per_step({passes!r}): must be an int >= 1")
        self._require_idle("set_backward_passes_per_step()")
        self.backward_passes_per_step = passes

    def synchronize(self) -> None:
        """Reduce every gradient now (idempotent until the next backward); sparse gradients
        come back sparse."""
        sparse = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and p.grad.is_sparse]
        super().synchronize()
        for p in sparse:
            if p.grad is not None and not p.grad.is_sparse:
                p.grad = p.grad.to_sparse()


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: type[Compressor] | Compressor | str = Compression.none,
                         backward_passes_per_step: int = 1, op: int = Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Any = None, sparse_as_dense: bool = False,
                         process_set: ProcessSet = global_process_set,
                         ) -> HorovodDistributedOptimizer:
    """Reduce gradients across ranks (Average by default) before each `step()` of `optimizer`.

    `named_parameters` (usually ``model.named_parameters()``) must name every parameter of the
    optimizer with unique names; `backward_passes_per_step` accumulates that many backward
    passes locally before reducing; `gradient_predivide_factor` f divides gradients by f before
    the sum and multiplies by f/size after (op=Average only)."""
    require_init("DistributedOptimizer")
    comm = check(process_set, "DistributedOptimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"DistributedOptimizer: optimizer={type(optimizer).__name__} is not a "
                         "torch.optim.Optimizer; pass e.g. torch.optim.SGD(model.parameters())")
    px_op = _map_op(op)
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError(f"DistributedOptimizer: gradient_predivide_factor="
                         f"{gradient_predivide_factor} needs op=hvd.Average, got "
                         f"op={OP_NAMES.get(op, op)}")
    if not float(gradient_predivide_factor) > 0:
        raise ValueError(f"DistributedOptimizer: gradient_predivide_factor="
                         f"{gradient_predivide_factor!r} must be > 0")
    if num_groups != 0:
        warnings.warn("DistributedOptimizer: num_groups= is deprecated; use groups=",
                      DeprecationWarning, stacklevel=2)
        groups = num_groups if groups is None else groups
    _check_groups(groups)
    if isinstance(backward_passes_per_step, bool) or not isinstance(
            backward_passes_per_step, int) or backward_passes_per_step <= 0:
        raise ValueError(f"DistributedOptimizer: backward_passes_per_step="
                         f"{backward_passes_per_step!r} must be an int > 0")
    return HorovodDistributedOptimizer(
        optimizer, named_parameters=_check_names(optimizer, named_parameters), op=px_op,
        compression=_map_compression(compression), gradient_predivide_factor=float(
            gradient_predivide_factor), backward_passes_per_step=backward_passes_per_step,
        comm=comm)


def _map_op(op: Any) -> str:
    if op == Adasum and not isinstance(op, bool):
        if size() == 1:
            return "sum"  # Adasum of a single rank's gradient is that gradient
        raise NotImplementedError(
            f"DistributedOptimizer(op=hvd.Adasum) on {size()} ranks: Horovod's Adasum optimizer "
            "(reducing parameter deltas) is not implemented in phalanx; use op=hvd.Average "
            "(hvd.allreduce(..., op=hvd.Adasum) itself is supported)")
    if isinstance(op, bool) or op not in _PX_OPS:
        raise ValueError(f"DistributedOptimizer: op={op!r} is not one of hvd.Average, hvd.Sum, "
                         "hvd.Adasum, hvd.Min, hvd.Max, hvd.Product")
    return _PX_OPS[op]


def _map_compression(compression: Any) -> str:
    if isinstance(compression, str) and compression in _PX_COMPRESSIONS:
        return compression
    name = getattr(compression, "phalanx_name", None)
    if name in _PX_COMPRESSIONS:
        return str(name)
    raise NotImplementedError(
        f"DistributedOptimizer(compression={compression!r}): phalanx fuses gradients and "
        "compresses whole buckets, so only hvd.Compression.none, hvd.Compression.fp16 or a "
        f"phalanx name {_PX_COMPRESSIONS} work here; hvd.allreduce(compression=...) accepts "
        "any Compressor")


def _check_groups(groups: Any) -> None:
    if groups is None:
        return
    if isinstance(groups, list):
        seen: set[int] = set()
        for group in groups:
            for p in group:
                if not isinstance(p, torch.Tensor):
                    raise ValueError("DistributedOptimizer: groups must be lists of tensors, "
                                     f"got a {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("DistributedOptimizer: a parameter appears in more than "
                                     "one of groups")
                seen.add(id(p))
    elif isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"DistributedOptimizer: groups={groups!r} must be a positive int or a "
                         "list of lists of tensors")


def _check_names(optimizer: torch.optim.Optimizer,
                 named_parameters: Any) -> list[tuple[str, torch.nn.Parameter]] | None:
    """Horovod's rules: (name, tensor) pairs, unique names, every optimizer parameter named."""
    if named_parameters is None:
        return None
    named = list(named_parameters)
    if any(not isinstance(p, tuple) or len(p) != 2 for p in named):
        raise ValueError("DistributedOptimizer: named_parameters must be (name, parameter) "
                         "pairs, as model.named_parameters() yields")
    counts = Counter(name for name, _ in named)
    dups = sorted(str(name) for name, k in counts.items() if k > 1)
    if dups:
        raise ValueError(f"DistributedOptimizer: parameter names must be unique; duplicates: "
                         f"{', '.join(dups)}")
    ids = {id(p) for _, p in named}
    unnamed = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in ids]
    if unnamed:
        shapes = ", ".join(str(tuple(p.shape)) for p in unnamed[:5])
        raise ValueError(f"DistributedOptimizer: named_parameters was given but {len(unnamed)} "
                         f"optimizer parameter(s) are not in it (shapes {shapes}); pass "
                         "model.named_parameters() of the model the optimizer trains")
    return named
