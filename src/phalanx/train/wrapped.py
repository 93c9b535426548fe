"""The base of every phalanx optimizer that wraps a torch optimizer: delegation and step hooks.

The wrapped optimizer owns the parameter groups, the state and the defaults; the wrapper adds
two hooks an elastic `State` registers for: after a complete step (its boundary), and at the
start of a step (where it leaves for a membership change). Subclasses fire them (`_stepped`,
`_starting`) and decide what a step is. `DistributedOptimizer` and the Horovod facade's
optimizers share it, so delegation is written once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


class WrappedOptimizer(torch.optim.Optimizer):
    """Delegates to `optimizer`; subclasses call `super().__init__(optimizer)` (torch's own
    constructor is not run: the wrapped optimizer already holds the groups)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: super-init-not-called
        self._opt = optimizer
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

    def state_dict(self) -> dict[str, Any]:
        return self._opt.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._opt.load_state_dict(state_dict)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """`hook(optimizer, args, kwargs)` runs after each complete step (reduction applied):
        the step boundary an elastic `State` registers for."""
        handle = RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    def register_step_start_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """`hook(optimizer)` runs once per step, before the step's first reduction: an
        elastic `State` leaves there for a membership change."""
        handle = RemovableHandle(self._start_hooks)
        self._start_hooks[handle.id] = hook
        return handle

    def _stepped(self) -> None:
        """Tell the post-step hooks a step is complete."""
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})

    def _starting(self) -> None:
        """Tell the start hooks a step begins (they may raise to leave the step)."""
        for hook in list(self._start_hooks.values()):
            hook(self)
