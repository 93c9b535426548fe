"""The two `hvd.DistributedOptimizer`s that are not phalanx's fused one.

- `AdasumOptimizer` (``op=hvd.Adasum`` on more than one rank): Horovod's delta optimizer
  (`_DistributedAdasumOptimizer`). Each rank steps its wrapped optimizer locally, the change
  each step made to every parameter (the delta) is combined across ranks with Adasum, and every
  rank sets its parameters to where they were before the step plus the combined delta. Each
  parameter's delta is combined on its own (its own dot products and norms), as Horovod does.
  The local optimizer state (momentum, Adam moments) stays each rank's own, as in Horovod.
  Horovod steps each parameter as its gradient becomes ready; phalanx steps the wrapped
  optimizer once in `step()`, which is the same for optimizers that update each parameter from
  its own gradient and state (every torch.optim optimizer). `synchronize()` does nothing and
  `skip_synchronize()` raises AssertionError, as in Horovod; `backward_passes_per_step` only
  accumulates (the reduction happens at `step()` whatever the count).
- `LocalOptimizer`: what a rank outside `process_set` gets, as in Horovod: `step()` updates
  with the local gradients and talks to no other rank.

Both expose the wrapped optimizer's `param_groups`, `state` and `state_dict()`, and the step
hooks phalanx's elastic `State` uses to find the step boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ...train.wrapped import WrappedOptimizer
from . import reduce as R
from .compression import Compressor


class _Wrapped(WrappedOptimizer):
    """Delegation to a wrapped torch optimizer (`train.wrapped`), with Horovod's names."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 names: dict[torch.Tensor, str]) -> None:
        super().__init__(optimizer)
        self._parameter_names = names
        """Each parameter's name (Horovod's attribute: the names its reductions carry)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._opt!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._opt.add_param_group(param_group)

    def synchronize(self) -> None:
        """Nothing to do: these optimizers reduce (if at all) inside `step()`."""


class LocalOptimizer(_Wrapped):
    """A rank outside the optimizer's process set: steps on its local gradients."""

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """As in Horovod: nothing is synchronized here anyway."""
        yield

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        self._starting()
        result = self._opt.step(closure) if closure is not None else self._opt.step()
        self._stepped()
        return result


class AdasumOptimizer(_Wrapped):
    """Horovod's Adasum delta optimizer (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str],
                 compression: type[Compressor] | Compressor, comm: Any) -> None:
        super().__init__(optimizer, names)
        self._compression = compression
        self._comm = comm

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Refused, as in Horovod: the Adasum optimizer reduces inside step()."""
        raise AssertionError("Skipping synchronization is not supported when using Adasum "
                             "optimizer.")
        yield  # pragma: no cover

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step locally, Adasum-combine each parameter's delta across ranks, apply it."""
        loss = closure() if closure is not None else None
        self._starting()
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        starts = [p.detach().clone() for p in params]
        self._opt.step()
        with torch.no_grad():
            deltas = [p.detach().sub(s) for p, s in zip(params, starts)]
            if deltas:
                self._combine(params, deltas)
            for p, s, d in zip(params, starts, deltas):
                p.copy_(s.add_(d))
        self._stepped()
        return loss

    def _combine(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        """Replace each delta by its Adasum over the ranks (compressed as asked)."""
        pairs = [self._compression.compress(d) for d in deltas]
        sent = [c.contiguous() for c, _ in pairs]
        name = f"adasum.{self._parameter_names.get(params[0], 'delta')}"
        R.adasum_many_(sent, 1.0, 1.0, name, self._comm)
        for d, c, (_, ctx) in zip(deltas, sent, pairs):
            d.copy_(self._compression.decompress(c, ctx))
