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


class MembershipChanged(PhalanxError):
    """Workers are waiting to join: leave the step loop at a step boundary and re-form."""


class ProgressLost(PhalanxError):
    """Every worker holding the newest training state was lost; continuing would restart."""


class JobFailed(PhalanxError):
    """The job stopped before its workers finished: too few workers were left, or a worker
    of a job that is not elastic was lost. `cause` says which worker started it."""

    def __init__(self, message: str, *, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        """One phrase naming the worker whose exit started the failure (empty if none)."""


class WorkerError(JobFailed):
    """`fn` raised on one rank. The original exception, when it could be sent back to the
    driver, is this error's ``__cause__``; `remote_traceback` is its traceback as text."""

    def __init__(self, message: str, *, rank: int, worker: str, exc_type: str,
                 exc_message: str, where: str, remote_traceback: str) -> None:
        super().__init__(message, cause=message)
        self.rank = rank
        """Rank slot the failing worker was started for (its rank in the first generation)."""
        self.worker = worker
        """Its worker id: ``w<slot>``, or ``w<slot>.<n>`` for the n-th replacement."""
        self.exc_type = exc_type
        """Name of the exception's type, e.g. ``'ValueError'``."""
        self.exc_message = exc_message
        """The exception's message."""
        self.where = where
        """``file:line`` of the innermost frame of user code where it was raised."""
        self.remote_traceback = remote_traceback
        """The traceback as the worker printed it."""
