"""Intra-host allreduce/broadcast engine over one shared-memory segment.

The ranks of a job that share a host exchange CPU tensors through a file under /dev/shm
instead of TCP.  An allreduce is a reduce-scatter plus an allgather over the segment: every
rank copies the parts of its input that *others* reduce into its input slot, rank r reduces
chunk r (its own part straight from its tensor, the peers' parts from their slots) into its
tensor and into the shared result area, then copies the other chunks out of the result area.
Work is pipelined in blocks of ``block_bytes`` so the data a peer just wrote is still in the
shared L3 cache when it is read.  Torch kernels do the arithmetic and copies (they release
the GIL and vectorise).

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
from collections.abc import Callable

import numpy as np
import torch

from phalanx.errors import CollectiveMismatch, WorkerLost

__all__ = ["ShmAllreduce"]

_LINE = 64                      # bytes per flag: one cache line each, so no false sharing
_SIG_WORDS = 32                 # int64 words per signature slot: [length, internal..., user...]
_PAGE = 4096
_INTERNAL = 6                   # kind, op, dtype, numel, root, capacity
_MAX_USER_SIG = _SIG_WORDS - 1 - _INTERNAL
_OPS = ("sum", "avg", "min", "max", "prod")
_KINDS = ("barrier", "allreduce", "broadcast")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
           torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
           torch.complex64, torch.complex128)
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
        raise ValueError(f"signature entry {v!r} does not fit in 64 bits; hash or truncate it")
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


class ShmAllreduce:
    """Allreduce among the ranks of one host through one shared-memory segment."""

    def __init__(self, path: str, local_rank: int, local_size: int, *, capacity_bytes: int,
                 timeout: float, peer_pids: list[int] | None = None,
                 abort_check: Callable[[], str | None] | None = None,
                 block_bytes: int = 1 << 20, threads: int | None = None) -> None:
        if not isinstance(local_size, int) or local_size < 1:
            raise ValueError(f"local_size={local_size!r} must be an int >= 1")
        if not isinstance(local_rank, int) or not 0 <= local_rank < local_size:
            raise ValueError(f"local_rank={local_rank!r} must be an int in [0, {local_size})")
        if not isinstance(capacity_bytes, int) or capacity_bytes < 64:
            raise ValueError(f"capacity_bytes={capacity_bytes!r} must be an int >= 64, "
                             "e.g. 64 << 20")
        if not isinstance(block_bytes, int) or block_bytes < 64:
            raise ValueError(f"block_bytes={block_bytes!r} must be an int >= 64, e.g. 1 << 20")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r} must be an int >= 1 or None (auto)")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
        if peer_pids is not None and len(peer_pids) != local_size:
            raise ValueError(f"peer_pids={peer_pids!r} must list one pid per local rank "
                             f"(length {local_size}, own entry ignored) or be None")
        self.path, self.local_rank, self.local_size = path, local_rank, local_size
        self.capacity_bytes, self.block_bytes, self.timeout = capacity_bytes, block_bytes, timeout
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
        self._seq = 0           # value of the own flag after the last sync
        self._nops = 0          # ops started; parity selects the signature buffer

        P = local_size
        sig_off = _LINE * P
        self._slot_stride = _align(capacity_bytes)
        self._data_off = _align(sig_off + 2 * P * _SIG_WORDS * 8)
        self._result_off = self._data_off + P * self._slot_stride
        self.total_bytes = self._result_off + self._slot_stride

        self._fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            # Grow only: a new file is zero-filled, so all flags start at 0.  Never shrink,
            # or a rank mapped with a larger layout would fault (SIGBUS); a capacity mismatch
            # is instead caught by the signature check of the first op.
            if os.fstat(self._fd).st_size < self.total_bytes:
                os.ftruncate(self._fd, self.total_bytes)
            self._mm = mmap.mmap(self._fd, self.total_bytes)
        except BaseException:
            os.close(self._fd)
            raise
        all_i64 = np.frombuffer(self._mm, dtype=np.int64, count=self._data_off // 8)
        self._flags = all_i64[:sig_off // 8:_LINE // 8]
        self._sigs = all_i64[sig_off // 8:sig_off // 8 + 2 * P * _SIG_WORDS].reshape(
            2, P, _SIG_WORDS)
        if self._flags[local_rank] != 0:
            self.close()
            raise ValueError(f"shared-memory segment {path!r} is stale (local rank {local_rank}"
                             "'s flag is already set): unlink it or use a fresh path per group")
        self._u8 = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._views: dict[torch.dtype, tuple[list[torch.Tensor], torch.Tensor]] = {}

    # ----------------------------------------------------------------------------- lifecycle
    def unlink(self) -> None:
        """Remove the file name; existing mappings stay valid.  Idempotent."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

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
        self._broken = self._broken or "ShmAllreduce is closed"

    def __enter__(self) -> ShmAllreduce:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- public ops
    def barrier(self) -> None:
        """Block until every local rank has called barrier()."""
        self._start(0, 0, 0, 0, 0, ())
        self._sync()
        self._check_signatures(None)

    def allreduce_(self, tensor: torch.Tensor, op: str, signature: tuple[int, ...] = (), *,
                   describe: Callable[[tuple[int, ...]], str] | None = None) -> None:
        """Reduce ``tensor`` in place across the local ranks with ``op``."""
        flat = self._check_tensor(tensor, "tensor")
        dt = tensor.dtype
        if op not in _OPS:
            raise ValueError(f"op={op!r} is not one of {_OPS}")
        if op == "avg" and not (dt.is_floating_point or dt.is_complex):
            raise ValueError(f"op='avg' needs a floating or complex tensor, got {dt}; "
                             "use 'sum' and divide yourself")
        if op in ("min", "max") and dt.is_complex:
            raise ValueError(f"op={op!r} is undefined for complex dtype {dt}; use a real view")
        fn: Callable[..., torch.Tensor]
        if dt == torch.bool:
            fn = torch.logical_or if op in ("sum", "max") else torch.logical_and
        else:
            table: dict[str, Callable[..., torch.Tensor]] = {
                "sum": torch.add, "avg": torch.add, "prod": torch.mul,
                "min": torch.minimum, "max": torch.maximum}
            fn = table[op]
        n = flat.numel()
        self._start(1, _OPS.index(op), _DTYPES.index(dt), n, 0, signature)
        if n == 0:
            self._sync()
            self._check_signatures(describe)
            return
        slots, result = self._dtype_views(dt)
        me, P = self.local_rank, self.local_size
        mine, peers = slots[me], [slots[q] for q in self._peers]

        def bounds(b0: int, b1: int) -> tuple[int, int]:
            return b0 + (b1 - b0) * me // P, b0 + (b1 - b0) * (me + 1) // P

        def copy_in(base: int, b0: int, b1: int) -> None:
            # Only the parts others reduce: rank r reads its own chunk from its tensor.
            c0, c1 = bounds(b0, b1)
            if c0 > b0:
                mine[b0:c0].copy_(flat[base + b0:base + c0])
            if b1 > c1:
                mine[c1:b1].copy_(flat[base + c1:base + b1])

        def work(base: int, b0: int, b1: int) -> None:
            c0, c1 = bounds(b0, b1)
            if c1 == c0:
                return
            out = flat[base + c0:base + c1]
            for s in peers:
                fn(out, s[c0:c1], out=out)
            if op == "avg":
                out.div_(P)
            result[c0:c1].copy_(out)

        def copy_out(base: int, b0: int, b1: int) -> None:
            c0, c1 = bounds(b0, b1)
            if c0 > b0:
                flat[base + b0:base + c0].copy_(result[b0:c0])
            if b1 > c1:
                flat[base + c1:base + b1].copy_(result[c1:b1])

        self._run(n, tensor.element_size(), copy_in, work, copy_out, False, describe)

    def broadcast_(self, tensor: torch.Tensor, root: int, signature: tuple[int, ...] = (), *,
                   describe: Callable[[tuple[int, ...]], str] | None = None) -> None:
        """Overwrite ``tensor`` on every local rank with local rank ``root``'s tensor."""
        flat = self._check_tensor(tensor, "tensor")
        if not isinstance(root, int) or not 0 <= root < self.local_size:
            raise ValueError(f"root={root!r} must be a local rank in [0, {self.local_size})")
        n = flat.numel()
        self._start(2, 0, _DTYPES.index(tensor.dtype), n, root, signature)
        if n == 0:
            self._sync()
            self._check_signatures(describe)
            return
        src = self._dtype_views(tensor.dtype)[0][root]
        is_root = self.local_rank == root

        def copy_in(base: int, b0: int, b1: int) -> None:
            if is_root:
                src[b0:b1].copy_(flat[base + b0:base + b1])

        def copy_out(base: int, b0: int, b1: int) -> None:
            if not is_root:
                flat[base + b0:base + b1].copy_(src[b0:b1])

        # trailing sync: non-roots read the root's *input slot* after the last sync, which
        # the root would overwrite in its next op before any sync.
        self._run(n, tensor.element_size(), copy_in, None, copy_out, True, describe)

    # ------------------------------------------------------------------------------ helpers
    def _check_tensor(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        if self._broken is not None:
            raise WorkerLost(f"shared-memory group unusable after an earlier failure: "
                             f"{self._broken}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor (got device="
                             f"{tensor.device}, contiguous={tensor.is_contiguous()}); "
                             "pass tensor.contiguous().cpu() and copy back")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}.dtype={tensor.dtype} is not supported; one of {_DTYPES}")
        if tensor.element_size() > self.capacity_bytes:
            raise ValueError(f"capacity_bytes={self.capacity_bytes} is smaller than one element")
        return tensor.view(-1)

    def _dtype_views(self, dt: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        v = self._views.get(dt)
        if v is None:
            nb = self.capacity_bytes // torch.empty((), dtype=dt).element_size()
            nb *= torch.empty((), dtype=dt).element_size()

            def at(off: int) -> torch.Tensor:
                return self._u8[off:off + nb].view(dt)
            v = ([at(self._data_off + q * self._slot_stride) for q in range(self.local_size)],
                 at(self._result_off))
            self._views[dt] = v
        return v

    def _start(self, kind: int, op: int, dtype: int, numel: int, root: int,
               signature: tuple[int, ...]) -> None:
        if self._broken is not None:
            raise WorkerLost(f"shared-memory group unusable after an earlier failure: "
                             f"{self._broken}")
        if len(signature) > _MAX_USER_SIG:
            raise ValueError(f"signature has {len(signature)} entries; at most {_MAX_USER_SIG}")
        words = [kind, op, dtype, numel, root, self.capacity_bytes]
        words += [_to_i64(int(v)) for v in signature]
        # Signatures are double-buffered by op parity: a rank writes op k+1's signature only
        # after passing op k's last sync, while a peer may still be checking op k's (right
        # after op k's first sync).  It cannot reach op k+2 before that peer has signalled
        # in op k+1, i.e. finished checking op k, so two buffers suffice.
        slot = self._sigs[self._nops & 1, self.local_rank]
        slot[0] = len(words)
        slot[1:1 + len(words)] = words
        self._nops += 1

    def _check_signatures(self, describe: Callable[[tuple[int, ...]], str] | None) -> None:
        sigs = self._sigs[(self._nops - 1) & 1]
        if (sigs == sigs[self.local_rank]).all():
            return
        groups: dict[tuple[int, ...], list[int]] = {}
        for q in range(self.local_size):
            groups.setdefault(tuple(int(x) for x in sigs[q, 1:1 + int(sigs[q, 0])]),
                              []).append(q)
        parts = []
        for words, ranks in groups.items():
            kind, op, dt, numel, root, cap = words[:_INTERNAL]
            user = words[_INTERNAL:]
            what = f"{_KINDS[kind]}"
            if kind == 1:
                what += f"(op={_OPS[op]}, dtype={_DTYPES[dt]}, numel={numel})"
            elif kind == 2:
                what += f"(root={root}, dtype={_DTYPES[dt]}, numel={numel})"
            what += f" capacity_bytes={cap} signature={user}"
            if describe is not None:
                try:
                    what += f" [{describe(user)}]"
                except Exception as e:  # a broken decoder must not hide the real error
                    what += f" [describe failed: {e!r}]"
            parts.append(f"local rank(s) {ranks}: {what}")
        raise CollectiveMismatch("local ranks called different collectives on the "
                                 f"shared-memory segment {self.path!r}: " + "; ".join(parts))

    def _run(self, n: int, esize: int, copy_in: Callable, work: Callable | None,
             copy_out: Callable, trailing_sync: bool, describe: Callable | None) -> None:
        """Pipeline over rounds of capacity_bytes and blocks of block_bytes.

        Per round: copy_in(0); sync; for each block j: work(j); copy_in(j+1); sync;
        copy_out(j).  Why this is race-free across blocks, rounds and ops:
        * work(j) reads the peers' input slots of block j, written before the sync it follows.
        * copy_out(j) reads result[j], written by every work(j) before the sync it follows.
        * Input slots are rewritten (next round/op) only after the round's last sync, by
          which every rank has finished all its work() reads of them.
        * The result area is rewritten only by work(), i.e. after the first sync of the next
          round/op, which every rank reaches only after finishing its copy_out() reads.
        Block ranges are disjoint, so overlapping copy_in(j+1)/copy_out(j) never collide.
        """
        nt = torch.get_num_threads()
        if nt != self.threads:
            torch.set_num_threads(self.threads)   # per calling thread under OpenMP
        try:
            self._rounds(n, esize, copy_in, work, copy_out, describe)
        finally:
            if nt != self.threads:
                torch.set_num_threads(nt)
        if trailing_sync:
            self._sync()

    def _rounds(self, n: int, esize: int, copy_in: Callable, work: Callable | None,
                copy_out: Callable, describe: Callable | None) -> None:
        cap = self.capacity_bytes // esize
        blk = max(1, self.block_bytes // esize)
        first = True
        for base in range(0, n, cap):
            m = min(cap, n - base)
            blocks = [(b, min(m, b + blk)) for b in range(0, m, blk)]
            copy_in(base, *blocks[0])
            self._sync()
            if first:
                self._check_signatures(describe)
                first = False
            for j, (b0, b1) in enumerate(blocks):
                if work is not None:
                    work(base, b0, b1)
                if j + 1 < len(blocks):
                    copy_in(base, *blocks[j + 1])
                self._sync()
                copy_out(base, b0, b1)

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
        def lost(msg: str, ranks: list[int]) -> WorkerLost:
            self._broken = msg
            return WorkerLost(msg, lost_ranks=ranks)

        if self._abort_check is not None:
            reason = self._abort_check()
            if reason is not None:
                self._broken = reason
                raise WorkerLost(reason)
        for q, pid in self._peer_pids:
            if _pid_dead(pid):
                raise lost(f"local rank {q} (pid {pid}) died during a shared-memory collective "
                           f"on {self.path!r} (seen by local rank {self.local_rank})", [q])
        if waited > self.timeout:
            raise lost(f"local rank(s) {pending} did not arrive within {self.timeout}s at a "
                       f"shared-memory collective on {self.path!r} (local rank "
                       f"{self.local_rank} waited {waited:.2f}s)", pending)
