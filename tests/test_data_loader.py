"""ShardedLoader: a single process behaves like a shuffled DataLoader; several (fake) ranks split
each epoch exactly once, also across failed steps and a shrinking world."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from phalanx.data import ArrayDataset, ShardedLoader, _collective
from phalanx.data._testing import ThreadWorld
from phalanx.errors import ConfigError

N = 103


@pytest.fixture(autouse=True)
def single_process() -> Iterator[None]:
    """The real runtime when it is importable, else a one-rank fake (same semantics)."""
    import phalanx
    if all(hasattr(phalanx, n) for n in ("rank", "size", "allreduce", "allgather_object")):
        yield
    else:
        with _collective.use_backend(ThreadWorld(1)):
            yield


def ids(batches: list[tuple[Any, ...]]) -> list[int]:
    return [int(v) for b in batches for v in b[0]]


def test_every_sample_once_per_epoch_numpy() -> None:
    loader = ShardedLoader(ArrayDataset(np.arange(N), np.arange(N) * 2.0), batch_size=10, seed=1)
    assert len(loader) == 11
    epochs = [list(loader) for _ in range(3)]
    for batches in epochs:
        assert len(batches) == 11 and len(batches[-1][0]) == 3
        assert sorted(ids(batches)) == list(range(N))
        assert isinstance(batches[0][0], np.ndarray)
        np.testing.assert_array_equal(batches[0][1], batches[0][0] * 2.0)
    assert ids(epochs[0]) != ids(epochs[1])  # a fresh order each epoch
    assert loader.epoch == 2


def test_torch_dataset_yields_tensors_and_no_shuffle_keeps_order() -> None:
    ds = ArrayDataset(torch.arange(N), torch.ones(N, 2))
    batches = list(ShardedLoader(ds, batch_size=16, shuffle=False))
    assert all(isinstance(t, torch.Tensor) for b in batches for t in b)
    assert ids(batches) == list(range(N))
    as_np = next(iter(ShardedLoader(ds, batch_size=4, as_torch=False)))
    assert isinstance(as_np[0], np.ndarray)


def test_determinism_given_seed_and_epoch() -> None:
    ds = ArrayDataset(np.arange(N))
    a, b = ShardedLoader(ds, 8, seed=5), ShardedLoader(ds, 8, seed=5)
    b.set_epoch(3)
    a.set_epoch(3)
    assert ids(list(a)) == ids(list(b))
    c = ShardedLoader(ds, 8, seed=6)
    c.set_epoch(3)
    assert ids(list(c)) != ids(list(b))


def test_state_dict_round_trip_resumes_mid_epoch() -> None:
    ds = ArrayDataset(np.arange(N))
    loader = ShardedLoader(ds, batch_size=7, seed=2)
    loader.set_epoch(4)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()  # the 5th batch is pending: it completes on restore
    resumed = ShardedLoader(ds, batch_size=7, seed=0)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert resumed.epoch == 4
    assert sorted(ids(head) + ids(tail)) == list(range(N))
    reference = ShardedLoader(ds, batch_size=7, seed=2)
    reference.set_epoch(4)
    assert ids(list(reference)) == ids(head) + ids(tail)
    with pytest.raises(ConfigError, match="cursor"):
        resumed.load_state_dict({})


def test_set_epoch_pins_the_pass_to_that_epoch() -> None:
    loader = ShardedLoader(ArrayDataset(np.arange(N)), batch_size=10, seed=1)
    loader.set_epoch(2)
    assert sorted(ids(list(loader))) == list(range(N))
    assert list(loader) == []  # epoch 2 is finished; no silent move to epoch 3
    loader.set_epoch(3)
    assert sorted(ids(list(loader))) == list(range(N)) and loader.epoch == 3


def test_drop_last() -> None:
    loader = ShardedLoader(ArrayDataset(np.arange(N)), batch_size=10, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 10
    assert all(len(b[0]) == 10 for b in batches)
    assert len(set(ids(batches))) == 100


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="batch_size=0"):
        ShardedLoader(ArrayDataset(np.arange(3)), batch_size=0)
    with pytest.raises(ConfigError, match="dataset=list"):
        ShardedLoader([1, 2, 3], batch_size=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("world", [2, 3])
def test_fake_ranks_split_the_epoch(world: int) -> None:
    ds = ArrayDataset(np.arange(N))

    def body(r: int) -> list[list[int]]:
        loader = ShardedLoader(ds, batch_size=6, seed=9)
        return [ids(list(loader)) for _ in range(2)]

    per_rank = ThreadWorld(world).run(body)
    for epoch in range(2):
        got = [i for r in per_rank for i in r[epoch]]
        assert sorted(got) == list(range(N))


class Seat:
    """A backend that plays one chosen rank of a chosen world (ranks driven in lockstep)."""

    def __init__(self) -> None:
        self.r, self.w = 0, 1

    def rank(self) -> int:
        return self.r

    def size(self) -> int:
        return self.w


def test_failed_step_requeues_lost_samples_and_world_shrinks() -> None:
    ds = ArrayDataset(np.arange(N))
    seat = Seat()
    loaders = [ShardedLoader(ds, batch_size=5, seed=4) for _ in range(3)]
    consumed: list[int] = []
    with _collective.use_backend(seat):  # type: ignore[arg-type]
        its = [iter(ld) for ld in loaders]

        def step(alive: list[int]) -> list[list[int]]:
            seat.w = len(alive)
            out, stopped = [], 0
            for new_rank, old in enumerate(alive):
                seat.r = new_rank
                try:
                    out.append(ids([next(its[old])]))
                except StopIteration:
                    stopped += 1
            assert stopped in (0, len(alive))  # every rank takes the same number of steps
            if stopped:
                raise StopIteration
            return out

        for _ in range(3):
            consumed += [i for part in step([0, 1, 2]) for i in part]
        # Step 4 fails: rank 1 dies; ranks 0 and 2 completed their part (they redo it locally).
        lost_batch = step([0, 1, 2])
        consumed += lost_batch[0] + lost_batch[2]
        for old in (0, 2):
            loaders[old].on_step_failed([0, 2])
        first_after = None
        while True:
            try:
                batch = step([0, 2])
            except StopIteration:
                break
            first_after = first_after or batch
            consumed += [i for part in batch for i in part]
    assert sorted(consumed) == list(range(N))
    assert set(lost_batch[1]) <= set(first_after[0] + first_after[1])  # requeued first
    assert loaders[0].state_dict() == loaders[2].state_dict()
