"""`State`: what an elastic job carries across membership changes, with commit/restore/sync.

Framework-agnostic in the Horovod manner: a state holds handlers (torch module, torch
optimizer, sharded loaders, plain user fields), each able to save, restore and be serialised
for healing. `sync()` heals every rank from the most advanced one; nobody rolls back.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import env, runtime
from ..errors import PhalanxError
from . import policy

log = logging.getLogger("phalanx.elastic")

_current: State | None = None


class MembershipChanged(PhalanxError):
    """Workers are waiting to join: leave the step loop at a step boundary and re-form."""


class State:
    """Model, optimizer, loaders and user fields (`State(model=m, optimizer=o, epoch=0)`)."""

    def __init__(self, model: Any = None, optimizer: Any = None, *, loaders: Any = None,
                 checkpointer: Any = None, **fields: Any) -> None:
        global _current
        object.__setattr__(self, "_fields", dict(fields))
        self.model = model
        self.optimizer = optimizer
        self.loaders = list(loaders) if isinstance(loaders, (list, tuple)) else (
            [loaders] if loaders is not None else [])
        self.step = 0
        self.recoveries: list[dict[str, Any]] = []
        self.reform_attempts = 0
        self._reset_callbacks: list[Callable[[], None]] = []
        self._snapshot: dict[str, Any] | None = None
        self.checkpointer = checkpointer
        _current = self

    # User fields read and write like attributes (state.epoch += 1).
    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        raise AttributeError(f"State has no field {name!r}; pass it to State(..., {name}=...)")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._fields:
            self._fields[name] = value
        else:
            object.__setattr__(self, name, value)

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Call these after every membership change (e.g. to rescale the learning rate)."""
        self._reset_callbacks.extend(callbacks)

    # ------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training, as picklable values."""
        return {
            "step": self.step,
            "fields": copy.deepcopy(self._fields),
            "model": self.model.state_dict() if self.model is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "loaders": [ld.state_dict() for ld in self.loaders],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self._fields.update(sd["fields"])
        if self.model is not None and sd.get("model") is not None:
            self.model.load_state_dict(sd["model"])
        if self.optimizer is not None and sd.get("optimizer") is not None:
            self.optimizer.load_state_dict(sd["optimizer"])
        for ld, s in zip(self.loaders, sd.get("loaders", [])):
            ld.load_state_dict(s)

    # ------------------------------------------------------------ Horovod-style API
    def commit(self) -> None:
        """Keep an in-memory copy to `restore()` to, and leave at this boundary if workers
        wait to join. (phalanx's own recovery heals forward and never restores.)"""
        self._snapshot = copy.deepcopy(self.state_dict())
        check_membership()

    def restore(self) -> None:
        """Go back to the last commit (only if you want rollback; recovery does not use it)."""
        if self._snapshot is None:
            raise PhalanxError("restore() called before any commit(); call state.commit() first")
        self.load_state_dict(copy.deepcopy(self._snapshot))

    def sync(self) -> policy.HealPlan:
        """Heal: every rank takes the state of the most advanced rank."""
        from .. import api
        for ld in self.loaders:
            # A step handed out but never applied here is requeued: its samples come again.
            if ld.pending_step is not None:
                ld.on_step_failed([])
        steps = api.allgather_object(self.step)
        plan = policy.choose_source(steps)
        if api.size() > 1:
            sd = api.broadcast_object(self.state_dict() if api.rank() == plan.source else None,
                                      root=plan.source)
            if api.rank() != plan.source:
                self.load_state_dict(sd)
        return plan

    def on_reset(self) -> None:
        for cb in self._reset_callbacks:
            cb()


def current() -> State | None:
    """The most recently created State (the one the step hook reports to)."""
    return _current


def check_membership() -> None:
    """Raise MembershipChanged on every rank if workers are waiting to join.

    Each rank hears of newcomers through its own heartbeats, at different moments; a one-int
    max-allreduce makes every rank leave at the same step boundary (Horovod does the same at
    commit). Skipped unless the launcher says workers can join.
    """
    rt = runtime._runtime
    if rt is None or rt.client is None or not env.get_bool(env.GROWTH, False):
        return
    from .. import api
    waiting = int(rt.client.status.get("newcomers", 0))
    if api.allreduce(waiting, op="max", name="phalanx.membership") > 0:
        raise MembershipChanged(f"worker(s) waiting to join generation {rt.group.place.generation}")


def step_completed() -> None:
    """Called by DistributedOptimizer after each applied step: the step boundary.

    Closes the loaders' pending step (its samples are consumed), reports the step to the
    coordinator, saves a checkpoint when due, injects chaos if asked, and leaves for a
    re-form if workers are waiting to join.
    """
    st = _current
    rt = runtime._runtime
    if st is not None:
        st.step += 1
        for ld in st.loaders:
            ld.on_step_done()
        if st.checkpointer is not None:
            st.checkpointer.maybe_save(st)
    if rt is None:
        return
    step = st.step if st is not None else -1
    if rt.client is not None:
        rt.client.step = step
        rt.step = step
    from ..launch import chaos
    rules = chaos.rules_from_env()
    if rules:
        g = rt.group.place
        chaos.maybe_inject(rules, rank=g.rank, size=g.size, step=step)
    if st is not None:
        # Only an elastic loop (State + @run) can admit newcomers; a plain script keeps going.
        check_membership()


def record_recovery(state: State, **info: Any) -> None:
    info["t"] = time.time()
    state.recoveries.append(info)
