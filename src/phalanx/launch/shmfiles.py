"""Removal of a job's shared-memory files when the job ends (no torch).

The names live in `phalanx.comm.shmnames` (torch-free), next to the code that makes them. They
all start with the job's prefix, so the launcher finds a crashed job's files by listing
/dev/shm, without the secret their tokens derive from: it removes only names that belong to
its own user (another user may have planted names with the job's prefix; those stay).
"""

from __future__ import annotations

import os

from ..comm.shmnames import SHM_DIR, job_prefix, segment_path

__all__ = ["SHM_DIR", "cleanup", "segment_path"]


def cleanup(job_id: str) -> int:
    """Remove every shared-memory file of a job; returns how many were removed."""
    prefix = job_prefix(job_id)
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if name.startswith(prefix) and _remove_own(os.path.join(SHM_DIR, name)):
            removed += 1
    return removed


def _remove_own(path: str) -> bool:
    """Unlink `path` (never what it links to) if our user owns the name."""
    try:
        if os.lstat(path).st_uid != os.geteuid():
            return False
        os.unlink(path)
        return True
    except (FileNotFoundError, PermissionError):
        return False
