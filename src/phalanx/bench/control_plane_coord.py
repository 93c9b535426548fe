"""The processes of `phalanx bench control-plane`: the coordinator under test, and the pipe both
it and the load generators are driven through.

`python -m phalanx.bench.control_plane_coord` hosts one real `CoordServer` in its own process,
so its threads, memory and CPU can be read from /proc without the load generator's mixed in.
It reads one JSON line of settings on stdin, prints `{"address": ..., "pid": ...}`, answers
`{"cmd": "state"}` lines with the current generation and world size, and stops the server and
exits when stdin closes (the driver exited, crashed or gave up).

`Child` is the driver's end of such a process: JSON lines in, JSON lines out, every read with
a deadline, and a close that kills what does not exit in time.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import phalanx

CLOSE_GRACE = 5.0
"""Seconds a child has to exit after its stdin closes before it is killed."""


class ChildGone(RuntimeError):
    """A child process exited, or did not answer within its deadline."""


def proc_stats(pid: int) -> dict[str, float]:
    """Threads, resident memory (MB) and CPU seconds (user + system) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return {"threads": int(fields["Threads"]),
            "rss_mb": int(fields["VmRSS"].split()[0]) / 1024.0,
            "cpu_s": cpu}


class Child:
    """A `python -m MODULE` child driven by JSON lines over its stdin and stdout."""

    def __init__(self, module: str, config: dict[str, Any], *, stderr: IO[Any] | None = None,
                 ) -> None:
        src = str(Path(phalanx.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, env=env, bufsize=0)
        self.pid = self.proc.pid
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        self.send(config)

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())  # type: ignore[union-attr]
        except (BrokenPipeError, OSError) as e:
            raise ChildGone(f"pid {self.pid} is gone ({e})") from None

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise ChildGone(f"pid {self.pid} did not answer within {timeout:g}s")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)  # type: ignore[union-attr]
            if not chunk:
                raise ChildGone(f"pid {self.pid} exited (code {self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, obj: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        self.send(obj)
        return self.read(timeout)

    def stats(self) -> dict[str, float] | None:
        """`proc_stats` of the child, or None once it has exited."""
        try:
            return proc_stats(self.pid)
        except (OSError, ValueError, KeyError, IndexError):
            return None

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Close its stdin (its signal to exit); kill it if it has not exited within `grace`."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sel.close()
        self.proc.stdout.close()  # type: ignore[union-attr]


def _serve(cfg: dict[str, Any]) -> None:
    from ..coord.server import ConnectionLimits, CoordServer
    limits = ConnectionLimits(**cfg["limits"]) if cfg.get("limits") else None
    server = CoordServer(cfg["secret"], host="127.0.0.1", port=0, target_np=cfg["target_np"],
                         min_np=cfg["min_np"], max_np=cfg["max_np"],
                         heartbeat_timeout=cfg["heartbeat_timeout"], settle=cfg["settle"],
                         fence=None, probe_stopped=None, limits=limits)
    server.start()
    try:
        _reply({"address": server.address, "pid": os.getpid(), "fd_limit": cfg["fd_limit"]})
        for line in sys.stdin:
            if json.loads(line).get("cmd") == "state":
                world = server.world()
                _reply({"generation": server.generation,
                        "size": len(world.workers) if world is not None else 0})
    finally:
        server.stop()


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    """Entry point of the coordinator process (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when we stop
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s coordinator: %(message)s")
    from ..coord.server import raise_fd_limit
    fd_limit = raise_fd_limit()
    line = sys.stdin.readline()
    if not line:
        return 0
    _serve({**json.loads(line), "fd_limit": fd_limit})
    return 0


if __name__ == "__main__":
    sys.exit(main())
