"""A shared-memory segment for the ranks of one host: layout, lock-free sync, signatures.

The segment holds one sequence flag per local rank, two buffers of per-rank op signatures, one
input slot per rank and a result area.  `ShmSegment` maps it, exchanges and checks signatures
(a CollectiveMismatch on every rank instead of a hang), and detects lost peers; `ShmAllreduce`
(`comm/shm.py`) moves tensors through it.  Local rank 0 creates the file (exclusively, 0600,
never through a link); the others open it only if it is that file (`comm/shmfile.py`).

Synchronisation uses no locks: each rank owns a monotonically increasing int64 sequence flag
on its own 64-byte cache line.  A "sync" increments the own flag and waits until every flag
has reached the same value.  This relies on x86-64 total store order: data written before a
flag store is visible to any core that sees the flag store, and loads are not reordered with
older loads.  (A weakly ordered CPU such as ARM would need explicit fences here.)
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from ..errors import CollectiveMismatch, ConfigError, WorkerLost
from . import ops, shmfile

__all__ = ["Explain", "ShmSegment"]

Explain = Callable[[list[tuple[int, ...]], list[int]], "str | None"]
"""Words a mismatch from the callers' signatures (None: the segment words it itself).

Called with the signatures in local-rank order and the rank reported for each local rank;
`ops.mismatch_message` has this shape.
"""

_LINE = 64                      # bytes per flag: one cache line each, so no false sharing
_SIG_WORDS = 32                 # int64 words per signature slot: [length, internal..., caller's...]
_PAGE = 4096
_INTERNAL = 6                   # kind, op, dtype, numel, root, capacity (indices into ops' tables)
_MAX_USER_SIG = _SIG_WORDS - 1 - _INTERNAL
_BARRIER = ops.COLLECTIVE_INDEX["barrier"]
_BROADCAST = ops.COLLECTIVE_INDEX["broadcast"]
_ROOT = 5                       # index of the root word in a signature slot
_S = TypeVar("_S", bound="ShmSegment")

# Waiting: busy-poll, then sched_yield (lets a co-scheduled peer run), then sleep with backoff.
# Measured on a 2-vCPU KVM guest: with a core per rank, sched_yield/sleep add ~130 us per wait
# (the vCPU gives up its slot), so spin long; with more ranks than cores, spinning starves the
# very peer we wait for (4 ranks on 2 cores: 4 ms per 4 KB op), so yield almost at once.
_SPIN_S, _SPIN_OVERSUBSCRIBED_S = 20e-6, 5e-6
_YIELD_S = 2e-3                 # yield phase length, after the spin phase
_MAX_SLEEP_S = 5e-4             # then sleep with backoff up to this
_CHECK_S = 5e-3                 # liveness/abort/timeout check period while waiting


def _align(n: int, a: int = _PAGE) -> int:
    return (n + a - 1) // a * a


def _to_i64(v: int) -> int:
    if not -(1 << 63) <= v < (1 << 64):
        raise ConfigError(f"signature entry {v!r} does not fit in 64 bits; hash or truncate it")
    return v - (1 << 64) if v >= (1 << 63) else v


def _pid_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass                    # exists but belongs to someone else: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False            # no procfs (or raced with exit): trust os.kill
    # The state letter follows the last ')' (the command name may contain parentheses).
    # 'T'/'t' (stopped) is not dead: a SIGCONT may resume it; the timeout handles it.
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X")


def _name(table: Sequence[object], i: int) -> str:
    return str(table[i]).replace("torch.", "") if 0 <= i < len(table) else f"#{i}"


def _describe(words: tuple[int, ...], root_label: Callable[[int], str]) -> str:
    """The engine's own words of an op, e.g. ``allreduce(op='sum', dtype=float32, numel=10)``."""
    kind, op, dt, numel, root, cap = words[:_INTERNAL]
    parts = [f"op={_name(ops.REDUCE_OPS, op)!r}"] if op >= 0 else []
    if dt >= 0:
        parts += [f"dtype={_name(ops.DTYPES, dt)}", f"numel={numel}"]
    if root >= 0:
        parts.append(f"root={root_label(root)}")
    parts.append(f"capacity_bytes={cap}")
    if len(words) > _INTERNAL:
        parts.append(f"signature={words[_INTERNAL:]}")
    return f"{_name(ops.COLLECTIVES, kind)}({', '.join(parts)})"


class ShmSegment:
    """The segment, its flags and signatures; ops are `ShmAllreduce`'s (a subclass).

    Errors name ranks by `ranks` (the rank reported for each local rank; default the local ranks
    themselves) and every WorkerLost carries `generation`.  A mismatch between the callers'
    signatures is worded by `explain` when given (see `Explain`), else by the segment.
    """

    def __init__(self, path: str, local_rank: int, local_size: int, *, capacity_bytes: int,
                 timeout: float, peer_pids: list[int] | None = None,
                 abort_check: Callable[[], str | None] | None = None,
                 block_bytes: int = 1 << 20, threads: int | None = None,
                 ranks: Sequence[int] | None = None, generation: int | None = None,
                 explain: Explain | None = None) -> None:
        if not isinstance(local_size, int) or local_size < 1:
            raise ConfigError(f"local_size={local_size!r} must be an int >= 1")
        if not isinstance(local_rank, int) or not 0 <= local_rank < local_size:
            raise ConfigError(f"local_rank={local_rank!r} must be an int in [0, {local_size})")
        if not isinstance(capacity_bytes, int) or capacity_bytes < 64:
            raise ConfigError(f"capacity_bytes={capacity_bytes!r} must be an int >= 64, "
                              "e.g. 64 << 20")
        if not isinstance(block_bytes, int) or block_bytes < 64:
            raise ConfigError(f"block_bytes={block_bytes!r} must be an int >= 64, e.g. 1 << 20")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads={threads!r} must be an int >= 1 or None (auto)")
        if not timeout > 0:
            raise ConfigError(f"timeout={timeout!r} must be a positive number of seconds")
        if peer_pids is not None and len(peer_pids) != local_size:
            raise ConfigError(f"peer_pids={peer_pids!r} must list one pid per local rank "
                              f"(length {local_size}, own entry ignored) or be None")
        if ranks is not None and len(ranks) != local_size:
            raise ConfigError(f"ranks={list(ranks)!r} must give one rank per local rank "
                              f"(length {local_size}) or be None")
        self.path, self.local_rank, self.local_size = path, local_rank, local_size
        self.capacity_bytes, self.block_bytes, self.timeout = capacity_bytes, block_bytes, timeout
        self.generation = generation
        self._ranks = None if ranks is None else [int(r) for r in ranks]
        self._labels = self._ranks if self._ranks is not None else list(range(local_size))
        self._explain = explain
        self._abort_check = abort_check
        # Intra-op threads for our (memory-bound) kernels.  More OpenMP threads than cores,
        # summed over the ranks, is catastrophic (measured 30x slower with 2 ranks x 2 threads
        # on 2 cores: spinning OpenMP teams preempt the peer), so default to a fair share.
        ncpu = len(os.sched_getaffinity(0))
        self.threads = threads or max(1, ncpu // local_size)
        self._spin_s = _SPIN_S if local_size <= ncpu else _SPIN_OVERSUBSCRIBED_S
        self._peer_pids = [(r, p) for r, p in enumerate(peer_pids or [])
                           if r != local_rank and p is not None and p != os.getpid()]
        self._peers = [r for r in range(local_size) if r != local_rank]
        self._broken: str | None = None
        self._lost_ranks: list[int] = []
        self._seq = 0           # value of the own flag after the last sync
        self._nops = 0          # ops started; parity selects the signature buffer
        self._next_check = 0.0  # when to check peers next while waiting for the segment

        P = local_size
        sig_off = _LINE * P
        self._slot_stride = _align(capacity_bytes)
        self._data_off = _align(sig_off + 2 * P * _SIG_WORDS * 8)
        self._result_off = self._data_off + P * self._slot_stride
        self.total_bytes = self._result_off + self._slot_stride

        self._fd = self._open()
        self._ident = shmfile.ident(self._fd)
        try:
            # Grow only: a new file is zero-filled, so all flags start at 0.  Never shrink,
            # or a rank mapped with a larger layout would fault (SIGBUS); a capacity mismatch
            # is instead caught by the signature check of the first op.
            if os.fstat(self._fd).st_size < self.total_bytes:
                os.ftruncate(self._fd, self.total_bytes)
            self._mm = mmap.mmap(self._fd, self.total_bytes)
        except BaseException:
            os.close(self._fd)
            if local_rank == 0:
                self.unlink()
            raise
        all_i64 = np.frombuffer(self._mm, dtype=np.int64, count=self._data_off // 8)
        self._flags = all_i64[:sig_off // 8:_LINE // 8]
        self._sigs = all_i64[sig_off // 8:sig_off // 8 + 2 * P * _SIG_WORDS].reshape(
            2, P, _SIG_WORDS)
        if self._flags[local_rank] != 0:
            self.close()
            raise ConfigError(f"shared-memory segment {path!r} is stale (local rank {local_rank}"
                              "'s flag is already set): unlink it or use a fresh path per group")
        self._u8 = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._views: dict[torch.dtype, tuple[list[torch.Tensor], torch.Tensor]] = {}

    # ----------------------------------------------------------------------------- lifecycle
    def _open(self) -> int:
        """Local rank 0 creates the segment (exclusively, at full size, 0600); the others wait
        for it and open it only if it is that file (see `comm/shmfile.py`)."""
        if self.local_rank == 0:
            return shmfile.create_linked(self.path, self.total_bytes)
        fd = shmfile.wait_open(self.path, self.timeout, self._check_creator)
        if fd is None:
            raise self._lost(f"{self._who([0])} did not create the shared-memory segment "
                             f"{self.path!r} within {self.timeout}s (seen by "
                             f"{self._who([self.local_rank])})", [0])
        return fd

    def _check_creator(self) -> None:
        """While waiting for the segment: give up if the job aborts or a peer died."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + _CHECK_S
            self._check_health([0], 0.0)

    def unlink(self) -> None:
        """Remove the file name (if it is still our segment's); existing mappings stay valid.
        Idempotent."""
        shmfile.unlink_if(self.path, self._ident)

    def close(self) -> None:
        """Unmap the segment and close the fd.  Idempotent."""
        if getattr(self, "_fd", None) is None:
            return
        self._views, self._u8 = {}, None  # type: ignore[assignment]
        self._flags = self._sigs = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            pass                # a view still exported elsewhere: unmapped when it dies
        os.close(self._fd)
        self._fd = None  # type: ignore[assignment]
        self._broken = self._broken or "the shared-memory segment is closed"

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- public ops
    def barrier(self) -> None:
        """Block until every local rank has called barrier()."""
        self.exchange(())

    def exchange(self, signature: Sequence[int], *, ignore_last: bool = False,
                 check: bool = True) -> list[tuple[int, ...]]:
        """A barrier that returns every local rank's `signature`, in local-rank order.

        Raises CollectiveMismatch on every local rank if they differ (in all but the last word
        with `ignore_last`; not at all with check=False).
        """
        self._start(_BARRIER, -1, -1, 0, -1, signature)
        self._sync()
        if check:
            self._check(ignore_last)
        # Safe to read until our next sync: no peer rewrites this buffer before then.
        rows = self._sigs[(self._nops - 1) & 1].tolist()
        return [tuple(r[1 + _INTERNAL:1 + r[0]]) for r in rows]

    def _start(self, kind: int, op: int, dtype: int, numel: int, root: int,
               signature: Sequence[int]) -> None:
        if self._broken is not None:
            raise self._unusable()
        if len(signature) > _MAX_USER_SIG:
            raise ConfigError(f"signature has {len(signature)} entries; at most {_MAX_USER_SIG}")
        words = (kind, op, dtype, numel, root, self.capacity_bytes, *signature)
        # Signatures are double-buffered by op parity: a rank writes op k+1's signature only
        # after passing op k's last sync, while a peer may still be checking op k's (right
        # after op k's first sync).  It cannot reach op k+2 before that peer has signalled
        # in op k+1, i.e. finished checking op k, so two buffers suffice.
        slot = self._sigs[self._nops & 1, self.local_rank]
        try:
            slot[1:1 + len(words)] = words
        except (OverflowError, TypeError):
            slot[1:1 + len(words)] = [_to_i64(int(v)) for v in words]
        slot[0] = len(words)
        self._nops += 1

    def _check(self, ignore_last: bool = False, ignore_root: bool = False) -> None:
        """After an op's first sync: raise CollectiveMismatch if the ranks' signatures differ
        (in all but the last word with ignore_last; but the root word with ignore_root)."""
        sigs = self._sigs[(self._nops - 1) & 1]
        mine = sigs[self.local_rank]
        k = 1 + int(mine[0]) - ignore_last     # a differing length differs in word 0
        same = sigs[:, :k] == mine[:k]
        if ignore_root:
            same[:, _ROOT] = True
        if not same.all():
            raise CollectiveMismatch(self._mismatch(sigs))

    def _roots(self) -> list[int]:
        """Every local rank's root word of the current op (after its first sync)."""
        return [int(x) for x in self._sigs[(self._nops - 1) & 1][:, _ROOT]]

    def _mismatch(self, sigs: np.ndarray) -> str:
        """The same text on every rank, whichever op each rank is in."""
        rows = [tuple(int(x) for x in sigs[q, 1:1 + int(sigs[q, 0])])
                for q in range(self.local_size)]
        # an allreduce's root word says where a shared tensor lives: not part of the call
        rows = [r[:_ROOT - 1] + (-1,) + r[_ROOT:] if r and r[0] != _BROADCAST else r
                for r in rows]
        note = ""
        if self._explain is not None:
            try:
                msg = self._explain([r[_INTERNAL:] for r in rows], self._labels)
            except Exception as e:  # a broken explainer must not hide the real error
                msg, note = None, f" (explain failed: {e!r})"
            if msg:
                return msg
        groups: dict[tuple[int, ...], list[int]] = {}
        for q, words in enumerate(rows):
            groups.setdefault(words, []).append(q)
        calls = "; ".join(f"{self._who(qs)} called {_describe(w, lambda r: self._who([r]))}"
                          for w, qs in groups.items())
        return (f"collective mismatch on the shared-memory segment {self.path!r}: {calls}{note}. "
                "Every rank must issue the same collectives in the same order with the same "
                "shapes, dtypes and names")

    def _who(self, local: list[int]) -> str:
        one = len(local) == 1
        loc = f"local rank {local[0]}" if one else f"local rank(s) {local}"
        if self._ranks is None:
            return loc
        glob = [self._ranks[q] for q in local]
        return f"rank {glob[0]} ({loc})" if one else f"rank(s) {glob} ({loc})"

    def _lost(self, msg: str, local: list[int]) -> WorkerLost:
        """Mark the engine failed and build the WorkerLost every later op re-raises."""
        self._broken = msg
        self._lost_ranks = [self._labels[q] for q in local]
        return WorkerLost(msg, lost_ranks=self._lost_ranks, generation=self.generation)

    def _unusable(self) -> WorkerLost:
        return WorkerLost(f"shared-memory group unusable after an earlier failure: "
                          f"{self._broken}", lost_ranks=self._lost_ranks,
                          generation=self.generation)

    def _sync(self) -> None:
        """Bump the own flag and wait until every local rank's flag reaches it."""
        self._seq += 1
        target = self._seq
        flags = self._flags
        flags[self.local_rank] = target   # after all data writes (TSO keeps the order)
        pending = [q for q in self._peers if flags[q] < target]
        if not pending:
            return
        t0 = time.monotonic()
        next_check = t0 + _CHECK_S
        sleep = 2e-5
        while True:
            pending = [q for q in pending if flags[q] < target]
            if not pending:
                return
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _CHECK_S
                self._check_health(pending, now - t0)
            if now - t0 < self._spin_s:
                continue
            if now - t0 < self._spin_s + _YIELD_S:
                os.sched_yield()
            else:
                time.sleep(sleep)
                sleep = min(sleep * 2, _MAX_SLEEP_S)

    def _check_health(self, pending: list[int], waited: float) -> None:
        if self._abort_check is not None:
            reason = self._abort_check()
            if reason is not None:
                raise self._lost(reason, [])
        for q, pid in self._peer_pids:
            if _pid_dead(pid):
                raise self._lost(f"{self._who([q])} (pid {pid}) died during a shared-memory "
                                 f"collective on {self.path!r} (seen by "
                                 f"{self._who([self.local_rank])})", [q])
        if waited > self.timeout:
            raise self._lost(f"{self._who(pending)} did not arrive within {self.timeout}s at a "
                             f"shared-memory collective on {self.path!r} ("
                             f"{self._who([self.local_rank])} waited {waited:.2f}s)", pending)
