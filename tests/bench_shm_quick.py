"""Quick benchmark: ShmAllreduce vs torch.distributed Gloo allreduce between 2 local processes.

Run:  PYTHONPATH=src python tests/bench_shm_quick.py [--procs 2] [--threads 1] [--block-kb 1024]
Prints median time per op and bus bandwidth (busbw = bytes * 2(P-1)/P / time) per size.
Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

SIZES = [4 << 10, 1 << 20, 16 << 20, 64 << 20]


def _iters(nbytes: int) -> int:
    return 300 if nbytes <= 64 << 10 else 40 if nbytes <= 4 << 20 else 12


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _worker(rank: int, size: int, path: str, port: int, threads: int, block: int, q) -> None:
    import torch
    import torch.distributed as dist

    from phalanx.comm.shm import ShmAllreduce
    if threads:
        torch.set_num_threads(threads)
    eng = ShmAllreduce(path, rank, size, capacity_bytes=max(SIZES), timeout=60.0,
                       block_bytes=block)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    # Busy warm-up: real trainers compute between collectives, which makes the scheduler
    # spread the ranks over the cores; idle freshly spawned processes often share one core.
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    res = []
    try:
        for nbytes in SIZES:
            t = torch.ones(nbytes // 4, dtype=torch.float32)
            it = _iters(nbytes)
            eng.barrier()
            shm = _time(lambda: eng.allreduce_(t, "sum"), it)
            dist.barrier()
            gloo = _time(lambda: dist.all_reduce(t), it)
            res.append((nbytes, shm, gloo))
    finally:
        eng.close()
        dist.destroy_process_group()
    if rank == 0:
        q.put(res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads per process (0: leave torch's default)")
    ap.add_argument("--block-kb", type=int, default=1024)
    a = ap.parse_args()
    src = str(Path(__file__).resolve().parents[1] / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = f"/dev/shm/phalanx-bench-{os.getpid()}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, a.procs, path, port, a.threads,
                                                a.block_kb << 10, q)) for r in range(a.procs)]
    try:
        for p in procs:
            p.start()
        res = q.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if os.path.exists(path):
            os.unlink(path)
    f = 2 * (a.procs - 1) / a.procs
    print(f"procs={a.procs} threads={a.threads} block={a.block_kb}KB")
    print(f"{'size':>8} {'shm time':>10} {'shm busbw':>11} {'gloo time':>10} {'gloo busbw':>11}"
          f" {'ratio':>6}")
    for nbytes, shm, gloo in res:
        label = f"{nbytes >> 20}MB" if nbytes >= 1 << 20 else f"{nbytes >> 10}KB"
        print(f"{label:>8} {shm * 1e6:>8.0f}us {nbytes * f / shm / 1e9:>7.2f}GB/s"
              f" {gloo * 1e6:>8.0f}us {nbytes * f / gloo / 1e9:>7.2f}GB/s {gloo / shm:>6.2f}x")


if __name__ == "__main__":
    main()
