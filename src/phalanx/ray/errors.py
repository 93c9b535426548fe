"""Why `phalanx.ray.run` failed: a job that could not go on, or an exception raised by `fn`.

Faults (an actor killed, its node lost) are recovered while enough workers remain; when they
are not, the call raises `JobFailed`. An exception raised by the user's function is a bug, not a
fault: it fails the call at once as `WorkerError`, whatever `max_restarts` says, naming the
rank and carrying the original type, message and traceback.
"""

from __future__ import annotations

from ..errors import PhalanxError


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
