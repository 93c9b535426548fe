"""Names of a job's shared-memory segments, and their removal when the job ends (no torch)."""

from __future__ import annotations

import os

SHM_DIR = "/dev/shm"


def segment_path(job_id: str, generation: int) -> str:
    """Path of one generation's intra-host segment."""
    return os.path.join(SHM_DIR, f"phalanx-{job_id}-g{generation}")


def cleanup(job_id: str) -> int:
    """Remove every shared-memory segment of a job; returns how many were removed."""
    prefix = f"phalanx-{job_id}-"
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
