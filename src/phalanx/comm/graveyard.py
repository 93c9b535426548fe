"""Where process groups go when they are closed with an operation still in flight.

A Gloo operation with a peer that was cut off (not killed: its link went down, so no connection
is ever reset) stays blocked in Gloo's worker thread until the group's timeout. Dropping the last
reference to that group, or to the operation's Work, runs a C++ destructor that waits for the
operation to end, and it waits holding the GIL: every thread of the worker, the new generation's
collectives included, would freeze for the rest of the timeout (measured: 30 s after a host cut,
with the survivors otherwise recovered in 0.03 s). So a group closed while such operations are
pending is kept here, untouched, and let go once they have all ended (Gloo's own timeout ends
them) or, as a last resort, after `deadline`.

The list is per process and holds nothing but these references: nothing else reads it.
"""

from __future__ import annotations

import atexit
import ctypes
import time
from typing import Any

_hooked = False
_buried: list[tuple[float, list[Any], list[Any]]] = []
"""(let go after this monotonic time, pending Works, the groups and Works to keep alive)."""


def pending(works: list[Any]) -> list[Any]:
    """The Works of `works` that have not ended."""
    out = []
    for w in works:
        try:
            if not w.is_completed():
                out.append(w)
        except RuntimeError:
            pass                    # an errored Work counts as ended
    return out


def bury(works: list[Any], keep: list[Any], deadline_s: float) -> None:
    """Keep `keep` (process groups) and `works` alive until `works` end, at most `deadline_s`."""
    global _hooked
    sweep()
    _buried.append((time.monotonic() + deadline_s, list(works), [k for k in keep if k is not None]))
    if not _hooked:
        _hooked = True
        atexit.register(_leak_at_exit)


def _leak_at_exit() -> None:
    """At interpreter exit, never destroy what is still pending (the destructor would make the
    exit wait out the timeout): take an extra reference the interpreter never gives back, and
    let the operating system reclaim it with the process."""
    sweep()
    for _, works, keep in _buried:
        for obj in (*works, *keep):
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def sweep() -> None:
    """Let go of the entries whose operations have ended or whose deadline passed."""
    now = time.monotonic()
    _buried[:] = [(d, w, k) for d, w, k in _buried if now < d and pending(w)]


def size() -> int:
    """How many closed groups are still kept (for tests and logs)."""
    return len(_buried)
