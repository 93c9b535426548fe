"""One generation's communicator: a Gloo process group, the shared-memory path, NCCL for CUDA.

A `Group` is built after each rendezvous and thrown away when membership changes. It runs
every collective through one ordered executor, checks signatures across ranks (so a mismatch
fails on every rank instead of hanging), and turns transport failures into `WorkerLost`, which
always names global ranks and carries the generation, whichever path failed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import CollectiveMismatch, PhalanxError, WorkerLost
from . import graveyard, ops
from .shmbuf import SharedBuffers
from .shmnames import segment_path
from .work import Handle, OrderedExecutor

if TYPE_CHECKING:
    from ..observe import Recorder
    from .hier import Hierarchy
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

    def local_ranks(self) -> list[int]:
        """Each global rank's local rank on its host (ranks are packed host by host)."""
        seen: dict[str, int] = {}
        local: list[int] = []
        for h in self.hosts:
            local.append(seen.get(h, 0))
            seen[h] = local[-1] + 1
        return local

    def _cross(self) -> list[int]:
        """Global ranks with this worker's local rank, one per host, in host order."""
        return [i for i, q in enumerate(self.local_ranks()) if q == self.local_rank]

    @property
    def uniform(self) -> bool:
        """Several hosts, each with the same number (more than one) of this generation's ranks:
        the layout the hierarchical collectives need."""
        counts = {h: self.hosts.count(h) for h in self.hosts}
        return len(counts) > 1 and len(set(counts.values())) == 1 and self.local_size > 1


class TransportError(RuntimeError):
    """A process-group operation failed in transport (peer gone, connection reset, timeout)."""


def brief(e: BaseException, limit: int = 160) -> str:
    """A transport error in one short phrase: its first line, without Gloo's source location
    and advice ("This is typically caused by ..."), at most `limit` characters."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[^\]]*:\d+\]\s*", "", lines[0]) if lines else type(e).__name__
    text = text.split(". This is typically caused", 1)[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Group:
    """Collectives among the ranks of one generation.

    `secret` is a key every rank of the job holds and no other local user does (the job's
    secret, or a key derived from it): the names of the shared-memory files derive from it
    (`comm/shmnames.py`), so nobody else can plant one.
    """

    def __init__(self, place: Placement, store: dist.Store, config: Config, *, job_id: str,
                 secret: str | bytes, abort_check: Callable[[], str | None] | None = None,
                 status: Callable[[], list[int]] | None = None,
                 recorder: Recorder | None = None, scope: str = "") -> None:
        self.place = place
        self.job_id = job_id
        self._secret = secret
        self.members: tuple[int, ...] | None = None
        """For a subgroup (`subgroup.open_subgroup`): the job ranks of its members."""
        self.subgroups: dict[tuple[int, ...], Group] = {}
        """This generation's subgroups this rank belongs to, by member ranks."""
        self._scope = scope
        self.recorder = recorder
        self.config = config
        self._store = store
        self._abort_check = abort_check
        self._lost_ranks = status
        self.broken: str | None = None
        self._started = 0
        self._since: float | None = None
        try:
            # Typed Any: torch's stubs omit the backend's collective methods.
            self.pg: Any = dist.ProcessGroupGloo(store, place.rank, place.size, self._gloo_opts())
        except RuntimeError as e:
            raise WorkerLost(f"could not connect the generation {place.generation} process "
                             f"group: {e}", generation=place.generation) from e
        self._nccl: Any = None
        self._nccl_ok: bool | None = None
        self._keep_store: dist.Store | None = None
        self._inflight: list[Any] = []
        self._exec = OrderedExecutor(f"phalanx-comm-g{place.generation}")
        self.shm: ShmAllreduce | None = None
        """The shared-memory engine when every rank is on this host."""
        self.hier: Hierarchy | None = None
        """Host-level shared memory plus cross-host Gloo, when the hosts are `uniform`."""
        self.shm_path = segment_path(job_id, place.generation, secret=secret)
        try:
            path = self._pick_path()
            if path == "shm":
                self.shm = self._open_shm()
                self.shm.buffers = SharedBuffers(self.shm_path, place.local_rank,
                                                 place.generation, secret=secret)
            elif path == "hier":
                self._open_hier()
        except BaseException:
            self.close()  # a refused segment (planted by someone else) leaves nothing behind
            raise

    # ----------------------------------------------------------------- setup
    def _pick_path(self) -> str:
        """'shm', 'hier' or 'gloo', from the configured algorithm and the placement."""
        algo, place = self.config.allreduce_algo, self.place
        one_host = place.size > 1 and place.local_size == place.size
        if one_host and algo in ("auto", "shm"):
            return "shm"
        if place.uniform and algo in ("auto", "hier"):
            return "hier"
        if algo in ("shm", "hier") and place.rank == 0:
            log.warning("allreduce_algo=%r needs %s; this generation has %d rank(s) on hosts "
                        "%s: using Gloo", algo, "every rank on one host" if algo == "shm" else
                        "several hosts with the same number (>1) of ranks each", place.size,
                        sorted(set(place.hosts)))
        return "gloo"

    def _open_hier(self) -> None:
        from .hier import Hierarchy
        place = self.place
        # Segment names carry the host, so hosts that share a /dev/shm (one machine listed
        # under several names) never collide.
        host_index = sorted(set(place.hosts)).index(place.hosts[place.rank])
        self.shm_path = segment_path(self.job_id, place.generation, secret=self._secret,
                                     host=host_index)
        cross_ranks = place._cross()
        try:
            cross = dist.ProcessGroupGloo(self._sub_store(f"cross{place.local_rank}"),
                                          place.cross_rank, place.cross_size, self._gloo_opts())
        except RuntimeError as e:
            raise WorkerLost(f"could not connect the generation {place.generation} cross-host "
                             f"group of local rank {place.local_rank}: {e}",
                             generation=place.generation) from e
        self.hier = Hierarchy(self._open_shm(), cross, place.cross_rank, place.cross_size,
                              place.size, self.wait, cross_ranks, self.track)

    def _gloo_opts(self) -> Any:
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.config.bind_addr)]
        opts._timeout = timedelta(seconds=self.config.backstop)
        return opts

    def _sub_store(self, scope: str) -> dist.Store:
        """A store for another process group of this generation, keys under `scope`."""
        from .store import CoordStore
        if isinstance(self._store, CoordStore):
            return CoordStore(self._store._client,
                              f"g{self.place.generation}/{self._scope}{scope}",
                              timeout=self._store._timeout_s,
                              abort_check=self._store._abort_check)
        return dist.PrefixStore(scope, self._store)

    def _open_shm(self) -> ShmAllreduce:
        from .shm import ShmAllreduce
        me = self.place.hosts[self.place.rank]
        # Local rank q on this host is the q-th rank i with hosts[i] == this host.
        host_ranks = [i for i, h in enumerate(self.place.hosts) if h == me]
        shm = ShmAllreduce(self.shm_path, self.place.local_rank, self.place.local_size,
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
            shm.unlink()
            shm.close()
            raise WorkerLost(f"a peer was lost while generation {self.place.generation} set up "
                             f"shared memory: {e}", generation=self.place.generation) from e
        if self.place.local_rank == 0:
            shm.unlink()
        return shm

    def close(self) -> None:
        """Release the subgroups, the executor, the shared segment and the process groups."""
        for sub in self.subgroups.values():
            sub.close()
        self.subgroups = {}
        self._exec.close()
        if self.shm is not None:
            if self.shm.buffers is not None:
                self.shm.buffers.close()
            self.shm.unlink()
            self.shm.close()
            self.shm = None
        pgs = [self._nccl, self.pg]
        if self.hier is not None:
            pgs.append(self.hier.cross)
            self.hier.local.unlink()
            self.hier.local.close()
            self.hier = None
        inflight = graveyard.pending(self._inflight)
        self._inflight = []
        if inflight:
            # Shutting down or dropping these would block this process (see comm/graveyard.py).
            graveyard.bury(inflight, pgs, self.config.backstop + 10.0)
        else:
            graveyard.sweep()
            for pg in pgs:
                if pg is not None:
                    try:
                        pg.shutdown()  # type: ignore[attr-defined]
                    except (RuntimeError, AttributeError):
                        pass
        self._nccl = None

    def shared_buffers(self) -> SharedBuffers | None:
        """Where to allocate CPU tensors this group reduces often (gradient buckets) so the
        shared-memory allreduce reads them in place; None when the group is not one host's."""
        return self.shm.buffers if self.shm is not None else None

    # ----------------------------------------------------------------- plumbing
    def _guard(self, what: str, fn: Callable[[], T], queued: float | None = None,
               info: dict[str, Any] | None = None) -> T:
        if self.broken:
            raise WorkerLost(f"{what}: generation {self.place.generation} is broken "
                             f"({self.broken}); re-form the group", generation=self.place.generation)
        self._started += 1
        self._since = time.monotonic()
        start = time.perf_counter()
        try:
            value = fn()
            if self.recorder is not None:
                self.recorder.collective(what, queued, start, time.perf_counter(), info)
            return value
        except WorkerLost as e:
            self.broken = str(e)
            if e.generation is None:
                e.generation = self.place.generation
            raise
        except TransportError as e:
            lost = self._lost_ranks() if self._lost_ranks else []
            who = f"rank(s) {lost}" if lost else "a peer"
            hosts = sorted({self.place.hosts[r] for r in lost if 0 <= r < len(self.place.hosts)})
            if hosts and len(set(self.place.hosts)) > 1:  # a job across hosts: say which
                who += f" (on host {', '.join(hosts)})"
            self.broken = f"{who} failed during {what}"
            me = self.place.rank if self.members is None else (
                f"{self.members[self.place.rank]} (in the subgroup of ranks {list(self.members)})")
            raise WorkerLost(f"{what} failed on rank {me}: {who} of generation "
                             f"{self.place.generation} died, stopped or was cut off ({brief(e)})",
                             lost_ranks=lost, generation=self.place.generation) from e
        finally:
            self._since = None

    def progress(self) -> tuple[int, float]:
        """(collectives started in this generation, seconds the current one has taken so far):
        the heartbeat carries it, so the coordinator can tell a rank its peers wait on."""
        since = self._since
        return self._started, (time.monotonic() - since) if since is not None else 0.0

    def run(self, what: str, fn: Callable[[], T], info: dict[str, Any] | None = None) -> T:
        """Run a collective now, in issue order (`info`: name and bytes, for the timeline)."""
        return self._exec.run(lambda: self._guard(what, fn, None, info))

    def submit(self, what: str, fn: Callable[[], T],
               info: dict[str, Any] | None = None) -> Handle[T]:
        """Queue a collective on the comm thread; the handle's wait() returns its result."""
        queued = time.perf_counter()
        return self._exec.submit(lambda: self._guard(what, fn, queued, info))

    def wait(self, work: dist.Work) -> None:
        """Wait for a process-group operation; transport failures become TransportError.

        A peer that left this generation for a recovery without a transport error (it saw a
        loss first) leaves us blocked in Gloo until its timeout: so while waiting, poll the
        coordinator's verdict (cheap: the heartbeat's cached status) and give up on it."""
        if self._abort_check is not None and not work.is_completed():
            try:
                self._wait_watching(work)
            except TransportError:
                self.track(work)    # abandoned in flight: it must outlive this group
                raise
        try:
            work.wait()
        except RuntimeError as e:
            raise TransportError(str(e)) from e

    def track(self, work: Any) -> None:
        """Remember an operation that may still be in flight when the group closes."""
        self._inflight = [*graveyard.pending(self._inflight), work]

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
        rec = self.recorder
        if rec is None or not rec.tracing:
            return self._agree(sig)
        start = rec.now()
        try:
            return self._agree(sig)
        finally:
            rec.span("collective", "negotiate", start, rec.now(), lane="collectives")

    def _agree(self, sig: tuple[int, ...]) -> list[tuple[int, ...]]:
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

    @property
    def nccl_ok(self) -> bool:
        """CUDA tensors can go through NCCL: it is built in, and this host has a GPU for each of
        its ranks (NCCL refuses two ranks on one device). Otherwise they are staged through
        host memory and take the CPU path (shared memory / Gloo)."""
        if self._nccl_ok is None:
            self._nccl_ok = bool(dist.is_nccl_available() and torch.cuda.is_available()
                                 and torch.cuda.device_count() >= self.place.local_size)
            if not self._nccl_ok and self.place.rank == 0:
                log.warning("CUDA tensors are staged through host memory: %d rank(s) per host, "
                            "%d GPU(s) on this one%s", self.place.local_size,
                            torch.cuda.device_count(),
                            "" if dist.is_nccl_available() else ", and no NCCL in this torch")
        return self._nccl_ok

    def nccl(self) -> Any:
        """The NCCL group for CUDA tensors, created on first use."""
        if self._nccl is None:
            if not dist.is_nccl_available():
                raise PhalanxError("a CUDA tensor was passed but this torch build has no NCCL")
            # NCCL bootstraps lazily, at the first collective, through the Python store: keep
            # it referenced, or its overrides are gone by then ("Not implemented").
            store = self._keep_store = self._sub_store("nccl")
            torch.cuda.set_device(self.place.local_rank % max(1, torch.cuda.device_count()))
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timedelta(seconds=self.config.backstop)
            self._nccl = dist.ProcessGroupNCCL(store, self.place.rank, self.place.size, opts)
        return self._nccl

