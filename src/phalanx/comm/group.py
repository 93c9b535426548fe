"""One generation's communicator: a Gloo process group, the shared-memory path, NCCL for CUDA.

A `Group` is built after each rendezvous and thrown away when membership changes. It runs
every collective through one ordered executor, checks signatures across ranks (so a mismatch
fails on every rank instead of hanging), and turns transport failures into `WorkerLost`, which
always names global ranks and carries the generation, whichever path failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import CollectiveMismatch, PhalanxError, WorkerLost
from . import ops
from .shmnames import segment_path
from .work import Handle, OrderedExecutor

if TYPE_CHECKING:
    from .shm import ShmAllreduce

log = logging.getLogger("phalanx.comm")
_WATCH_S = 0.01
"""How often a wait on the process group checks whether its generation was declared broken."""
T = TypeVar("T")


@dataclass(kw_only=True, slots=True)
class Placement:
    """Where this process sits in a generation."""

    generation: int
    rank: int
    size: int
    local_rank: int
    local_size: int
    hosts: list[str]
    pids: list[int]

    @property
    def cross_rank(self) -> int:
        """Index of this host among the hosts that have a worker of this local rank (Horovod's
        cross_rank): the rank in the group that links the hosts' local rank r workers."""
        return self._cross().index(self.rank)

    @property
    def cross_size(self) -> int:
        """How many hosts have a worker of this local rank (Horovod's cross_size)."""
        return len(self._cross())

    def _cross(self) -> list[int]:
        """Global ranks with this worker's local rank, one per host, in host order."""
        seen: dict[str, int] = {}
        local: list[int] = []
        for h in self.hosts:
            local.append(seen.get(h, 0))
            seen[h] = local[-1] + 1
        return [i for i, q in enumerate(local) if q == self.local_rank]


class TransportError(RuntimeError):
    """A process-group operation failed in transport (peer gone, connection reset, timeout)."""


class Group:
    """Collectives among the ranks of one generation."""

    def __init__(self, place: Placement, store: dist.Store, config: Config, *, job_id: str,
                 abort_check: Callable[[], str | None] | None = None,
                 status: Callable[[], list[int]] | None = None) -> None:
        self.place = place
        self.config = config
        self._store = store
        self._abort_check = abort_check
        self._lost_ranks = status
        self.broken: str | None = None
        self._started = 0
        self._since: float | None = None
        timeout = timedelta(seconds=config.backstop)
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=config.bind_addr)]
        opts._timeout = timeout
        try:
            # Typed Any: torch's stubs omit the backend's collective methods.
            self.pg: Any = dist.ProcessGroupGloo(store, place.rank, place.size, opts)
        except RuntimeError as e:
            raise WorkerLost(f"could not connect the generation {place.generation} process "
                             f"group: {e}", generation=place.generation) from e
        self._nccl: Any = None
        self._exec = OrderedExecutor(f"phalanx-comm-g{place.generation}")
        self.shm: ShmAllreduce | None = None
        self.shm_path = segment_path(job_id, place.generation)
        if self._use_shm():
            self._open_shm()

    # ----------------------------------------------------------------- setup
    def _use_shm(self) -> bool:
        algo = self.config.allreduce_algo
        one_host = self.place.size > 1 and self.place.local_size == self.place.size
        if algo == "shm" and not one_host:
            log.warning("allreduce_algo='shm' needs every rank on one host; using Gloo")
        return one_host and algo in ("auto", "shm")

    def _open_shm(self) -> None:
        from .shm import ShmAllreduce
        me = self.place.hosts[self.place.rank]
        # Local rank q on this host is the q-th rank i with hosts[i] == this host.
        host_ranks = [i for i, h in enumerate(self.place.hosts) if h == me]
        self.shm = ShmAllreduce(self.shm_path, self.place.local_rank, self.place.local_size,
                                capacity_bytes=self.config.shm_max_bytes,
                                timeout=self.config.backstop,
                                peer_pids=[self.place.pids[i] for i in host_ranks],
                                abort_check=self._abort_check, ranks=host_ranks,
                                generation=self.place.generation,
                                explain=ops.mismatch_message)
        # Once every rank has mapped the segment its name can go: nothing leaks on a crash.
        try:
            self.wait(self.pg.barrier())
        except TransportError as e:
            self.shm.unlink()
            self.shm.close()
            self.shm = None
            raise WorkerLost(f"a peer was lost while generation {self.place.generation} set up "
                             f"shared memory: {e}", generation=self.place.generation) from e
        if self.place.local_rank == 0:
            self.shm.unlink()

    def close(self) -> None:
        """Release the executor, the shared segment and the process groups."""
        self._exec.close()
        if self.shm is not None:
            self.shm.unlink()
            self.shm.close()
            self.shm = None
        for pg in (self._nccl, self.pg):
            if pg is not None:
                try:
                    pg.shutdown()  # type: ignore[attr-defined]
                except (RuntimeError, AttributeError):
                    pass
        self._nccl = None

    # ----------------------------------------------------------------- plumbing
    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        if self.broken:
            raise WorkerLost(f"{what}: generation {self.place.generation} is broken "
                             f"({self.broken}); re-form the group", generation=self.place.generation)
        self._started += 1
        self._since = time.monotonic()
        try:
            return fn()
        except WorkerLost as e:
            self.broken = str(e)
            if e.generation is None:
                e.generation = self.place.generation
            raise
        except TransportError as e:
            lost = self._lost_ranks() if self._lost_ranks else []
            who = f"rank(s) {lost}" if lost else "a peer"
            self.broken = f"{who} failed during {what}"
            raise WorkerLost(f"{what} failed on rank {self.place.rank}: {who} of generation "
                             f"{self.place.generation} died, stopped or was cut off ({e})",
                             lost_ranks=lost, generation=self.place.generation) from e
        finally:
            self._since = None

    def progress(self) -> tuple[int, float]:
        """(collectives started in this generation, seconds the current one has taken so far):
        the heartbeat carries it, so the coordinator can tell a rank its peers wait on."""
        since = self._since
        return self._started, (time.monotonic() - since) if since is not None else 0.0

    def run(self, what: str, fn: Callable[[], T]) -> T:
        """Run a collective now, in issue order."""
        return self._exec.run(lambda: self._guard(what, fn))

    def submit(self, what: str, fn: Callable[[], T]) -> Handle[T]:
        """Queue a collective on the comm thread; the handle's wait() returns its result."""
        return self._exec.submit(lambda: self._guard(what, fn))

    def wait(self, work: dist.Work) -> None:
        """Wait for a process-group operation; transport failures become TransportError.

        A peer that left this generation for a recovery without a transport error (it saw a
        loss first) leaves us blocked in Gloo until its timeout: so while waiting, poll the
        coordinator's verdict (cheap: the heartbeat's cached status) and give up on it."""
        if self._abort_check is not None and not work.is_completed():
            self._wait_watching(work)
        try:
            work.wait()
        except RuntimeError as e:
            raise TransportError(str(e)) from e

    def _wait_watching(self, work: dist.Work) -> None:
        pause, next_check = 2e-5, time.monotonic() + _WATCH_S
        while not work.is_completed():
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + _WATCH_S
                reason = self._abort_check() if self._abort_check is not None else None
                if reason:
                    raise TransportError(f"abandoned: {reason}")

    def agree(self, sig: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Exchange signatures (`ops.signature`); raise CollectiveMismatch on every rank if they
        differ. Returns every rank's, in rank order (the last slot may differ: ops.DIM0_FREE).

        With shared memory the exchange goes through the segment, the channel the shm
        collectives check theirs on, so every mix of collectives fails with the same message.
        """
        reason = self._abort_check() if self._abort_check else None
        if reason:
            raise WorkerLost(reason, generation=self.place.generation)
        if self.shm is not None:
            return self.shm.exchange(sig, ignore_last=True, check=self.config.check_collectives)
        mine = torch.tensor(sig, dtype=torch.int64)
        out = torch.empty(self.place.size * len(sig), dtype=torch.int64)
        self.wait(self.pg._allgather_base(out, mine))
        sigs = [tuple(int(v) for v in row) for row in out.view(self.place.size, len(sig)).tolist()]
        if self.config.check_collectives:
            msg = ops.mismatch_message(sigs)
            if msg:
                raise CollectiveMismatch(msg)
        return sigs

    def nccl(self) -> Any:
        """The NCCL group for CUDA tensors, created on first use."""
        if self._nccl is None:
            if not dist.is_nccl_available():
                raise PhalanxError("a CUDA tensor was passed but this torch build has no NCCL")
            from .store import CoordStore
            store = (CoordStore(self._store._client, f"g{self.place.generation}/nccl")  # type: ignore[attr-defined]
                     if hasattr(self._store, "_client") else dist.PrefixStore("nccl", self._store))
            torch.cuda.set_device(self.place.local_rank % max(1, torch.cuda.device_count()))
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timedelta(seconds=self.config.backstop)
            self._nccl = dist.ProcessGroupNCCL(store, self.place.rank, self.place.size, opts)
        return self._nccl

