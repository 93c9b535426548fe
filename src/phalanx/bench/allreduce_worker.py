"""Worker of `phalanx bench allreduce` (run under the launcher; not a user entry point).

Times phalanx, raw Gloo and a raw TCP ring in the same processes, size by size.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

import torch
import torch.distributed as dist

import phalanx as px


class TcpRing:
    """Each rank sends to rank+1 and receives from rank-1 over plain TCP sockets."""

    def __init__(self, rank: int, size: int, port: int) -> None:
        self.rank, self.size = rank, size
        srv = socket.create_server(("127.0.0.1", port + rank))
        px.barrier()
        self.out = socket.create_connection(("127.0.0.1", port + (rank + 1) % size))
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True)
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--gloo-port", type=int, required=True)
    p.add_argument("--tcp-port", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    px.init()
    r, n = px.rank(), px.size()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.gloo_port}", rank=r,
                            world_size=n)
    ring = TcpRing(r, n, a.tcp_port)
    factor = 2 * (n - 1) / n
    rows = []
    for size in [int(s) for s in a.sizes.split(",")]:
        numel = max(1, size // 4)
        x = torch.rand(numel)
        y = x.clone()
        ring_bytes = int(size * factor)
        send = memoryview(bytearray(ring_bytes))
        recv = memoryview(bytearray(ring_bytes))
        px_t = _shared_median(lambda x=x: px.allreduce_(x, op="sum"), a.min_time)
        gl_t = _shared_median(lambda y=y: dist.all_reduce(y), a.min_time)
        tcp_t = _shared_median(lambda s=send, r=recv: ring.exchange(s, r), a.min_time)
        row = {"bytes": size, "phalanx_us": px_t * 1e6, "gloo_us": gl_t * 1e6, "tcp_us": tcp_t * 1e6,
               "phalanx_busbw": size / px_t * factor / 1e9, "gloo_busbw": size / gl_t * factor / 1e9,
               "tcp_busbw": ring_bytes / tcp_t / 1e9}
        rows.append(row)
        if r == 0:
            print(f"{size:>10} B  phalanx {row['phalanx_us']:9.1f} us  gloo {row['gloo_us']:9.1f} us"
                  f"  tcp {row['tcp_us']:9.1f} us", flush=True)
    ring.close()
    dist.destroy_process_group()
    if r == 0:
        with open(a.out, "w") as f:
            json.dump({"np": n, "algo": px.runtime.current().config.allreduce_algo, "rows": rows}, f)


def _shared_median(fn, min_time: float) -> float:
    """Median per-op time; rank 0 decides the iteration count so every rank runs the same loop."""
    fn()
    fn()
    iters = 5
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
