"""Worker of `phalanx bench allreduce` (run under the launcher; not a user entry point).

Times, size by size and in the same processes, each requested path:

    phalanx  px.allreduce_ on the path phalanx picks (shared memory on one host, hierarchical
             across hosts with the same number of ranks each, else flat Gloo)
    flat     phalanx's flat Gloo path (its hierarchical levels switched off for the call)
    local    the shared-memory part of the hierarchical path alone (reduce-scatter + allgather
             inside each host, nothing crosses hosts): the model's t_local
    gloo     a raw torch.distributed Gloo process group of the same ranks (no phalanx)
    tcp      a raw TCP ring moving the bytes a flat ring allreduce moves, with no arithmetic
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

import phalanx as px
from phalanx import runtime
from phalanx.bench.allreduce import RESULT


class TcpRing:
    """Each rank sends to rank+1 and receives from rank-1 over plain TCP sockets."""

    def __init__(self, rank: int, size: int, bind: str) -> None:
        srv = socket.create_server((bind, 0))
        ends = px.allgather_object((bind, srv.getsockname()[1]))
        self.out = socket.create_connection(ends[(rank + 1) % size])
        self.inp, _ = srv.accept()
        srv.close()
        for s in (self.out, self.inp):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def exchange(self, send: memoryview, recv: memoryview) -> None:
        # Below the socket buffers a plain send cannot block; above, send from a thread so the
        # ring runs full duplex like an allreduce would.
        t = None
        if len(send) <= 1 << 20:
            self.out.sendall(send)
        else:
            t = threading.Thread(target=self.out.sendall, args=(send,))
            t.start()
        got, n = 0, len(recv)
        while got < n:
            k = self.inp.recv_into(recv[got:], n - got)
            if k == 0:
                raise ConnectionError("tcp ring peer closed")
            got += k
        if t is not None:
            t.join()

    def close(self) -> None:
        self.out.close()
        self.inp.close()


def raw_gloo(rank: int, size: int, bind: str, timeout: float) -> tuple[object, object]:
    """(store, process group): plain Gloo over a TCPStore on rank 0, nothing of phalanx."""
    wait = timedelta(seconds=timeout)
    store = (dist.TCPStore(bind, 0, size, True, wait, wait_for_workers=False) if rank == 0
             else None)
    host, port = px.broadcast_object((bind, store.port if store else 0), root=0)
    store = store or dist.TCPStore(host, port, size, False, wait)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
    opts._timeout = timedelta(seconds=timeout)
    return store, dist.ProcessGroupGloo(store, rank, size, opts)


def timers(paths: list[str], r: int, n: int) -> tuple[dict[str, Callable], Callable[[], None]]:
    """A function per path taking (x, send, recv), and a closer."""
    g = runtime.current().group
    bind = runtime.current().config.bind_addr
    fns: dict[str, Callable] = {}
    closers: list[Callable[[], None]] = []
    if "phalanx" in paths:
        fns["phalanx"] = lambda x, s, v: px.allreduce_(x, op="sum")
    if "flat" in paths:
        def flat(x, s, v):
            saved, g.hier = g.hier, None
            try:
                px.allreduce_(x, op="sum")
            finally:
                g.hier = saved
        fns["flat"] = flat
    if "local" in paths:
        if g.hier is None:
            raise SystemExit("bench: 'local' needs the hierarchical path (several hosts with "
                             "the same number (>1) of ranks)")
        fns["local"] = lambda x, s, v: g.hier.local.allreduce_around_(
            x, "sum", lambda c: lambda: None)
    if "gloo" in paths:
        store, pg = raw_gloo(r, n, bind, 120.0)
        fns["gloo"] = lambda x, s, v: pg.allreduce([x]).wait()
        closers.append(lambda: (pg.shutdown(), store))
    if "tcp" in paths:
        ring = TcpRing(r, n, bind)
        fns["tcp"] = lambda x, s, v: ring.exchange(s, v)
        closers.append(ring.close)
    return fns, lambda: [c() for c in closers]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True)
    p.add_argument("--paths", required=True)
    p.add_argument("--min-time", type=float, default=0.5)
    a = p.parse_args()
    torch.set_num_threads(1)
    px.init()
    r, n = px.rank(), px.size()
    paths = a.paths.split(",")
    fns, close = timers(paths, r, n)
    factor = 2 * (n - 1) / n
    rows = []
    for size in [int(s) for s in a.sizes.split(",")]:
        x = torch.rand(max(1, size // 4))
        ring_bytes = int(size * factor)
        send, recv = memoryview(bytearray(ring_bytes)), memoryview(bytearray(ring_bytes))
        row: dict[str, float] = {"bytes": size}
        for path in paths:
            t = _shared_median(lambda f=fns[path], x=x, s=send, v=recv: f(x, s, v), a.min_time)
            row[f"{path}_us"] = t * 1e6
        rows.append(row)
        if r == 0:
            print(f"{size:>10} B  " + "  ".join(f"{k} {row[f'{k}_us']:9.1f} us" for k in paths),
                  flush=True)
    close()
    if r == 0:   # on stdout: the launcher may share no file system with rank 0's host
        g = runtime.current().group
        print(RESULT + json.dumps({
            "np": n, "hosts": len(set(g.place.hosts)), "paths": paths, "rows": rows,
            "phalanx_path": "shm" if g.shm else "hier" if g.hier else "gloo"}), flush=True)


def _shared_median(fn, min_time: float) -> float:
    """Median per-op time; rank 0 decides the iteration count so every rank runs the same loop."""
    fn()
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    iters = int(px.broadcast_object(max(5, min(2000, int(min_time / max(one, 1e-6)))), root=0))
    times = []
    for _ in range(iters):
        px.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    main()
