"""`Recorder`: one worker's timeline events and per-step metrics.

The runtime builds one per process and hands it to each `Group` (collective spans) and, through
the training seam, to `DistributedOptimizer` (step phases) and the elastic loop (recovery
events). Step metrics are always kept in memory (a few counters per step, for `px.metrics()`);
timeline events and metric lines are written only when a path is given (`phalanx run
--timeline FILE` / `--metrics FILE`). Timeline events go as JSON lines to this worker's own part
file next to FILE, flushed in batches; `timeline.merge` joins the parts into one Chrome trace.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from . import timeline

PHASES = ("forward_backward_s", "sync_s", "optimizer_s", "boundary_s")
"""Step phases that add up to the step time: compute until step(), waiting for (and applying)
the gradient reductions, the wrapped optimizer's step, the elastic step boundary."""

_FLUSH_EVERY = 256
_FLUSH_S = 0.5   # a killed worker loses at most this much of its timeline
_KEEP_STEPS = 1000


class Recorder:
    """Timeline spans, instants and step records of this process (thread-safe)."""

    def __init__(self, *, worker: str, timeline_path: str | None = None,
                 metrics_path: str | None = None) -> None:
        self.worker = worker
        self.rank, self.generation = 0, 0
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._origin = time.time() - time.perf_counter()
        self._part: Path | None = None
        self._flushed = time.monotonic()
        if timeline_path:
            self._part = timeline.part_path(timeline_path, worker)
            self._part.parent.mkdir(parents=True, exist_ok=True)
            self._events.append(timeline.process_name(worker, os.getpid()))
        self._metrics_fd = (os.open(metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                            if metrics_path else None)
        self.steps: collections.deque[dict[str, Any]] = collections.deque(maxlen=_KEEP_STEPS)
        self.comm_busy_s = 0.0
        """Seconds collectives have executed in this process (they may overlap compute)."""
        self.recovery_s = 0.0
        """Seconds spent re-forming and healing since the last recorded step."""
        self.recoveries = 0
        self.state_step: int | None = None
        """The elastic State's step count, when a State reports one (else steps are counted)."""
        self._count = 0

    @property
    def tracing(self) -> bool:
        """True when timeline events are written (callers skip building their arguments)."""
        return self._part is not None

    def now(self) -> float:
        """A timestamp for `span` (seconds, monotonic)."""
        return time.perf_counter()

    def place(self, rank: int, generation: int) -> None:
        """This worker's rank in the generation that just formed."""
        self.rank, self.generation = rank, generation
        if self._part is not None:
            self._add(timeline.process_sort(os.getpid(), rank))
            self.instant("elastic", f"generation {generation}", {"rank": rank})
            self.flush()

    # ------------------------------------------------------------- timeline
    def span(self, cat: str, name: str, start: float, end: float, *, lane: str = "main",
             args: dict[str, Any] | None = None) -> None:
        """A complete event from `start` to `end` (both from `now()`)."""
        if self._part is not None:
            self._add(timeline.complete(cat, name, self._us(start), self._us(end), os.getpid(),
                                        lane, {**(args or {}), "generation": self.generation}))

    def instant(self, cat: str, name: str, args: dict[str, Any] | None = None) -> None:
        """A point in time (a fault detected, a generation formed)."""
        if self._part is not None:
            self._add(timeline.instant(cat, name, self._us(time.perf_counter()), os.getpid(),
                                       {**(args or {}), "generation": self.generation}))

    def collective(self, what: str, queued: float | None, start: float, end: float,
                   info: dict[str, Any] | None) -> None:
        """A collective ran from `start` to `end`, submitted at `queued` (async) or inline."""
        with self._lock:
            self.comm_busy_s += end - start
        if self._part is None:
            return
        lane = "collectives"
        if queued is not None and start - queued > 1e-6:
            self.span("collective", f"{what} queued", queued, start, lane=lane, args=info)
        self.span("collective", what, start, end, lane=lane, args=info)

    # ------------------------------------------------------------- metrics
    def step(self, phases: dict[str, float], comm_s: float, samples: int = 0) -> None:
        """One completed training step's phases (`PHASES`), for px.metrics() and --metrics."""
        with self._lock:
            self._count += 1
            step = self.state_step if self.state_step is not None else self._count
            record = {"rank": self.rank, "generation": self.generation, "step": step,
                      "t": time.time(), "step_s": sum(phases.values()), **phases,
                      "reduce_s": comm_s, "recovery_s": self.recovery_s}
            if samples:
                record["samples"] = samples
            self.recovery_s = 0.0
            self.steps.append(record)
        if self._metrics_fd is not None:
            line = {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}
            os.write(self._metrics_fd, (json.dumps(line) + "\n").encode())

    def recovered(self, seconds: float) -> None:
        with self._lock:
            self.recovery_s += seconds
            self.recoveries += 1

    def summary(self) -> dict[str, Any]:
        """What `px.metrics()` returns: the last step, means over the kept steps, counters."""
        with self._lock:
            steps = list(self.steps)
            out: dict[str, Any] = {"steps": len(steps), "recoveries": self.recoveries,
                                   "comm_busy_s": self.comm_busy_s, "last": dict(steps[-1])
                                   if steps else None, "mean": {}}
        if steps:
            keys = ("step_s", *PHASES, "reduce_s", "recovery_s")
            out["mean"] = {k: sum(s[k] for s in steps) / len(steps) for k in keys}
            out["steps_per_s"] = 1.0 / out["mean"]["step_s"] if out["mean"]["step_s"] else None
        return out

    # ------------------------------------------------------------- output
    def _us(self, t: float) -> float:
        return round((self._origin + t) * 1e6, 1)

    def _add(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append(event)
            due = len(self._events) >= _FLUSH_EVERY or now - self._flushed > _FLUSH_S
        if due:
            self.flush()

    def flush(self) -> None:
        """Append buffered timeline events to this worker's part file."""
        with self._lock:
            events, self._events = self._events, []
            self._flushed = time.monotonic()
        if self._part is not None and events:
            with open(self._part, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(e) + "\n" for e in events))

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        self.flush()
        if self._metrics_fd is not None:
            os.close(self._metrics_fd)
            self._metrics_fd = None
