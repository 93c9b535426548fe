"""Names of a job's intra-host shared-memory segments (no torch: the launcher imports this).

One segment per membership generation, ``/dev/shm/phalanx-<job>-g<generation>``; every name of a
job starts with `job_prefix(job_id)`, so the launcher can remove a crashed job's segments.
"""

from __future__ import annotations

import os

SHM_DIR = "/dev/shm"


def job_prefix(job_id: str) -> str:
    """The file-name prefix every segment of job `job_id` starts with."""
    return f"phalanx-{job_id}-"


def segment_path(job_id: str, generation: int) -> str:
    """Path of one generation's intra-host segment."""
    return os.path.join(SHM_DIR, f"{job_prefix(job_id)}g{generation}")
