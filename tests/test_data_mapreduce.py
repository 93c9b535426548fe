"""map_reduce and aggregate over 1, 2 and 3 fake ranks: numeric trees go through allreduce,
anything else through allgather_object; every rank gets the same result."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from phalanx.data import ArrayDataset, PartitionedDataset, aggregate, map_reduce
from phalanx.data._testing import ThreadWorld
from phalanx.errors import ConfigError

X = np.arange(40, dtype=np.float64).reshape(20, 2)
Y = np.arange(20) % 3


def on_world(world: int, fn):  # type: ignore[no-untyped-def]
    results = ThreadWorld(world).run(lambda r: fn())
    for other in results[1:]:
        assert repr(other) == repr(results[0])
    return results[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_numeric_tree_sum_min_max_avg(world: int) -> None:
    ds = ArrayDataset(X, Y, num_splits=5)

    def stats(x: np.ndarray, y: np.ndarray) -> dict[str, object]:
        return {"n": len(x), "sum": x.sum(axis=0),
                "moments": (x.T @ x, np.bincount(y, minlength=3)),
                "t": torch.tensor(x.sum(), dtype=torch.float64)}

    out = on_world(world, lambda: map_reduce(ds, stats))
    assert out["n"] == 20 and isinstance(out["n"], int)
    np.testing.assert_allclose(out["sum"], X.sum(axis=0))
    np.testing.assert_allclose(out["moments"][0], X.T @ X)
    np.testing.assert_array_equal(out["moments"][1], np.bincount(Y))
    assert isinstance(out["t"], torch.Tensor) and out["t"].item() == X.sum()
    assert on_world(world, lambda: map_reduce(ds, lambda x, y: x.min(axis=0), "min")).tolist() \
        == [0, 1]
    assert on_world(world, lambda: map_reduce(ds, lambda x, y: float(x.max()), "max")) == 39.0
    assert on_world(world, lambda: map_reduce(ds, lambda x, y: len(x), "avg")) == 4.0


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_without_splits_contribute_identities(world: int) -> None:
    ds = ArrayDataset(X, num_splits=2)  # with 4 ranks, two ranks own nothing
    assert on_world(world, lambda: map_reduce(ds, lambda x: x.sum(axis=0))).tolist() == [380, 400]
    assert on_world(world, lambda: map_reduce(ds, lambda x: x.min(), "min")) == 0
    assert on_world(world, lambda: map_reduce(ds, lambda x: np.int32(len(x)), "prod")) == 100


@pytest.mark.parametrize("world", [1, 3])
def test_non_numeric_results_use_allgather(world: int) -> None:
    ds = ArrayDataset(X, Y, num_splits=6)
    words = on_world(world, lambda: map_reduce(ds, lambda x, y: Counter(y.tolist())))
    assert words == Counter(Y.tolist())
    firsts = on_world(world, lambda: map_reduce(ds, lambda x, y: [int(x[0, 0])]))
    assert firsts == [int(x[0, 0]) for x, _ in (ds.load_split(i) for i in range(6))]
    union = on_world(world, lambda: map_reduce(ds, lambda x, y: set(y.tolist()),
                                              reduce=lambda a, b: a | b))
    assert union == {0, 1, 2}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_aggregate_spark_style(world: int) -> None:
    ds = ArrayDataset(X, num_splits=4)

    def run() -> tuple[float, int]:
        return aggregate(PartitionedDataset(ds, cache=False), (0.0, 0),
                         lambda acc, x: (acc[0] + float(x.sum()), acc[1] + len(x)),
                         lambda a, b: (a[0] + b[0], a[1] + b[1]))

    assert on_world(world, run) == (float(X.sum()), 20)


def test_errors() -> None:
    ds = ArrayDataset(X, num_splits=2)
    with pytest.raises(ConfigError, match="reduce='median'"):
        on_world(1, lambda: map_reduce(ds, len, "median"))
    with pytest.raises(ConfigError, match="numeric"):
        on_world(1, lambda: map_reduce(ds, lambda x: "a", "avg"))
    with pytest.raises(Exception, match="different"):
        on_world(2, lambda: map_reduce(ds, lambda x: x[: int(x[0, 0]) % 3 + 1].sum(axis=1)))


def test_split_results_of_different_shapes_on_one_rank() -> None:
    ds = ArrayDataset(X, num_splits=2)
    with pytest.raises(ConfigError, match="one shape and dtype"):
        on_world(1, lambda: map_reduce(ds, lambda x: x[: int(x[0, 0]) % 3 + 1].sum(axis=1)))
