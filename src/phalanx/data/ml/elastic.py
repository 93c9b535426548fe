"""`fit_elastic`: fit a summation-form estimator so that the fit survives lost workers.

Every rank holds the same iterate at every collective, so when a worker dies mid-fit the
survivors lose nothing they cannot rebuild: they re-form the group, adopt the lost rank's
input splits (re-read and re-transformed from the source, as Spark recomputes a lost
partition from its lineage) and fit again on the whole data.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import ConfigError, WorkerLost
from ..partition import PartitionedDataset

log = logging.getLogger("phalanx.data")
E = TypeVar("E")


def fit_elastic(estimator: E, data: PartitionedDataset, *, max_recoveries: int = 10,
                on_recovery: Callable[[dict[str, Any]], None] | None = None) -> E:
    """`estimator.fit(data)`, re-forming and refitting on the survivors if a worker is lost.

    `data` must be a PartitionedDataset so the lost rank's splits can be rebuilt from source.
    `on_recovery` receives, after each recovery, the old and new rank and world size, the lost
    old ranks, and the splits this rank adopted. Needs a job started by `phalanx run` with
    `--min-np` below `-np` (so survivors are allowed to continue).
    """
    if not isinstance(data, PartitionedDataset):
        raise ConfigError(f"fit_elastic needs a PartitionedDataset, got {type(data).__name__}: "
                          "with plain arrays the lost rank's rows are gone; wrap the source, e.g. "
                          "PartitionedDataset(FileDataset(path))")
    from ... import api
    from ...elastic.loop import reform
    for attempt in range(max_recoveries + 1):
        try:
            estimator.fit(data)  # type: ignore[attr-defined]
            return estimator
        except WorkerLost as e:
            if attempt == max_recoveries:
                raise
            info: dict[str, Any] = {"reported": list(e.lost_ranks)}
            reform(e, functools.partial(_adopt_lost_splits, data, info))
            log.warning("fit lost rank(s) %s; refitting on %d workers", info["lost"], api.size())
            if on_recovery is not None:
                on_recovery(info)
    raise RuntimeError("unreachable: the loop returns or raises")


def _adopt_lost_splits(data: PartitionedDataset, info: dict[str, Any], origin: Any) -> str:
    """The heal of a fit: survivors agree on who left from who is here (a WorkerLost's
    lost_ranks can be empty when the collective failed before the coordinator noticed the
    death) and take over the lost ranks' splits, re-read from source."""
    from ... import api
    alive = api.allgather_object(origin.rank)
    lost = sorted(set(range(origin.size)) - set(alive))
    adopted = data.reassign(api.rank(), api.size(), lost_ranks=lost)
    info.update(old_rank=origin.rank, old_world=origin.size, rank=api.rank(), world=api.size(),
                lost=lost, adopted=adopted)
    return f"adopted the splits of lost rank(s) {lost}"
