"""`State`: what an elastic job carries across membership changes, and the owner of the step.

Framework-agnostic in the Horovod manner: each field is saved, restored and healed through a
handler chosen by its type (`handlers.py`), in place, so the objects the user's code holds stay
the live ones. `sync()` heals every rank that is behind from the most advanced one; nobody
rolls back. The State owns the step count: it registers a step hook with its optimizer, and at
each step boundary closes the loaders' step, reports the step to the coordinator, saves a
checkpoint when due, fires chaos rules, and admits workers waiting to join.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import env, runtime
from ..errors import MembershipChanged, PhalanxError, ProgressLost, WorkerLost
from . import policy
from .chaos import ChaosRule, Injector
from .handlers import Handler, LoaderHandler, handler_for

log = logging.getLogger("phalanx.elastic")

_OWN = frozenset({"step", "recoveries", "reform_attempts", "checkpointer", "loaders"})
_STEP_OWNED = (
    "state.step is owned by the State: it advances by one at each optimizer.step() (the step "
    "boundary; without an optimizer, at each state.end_step()) and comes back from heals and "
    "checkpoints. Setting it (state.step = ..., state.step += 1, for state.step in ...) would "
    "count steps twice; read it, and keep a counter of your own in a field with another name "
    "(State(..., my_step=0))")


class State:
    """Model, optimizer, loaders and user fields (`State(model=m, optimizer=o, epoch=0)`).

    Fields read and write like attributes (``state.epoch += 1``). The `optimizer`'s step() is
    the step boundary; without one, call `end_step()` after each training step. `state.step`
    counts the steps done; it is the State's own (restored by heals and checkpoints), so
    setting it from user code is an error rather than a silent double count.
    """

    def __init__(self, model: Any = None, optimizer: Any = None, *, loaders: Any = None,
                 checkpointer: Any = None, **fields: Any) -> None:
        for name in fields:
            if name in _OWN or name.startswith("_"):
                raise PhalanxError(f"State field name {name!r} is reserved (the State's own "
                                   f"{sorted(_OWN)} and names starting with '_'); rename the "
                                   "field")
        object.__setattr__(self, "_fields", {"model": model, "optimizer": optimizer, **fields})
        self.loaders = list(loaders) if isinstance(loaders, (list, tuple)) else (
            [loaders] if loaders is not None else [])
        object.__setattr__(self, "step", 0)
        self.recoveries: list[dict[str, Any]] = []
        self.reform_attempts = 0
        self.checkpointer = checkpointer
        self._reset_callbacks: list[Callable[[], None]] = []
        self._snapshot: dict[str, Any] | None = None
        self._in_loop = 0
        self._chaos: Injector | None = None
        self._chaos_ready = False
        self._hcache: dict[str, Handler] = {}
        self._defer_changes = False
        self._change_pending: str | None = None
        if optimizer is not None and hasattr(optimizer, "register_step_post_hook"):
            optimizer.register_step_post_hook(self._after_optimizer_step)
        # Admit newcomers at the start of the next step, not inside this step(): code the user
        # runs after step() (a scheduler's step, a metric) must not be skipped. The start of a
        # step is DistributedOptimizer's to tell, or with a plain torch optimizer the model's
        # (px.DistributedDataParallel: its next training forward).
        starter = next((o for o in (optimizer, model)
                        if o is not None and hasattr(o, "register_step_start_hook")), None)
        if starter is not None:
            starter.register_step_start_hook(self._at_step_start)
            self._defer_changes = True

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        raise AttributeError(f"State has no field {name!r}; pass it to State(..., {name}=...)")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._fields:
            self._fields[name] = value
            self._hcache.pop(name, None)
        elif name == "step":
            raise PhalanxError(_STEP_OWNED)
        else:
            object.__setattr__(self, name, value)

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Call these after every membership change (e.g. to rescale the learning rate)."""
        self._reset_callbacks.extend(callbacks)

    # ------------------------------------------------------------ serialisation
    def _handlers(self) -> dict[str, Handler]:
        for name, value in self._fields.items():
            h = self._hcache.get(name)
            if h is None or h.value is not value:
                self._hcache[name] = handler_for(value)
        return self._hcache

    def state_dict(self, *, copy_: bool = True) -> dict[str, Any]:
        """Everything needed to continue training, as picklable values."""
        return {"step": self.step,
                "fields": {n: h.save(copy_=copy_) for n, h in self._handlers().items()},
                "loaders": [LoaderHandler(ld).save(copy_=copy_) for ld in self.loaders]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load into the live objects (stateful fields in place; plain values replaced)."""
        object.__setattr__(self, "step", int(sd["step"]))
        for name, h in list(self._handlers().items()):
            if name in sd["fields"]:
                self._fields[name] = h.load(sd["fields"][name])
                h.value = self._fields[name]
        for ld, s in zip(self.loaders, sd.get("loaders", [])):
            LoaderHandler(ld).load(s)

    # ------------------------------------------------------------ Horovod-style API
    def commit(self) -> None:
        """Keep an in-memory copy to `restore()` to, and leave at this boundary if workers
        wait to join. (phalanx's own recovery heals forward and never restores.)"""
        self._snapshot = self.state_dict()
        self._check_membership()

    def restore(self) -> None:
        """Go back to the last commit (only if you want rollback; recovery does not use it)."""
        if self._snapshot is None:
            raise PhalanxError("restore() called before any commit(); call state.commit() first")
        self.load_state_dict(copy.deepcopy(self._snapshot))

    def sync(self) -> policy.HealPlan:
        """Heal: every rank behind the most advanced one takes its state; nobody rolls back."""
        from .. import api
        self._change_pending = None
        for ld in self.loaders:
            LoaderHandler(ld).requeue()  # a step handed out but never applied: samples again
        for h in self._handlers().values():
            h.requeue()
        steps = api.allgather_object(self.step)
        plan = policy.choose_source(steps)
        rt = runtime.active()
        job_step = rt.job_step if rt is not None else -1
        if policy.progress_lost(plan.step, job_step):
            return self._resume_lost(plan, job_step)
        if plan.behind:
            me = api.rank()
            sd = api.broadcast_object(self.state_dict(copy_=False) if me == plan.source else None,
                                      root=plan.source)
            if me in plan.behind:
                self.load_state_dict(sd)
        return plan

    def _resume_lost(self, plan: policy.HealPlan, job_step: int) -> policy.HealPlan:
        """Every holder of steps after `plan.step` is gone: resume from the newest durable
        checkpoint (and say so), or fail; never restart silently."""
        from .. import api
        if self.checkpointer is None:
            raise ProgressLost(
                f"every worker holding the training state was lost: the job had reached at least "
                f"step {job_step} but the most advanced worker left is at step {plan.step}. With no "
                "durable checkpoint to resume from, continuing would silently restart training; "
                "pass State(..., checkpointer=px.elastic.Checkpointer(DIR)) to survive this")
        step, tried = self.checkpointer.load_newest(self) if api.rank() == 0 else (None, [])
        sd, tried = api.broadcast_object(
            (self.state_dict(copy_=False) if step is not None else None, tried), 0)
        if sd is None:
            raise ProgressLost(f"every worker holding the training state was lost (the job had "
                               f"reached at least step {job_step}) and "
                               f"{self.checkpointer.directory} holds no valid checkpoint "
                               f"(tried: {'; '.join(tried) or 'none there'}); "
                               "failing rather than restarting from step 0")
        self.load_state_dict(sd)
        rt = runtime.active()
        if rt is not None:
            rt.rebase_step(self.step)
        why = (f"every worker holding steps {plan.step + 1}..{job_step} was lost; resumed from "
               f"the durable checkpoint at step {self.step}")
        if api.rank() == 0:
            log.warning("%s", why)
        return policy.HealPlan(source=0, behind=list(range(api.size())), step=self.step,
                               reason=why)

    def on_reset(self) -> None:
        for cb in self._reset_callbacks:
            cb()

    # ------------------------------------------------------------ the step boundary
    def _after_optimizer_step(self, *_: Any) -> None:
        self.end_step()

    def end_step(self) -> None:
        """The step boundary (called by the optimizer's step hook).

        Closes the loaders' pending step (its samples are consumed), reports the step to the
        coordinator, saves a checkpoint when due, fires chaos rules, and leaves for a re-form
        if workers are waiting to join.
        """
        object.__setattr__(self, "step", self.step + 1)
        for ld in self.loaders:
            ld.on_step_done()
        for h in self._handlers().values():
            h.step_done()
        rt = runtime.active()
        if rt is not None:
            rt.report_step(self.step)
        if self.checkpointer is not None:
            self.checkpointer.maybe_save(self)
        if rt is not None:
            chaos = self.chaos(rt)
            if chaos is not None:
                g = rt.group.place
                chaos.at_step(rank=g.rank, size=g.size, step=self.step)
        if not self._defer_changes:
            self._check_membership()
            return
        # Agree now, right after the step's reduction left every rank in step (a cheap
        # collective), but leave only at the start of the next step, so the code the user runs
        # after step() (a scheduler's step, a metric) is never skipped. A peer lost during this
        # check breaks the group; the next step's first collective reports it.
        try:
            self._check_membership()
        except MembershipChanged as e:
            self._change_pending = str(e)
        except WorkerLost:
            pass

    def _at_step_start(self, *_: Any) -> None:
        if self._change_pending is not None:
            why, self._change_pending = self._change_pending, None
            raise MembershipChanged(why)

    def chaos(self, rt: runtime.Runtime) -> Injector | None:
        """This worker's fault injector, when the launcher was given --chaos."""
        if not self._chaos_ready:
            self._chaos_ready = True
            spec = env.get_str(env.CHAOS)
            self._chaos = Injector.from_spec(spec, report=lambda r, w: _report(rt, r, w),
                                             sever=rt.sever, worker=rt.worker) \
                if rt.client is not None else None
        return self._chaos

    def _check_membership(self) -> None:
        """Raise MembershipChanged on every rank if workers are waiting to join.

        Each rank hears of newcomers through its own heartbeats, at different moments; a
        one-int max-allreduce makes every rank leave at the same step boundary (Horovod does
        the same at commit). Only inside an elastic loop, and only if workers can join.
        """
        rt = runtime.active()
        if not self._in_loop or rt is None or rt.client is None or not env.get_bool(
                env.GROWTH, False):
            return
        from .. import api
        waiting = int(rt.client.status.get("newcomers", 0))
        if api.allreduce(waiting, op="max", name="phalanx.membership") > 0:
            raise MembershipChanged(f"worker(s) waiting to join generation "
                                    f"{rt.group.place.generation}")


def _report(rt: runtime.Runtime, rule: ChaosRule, when: str) -> bool:
    return rt.event("chaos", {"rule": rule.index, "text": rule.text}, key=f"{rule.index}@{when}")


def record_recovery(state: State, **info: Any) -> None:
    info["t"] = time.time()
    state.recoveries.append(info)
