"""Placement: local and cross ranks follow Horovod's meaning for any packing of hosts."""

from __future__ import annotations

import itertools

from phalanx.comm.group import Placement


def _place(hosts: list[str], rank: int) -> Placement:
    local = [hosts[:i].count(h) for i, h in enumerate(hosts)]
    return Placement(generation=1, rank=rank, size=len(hosts), local_rank=local[rank],
                     local_size=hosts.count(hosts[rank]), hosts=hosts, pids=[0] * len(hosts))


def test_cross_rank_and_size_match_a_brute_force_reference() -> None:
    for layout in ([2, 2], [4, 4], [3, 1, 2], [1], [2, 3, 3, 1]):
        hosts = [h for i, n in enumerate(layout) for h in [f"h{i}"] * n]
        for rank in range(len(hosts)):
            p = _place(hosts, rank)
            # Reference: the hosts (in order) that have a worker with this local rank.
            having = [h for h, n in zip(itertools.count(), layout) if n > p.local_rank]
            assert p.cross_size == len(having), (layout, rank)
            assert p.cross_rank == having.index(int(hosts[rank][1:])), (layout, rank)
