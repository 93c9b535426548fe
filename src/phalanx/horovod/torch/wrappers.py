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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from . import reduce as R
from .compression import Compressor


class _Wrapped(torch.optim.Optimizer):
    """Delegation to a wrapped torch optimizer, and phalanx's step hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 names: dict[torch.Tensor, str]) -> None:   # no super().__init__: it delegates
        self._opt = optimizer
        self._parameter_names = names
        """Each parameter's name (Horovod's attribute: the names its reductions carry)."""
        self._post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._start_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._opt.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._opt.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._opt.defaults

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped torch optimizer."""
        return self._opt

    def __getattr__(self, name: str) -> Any:
        opt = self.__dict__.get("_opt")
        if opt is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(opt, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._opt!r})"

    def state_dict(self) -> dict[str, Any]:
        return self._opt.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._opt.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._opt.add_param_group(param_group)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """`hook(optimizer, args, kwargs)` after each step (an elastic State's boundary)."""
        handle = RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    def register_step_start_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """`hook(optimizer)` at the start of each step, before any reduction."""
        handle = RemovableHandle(self._start_hooks)
        self._start_hooks[handle.id] = hook
        return handle

    def synchronize(self) -> None:
        """Nothing to do: these optimizers reduce (if at all) inside `step()`."""

    def _stepped(self) -> None:
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})


class LocalOptimizer(_Wrapped):
    """A rank outside the optimizer's process set: steps on its local gradients."""

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """As in Horovod: nothing is synchronized here anyway."""
        yield

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        for hook in list(self._start_hooks.values()):
            hook(self)
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
        for hook in list(self._start_hooks.values()):
            hook(self)
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
