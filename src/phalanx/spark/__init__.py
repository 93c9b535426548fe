"""phalanx.spark: run a phalanx job on a Spark cluster, and feed it Spark DataFrames.

    import phalanx.spark as pxs
    results = pxs.run(train_fn, num_workers=4, min_workers=2)    # workers as Spark tasks
    ds = pxs.from_dataframe(df, columns=["x1", "x2"], label="y")  # partitions as input splits

`run` hosts the coordinator in the driver and runs each worker as a plain Spark task (see
`phalanx.spark.driver` for the execution mode and why); `from_dataframe` writes each partition
once as an Arrow file that workers read and cache (see `phalanx.spark.dataset`).
Names load on first use: importing this package imports neither pyspark nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "run": "driver", "JobFailed": "outcome", "WorkerError": "outcome",
    "from_dataframe": "dataset", "SparkDataset": "dataset", "SplitMissing": "dataset",
    "task_slots": "cluster",
}

__all__ = ["JobFailed", "SparkDataset", "SplitMissing", "WorkerError", "from_dataframe", "run",
           "task_slots"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'phalanx.spark' has no attribute {name!r}")


if TYPE_CHECKING:
    from .cluster import task_slots
    from .dataset import SparkDataset, SplitMissing, from_dataframe
    from .driver import run
    from .outcome import JobFailed, WorkerError
