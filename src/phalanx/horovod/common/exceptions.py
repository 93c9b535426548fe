"""Horovod's `horovod.common.exceptions`, for scripts that import them from there.

`HorovodInternalError` is phalanx's `WorkerLost` (a collective failed because a peer was lost);
`HostsUpdatedInterrupt` is what an elastic `state.commit()` / `state.check_host_updates()`
raises when workers wait to join: a `MembershipChanged`, so `hvd.elastic.run` re-forms the
job with them and calls the training function again (without restoring the last commit, as in
Horovod).
"""

from __future__ import annotations

from ...errors import MembershipChanged, WorkerLost

HorovodInternalError = WorkerLost


class HostsUpdatedInterrupt(MembershipChanged):
    """Workers are waiting to join; raised at `commit()` / `check_host_updates()` only.

    `skip_sync` is Horovod's flag (True when hosts were only removed, so no state needs to be
    sent); phalanx always heals the ranks that are behind, so it is informational."""

    def __init__(self, skip_sync: bool = False, message: str = "") -> None:
        super().__init__(message or "the set of workers changed: workers are waiting to join")
        self.skip_sync = skip_sync


__all__ = ["HorovodInternalError", "HostsUpdatedInterrupt"]
