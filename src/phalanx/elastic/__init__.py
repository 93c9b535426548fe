"""Elastic training: State and its handlers, the @run recovery loop, checkpoints, chaos.

    state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0)

    @px.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for x, y in loader:
                ...

Names load on first use, so the launcher can use `phalanx.elastic.chaos` without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Checkpointer": "checkpoint", "CheckpointError": "checkpoint_dir", "recover": "loop",
    "run": "loop", "reform": "loop",
    "MembershipChanged": "state", "ProgressLost": "state", "State": "state",
    "Handler": "handlers", "RNGState": "handlers", "Stateful": "handlers",
    "register_handler": "handlers",
}

__all__ = ["CheckpointError", "Checkpointer", "Handler", "MembershipChanged", "ProgressLost",
           "RNGState", "State", "Stateful", "recover", "reform", "register_handler", "run"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'phalanx.elastic' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (loaded lazily, so not in globals() before first use)."""
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})


if TYPE_CHECKING:
    from ..errors import CheckpointError, MembershipChanged, ProgressLost
    from .checkpoint import Checkpointer
    from .handlers import Handler, RNGState, Stateful, register_handler
    from .loop import recover, reform, run
    from .state import State
