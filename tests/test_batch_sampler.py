"""`ElasticBatchSampler` in one process: ranks simulated by switching the data layer's backend.

The reference is the definition: every sample of an epoch trained exactly once, an epoch's
number of steps the same with and without losses, and every rank computing the same plans.
"""

from __future__ import annotations

import pytest

from phalanx.data import _collective
from phalanx.data.batch_sampler import ElasticBatchSampler, LiveShardSampler
from phalanx.errors import ConfigError


class World:
    """A backend that answers rank()/size() for the rank being simulated."""

    def __init__(self, size: int) -> None:
        self.size_, self.rank_ = size, 0

    def rank(self) -> int:
        return self.rank_

    def size(self) -> int:
        return self.size_


def draw(samplers, world, iters, ranks):
    """Each live rank draws its next batch (all ranks alike, as lock-stepped trainers do)."""
    out = []
    with _collective.use_backend(world):
        for r in ranks:
            world.rank_ = r
            out.append(next(iters[r]))
    return out


@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_a_loss_mid_epoch_keeps_every_sample_once_and_the_step_count(lookahead) -> None:
    n, world = 50, World(4)
    samplers = [ElasticBatchSampler(n, 8, seed=3) for _ in range(4)]
    steps = len(samplers[0])
    assert steps == 7
    with _collective.use_backend(world):
        iters = {}
        for r in range(4):
            world.rank_ = r
            iters[r] = iter(samplers[r])
    live, trained, done = list(range(4)), [], 0
    for _ in range(lookahead):  # loaders that read ahead
        draw(samplers, world, iters, live)
    while done < steps:
        batches = draw(samplers, world, iters, live) if done + lookahead < steps else None
        if done == 2:  # old rank 1 is lost while this step is in flight: survivors redo it
            kept = [0, 2, 3]
            for s in (samplers[r] for r in kept):
                s.on_lost(kept, 3)
            pending = samplers[0].pending
            assert all(samplers[r].pending == pending for r in kept)
            samplers = [samplers[r] for r in kept]
            iters = {i: iters[r] for i, r in enumerate(kept)}
            world.size_, live = 3, [0, 1, 2]
        plan = samplers[0].pending[0]
        trained.extend(i for part in plan for i in part)
        for s in samplers:
            s.on_step_done()
        done += 1
        del batches
    assert sorted(trained) == list(range(n))
    with _collective.use_backend(world):
        world.rank_ = 0
        assert list(iters[0]) == []  # the epoch is over after exactly `steps` steps


def test_epochs_differ_and_set_epoch_is_idempotent() -> None:
    world = World(1)
    s = ElasticBatchSampler(10, 4, seed=0)
    with _collective.use_backend(world):
        first = [b for b in s if not s.on_step_done()]
        s.set_epoch(1)
        s.set_epoch(1)
        second = [b for b in s if not s.on_step_done()]
    flat = [[i for b in bs for i in b] for bs in (first, second)]
    assert sorted(flat[0]) == sorted(flat[1]) == list(range(10))
    assert first != second and len(first) == len(second) == 3


def test_drop_last_drops_only_the_tail() -> None:
    world = World(2)
    s = ElasticBatchSampler(11, 4, drop_last=True, shuffle=False)
    assert len(s) == 2
    with _collective.use_backend(world):
        got = [b for b in s if not s.on_step_done()]
    assert got == [[0, 1], [4, 5]]  # rank 0's halves of global batches [0..3] and [4..7]


def test_state_heals_another_rank_and_rejects_another_dataset() -> None:
    world = World(2)
    a, b = ElasticBatchSampler(20, 4), ElasticBatchSampler(20, 4)
    with _collective.use_backend(world):
        next(iter(a))
    b.load_state_dict(a.state_dict())
    assert b.pending == a.pending and b.position == a.position
    with pytest.raises(ConfigError, match="num_samples=20"):
        ElasticBatchSampler(21, 4).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="global_batch_size"):
        ElasticBatchSampler(20, 0)


def test_live_shards_cover_the_dataset_at_any_size() -> None:
    for size in (1, 2, 3):
        world = World(size)
        per_rank = []
        with _collective.use_backend(world):
            for r in range(size):
                world.rank_ = r
                per_rank.append(list(LiveShardSampler(10)))
        seen = [i for part in per_rank for i in part]
        assert sorted(set(seen)) == list(range(10))
        # as torch's DistributedSampler: equal counts, the wrap-around repeats the first ones
        assert {len(p) for p in per_rank} == {-(-10 // size)}
        assert sorted(seen) == sorted([*range(10), *range(len(seen) - 10)])


def test_a_loss_in_the_last_step_carries_its_share_into_the_next_epoch() -> None:
    world = World(2)
    a, b = ElasticBatchSampler(8, 4, shuffle=False), ElasticBatchSampler(8, 4, shuffle=False)
    with _collective.use_backend(world):
        ia, ib = iter(a), iter(b)
        for _ in range(2):  # both steps of epoch 0 drawn; the first one completes
            world.rank_ = 0
            next(ia)
            world.rank_ = 1
            next(ib)
        a.on_step_done()
        a.on_lost([0], 1)  # rank 1 is lost in the last step; rank 0 redoes its share
        trained = [i for step in ([0, 1, 2, 3], a.pending[0][0]) for i in step]
        a.on_step_done()
        world.size_, world.rank_ = 1, 0
        a.set_epoch(1)
        first = next(iter(a))
    assert trained == [0, 1, 2, 3, 4, 5]
    assert first[:2] == [6, 7]  # the lost share opens epoch 1, before its own samples
    assert len(first) == 5  # 10 samples over epoch 1's 2 steps: it keeps its step count
