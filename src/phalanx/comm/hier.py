"""Hierarchical collectives: shared memory inside each host, Gloo between hosts.

With H hosts of L ranks each, an allreduce of S bytes is a shared-memory reduce-scatter on
every host (local rank q ends with the host's sum of chunk q, S/L bytes), an allreduce of chunk
q among the local rank q workers of all hosts (one Gloo group per local rank; the L groups run at
once, so each host link carries S * 2(H-1)/H bytes in all), then a shared-memory allgather. A
flat ring over all H*L ranks crosses each host link with S * 2(HL-1)/(HL) bytes instead: 1.5x at
2x2, 1.75x at 2x4.

A broadcast goes to the root's local rank on every host first (its cross group), then to the
rest of each host through shared memory.

Built by `Group` when every host has the same number of ranks (more than one): chunk q must be
the same bytes on every host, and a host with fewer ranks would have no one to reduce some chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .glooreduce import Wait, start_allreduce_
from .shm import ShmAllreduce


class Hierarchy:
    """The two levels one rank takes part in: its host's segment and its cross-host group."""

    def __init__(self, local: ShmAllreduce, cross: Any, cross_rank: int, cross_size: int,
                 size: int, wait: Wait, cross_ranks: list[int],
                 track: Callable[[Any], None]) -> None:
        self.local = local
        self.cross = cross
        self.cross_rank, self.cross_size, self.size = cross_rank, cross_size, size
        self._wait = wait
        self._track = track
        """Told of every operation started in the background (see comm/graveyard.py)."""
        self._cross_ranks = cross_ranks
        """Global rank of each member of this rank's cross group, in cross-rank order."""
        self.piece_bytes = 8 << 20
        """The cross-host allreduce goes in pieces of this size, each started as soon as the
        host has reduced it, so reducing the next overlaps sending the last."""

    def allreduce_(self, t: torch.Tensor, op: str) -> None:
        """Reduce contiguous CPU tensor `t` in place over the whole job."""
        def between(chunk: torch.Tensor) -> Callable[[], None]:
            return start_allreduce_(self._wait, self.cross, self.cross_size, chunk, op,
                                    divide_by=self.size, track=self._track)
        self.local.allreduce_around_(t, "sum" if op == "avg" else op, between,
                                     self.piece_bytes)

    def broadcast_(self, t: torch.Tensor, root: int, root_local: int) -> None:
        """Copy global rank `root`'s tensor (local rank `root_local` on its host) to every rank."""
        flat = t.reshape(-1).view(torch.uint8)
        if self.local.local_rank == root_local:
            self._wait(self.cross.broadcast(flat, self._cross_ranks.index(root)))
        self.local.broadcast_(flat, root_local)
