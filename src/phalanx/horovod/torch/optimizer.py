"""Horovod's `DistributedOptimizer` on phalanx's fused, overlapped one.

`hvd.DistributedOptimizer(opt, named_parameters=..., ...)` returns a phalanx
`DistributedOptimizer` subclass: gradients are fused into buckets and reduced during backward;
`step()`, `synchronize()`, `skip_synchronize()`, `zero_grad()`, `param_groups`, `state_dict()`
and `load_state_dict()` behave as in Horovod, and an elastic State sees its step boundary.
Without `named_parameters` the parameters are named as Horovod names them
(``allreduce.noname.<group>.<index>``, the same on every rank; `_parameter_names` maps each
parameter to its name). `op=hvd.Adasum` on more than one rank returns Horovod's Adasum delta
optimizer, and a rank outside `process_set` gets an optimizer that steps on its local
gradients, as in Horovod (see `wrappers`).

Differences from Horovod, by argument:

- the result wraps the optimizer instead of being an instance of a subclass built at runtime
  from its class, so ``isinstance(opt, torch.optim.SGD)`` is False (use ``opt.optimizer``);
- `groups` / `num_groups` are validated and otherwise ignored: phalanx fuses by bucket size,
  which changes speed, never results;
- sparse gradients (``nn.Embedding(sparse=True)``) are allgathered as indices and values, as
  in Horovod, or with `sparse_as_dense=True` reduced densely and handed back sparse (see
  `sparse`);
- `gradient_predivide_factor` f divides each fused bucket by f before the averaging reduction
  (before an fp16 cast, so it guards against overflow as Horovod's does) and multiplies by f
  after it: Horovod's f/size postscale, up to rounding;
- `step()` after `synchronize()` outside `skip_synchronize()` warns as Horovod does, but does
  not reduce the gradients a second time (Horovod does: a Sum would count them twice);
- `step(closure)` is refused; `compression` takes `Compression.none`, `Compression.fp16` or a
  phalanx compression name ("bf16", "1bit", "topk"), not a user-defined Compressor (the Adasum
  optimizer takes any Compressor, as it compresses whole deltas).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from ...train.optimizer import DistributedOptimizer as _PxOptimizer
from . import announce, handles
from . import reduce as R
from .basics import OP_NAMES, Adasum, Average, Max, Min, Product, Sum, require_init
from .compression import Compression, Compressor
from .process_sets import ProcessSet, check, global_process_set, member
from .sparse import reduce_sparse
from .wrappers import AdasumOptimizer, LocalOptimizer

STEP_AFTER_SYNCHRONIZE = (
    "optimizer.step() called without optimizer.skip_synchronize() context after "
    "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
    "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your "
    "code.")
"""Horovod's warning, word for word."""

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
                 named_parameters: list[tuple[str, torch.nn.Parameter]], op: str,
                 compression: str, backward_passes_per_step: int,
                 gradient_predivide_factor: float, sparse_as_dense: bool = False,
                 comm: Any = None) -> None:
        if comm is None:
            import phalanx as comm
        self._hvd_comm = comm
        """The process set's communicator (`process_sets.check`)."""
        super().__init__(optimizer, named_parameters=named_parameters, op=op,
                         compression=compression,
                         backward_passes_per_step=backward_passes_per_step,
                         group=getattr(comm, "group", None))
        self._parameter_names = {p: name for name, p in named_parameters}
        """Each parameter's name (Horovod's attribute)."""
        self.gradient_predivide_factor = gradient_predivide_factor
        if gradient_predivide_factor != 1.0:
            self._compressor = _Predivided(self._compressor, gradient_predivide_factor)
        self._compression_name = compression
        self.sparse_as_dense = sparse_as_dense
        self._sparse_dims: dict[torch.Tensor, int] = {}
        """Parameters seen with a sparse gradient (reduced by allgather), and their sparse_dim."""
        self._sparse_grads: dict[torch.Tensor, torch.Tensor] = {}
        """This step's local sparse gradients, held out of the dense buckets."""
        self._user_synced = False
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

    def _on_grad(self, p: torch.Tensor) -> None:
        """A sparse gradient (sparse_as_dense=False) is held out of its dense bucket, which
        reduces zeros in its place, and allgathered at synchronize()."""
        g = p.grad
        if g is not None and g.is_sparse and not self.sparse_as_dense:
            self._sparse_dims[p] = g.sparse_dim()
            held = self._sparse_grads.get(p)
            self._sparse_grads[p] = g if held is None else held + g
            p.grad = None
        super()._on_grad(p)

    def synchronize(self) -> None:
        """Reduce every gradient now (idempotent until the next backward); sparse gradients
        come back sparse."""
        self._user_synced = True
        if self._synced:
            return
        dense_sparse = [p for g in self.param_groups for p in g["params"]
                        if p.grad is not None and p.grad.is_sparse]
        super().synchronize()
        for p in dense_sparse:
            if p.grad is not None and not p.grad.is_sparse:
                p.grad = p.grad.to_sparse()
        if self._sparse_dims:
            held, self._sparse_grads = self._sparse_grads, {}
            params = list(self._sparse_dims)
            for p, g in zip(params, reduce_sparse(
                    [(p, held.get(p), self._sparse_dims[p]) for p in params],
                    _HVD_OP[self.op], self._hvd_comm)):
                p.grad = g

    def step(self, closure: Any = None) -> Any:
        """Reduce (unless inside `skip_synchronize()`) and step; warns as Horovod does when
        `synchronize()` was called since the last step outside `skip_synchronize()`."""
        if not self._in_skip and self._user_synced:
            warnings.warn(STEP_AFTER_SYNCHRONIZE, stacklevel=2)
        self._user_synced = False
        try:
            return super().step(closure)
        finally:
            self._user_synced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As Horovod: refused (AssertionError) between backward() and step()/synchronize()."""
        if self._next_launch > 0 and not self._synced:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(). This is "
                                 "prohibited as it can cause a race condition.")
        self._sparse_grads = {}
        super().zero_grad(set_to_none=set_to_none)


_HVD_OP = {"avg": Average, "sum": Sum, "min": Min, "max": Max, "prod": Product}


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: type[Compressor] | Compressor | str = Compression.none,
                         backward_passes_per_step: int = 1, op: int = Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Any = None, sparse_as_dense: bool = False,
                         process_set: ProcessSet = global_process_set) -> torch.optim.Optimizer:
    """Reduce gradients across ranks (Average by default) before each `step()` of `optimizer`.

    `named_parameters` (usually ``model.named_parameters()``) must name every parameter of the
    optimizer with unique names; `backward_passes_per_step` accumulates that many backward
    passes locally before reducing; `gradient_predivide_factor` f divides gradients by f before
    the sum and multiplies by f/size after (op=Average only)."""
    require_init("DistributedOptimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"DistributedOptimizer: optimizer={type(optimizer).__name__} is not a "
                         "torch.optim.Optimizer; pass e.g. torch.optim.SGD(model.parameters())")
    if isinstance(op, bool) or op not in OP_NAMES:
        raise ValueError(f"DistributedOptimizer: op={op!r} is not one of hvd.Average, hvd.Sum, "
                         "hvd.Adasum, hvd.Min, hvd.Max, hvd.Product")
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
    named = _check_names(optimizer, named_parameters)
    if not member(process_set, "DistributedOptimizer"):
        return LocalOptimizer(optimizer, {p: n for n, p in named})
    comm = check(process_set, "DistributedOptimizer")
    if op == Adasum and comm.size() > 1:
        R.check_adasum(comm.size(), [], "DistributedOptimizer")
        return AdasumOptimizer(optimizer, {p: n for n, p in named}, compression, comm)
    return HorovodDistributedOptimizer(
        optimizer, named_parameters=named, op=_map_op(op),
        compression=_map_compression(compression), gradient_predivide_factor=float(
            gradient_predivide_factor), backward_passes_per_step=backward_passes_per_step,
        sparse_as_dense=bool(sparse_as_dense), comm=comm)


def _map_op(op: int) -> str:
    """phalanx's op name (Adasum reaches here only on one rank, where it is the identity)."""
    return "sum" if op == Adasum else _PX_OPS[op]


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
                 named_parameters: Any) -> list[tuple[str, torch.Tensor]]:
    """Horovod's rules: (name, tensor) pairs, unique names, every optimizer parameter named;
    without names, Horovod's own (``allreduce.noname.<group>.<index>``)."""
    if named_parameters is None:
        return [(f"allreduce.noname.{i}.{j}", p) for i, group in enumerate(optimizer.param_groups)
                for j, p in enumerate(group["params"])]
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
