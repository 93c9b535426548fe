"""Horovod's elastic API (`hvd.elastic.run`, `TorchState`, `ObjectState`, `ElasticSampler`)
on phalanx's elastic layer. Run the script with ``phalanx run -np N --min-np M ...``.

What differs from Horovod: on a lost or joining worker, Horovod rolls every rank back to the
last `state.commit()` and replays from there; phalanx re-forms the group and heals forward:
ranks behind the most advanced one take its state (model, optimizer, samplers, fields), nobody
rolls back, and the step whose reduction failed is redone. As in Horovod, workers waiting to
join are admitted only at `state.commit()` / `state.check_host_updates()`, which raise
`HostsUpdatedInterrupt`. Reset callbacks run after a change in the number of workers (Horovod
runs them after every reset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ...common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
from ..basics import init, shutdown
from .sampler import ElasticSampler
from .state import ObjectState, TorchState

R = TypeVar("R")


def run(func: Callable[..., R]) -> Callable[..., R]:
    """Decorate ``train(state, ...)`` so it survives lost workers and admits new ones."""
    from ....elastic.loop import run as px_run
    return px_run(func)


__all__ = ["ElasticSampler", "HorovodInternalError", "HostsUpdatedInterrupt", "ObjectState",
           "TorchState", "init", "run", "shutdown"]
