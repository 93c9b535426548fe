"""Horovod's integer handles and its name-matched operations: `poll(handle)`,
`synchronize(handle)`.

As in Horovod, ranks may submit operations in different orders: an operation is keyed by its
kind and name (unnamed ones get ``noname.<n>``, counted per kind in submission order, so
unnamed operations match by order), queued, and started once every rank has submitted it.
phalanx has no background coordinator, so ranks agree on what to start (`negotiate`) when a
result is needed: `synchronize()` of a queued operation, the synchronous forms, `barrier()`,
`join()` and `poll()`. A round runs once every rank of the set has arrived at it, and ranks
wait for each other in the coordinator, not in a collective (`gate`): `poll()` never waits
for a late peer, and a rank may wait at an operation as long as its peers take (up to the
stall time). Each round starts every operation queued on all ranks, in rank 0's submission
order; `synchronize()` loops until its own operation has started, then waits for it. Results
come back in whatever order `synchronize()` is called.

A second operation of the same kind and name submitted while the first is still in flight
raises ValueError, as Horovod's duplicate-name check does. Operations whose signature differs
between ranks fail with `negotiate.MismatchError`; ranks that wait for operations other ranks
never submit fail with `negotiate.StallError` after the stall time. A peer lost during
negotiation raises WorkerLost (hvd.HorovodInternalError) and fails every queued operation;
`init()`, `shutdown()` and a re-formed group (a new generation) drop queued operations.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ...errors import WorkerLost
from . import negotiate
from .gate import Gate, gate_for
from .process_sets import set_id, set_of

log = logging.getLogger("phalanx.horovod")
_MAX_PAUSE_S = 0.05
"""Longest pause between two idle negotiation rounds."""


class Waitable(Protocol):
    """What an operation becomes once started: a phalanx Handle or one of the wrappers below."""

    def done(self) -> bool: ...
    def wait(self) -> Any: ...


class Done:
    """An operation that already finished (those phalanx runs synchronously)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def wait(self) -> Any:
        return self._value


class Chain:
    """Several phalanx handles and what to make of their results, computed once."""

    def __init__(self, inner: Sequence[Waitable], finish: Callable[[list[Any]], Any]) -> None:
        self._inner, self._finish = inner, finish
        self._result: tuple[Any] | None = None

    def done(self) -> bool:
        return all(h.done() for h in self._inner)

    def wait(self) -> Any:
        if self._result is None:
            self._result = (self._finish([h.wait() for h in self._inner]),)
        return self._result[0]


@dataclass(slots=True, eq=False)
class _Entry:
    kind: str
    name: str
    sig: tuple[Any, ...]
    make: Callable[[], Waitable] | None
    generation: int
    comm: Any = None
    """Where it runs (`process_sets.check`; None: the whole job)."""
    pset: int = 0
    """Its process set id: operations are matched by name within a set."""
    op: Waitable | None = None
    error: BaseException | None = None

    @property
    def key(self) -> negotiate.Key:
        return (self.kind, self.name)

    @property
    def queued(self) -> bool:
        return self.make is not None

    def done(self) -> bool:
        return self.error is not None or (self.op is not None and bool(self.op.done()))


_table: dict[int, _Entry] = {}
_queue: list[_Entry] = []
_counters: dict[tuple[int, str], itertools.count[int]] = {}
_ids = itertools.count(1)
_lock = threading.Lock()
"""Guards the table, the queue and the counters (held briefly)."""
_negotiating = threading.Lock()
"""Held by the one thread of this rank running negotiation rounds."""
_state: dict[str, Any] = {"generation": None, "idle_since": None, "warned": False}
_gates: dict[tuple[int, ...], Gate | None] = {}
"""This rank's negotiation gate per set of ranks (`gate`), for the current generation. Kept
across init()/shutdown(): every rank of a set is between rounds there, and a newcomer only
ever meets the others in a new generation."""


def _generation() -> int:
    import phalanx as px
    return int(px.generation())


def start(kind: str, name: str | None, make: Callable[[], Waitable],
          sig: tuple[Any, ...] = (), comm: Any = None) -> int:
    """Queue a `kind` operation named `name` (auto-named when None) that `make()` starts once
    every rank of its process set (`comm`, from `process_sets.check`; None: the whole job) has
    submitted it; `sig` ((field, value) pairs: dtype, shape...) must agree across ranks.
    Returns its handle; ValueError if the name is in flight in that set."""
    gen = _generation()
    pset = set_id(comm) if comm is not None else 0
    with _lock:
        if _state["generation"] != gen:
            _drop_queued(None)
            _state["generation"] = gen
        if name is None:
            name = f"noname.{next(_counters.setdefault((pset, kind), itertools.count()))}"
        elif any(e.kind == kind and e.name == name and e.pset == pset and not e.done()
                 for e in _table.values()):
            raise ValueError(
                f"{kind}(name={name!r}): an operation with this name is still in flight; "
                "synchronize() it first or use a different name (as in Horovod, names of "
                "in-flight operations must be unique)")
        entry = _Entry(kind, name, tuple(sig), make, gen, comm, pset)
        handle = next(_ids)
        _table[handle] = entry
        _queue.append(entry)
    return handle


def poll(handle: int) -> bool:
    """True once the operation finished; `synchronize(handle)` then returns without waiting.

    Never waits for the other ranks: an operation still queued is negotiated only if every
    rank of its set reaches a negotiation within `gate.POLL_WINDOW_S` (a rank waiting in
    `synchronize()` is there; so is one polling in a loop), and not while another thread of
    this rank is negotiating."""
    with _lock:
        entry = _table.get(handle)
    if entry is None:
        raise ValueError(f"poll({handle!r}): unknown handle (already synchronized, or from "
                         "before the last hvd.init()); poll a handle an *_async call returned")
    if entry.queued and _negotiating.acquire(blocking=False):
        try:
            _round(entry, wait=False)
        finally:
            _negotiating.release()
    return entry.done()


def synchronize(handle: int) -> Any:
    """Wait for the operation and return its output (None for an unknown handle, as Horovod)."""
    with _lock:
        entry = _table.get(handle)
    if entry is None:
        return None
    try:
        if entry.queued:
            with _negotiating:
                while entry.queued:
                    _round(entry)
        if entry.error is not None:
            raise entry.error
        assert entry.op is not None
        return entry.op.wait()
    finally:
        with _lock:
            _table.pop(handle, None)
            if entry in _queue:  # abandoned by an error: no longer offered to the peers
                _queue.remove(entry)
                entry.make = None


def run(kind: str, name: str | None, make: Callable[[], Waitable],
        sig: tuple[Any, ...] = (), comm: Any = None) -> Any:
    """Submit an operation and wait for it (the synchronous forms)."""
    return synchronize(start(kind, name, make, sig, comm))


def join(make: Callable[[], Waitable],
         stand_in: Callable[[negotiate.Key, tuple[Any, ...]], None]) -> Any:
    """Queue `negotiate.JOIN` and negotiate until every rank has joined; meanwhile this rank
    runs `stand_in(key, sig)` for each operation the others run without it. Returns what
    `make()` (run once all joined) yields."""
    _state["stand_in"] = stand_in
    try:
        result = run(*negotiate.JOIN, make)
    finally:
        _state["stand_in"] = None
    with _lock:   # every rank is here: restart the auto names so unnamed ops match again
        _counters.clear()
    return result


def reset() -> None:
    """Forget every handle and drop queued operations (init and shutdown); operations
    already started still finish."""
    with _lock:
        _drop_queued(None)
        _table.clear()
        _state["generation"] = None


# ---------------------------------------------------------------- negotiation
def _round(target: _Entry, *, wait: bool = True) -> None:
    """One negotiation round while `target` is queued (caller holds `_negotiating`). With
    wait=False (poll) the round runs only if every rank arrives within the poll window."""
    pending = [e for e in _pending() if e.pset == target.pset]
    if target not in pending:
        return
    gate = _gate(target)
    if gate is not None and not _at_gate(gate, target, pending, wait):
        return
    try:
        plan = negotiate.exchange([(e.kind, e.name, e.sig) for e in pending], target.key,
                                  _idle_seconds(), target.comm)
    except WorkerLost as e:
        with _lock:
            _drop_queued(e)
        raise
    except BaseException:
        _state["idle_since"], _state["warned"] = None, False
        if gate is not None:
            gate.passed()
        raise
    if plan.announced is not None:   # a joined rank stays at this round's gate
        _stand_in(("optimizer", "step"), tuple(plan.announced.items()))
        _state["idle_since"], _state["warned"] = None, False
        return
    if gate is not None:
        gate.passed()
    _apply(plan, pending, target, wait)


def _apply(plan: negotiate.Plan, pending: list[_Entry], target: _Entry, wait: bool) -> None:
    """Start, fail or stand in for what the round decided; account for idle rounds."""
    by_key = {e.key: e for e in pending}
    for key, error in plan.errors.items():
        if key in by_key:
            _fail(by_key[key], error)
    for key in plan.run:
        if key in by_key:
            _start(by_key[key])
        else:
            _stand_in(key, plan.sigs[key])
    if plan.run or plan.errors:
        _state["idle_since"], _state["warned"] = None, False
        return
    if _state["idle_since"] is None:
        _state["idle_since"] = time.monotonic()
    if plan.stall is not None:
        _state["idle_since"], _state["warned"] = None, False
        _fail(target, negotiate.StallError(plan.stall))
        raise target.error  # type: ignore[misc]
    if plan.warning is not None and not _state["warned"]:
        _state["warned"] = True
        log.warning("%s", plan.warning)
    if wait:
        time.sleep(min(_MAX_PAUSE_S, 0.001 + _idle_seconds() / 20))


# ---------------------------------------------------------------- the gate
def _gate(target: _Entry) -> Gate | None:
    """This rank's gate for the target's set of ranks (None: no coordinator, or one rank)."""
    import phalanx as px
    comm = target.comm if target.comm is not None else px
    members = tuple(set_of(comm).ranks or ()) if target.pset else ()
    if _state.get("gates_generation") != target.generation:
        _gates.clear()
        _state["gates_generation"] = target.generation
    if members not in _gates:
        _gates[members] = gate_for(comm, members)
    return _gates[members]


def _at_gate(gate: Gate, target: _Entry, pending: list[_Entry], wait: bool) -> bool:
    """Arrive at the round; True once every rank of the set has (see `gate`). A joined rank
    goes straight into the round's collective, where it stands in for the others' steps."""
    joined = any(e.key == negotiate.JOIN for e in pending)
    try:
        return gate.meet(wait=wait, eager=joined,
                         stall=lambda: _gate_stall(gate, target, raise_=wait))
    except WorkerLost as e:
        with _lock:
            _drop_queued(e)
        raise


def _gate_stall(gate: Gate, target: _Entry, *, raise_: bool) -> None:
    """Warn after HOROVOD_STALL_CHECK_TIME_SECONDS at the gate; after the shutdown time, leave
    the round and fail `target` with StallError (raised when `raise_`)."""
    warn, limit = negotiate.stall_limits()
    waited = gate.waited()
    if waited < min(warn, limit) or (waited < limit and gate.warned):
        return
    text = gate.stall_text(negotiate.show(target.key), set_of(target.comm).ranks or [])
    if waited < limit:
        gate.warned = True
        log.warning("hvd: stalled for %.1fs: %s", waited, text)
        return
    if not gate.leave():
        return   # every rank arrived meanwhile: the round runs
    gate.since, gate.warned = None, False
    _fail(target, negotiate.StallError(
        f"hvd: stalled for {waited:.1f}s ({negotiate.STALL_SHUTDOWN_TIME}={limit:g}): {text}"))
    if raise_:
        raise target.error  # type: ignore[misc]


def _pending() -> list[_Entry]:
    """The queue in submission order, after failing operations of an older generation."""
    gen = _generation()
    with _lock:
        if _state["generation"] != gen:
            _drop_queued(None)
            _state["generation"] = gen
        return list(_queue)


def _idle_seconds() -> float:
    """How long rounds have found nothing to run (0 after a round that ran something)."""
    since = _state["idle_since"]
    return 0.0 if since is None else time.monotonic() - since


def _start(entry: _Entry) -> None:
    """Start a negotiated operation; an error other than a lost peer stays with it.

    `entry.make` is cleared only once `entry.op` is set, so another thread synchronizing it
    meanwhile waits for the negotiation lock instead of finding neither."""
    with _lock:
        make = entry.make
        if entry in _queue:
            _queue.remove(entry)
    if make is None:
        return
    try:
        entry.op = make()
    except WorkerLost as e:
        entry.error = e
        with _lock:
            _drop_queued(e)
        raise
    except Exception as e:  # noqa: BLE001 - its own error, for its synchronize() to raise
        entry.error = e
    finally:
        entry.make = None


def _stand_in(key: negotiate.Key, sig: tuple[Any, ...]) -> None:
    """This rank joined and lacks `key`: take part with zeros (`joining.stand_in`)."""
    stand_in = _state.get("stand_in")
    if stand_in is None:   # only a joined rank lacks an operation that runs
        raise negotiate.MismatchError(
            f"{negotiate.show(key)} runs on other ranks while this rank negotiates its own "
            "operations (it neither submitted it nor joined); every rank must run the same "
            "DistributedOptimizer steps and collectives, or call hvd.join() when out of data")
    try:
        stand_in(key, sig)
    except WorkerLost as e:
        with _lock:
            _drop_queued(e)
        raise


def _fail(entry: _Entry, error: BaseException) -> None:
    with _lock:
        entry.error, entry.make = error, None
        if entry in _queue:
            _queue.remove(entry)


def _drop_queued(error: BaseException | None) -> None:
    """Fail every queued operation (caller holds `_lock`) and restart the auto names."""
    for entry in _queue:
        entry.make = None
        entry.error = error or WorkerLost(
            f"{negotiate.show(entry.key)} was dropped before it ran: hvd.init(), "
            "hvd.shutdown() or a re-formed group (a lost or added worker) cleared the queue; "
            "submit it again")
    _queue.clear()
    _counters.clear()
    _state["idle_since"], _state["warned"] = None, False
