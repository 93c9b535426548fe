"""The exception hierarchy of phalanx: every error a user can catch from the library."""

from __future__ import annotations


class PhalanxError(RuntimeError):
    """Base of every error phalanx raises on purpose."""


class ConfigError(PhalanxError, ValueError):
    """A bad argument, flag or environment variable; the message names it and suggests a fix."""


class RendezvousError(PhalanxError):
    """Joining the job failed: the coordinator is unreachable, rejected us, or timed out."""


class JobFinished(RendezvousError):
    """A worker tried to join after every member had finished; there is nothing left to do."""


class EtcdError(RendezvousError):
    """etcd answered with an error (bad request, permission, lease not found, ...)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No etcd endpoint could serve the request within the client's timeout."""


class EtcdIndeterminate(EtcdUnavailable):
    """A transaction was sent but its answer was lost: it may or may not have been applied.
    Read the keys it touched to learn the outcome; never blindly resend it."""


class LeadershipLost(RendezvousError):
    """A fenced write was refused, or a campaign did not win in time: this process does not
    lead the job (any more). Stop acting as coordinator; campaign again if it should."""


class CollectiveMismatch(PhalanxError):
    """Ranks called a collective with a different op, shape, dtype or name."""


class WorkerLost(PhalanxError):
    """A peer died, stopped or was fenced during a collective; recoverable by re-forming the group."""

    def __init__(self, message: str, *, lost_ranks: list[int] | None = None,
                 generation: int | None = None) -> None:
        super().__init__(message)
        self.lost_ranks = list(lost_ranks or [])
        self.generation = generation


class AuthenticationError(PhalanxError):
    """A coordinator message failed its HMAC check (wrong or missing job secret)."""


class CheckpointError(PhalanxError):
    """A checkpoint directory that cannot be trusted or shared, checkpoints that cannot be
    loaded, or saves that keep failing; the message says what to do."""
