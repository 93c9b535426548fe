"""Tensors in shared memory that the other ranks of the host can read in place.

A rank allocates a long-lived buffer it reduces often (a gradient bucket) with `empty`; the
memory is a file under /dev/shm next to the group's segment, ``<segment>.b<local rank>.<seq>``
plus a token keyed by the job's secret (`shmnames.buffer_path`), so every name stays under the
job's prefix (the launcher removes what a crash leaves) and no other user can plant one. Its
owner creates it exclusively; peers map it only if it is the owner's 0600 file (`shmfile`). An
allreduce of such a tensor (`ShmAllreduce.allreduce_`) tells the peers where it lives with one
signature word (`locate`); when every rank's tensor is shared, the peers read and write each
other's buffers directly and nothing is copied through the segment's slots. Peers map a
buffer on first use (`peer`); its owner removes the name after that op, once every peer has it
mapped (`mapped`). Memory stays valid while any tensor views it, after `close` too.
"""

from __future__ import annotations

import mmap
import os

import torch

from ..errors import ConfigError, WorkerLost
from . import shmfile
from .shmnames import buffer_path

__all__ = ["SharedBuffers"]

_OFF_BITS = 40                  # location word: seq << 40 | byte offset (buffers < 1 TiB)
_MAX_SEQ = 1 << 22


class SharedBuffers:
    """This rank's shared buffers in one group, and its mappings of the peers' ones."""

    def __init__(self, prefix: str, local_rank: int, generation: int | None = None, *,
                 secret: str | bytes) -> None:
        self.prefix, self.local_rank, self.generation = prefix, local_rank, generation
        self._secret = secret
        self._own: list[tuple[int, int, int]] = []     # (data_ptr, nbytes, seq)
        self._named: dict[int, tuple[str, shmfile.Ident]] = {}  # seq -> name not yet removed
        self._keep: dict[int, mmap.mmap] = {}
        self._peers: dict[tuple[int, int], torch.Tensor] = {}
        self._seq = 0
        self.closed = False

    def _path(self, local_rank: int, seq: int) -> str:
        return buffer_path(self.prefix, local_rank, seq, secret=self._secret)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised flat CPU tensor of `numel` elements in a new shared buffer.

        Raises OSError when /dev/shm cannot hold it, ConfigError if the name exists."""
        if self.closed:
            raise ConfigError("SharedBuffers.empty: the group is closed; allocate in the "
                              "current generation's group")
        if self._seq >= _MAX_SEQ:
            raise ConfigError(f"SharedBuffers.empty: more than {_MAX_SEQ} buffers in one group")
        esize = torch.empty((), dtype=dtype).element_size()
        nbytes = max(1, numel) * esize
        seq, path = self._seq, self._path(self.local_rank, self._seq)
        fd = shmfile.create(path)
        owned = shmfile.ident(fd)
        try:
            # Reserve the pages now: on a full /dev/shm this raises ENOSPC here, where the
            # caller can fall back to private memory, instead of SIGBUS at a later write.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        except BaseException:
            shmfile.unlink_if(path, owned)
            raise
        finally:
            os.close(fd)
        self._seq += 1
        t = torch.frombuffer(mm, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
        # Kept mapped for the group's life, so no later allocation can take these addresses
        # and be taken by `locate` for this buffer.
        self._keep[seq] = mm
        self._named[seq] = (path, owned)
        self._own.append((t.data_ptr(), numel * esize, seq))
        return t

    def locate(self, t: torch.Tensor) -> int:
        """The location word of contiguous CPU tensor `t` if it lies in one of this rank's
        buffers (what peers pass to `peer`), else -1."""
        if self.closed or not self._own or t.device.type != "cpu":
            return -1
        p, n = t.data_ptr(), t.numel() * t.element_size()
        for base, size, seq in self._own:
            if base <= p and p + n <= base + size:
                return seq << _OFF_BITS | (p - base)
        return -1

    def peer(self, local_rank: int, word: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Local peer `local_rank`'s tensor at location `word` (from its `locate`)."""
        seq, off = word >> _OFF_BITS, word & ((1 << _OFF_BITS) - 1)
        base = self._peers.get((local_rank, seq))
        if base is None:
            base = self._map(local_rank, seq)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if off % torch.empty((), dtype=dtype).element_size() or off + nbytes > base.numel():
            raise WorkerLost(f"local rank {local_rank} named bytes [{off}, {off + nbytes}) of its "
                             f"shared buffer {seq}, which holds {base.numel()} bytes",
                             generation=self.generation)
        return base[off:off + nbytes].view(dtype)

    def _map(self, local_rank: int, seq: int) -> torch.Tensor:
        path = self._path(local_rank, seq)
        try:
            fd = shmfile.open_existing(path)
        except OSError as e:
            raise WorkerLost(f"could not map local rank {local_rank}'s shared buffer {path}: "
                             f"{e}", generation=self.generation) from e
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        base = torch.frombuffer(mm, dtype=torch.uint8)
        self._peers[(local_rank, seq)] = base
        return base

    def mapped(self, word: int) -> None:
        """Every peer has mapped the buffer at `word`: its name can go."""
        named = self._named.pop(word >> _OFF_BITS, None)
        if named is not None:
            shmfile.unlink_if(*named)

    def close(self) -> None:
        """Remove this rank's remaining names and forget every mapping (the memory lives on
        while tensors view it)."""
        for named in self._named.values():
            shmfile.unlink_if(*named)
        self._named, self._peers, self._keep, self._own = {}, {}, {}, []
        self.closed = True
