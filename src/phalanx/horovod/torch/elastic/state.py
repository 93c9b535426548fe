"""Horovod's `TorchState` and `ObjectState` as phalanx elastic `State`s.

Fields behave as in Horovod (``state.epoch``, ``state.model``...), and `commit()`,
`restore()`, `sync()`, `save()`, `check_host_updates()` and `register_reset_callbacks()` exist.
As in Horovod, the state is saved when it is built (so `restore()` before any `commit()` goes
back to it), and workers waiting to join are admitted only at `commit()` and
`check_host_updates()`, which raise `HostsUpdatedInterrupt` on every rank (phalanx's own
`px.elastic.State` admits them at the next optimizer step instead). The difference is what
happens on a fault: Horovod restores every rank to the last `commit()`; phalanx heals forward,
every rank taking the state of the most advanced one, so `commit()` is a membership check point
and what a manual `restore()` goes back to.
"""

from __future__ import annotations

from typing import Any

from ....elastic.state import State
from ....errors import MembershipChanged
from ...common.exceptions import HostsUpdatedInterrupt
from .sampler import ElasticSampler


class TorchState(State):
    """A model, an optimizer and any other fields (``TorchState(model, opt, epoch=0)``)."""

    def __init__(self, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        super().__init__(model=model, optimizer=optimizer, **kwargs)
        self._samplers = [k for k, v in kwargs.items() if isinstance(v, ElasticSampler)]
        self._admitting = False
        self.save()   # Horovod saves at construction: restore() before commit() returns here

    def save(self) -> None:
        """Keep an in-memory copy for `restore()` (commit() without the membership check)."""
        self._snapshot = self.state_dict()

    def commit(self) -> None:
        """Save (for `restore()`), then admit workers waiting to join, if any: raises
        `HostsUpdatedInterrupt` on every rank, which `hvd.elastic.run` handles."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Raise `HostsUpdatedInterrupt` on every rank if workers are waiting to join (a
        collective: every rank calls it at the same point)."""
        self._admitting = True
        try:
            super()._check_membership()
        except MembershipChanged as e:
            raise HostsUpdatedInterrupt(False, str(e)) from None
        finally:
            self._admitting = False

    def _check_membership(self) -> None:
        """At optimizer steps (phalanx's State checks there) do nothing: newcomers wait for
        the next commit() or check_host_updates(), as in Horovod."""
        if self._admitting:
            super()._check_membership()

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
