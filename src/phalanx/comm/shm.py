"""Intra-host allreduce/broadcast engine over one shared-memory segment.

The ranks of a job that share a host exchange CPU tensors through a file under /dev/shm
instead of TCP.  An allreduce is a reduce-scatter plus an allgather over the segment: every
rank copies the parts of its input that *others* reduce into its input slot, rank r reduces
chunk r (its own part straight from its tensor, the peers' parts from their slots) into its
tensor and into the shared result area, then copies the other chunks out of the result area.
Work is pipelined in blocks of ``block_bytes`` so the data a peer just wrote is still in the
shared L3 cache when it is read.  Torch kernels do the arithmetic and copies (they release
the GIL and vectorise).

The segment, its lock-free synchronisation and the signature checks are `ShmSegment`'s
(`comm/shmsync.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError
from . import ops
from .shmbuf import SharedBuffers
from .shmsync import Explain, ShmSegment

__all__ = ["Explain", "ShmAllreduce"]

_ALLREDUCE = ops.COLLECTIVE_INDEX["allreduce"]
_BROADCAST = ops.COLLECTIVE_INDEX["broadcast"]
# Kernels per op; torch.minimum/maximum propagate NaN, as numpy's np.minimum/np.maximum do.
_FN: dict[str, Callable[..., torch.Tensor]] = {
    "sum": torch.add, "avg": torch.add, "prod": torch.mul, "min": torch.minimum,
    "max": torch.maximum}
_BOOL_FN: dict[str, Callable[..., torch.Tensor]] = {
    "sum": torch.logical_or, "max": torch.logical_or, "prod": torch.logical_and,
    "min": torch.logical_and}


def _chunk(b0: int, b1: int, q: int, P: int) -> tuple[int, int]:
    """Local rank q's part of block [b0, b1): the q-th of P near-equal contiguous chunks."""
    return b0 + (b1 - b0) * q // P, b0 + (b1 - b0) * (q + 1) // P


class ShmAllreduce(ShmSegment):
    """Allreduce and broadcast among the ranks of one host through one shared-memory segment.

    Takes `ShmSegment`'s arguments (path, local rank and size, capacity_bytes, timeout,
    peer_pids, abort_check, block_bytes, threads, ranks, generation, explain). With `buffers`
    set, an allreduce of a tensor in one of them skips the slots when every rank's is shared.
    """

    buffers: SharedBuffers | None = None

    def allreduce_(self, tensor: torch.Tensor, op: str, signature: Sequence[int] = ()) -> None:
        """Reduce `tensor` in place across the local ranks with `op` (NaN propagates in min/max).

        A tensor that requires grad is reduced as data, like Gloo does: autograd does not see it.
        """
        flat = self._check_tensor(tensor)
        dt = flat.dtype
        ops.check_op(op, dt)
        fn = _BOOL_FN[op] if dt == torch.bool else _FN[op]
        n = flat.numel()
        where = self.buffers.locate(flat) if self.buffers is not None else -1
        # The root word says where a shared tensor lives (-1: private); ranks may differ.
        self._start(_ALLREDUCE, ops.OP_INDEX[op], ops.DTYPE_INDEX[dt], n, where, signature)
        if n == 0:
            self._sync()
            self._check(ignore_root=True)
            return
        slots, result = self._dtype_views(dt)
        me, P = self.local_rank, self.local_size
        mine, peers = slots[me], [slots[q] for q in self._peers]

        def bounds(b0: int, b1: int) -> tuple[int, int]:
            return _chunk(b0, b1, me, P)

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

        self._run(n, flat.element_size(), copy_in, work, copy_out, False,
                  lambda: self._in_place(flat, fn, op, where))

    def _in_place(self, flat: torch.Tensor, fn: Callable, op: str, where: int) -> bool:
        """After the first sync: if every rank's tensor is a shared buffer, reduce straight
        between them (no slots, no result area) and return True.

        Block by block, rank r reduces chunk r of every rank's block into its own tensor, then
        after a sync copies the other chunks from their reducers' tensors; a last sync keeps
        every buffer unchanged until all peers have read it.
        """
        wheres = self._roots()
        if min(wheres) < 0 or self.buffers is None:
            return False
        me, P, n, dt = self.local_rank, self.local_size, flat.numel(), flat.dtype
        peers = {q: self.buffers.peer(q, wheres[q], n, dt) for q in self._peers}
        blk = max(1, self.block_bytes // flat.element_size())
        for b0 in range(0, n, blk):
            b1 = min(n, b0 + blk)
            c0, c1 = _chunk(b0, b1, me, P)
            out = flat[c0:c1]
            for t in peers.values():
                fn(out, t[c0:c1], out=out)
            if op == "avg":
                out.div_(P)
            self._sync()
            for q, t in peers.items():
                d0, d1 = _chunk(b0, b1, q, P)
                flat[d0:d1].copy_(t[d0:d1])
        self._sync()
        self.buffers.mapped(where)
        return True

    def allreduce_around_(self, tensor: torch.Tensor, op: str,
                          between: Callable[[torch.Tensor], Callable[[], None]],
                          piece_bytes: int = 8 << 20) -> None:
        """Allreduce with a step between the halves: the hierarchical path's host level.

        Per round of `capacity_bytes`: reduce-scatter (local rank q ends with the reduction of
        the q-th of `local_size` near-equal contiguous chunks, in place in `tensor`), then
        `between` on that chunk (the cross-host allreduce; it may rewrite it), then an allgather
        that gives every local rank every chunk. The chunk is handed to `between` in pieces of
        about `piece_bytes` as each is reduced; `between` may start its work in the background
        and return the function that finishes it, so the next piece is reduced while the last
        one crosses the network. 'avg' reduces as 'sum' here: `between` divides. Signatures
        are the caller's to agree (across hosts); the segment still checks its own words.
        """
        flat = self._check_tensor(tensor)
        dt = flat.dtype
        ops.check_op(op, dt)
        fn = _BOOL_FN[op] if dt == torch.bool else _FN[op]
        n = flat.numel()
        self._start(_ALLREDUCE, ops.OP_INDEX[op], ops.DTYPE_INDEX[dt], n, -1, ())
        slots, result = self._dtype_views(dt)
        mine, peers = slots[self.local_rank], [slots[q] for q in self._peers]
        cap = self.capacity_bytes // flat.element_size()
        piece = max(1, piece_bytes // flat.element_size())
        nt = torch.get_num_threads()
        if nt != self.threads:
            torch.set_num_threads(self.threads)
        try:
            for base in range(0, max(n, 1), cap):
                self._around_round(flat[base:base + min(cap, n - base)], fn, between, piece,
                                   mine, peers, result, first=base == 0)
        finally:
            if nt != self.threads:
                torch.set_num_threads(nt)

    def _around_round(self, seg: torch.Tensor, fn: Callable, between: Callable, piece: int,
                      mine: torch.Tensor, peers: list[torch.Tensor], result: torch.Tensor,
                      first: bool) -> None:
        """One round of allreduce_around_, pipelined piece by piece (same count on every rank).

        Piece j of every rank's chunk: copy in the parts others reduce, sync, reduce ours and
        start `between` on it; then, as each finishes, publish it, sync, copy the others' out.
        Slots are read only at the positions of the piece the sync before released; the result
        area is written only after this op's first sync (every rank has read the last op's).
        """
        m, me, P = seg.numel(), self.local_rank, self.local_size
        bounds = [(m * q // P, m * (q + 1) // P) for q in range(P)]
        offsets = range(0, max(1, -(-m // P)), piece)

        def part(q: int, off: int) -> tuple[int, int]:
            b0, b1 = bounds[q]
            return min(b1, b0 + off), min(b1, b0 + off + piece)

        pending = []
        for off in offsets:
            for q in self._peers:
                p0, p1 = part(q, off)
                mine[p0:p1].copy_(seg[p0:p1])
            self._sync()
            if first:
                self._check()
                first = False
            p0, p1 = part(me, off)
            out = seg[p0:p1]
            for s in peers:
                fn(out, s[p0:p1], out=out)
            pending.append(between(out))
        for off, finish in zip(offsets, pending):
            finish()
            p0, p1 = part(me, off)
            result[p0:p1].copy_(seg[p0:p1])
            self._sync()
            for q in self._peers:
                p0, p1 = part(q, off)
                seg[p0:p1].copy_(result[p0:p1])

    def broadcast_(self, tensor: torch.Tensor, root: int, signature: Sequence[int] = ()) -> None:
        """Overwrite `tensor` on every local rank with local rank `root`'s tensor."""
        flat = self._check_tensor(tensor)
        if not isinstance(root, int) or not 0 <= root < self.local_size:
            raise ConfigError(f"root={root!r} must be a local rank in [0, {self.local_size})")
        dt = ops.DTYPE_INDEX.get(flat.dtype)
        if dt is None:
            raise ConfigError(f"tensor dtype {flat.dtype} is not supported by phalanx "
                              f"collectives; cast to one of {[str(d) for d in ops.DTYPES]}")
        n = flat.numel()
        self._start(_BROADCAST, -1, dt, n, root, signature)
        if n == 0:
            self._sync()
            self._check()
            return
        src = self._dtype_views(flat.dtype)[0][root]
        is_root = self.local_rank == root

        def copy_in(base: int, b0: int, b1: int) -> None:
            if is_root:
                src[b0:b1].copy_(flat[base + b0:base + b1])

        def copy_out(base: int, b0: int, b1: int) -> None:
            if not is_root:
                flat[base + b0:base + b1].copy_(src[b0:b1])

        # trailing sync: non-roots read the root's *input slot* after the last sync, which
        # the root would overwrite in its next op before any sync.
        self._run(n, flat.element_size(), copy_in, None, copy_out, True)

    # ------------------------------------------------------------------------------ helpers
    def _check_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._broken is not None:
            raise self._unusable()
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.requires_grad:
            tensor = tensor.detach()    # same storage: reduce the data, as Gloo does
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ConfigError(f"tensor must be a contiguous CPU tensor (got device="
                              f"{tensor.device}, contiguous={tensor.is_contiguous()}); "
                              "pass tensor.contiguous().cpu() and copy back")
        if tensor.element_size() > self.capacity_bytes:
            raise ConfigError(f"capacity_bytes={self.capacity_bytes} is smaller than one "
                              f"{tensor.dtype} element; use a larger capacity")
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

    def _run(self, n: int, esize: int, copy_in: Callable, work: Callable | None,
             copy_out: Callable, trailing_sync: bool,
             in_place: Callable[[], bool] | None = None) -> None:
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
            self._rounds(n, esize, copy_in, work, copy_out, in_place)
        finally:
            if nt != self.threads:
                torch.set_num_threads(nt)
        if trailing_sync:
            self._sync()

    def _rounds(self, n: int, esize: int, copy_in: Callable, work: Callable | None,
                copy_out: Callable, in_place: Callable[[], bool] | None) -> None:
        cap = self.capacity_bytes // esize
        blk = max(1, self.block_bytes // esize)
        first = True
        for base in range(0, n, cap):
            m = min(cap, n - base)
            blocks = [(b, min(m, b + blk)) for b in range(0, m, blk)]
            copy_in(base, *blocks[0])
            self._sync()
            if first:
                self._check(ignore_root=in_place is not None)
                first = False
                if in_place is not None and in_place():
                    return
            for j, (b0, b1) in enumerate(blocks):
                if work is not None:
                    work(base, b0, b1)
                if j + 1 < len(blocks):
                    copy_in(base, *blocks[j + 1])
                self._sync()
                copy_out(base, b0, b1)

