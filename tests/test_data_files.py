"""File datasets (npy, npz, csv, parquet) as input splits, the per-rank split cache and its
memory budget, and rebuilding a lost rank's splits from source after a membership change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phalanx.data import (
    CacheBudgetExceeded,
    FileDataset,
    PartitionedDataset,
    ShardedLoader,
    _collective,
    map_reduce,
)
from phalanx.data._testing import ThreadWorld
from phalanx.errors import ConfigError

ROWS = [5, 7, 3, 9]  # records per file


def table(start: int, rows: int) -> np.ndarray:
    """Records whose first column is their global index."""
    idx = np.arange(start, start + rows, dtype=np.float64)
    return np.column_stack([idx, idx * 10, idx % 3])


def write(tmp_path: Path, fmt: str) -> Path:
    start = 0
    for f, rows in enumerate(ROWS):
        data = table(start, rows)
        path = tmp_path / f"part-{f:02d}.{fmt}"
        if fmt == "npy":
            np.save(path, data)
        elif fmt == "npz":
            np.savez(path, x=data[:, :2], y=data[:, 2].astype(np.int64))
        elif fmt == "csv":
            np.savetxt(path, data, delimiter=",", header="idx,ten,mod", comments="")
        start += rows
    (tmp_path / "README.txt").write_text("not data")
    return tmp_path


def write_parquet(tmp_path: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    start = 0
    for f in range(2):
        data = table(start, 12)
        t = pa.table({"idx": data[:, 0], "ten": data[:, 1], "mod": data[:, 2].astype(np.int64)})
        pq.write_table(t, tmp_path / f"part-{f}.parquet", row_group_size=5)  # groups 5, 5, 2
        start += 12
    return tmp_path


@pytest.mark.parametrize("fmt", ["npy", "npz", "csv"])
def test_one_split_per_file(tmp_path: Path, fmt: str) -> None:
    ds = FileDataset(write(tmp_path, fmt))
    assert ds.format == fmt and ds.num_splits == 4 and ds.split_sizes() == ROWS
    assert len(ds) == sum(ROWS)
    first = ds.load_split(1)
    np.testing.assert_array_equal(first[0][:, 0], np.arange(5, 12))
    if fmt == "npz":
        assert [a.shape for a in first] == [(7, 2), (7,)]
    idx = np.array([20, 0, 13, 6, 6])
    np.testing.assert_array_equal(ds.take(idx)[0][:, 0], idx)


def test_csv_header_detection_columns_and_transform(tmp_path: Path) -> None:
    write(tmp_path, "csv")
    np.savetxt(tmp_path / "noheader.txt", table(0, 4), delimiter=",")
    bare = FileDataset([tmp_path / "noheader.txt"], format="csv")
    assert bare.split_sizes() == [4]
    picked = FileDataset(tmp_path, columns=["mod", "idx"])
    np.testing.assert_array_equal(picked.load_split(0)[0][:, 1], np.arange(5))
    lineage = FileDataset(tmp_path, transform=lambda row: (row[:2] * 2, int(row[2])))
    x, y = lineage.load_split(3)
    np.testing.assert_array_equal(x[:, 0], 2 * np.arange(15, 24))
    assert y.dtype.kind == "i"
    with pytest.raises(ConfigError, match="not in the header"):
        FileDataset(tmp_path, columns=["nope"]).load_split(0)


def test_parquet_row_groups_are_splits(tmp_path: Path) -> None:
    ds = FileDataset(write_parquet(tmp_path), columns=["idx", "mod"])
    assert ds.format == "parquet"
    assert ds.split_sizes() == [5, 5, 2, 5, 5, 2]
    idx, mod = ds.load_split(4)
    np.testing.assert_array_equal(idx, np.arange(17, 22))
    assert mod.dtype == np.int64
    assert ds.describe_split(4) == "part-1.parquet#rowgroup1"


def test_bad_sources_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no readable data files"):
        FileDataset(tmp_path)
    with pytest.raises(ConfigError, match="format='tsv'"):
        FileDataset(tmp_path, format="tsv")
    np.save(tmp_path / "a.npy", np.zeros(3))
    np.savetxt(tmp_path / "b.csv", np.zeros((2, 2)), delimiter=",")
    with pytest.raises(ConfigError, match="formats"):
        FileDataset(tmp_path)


def test_cache_reads_each_owned_split_once(tmp_path: Path) -> None:
    ds = FileDataset(write(tmp_path, "npy"))
    part = PartitionedDataset(ds, rank=0, world_size=2)
    assert part.splits == [0, 1]
    for _ in range(3):
        total = sum(float(s[0][:, 0].sum()) for _, s in part.local_splits())
    assert total == float(np.arange(12).sum())
    assert ds.reads == 2 and part.cached_splits == [0, 1]
    assert part.cached_bytes == 12 * 3 * 8
    uncached = PartitionedDataset(ds, rank=0, world_size=2, cache=False)
    for _ in range(3):
        list(uncached.local_splits())
    assert ds.reads == 2 + 3 * 2


def test_map_reduce_reuses_cache_across_iterations(tmp_path: Path) -> None:
    ds = FileDataset(write(tmp_path, "npy"))

    def rank_body(r: int) -> list[float]:
        part = PartitionedDataset(ds, cache=True)
        return [map_reduce(part, lambda a: a[:, 0].sum()) for _ in range(4)]

    results = ThreadWorld(2).run(rank_body)
    assert results[0] == results[1] == [float(np.arange(24).sum())] * 4
    assert ds.reads == 4  # one read per split over four iterations and two ranks


def test_memory_budget_error_names_split_size_and_budget(tmp_path: Path) -> None:
    ds = FileDataset(write(tmp_path, "npy"))
    part = PartitionedDataset(ds, rank=0, world_size=1, memory_budget=250)
    part.get_split(0)  # 5 rows * 3 cols * 8 bytes = 120 bytes fits
    with pytest.raises(CacheBudgetExceeded) as err:
        part.get_split(1)  # 168 more bytes does not
    msg = str(err.value)
    assert "split 1 (part-01.npy)" in msg and "168 bytes" in msg
    assert "memory_budget=250" in msg and "holds 120" in msg
    assert "cache=False" in msg
    with pytest.raises(ConfigError, match="memory_budget=-1"):
        PartitionedDataset(ds, rank=0, world_size=1, memory_budget=-1)


def test_survivor_rebuilds_lost_splits_from_source(tmp_path: Path) -> None:
    calls: list[int] = []

    def transform(row: np.ndarray) -> np.ndarray:
        calls.append(int(row[0]))
        return row * 2

    ds = FileDataset(write(tmp_path, "npy"), transform=transform)
    survivors = [PartitionedDataset(ds, rank=r, world_size=3) for r in (0, 2)]
    for p in survivors:
        list(p.local_splits())
    assert ds.reads == 3 and [p.splits for p in survivors] == [[0], [2, 3]]
    # Rank 1 (split 1) is lost; old ranks 0 and 2 become new ranks 0 and 1.
    new = [p.reassign(i, 2, lost_ranks=[1]) for i, p in enumerate(survivors)]
    assert new == [[1], []]
    assert sorted(s for p in survivors for s in p.splits) == [0, 1, 2, 3]
    calls.clear()
    sums = [sum(float(s[0][:, 0].sum()) for _, s in p.local_splits()) for p in survivors]
    assert ds.reads == 4  # only the lost split was read again
    assert sorted(set(calls)) == list(range(5, 12))  # ... and re-transformed (its lineage)
    assert sum(sums) == 2 * float(np.arange(sum(ROWS)).sum())
    rebalanced = survivors[0].reassign(0, 1)
    assert rebalanced == [2, 3] and survivors[0].splits == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="survivors"):
        survivors[1].reassign(0, 3, lost_ranks=[0])


def test_loader_over_files_sees_every_record(tmp_path: Path) -> None:
    ds = FileDataset(write(tmp_path, "npz"))
    part = PartitionedDataset(ds, rank=0, world_size=1)
    with _collective.use_backend(ThreadWorld(1)):
        batches = list(ShardedLoader(part, batch_size=4, seed=3))
    x = np.concatenate([b[0] for b in batches])
    assert isinstance(batches[0][0], np.ndarray)
    assert sorted(x[:, 0].tolist()) == list(range(sum(ROWS)))
    assert ds.reads == 4
