"""How `State` saves, restores and heals each field, chosen by the field's type.

A handler wraps one live object. `save()` returns a picklable snapshot (for commit, healing
and checkpoints); `load(snapshot)` puts a snapshot back **into the live object** and returns
the object the field should hold afterwards: the same object for anything stateful (a module,
an optimizer, an LR scheduler, a GradScaler, a loader, RNG state), a fresh copy for plain
values. So the objects a user's code holds stay the live ones across heals.

Lookup order: handlers registered with `register_handler` (newest first), then loaders, then
anything with `state_dict()`/`load_state_dict()` (the `Stateful` protocol), then plain values.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Stateful(Protocol):
    """Anything that can describe its state as a dict and load it back in place."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class Handler:
    """Save and load one field's state; subclass it for your own types."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def save(self, *, copy_: bool = True) -> Any:
        """A picklable snapshot; with `copy_=False` it may share memory with the live object
        (fine when it is serialised at once, as for healing and checkpoints)."""
        return copy.deepcopy(self.value) if copy_ else self.value

    def load(self, snapshot: Any) -> Any:
        """Put `snapshot` into the live object; return what the field holds afterwards."""
        self.value = copy.deepcopy(snapshot)
        return self.value

    def step_done(self) -> None:
        """A step boundary passed (the step is applied and committed)."""

    def requeue(self) -> None:
        """A step was begun but never applied here (recovery): undo what it consumed."""


class StatefulHandler(Handler):
    """Modules, optimizers, LR schedulers, GradScalers and any `Stateful`: loaded in place."""

    def save(self, *, copy_: bool = True) -> Any:
        sd = self.value.state_dict()
        return copy.deepcopy(sd) if copy_ else sd

    def load(self, snapshot: Any) -> Any:
        self.value.load_state_dict(snapshot)
        return self.value


class LoaderHandler(StatefulHandler):
    """A `ShardedLoader` (or anything with `pending_step`/`on_step_failed`): its position, and
    the step it handed out last, which goes back on the queue if it never completed."""

    def requeue(self) -> None:
        if hasattr(self.value, "on_recovery"):
            self.value.on_recovery()
        elif self.value.pending_step is not None:
            self.value.on_step_failed([])


class RNGHandler(StatefulHandler):
    """An `RNGState` field: also remembers the streams at each step boundary, so a step that
    is redone after a recovery draws the same random numbers as the first attempt did."""

    def step_done(self) -> None:
        self.value.mark()

    def requeue(self) -> None:
        self.value.rewind()


class RNGState:
    """The process's global random streams (torch CPU and CUDA, numpy, Python `random`) as one
    `Stateful` field: ``State(..., rng=px.elastic.RNGState())``.

    Healing gives every rank the stream position of the most advanced rank, so seed every rank
    alike (the usual data-parallel setup) for a fault-free-identical run after a heal."""

    def __init__(self) -> None:
        self._mark: dict[str, Any] | None = None

    def mark(self) -> None:
        """Remember the streams' position now (a step boundary)."""
        self._mark = self.state_dict()

    def rewind(self) -> None:
        """Go back to the last mark: a redone step draws what its failed attempt drew."""
        if self._mark is not None:
            self.load_state_dict(self._mark)

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                              "python": random.getstate()}
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.get_rng_state_all()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        np.random.set_state(state_dict["numpy"])
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


HandlerFactory = Callable[[Any], Handler]
_registry: list[tuple[type, HandlerFactory]] = []


def register_handler(cls: type, factory: HandlerFactory) -> None:
    """Use `factory(value)` (e.g. a `Handler` subclass) for fields that are instances of `cls`.

    Later registrations win over earlier ones and over the built-in handlers."""
    if not isinstance(cls, type):
        raise TypeError(f"register_handler: cls must be a type, got {cls!r}")
    if not callable(factory):
        raise TypeError(f"register_handler: factory must be callable, got {factory!r}")
    _registry.insert(0, (cls, factory))


def is_loader(value: Any) -> bool:
    return hasattr(value, "pending_step") and hasattr(value, "on_step_failed") and isinstance(
        value, Stateful)


def handler_for(value: Any) -> Handler:
    """The handler a field of this value gets (see the module docstring for the order)."""
    for cls, factory in _registry:
        if isinstance(value, cls):
            return factory(value)
    if is_loader(value):
        return LoaderHandler(value)
    if isinstance(value, RNGState):
        return RNGHandler(value)
    if isinstance(value, Stateful) and not isinstance(value, type):
        return StatefulHandler(value)
    return Handler(value)
