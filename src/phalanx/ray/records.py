"""What the driver knows about each worker actor, and what it says about them: how a worker
ended in the launcher's terms (`launch/report.py`: fault or bug), the error a failed call
raises, and the order of the results.

Pure functions over plain records (no Ray calls), so every message is tested without actors.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any

from .. import env
from ..errors import JobFailed, WorkerError
from ..launch import report
from .spec import RunSpec
from .worker import Outcome, Where


@dataclass(kw_only=True, slots=True)
class ActorRecord:
    """One worker actor as the driver holds it."""

    slot: int
    """Rank slot it was started for (its rank hint, and its placement-group bundle)."""
    restart: int
    """0 for the first actor of a slot, n for its n-th replacement."""
    handle: Any
    """The Ray actor handle."""
    where_ref: Any
    """Reference to its `where()` reply: ready once the actor is up."""
    run_ref: Any = None
    """Reference to its `run()` outcome, once the function was called."""
    where: Where | None = None
    fenced: bool = False
    """The driver killed it because the coordinator declared it lost."""
    ended: bool = False
    """Its outcome is in (or it died, or the driver killed it): nothing more will come."""

    @property
    def worker(self) -> str:
        """Worker id: w<slot>, w<slot>.<n> for the n-th replacement (as `phalanx run`)."""
        return f"w{self.slot}" if self.restart == 0 else f"w{self.slot}.{self.restart}"

    @property
    def label(self) -> str:
        """Prefix of its output lines: rank<slot>, rank<slot>.<n> for a replacement."""
        return f"rank{self.slot}" if self.restart == 0 else f"rank{self.slot}.{self.restart}"


def worker_env(spec: RunSpec, a: ActorRecord, *, address: str, secret: str, job_id: str,
               bind: bool, gpus: set[str]) -> dict[str, str]:
    """What `px.init()` in actor `a` reads, as `phalanx run` gives a local child. `bind`: its
    data plane listens on its node's address (several nodes), else on loopback. `gpus`: this
    job's GPUs on its node, all visible to each of its workers there, so NCCL works within
    the node and local rank i uses the i-th of them."""
    if a.where is None:
        raise ValueError(f"actor {a.label} has not said where it runs")
    wenv = {**env.forwarded({}),
            env.RANK: str(a.slot), env.SIZE: str(spec.num_workers), env.WORKER_ID: a.worker,
            env.COORD_ADDR: address, env.SECRET: secret, env.JOB_ID: job_id,
            env.HOST: a.where.ip, env.TIMEOUT: str(spec.timeout),
            env.HEARTBEAT_TIMEOUT: str(spec.heartbeat_timeout),
            env.ELASTIC: "1" if spec.elastic else "0", env.GROWTH: "1" if spec.can_grow else "0"}
    if bind:
        wenv[env.BIND_ADDR] = a.where.ip
    if spec.gpus > 0:
        wenv["CUDA_VISIBLE_DEVICES"] = ",".join(sorted(gpus, key=lambda g: (len(g), g)))
    return wenv


def _exit(a: ActorRecord, code: int, *, lost: bool = False, detail: str = "",
          error: dict[str, Any] | None = None) -> report.Exit:
    return report.Exit(slot=a.slot, worker=a.worker, pid=a.where.pid if a.where else -1,
                       code=code, seen=time.time(), fenced=a.fenced, lost=lost, error=error,
                       detail=detail)


def died_why(text: str) -> str:
    """The sentence of Ray's ActorDiedError text that says why ('... killed by `ray.kill`')."""
    at = text.find("The actor is dead because")
    if at >= 0:
        return text[at:].split(". ", 1)[0].split("\n", 1)[0].rstrip(".")[:300]
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else "no reason given"


def died(a: ActorRecord, ray_text: str, *, node_lost: str = "") -> report.Exit:
    """The actor died (killed, fenced, its node lost): a fault. `node_lost`: why its node is
    lost (the driver found it unreachable, or Ray reports it dead), which says more than
    how its actor ended."""
    if node_lost and a.where is not None:
        why = f"its node {a.where.ip} ({a.where.hostname}) was lost: {node_lost}"
    elif a.fenced:
        why = ("fenced: the driver killed its actor (ray.kill) after the coordinator declared "
               "it lost")
    else:
        why = f"its Ray actor died ({died_why(ray_text)})"
    return _exit(a, -9, lost=True, detail=why)


def call_failed(a: ActorRecord, exc_type: str, message: str, text: str) -> report.Exit:
    """Ray could not make the call (fn did not unpickle in the actor, its value did not
    pickle back, the runtime_env did not build): a bug, as an exception in fn is."""
    where = "Ray, outside fn: sending its call or its return value"
    return _exit(a, 1, error={"type": exc_type, "message": message[:2000], "where": where,
                              "time": time.time(), "cascade": False, "traceback": text[-20000:]})


def returned(a: ActorRecord, out: Outcome) -> report.Exit:
    """The function returned (code 0) or raised (code 1; a fault if it raised only because
    a peer was lost, see `launch/child.py` CASCADE)."""
    if out.error is None:
        return _exit(a, 0)
    detail = ""
    if out.error.get("cascade"):
        msg = str(out.error.get("message", "")).strip().splitlines()
        detail = f"raised {out.error.get('type')}" + (f" ({msg[0][:200]})" if msg else "")
    return _exit(a, 1, error=out.error, detail=detail)


def failure(exits: list[report.Exit], outcomes: dict[str, Outcome], *, fallback: str,
            why: str, elastic: bool) -> JobFailed:
    """The error a failed call raises: `WorkerError` when the root cause is an exception in
    fn (chained to the original when it unpickles here), else `JobFailed`."""
    failed = [e for e in exits if e.code != 0]
    cause = report.root_cause(failed) if failed else None
    text = cause.why() if cause is not None else fallback
    more = f"; {why}" if why else ""
    if cause is None or cause.is_fault or cause.error is None:
        hint = "" if elastic or cause is None else (
            "; the job is not elastic: pass min_workers < num_workers or max_restarts > 0 for "
            "the others to continue after a lost worker")
        return JobFailed(f"phalanx job on Ray failed: {text}{more}{hint}", cause=text)
    err = cause.error
    tb = str(err.get("traceback", ""))
    msg = f"{text}\n\nTraceback on the worker:\n{tb.rstrip()}" if tb else text
    out = WorkerError(msg, rank=cause.slot, worker=cause.worker, exc_type=str(err.get("type")),
                      exc_message=str(err.get("message", "")), where=str(err.get("where", "?")),
                      remote_traceback=tb)
    blob = outcomes[cause.worker].exception if cause.worker in outcomes else None
    if blob is not None:
        try:
            out.__cause__ = pickle.loads(blob)  # pickled by our own actor
        except Exception:  # noqa: BLE001 - its class may not import here; the text says it
            out.__cause__ = None
    return out


def in_rank_order(outcomes: list[Outcome], world: list[str] | None,
                  slots: dict[str, int]) -> list[Outcome]:
    """The outcomes of workers whose fn returned, in the final generation's rank order;
    any that finished outside it follow (newest generation first, then rank, then slot)."""
    pos = {w: i for i, w in enumerate(world or [])}
    done = [o for o in outcomes if o.returned]
    done.sort(key=lambda o: (o.worker not in pos, pos.get(o.worker, 0), -o.generation, o.rank,
                             slots.get(o.worker, 0), o.worker))
    return done
