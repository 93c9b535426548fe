"""A rank's view of a split dataset: the splits it owns, held in an in-memory cache across
epochs and iterations (Spark's cached partitions), and reassigned when the world changes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import ConfigError, PhalanxError
from . import _collective
from .dataset import Split, SplitDataset, _concat, nbytes, take_records
from .sharding import assignment_table, reassign_lost


class CacheBudgetExceeded(PhalanxError, MemoryError):
    """A split does not fit in what is left of the cache's memory budget."""


class PartitionedDataset:
    """The splits of `source` that `rank` of `world_size` owns; rank and world size default to
    the runtime's. With `cache=True` each owned split is read once and kept (up to
    `memory_budget` bytes, None for no limit); with `cache=False` it is re-read each time."""

    def __init__(self, source: SplitDataset, *, rank: int | None = None,
                 world_size: int | None = None, cache: bool = True,
                 memory_budget: int | None = None) -> None:
        if not isinstance(source, SplitDataset):
            raise ConfigError(f"source={type(source).__name__} is not a split dataset; pass an "
                              "ArrayDataset or FileDataset")
        if memory_budget is not None and (isinstance(memory_budget, bool) or
                                          not isinstance(memory_budget, int) or memory_budget < 0):
            raise ConfigError(f"memory_budget={memory_budget!r} must be a number of bytes >= 0 "
                              "or None for no limit")
        self.source = source
        self.cache = cache
        self.memory_budget = memory_budget
        self._cache: dict[int, Split] = {}
        self.rank = _collective.rank() if rank is None else rank
        self.world_size = _collective.size() if world_size is None else world_size
        self.table = assignment_table(source.num_splits, self.world_size)
        self._check_rank(self.rank, self.world_size)

    @staticmethod
    def _check_rank(rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is out of range for world_size={world_size}")

    @property
    def splits(self) -> list[int]:
        """The splits this rank owns."""
        return list(self.table[self.rank])

    @property
    def num_splits(self) -> int:
        return self.source.num_splits

    def __len__(self) -> int:
        return len(self.source)

    @property
    def cached_splits(self) -> list[int]:
        return sorted(self._cache)

    @property
    def cached_bytes(self) -> int:
        return sum(nbytes(s) for s in self._cache.values())

    def get_split(self, i: int) -> Split:
        """Split `i`: from the cache when this rank owns it and caching is on, else from source."""
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        split = self.source.load_split(i)
        if self.cache and i in self.table[self.rank]:
            self._admit(i, split)
        return split

    def _admit(self, i: int, split: Split) -> None:
        size = nbytes(split)
        if self.memory_budget is not None and self.cached_bytes + size > self.memory_budget:
            describe = getattr(self.source, "describe_split", lambda j: f"#{j}")(i)
            raise CacheBudgetExceeded(
                f"split {i} ({describe}) needs {size} bytes but the cache holds "
                f"{self.cached_bytes} of its memory_budget={self.memory_budget} bytes; raise "
                "memory_budget, run more workers so each owns fewer splits, or pass cache=False "
                "to re-read splits from source each time")
        self._cache[i] = split

    def local_splits(self) -> Iterator[tuple[int, Split]]:
        """(split id, split) for each split this rank owns, in split order."""
        for i in self.splits:
            yield i, self.get_split(i)

    def local_arrays(self) -> Split:
        """This rank's records, one array per field (the owned splits concatenated)."""
        parts = [s for _, s in self.local_splits()]
        if not parts:
            first = self.source.load_split(0) if self.num_splits else ()
            return tuple(a[:0] for a in first)
        return tuple(_concat([p[k] for p in parts]) for k in range(len(parts[0])))

    def take(self, indices: Sequence[int] | np.ndarray) -> Split:
        """Records at global `indices`; owned splits come from the cache."""
        return take_records(self.source, np.asarray(indices, dtype=np.int64), self.get_split)

    def __getitem__(self, indices: Sequence[int] | np.ndarray) -> Split:
        return self.take(indices)

    def reassign(self, rank: int, world_size: int,
                 lost_ranks: Sequence[int] | None = None) -> list[int]:
        """Adopt the assignment of a new world; returns the splits this rank newly owns.

        With `lost_ranks` (old ranks that left; survivors renumbered densely in old order),
        survivors keep their splits and share out the lost ones, which they rebuild from source.
        Without it, the balanced contiguous assignment of the new world is used. Splits no longer
        owned leave the cache.
        """
        if lost_ranks is not None:
            table = reassign_lost(self.table, lost_ranks)
            if len(table) != world_size:
                raise ConfigError(
                    f"world_size={world_size} does not match the {len(table)} survivors left "
                    f"after lost_ranks={sorted(lost_ranks)} in a world of {len(self.table)}; "
                    "pass the ranks that actually left, or lost_ranks=None to rebalance")
        else:
            table = assignment_table(self.source.num_splits, world_size)
        self._check_rank(rank, world_size)
        old = set(self.table[self.rank])
        self.table, self.rank, self.world_size = table, rank, world_size
        owned = set(table[rank])
        for i in [i for i in self._cache if i not in owned]:
            del self._cache[i]
        return sorted(owned - old)
