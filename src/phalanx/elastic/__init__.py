"""Elastic training: State, the @run recovery loop, durable checkpoints.

    state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0)

    @px.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for x, y in loader:
                ...
"""

from .checkpoint import Checkpointer
from .loop import recover, run
from .state import MembershipChanged, State, step_completed

__all__ = ["State", "run", "recover", "MembershipChanged", "Checkpointer", "step_completed"]
