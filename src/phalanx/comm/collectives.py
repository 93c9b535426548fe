"""Collective algorithms on torch tensors over a `Group` (CPU via Gloo or shared memory, CUDA via NCCL).

Tensors here are already contiguous torch tensors; `phalanx.api` converts numpy arrays and
picks the current group. Transport-only collectives (allgather, broadcast, alltoall) move raw
bytes, so every dtype works; reductions widen or fall back where Gloo lacks a kernel.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CollectiveMismatch, ConfigError
from . import ops
from .group import Group


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (for transport that ignores dtype)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _local_reduce(stack: torch.Tensor, op: str) -> torch.Tensor:
    if op in ("sum", "avg"):
        out = stack.sum(0, dtype=stack.dtype) if stack.dtype != torch.bool else stack.any(0)
        return out / stack.shape[0] if op == "avg" else out
    if op == "prod":
        return stack.prod(0, dtype=stack.dtype) if stack.dtype != torch.bool else stack.all(0)
    if stack.dtype == torch.bool:
        return stack.all(0) if op == "min" else stack.any(0)
    return stack.amin(0) if op == "min" else stack.amax(0)


def _gloo_allreduce_(g: Group, t: torch.Tensor, op: str) -> None:
    if t.numel() == 0:
        return
    dtype = t.dtype
    if dtype in ops.GLOO_NATIVE:
        g.wait(g.pg.allreduce([t], ops.GLOO_REDUCE[op]))
    elif dtype == torch.int16:
        # Widening then truncating gives the same wrapped result as int16 arithmetic.
        wide = t.to(torch.int32)
        g.wait(g.pg.allreduce([wide], ops.GLOO_REDUCE[op]))
        t.copy_(wide.to(torch.int16))
    elif dtype == torch.bool:
        as_u8 = t.to(torch.uint8)
        red = dist.ReduceOp.MAX if op in ("sum", "avg", "max") else dist.ReduceOp.MIN
        g.wait(g.pg.allreduce([as_u8], red))
        t.copy_(as_u8.bool())
    elif dtype.is_complex and op in ("sum", "avg"):
        g.wait(g.pg.allreduce([torch.view_as_real(t)], dist.ReduceOp.SUM))
    else:
        gathered = torch.empty((g.place.size,) + tuple(t.shape), dtype=dtype)
        g.wait(g.pg._allgather_base(_bytes(gathered), _bytes(t)))
        t.copy_(_local_reduce(gathered, op))
        return
    if op == "avg":
        t.div_(g.place.size)


def allreduce_(g: Group, t: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
    """Reduce `t` in place across ranks."""
    ops.check_op(op, t.dtype)
    sig = ops.signature("allreduce", op=op, dtype=t.dtype, shape=t.shape, name=name)
    if t.is_cuda:
        g.agree(sig)
        nccl = g.nccl()
        g.wait(nccl.allreduce([t], ops.GLOO_REDUCE[op]))
        if op == "avg":
            t.div_(g.place.size)
        return t
    if g.shm is not None:
        g.shm.allreduce_(t, op, sig, describe=ops.describe)
        return t
    g.agree(sig)
    _gloo_allreduce_(g, t, op)
    return t


def allgather(g: Group, t: torch.Tensor, name: str | None) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0; first dims may differ."""
    if t.dim() == 0:
        t = t.reshape(1)
    sigs = g.agree(ops.signature("allgather", dtype=t.dtype, shape=t.shape, name=name,
                                 skip_dim0=True), skip_dim0=True)
    rows = [s[-1] for s in sigs]  # dim 0 of each rank rides on the signature exchange
    rest = tuple(t.shape[1:])
    top = max(rows)
    if all(r == top for r in rows):
        out = torch.empty((top * g.place.size,) + rest, dtype=t.dtype, device=t.device)
        pg = g.nccl() if t.is_cuda else g.pg
        if out.numel():
            g.wait(pg._allgather_base(_bytes(out), _bytes(t)))
        return out
    padded = torch.zeros((top,) + rest, dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = torch.empty((top * g.place.size,) + rest, dtype=t.dtype, device=t.device)
    pg = g.nccl() if t.is_cuda else g.pg
    g.wait(pg._allgather_base(_bytes(out), _bytes(padded)))
    return torch.cat([out[r * top: r * top + n] for r, n in enumerate(rows)])


def broadcast_(g: Group, t: torch.Tensor, root: int, name: str | None) -> torch.Tensor:
    """Copy root's tensor into `t` on every rank."""
    _check_root(g, root)
    sig = ops.signature("broadcast", dtype=t.dtype, shape=t.shape, root=root, name=name)
    if g.shm is not None and not t.is_cuda and hasattr(g.shm, "broadcast_"):
        g.shm.broadcast_(t, root, sig, describe=ops.describe)
        return t
    g.agree(sig)
    if t.numel():
        pg = g.nccl() if t.is_cuda else g.pg
        g.wait(pg.broadcast(_bytes(t), root))
    return t


def reducescatter(g: Group, t: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
    """Reduce across ranks, then keep this rank's slice of dim 0 (first ranks get one extra row
    when dim 0 does not divide evenly, as torch.tensor_split does)."""
    if t.dim() == 0:
        raise ConfigError("reducescatter needs a tensor with at least one dimension, got a scalar")
    full = allreduce_(g, t.clone(), op, name)
    return full.tensor_split(g.place.size)[g.place.rank].clone()


def alltoall(g: Group, t: torch.Tensor, splits: Sequence[int] | None,
             name: str | None) -> tuple[torch.Tensor, list[int]]:
    """Send `splits[j]` rows of dim 0 to rank j; return what was received and from whom."""
    n = g.place.size
    if t.dim() == 0:
        raise ConfigError("alltoall needs a tensor with at least one dimension, got a scalar")
    if splits is None:
        if t.shape[0] % n:
            raise ConfigError(f"alltoall: dim 0 ({t.shape[0]}) does not divide by size {n}; "
                              "pass splits=[rows for rank 0, rows for rank 1, ...]")
        send = [t.shape[0] // n] * n
    else:
        send = [int(s) for s in splits]
        if len(send) != n or any(s < 0 for s in send) or sum(send) != t.shape[0]:
            raise ConfigError(f"alltoall: splits={list(splits)} must be {n} non-negative counts "
                              f"summing to dim 0 ({t.shape[0]})")
    g.agree(ops.signature("alltoall", dtype=t.dtype, shape=t.shape, name=name, skip_dim0=True),
            skip_dim0=True)
    matrix = torch.empty(n * n, dtype=torch.int64)
    g.wait(g.pg._allgather_base(matrix, torch.tensor(send, dtype=torch.int64)))
    recv = matrix.view(n, n)[:, g.place.rank].tolist()
    rest = tuple(t.shape[1:])
    row_bytes = t[:1].numel() * t.element_size() if t.shape[0] else (
        int(torch.tensor(rest).prod().item() if rest else 1) * t.element_size())
    out = torch.empty((sum(recv),) + rest, dtype=t.dtype, device=t.device)
    if row_bytes and (sum(recv) or sum(send)):
        pg = g.nccl() if t.is_cuda else g.pg
        g.wait(pg.alltoall_base(_bytes(out).view(-1, row_bytes) if out.numel() else
                         torch.empty(0, row_bytes, dtype=torch.uint8),
                         _bytes(t).view(-1, row_bytes) if t.numel() else
                         torch.empty(0, row_bytes, dtype=torch.uint8),
                         recv, send))
    return out, recv


def barrier(g: Group) -> None:
    """Wait until every rank arrives."""
    if g.shm is not None:
        g.shm.barrier()
        return
    g.agree(ops.signature("barrier"))


def _check_root(g: Group, root: int) -> None:
    if not 0 <= root < g.place.size:
        raise ConfigError(f"root={root} is not a rank of this job (size {g.place.size}); "
                          f"use 0..{g.place.size - 1}")


def _seal(obj: Any, key: bytes) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return hmac.new(key, data, hashlib.sha256).digest() + data


def _open(blob: bytes, key: bytes, rank: int) -> Any:
    tag, data = blob[:32], blob[32:]
    if not hmac.compare_digest(tag, hmac.new(key, data, hashlib.sha256).digest()):
        raise CollectiveMismatch(f"object from rank {rank} failed its HMAC check; refusing to "
                                 "unpickle it (a rank of another job, or corrupted data)")
    return pickle.loads(data)


def broadcast_object(g: Group, obj: Any, root: int, key: bytes) -> Any:
    """Root's picklable object on every rank (HMAC-checked before unpickling)."""
    _check_root(g, root)
    g.agree(ops.signature("broadcast_object", root=root))
    blob = _seal(obj, key) if g.place.rank == root else b""
    length = torch.tensor([len(blob)], dtype=torch.int64)
    g.wait(g.pg.broadcast(length, root))
    buf = (torch.frombuffer(bytearray(blob), dtype=torch.uint8) if g.place.rank == root
           else torch.empty(int(length.item()), dtype=torch.uint8))
    g.wait(g.pg.broadcast(buf, root))
    return obj if g.place.rank == root else _open(buf.numpy().tobytes(), key, root)


def allgather_object(g: Group, obj: Any, key: bytes) -> list[Any]:
    """Every rank's picklable object, in rank order (HMAC-checked before unpickling)."""
    g.agree(ops.signature("allgather_object"))
    blob = _seal(obj, key)
    sizes = torch.empty(g.place.size, dtype=torch.int64)
    g.wait(g.pg._allgather_base(sizes, torch.tensor([len(blob)], dtype=torch.int64)))
    top = int(sizes.max().item())
    mine = torch.zeros(top, dtype=torch.uint8)
    mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    out = torch.empty(top * g.place.size, dtype=torch.uint8)
    g.wait(g.pg._allgather_base(out, mine))
    raw = out.numpy().tobytes()
    return [obj if r == g.place.rank else _open(raw[r * top: r * top + int(sizes[r])], key, r)
            for r in range(g.place.size)]
