"""Horovod's `TorchState` and `ObjectState` as phalanx elastic `State`s.

Fields behave as in Horovod (``state.epoch``, ``state.model``...), and `commit()`,
`restore()`, `sync()`, `save()`, `check_host_updates()` and `register_reset_callbacks()` exist.
The difference is what happens on a fault: Horovod restores every rank to the last
`commit()`; phalanx heals forward, every rank taking the state of the most advanced one, so
`commit()` is only a membership check point here (and what a manual `restore()` goes back to).
"""

from __future__ import annotations

from typing import Any

from ....elastic.state import State
from .sampler import ElasticSampler


class TorchState(State):
    """A model, an optimizer and any other fields (``TorchState(model, opt, epoch=0)``)."""

    def __init__(self, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        super().__init__(model=model, optimizer=optimizer, **kwargs)
        self._samplers = [k for k, v in kwargs.items() if isinstance(v, ElasticSampler)]

    def save(self) -> None:
        """Keep an in-memory copy for `restore()` (commit() without the membership check)."""
        self._snapshot = self.state_dict()

    def check_host_updates(self) -> None:
        """Leave the training function (to re-form) if workers are waiting to join."""
        self._check_membership()

    def sync(self) -> Any:
        """Heal every rank from the most advanced one, then re-split the ElasticSamplers'
        remaining indices over the current ranks."""
        plan = super().sync()
        for name in self._samplers:
            getattr(self, name).reset()
        return plan

    def reset(self) -> None:
        """Called after a membership change, before the reset callbacks; override it."""

    def on_reset(self) -> None:
        self.reset()
        super().on_reset()


class ObjectState(TorchState):
    """Plain Python fields only (``ObjectState(epoch=0, batch=0)``).

    `bcast_object` and `get_rank`, which Horovod's ObjectState takes first, are accepted and
    ignored: phalanx heals fields itself."""

    def __init__(self, bcast_object: Any = None, get_rank: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
