"""Requests the coordinator cannot answer yet, parked without a thread.

An op returns either a reply or a `Wait`: the event loop parks the connection, retries the
wait when one of its topics changes (a key is set, a generation forms, news for heartbeats),
and answers it with `expire()` at its deadline. Topics keep wake-ups targeted: setting one
store key retries only the requests waiting for that key, not every waiter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Reply = tuple[dict[str, Any], bytes]

NEWS = "news"
"""Something every heartbeat should hear at once: a loss, a new generation, newcomers, failure."""
WORLD = "world"
"""Membership changed: parked rendezvous (and starters watching ranks) look again."""


def kv_topic(key: str) -> str:
    return f"kv:{key}"


def member_topic(worker: str) -> str:
    """One member's own parked rendezvous (it was lost, failed or left)."""
    return f"member:{worker}"


def starter_topic(starter: str) -> str:
    return f"starter:{starter}"


@dataclass(slots=True)
class Wait:
    """A parked request: `retry()` gives the reply once it can (None: keep waiting)."""

    retry: Callable[[], Reply | None]
    expire: Callable[[], Reply]
    deadline: float
    """time.monotonic() by which it is answered, by `expire()` if not sooner."""
    topics: tuple[str, ...]


Answer = Reply | Wait
"""What an op returns."""
