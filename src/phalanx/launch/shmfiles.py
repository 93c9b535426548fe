"""Removal of a job's shared-memory segments when the job ends (no torch).

The segment names live in `phalanx.comm.shmnames` (torch-free), next to the code that makes them.
"""

from __future__ import annotations

import os

from ..comm.shmnames import SHM_DIR, job_prefix, segment_path

__all__ = ["SHM_DIR", "cleanup", "segment_path"]


def cleanup(job_id: str) -> int:
    """Remove every shared-memory segment of a job; returns how many were removed."""
    prefix = job_prefix(job_id)
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed
