"""Simulated workers of `phalanx bench control-plane`: many per process, on the real protocol.

Each simulated worker does what `coord/client.py` and the runtime do, frame for frame: one
connection (nonce, per-connection key, hello, join, a second hello with the join's token that
makes it the heartbeat connection), numbered requests, beats in a loop with `hold`, and a
rendezvous for generation 1. When a beat's
reply tells it of a loss (lost ranks, a broken generation, a newer generation) it rendezvouses
again after its generation, as a worker whose collective failed does. The frames are byte-for-
byte those of `protocol.Channel`, over asyncio (`control_plane_link.py`), so one process
carries thousands of workers.

`python -m phalanx.bench.control_plane_sim` is one load-generator process. Its first stdin line
says which simulated hosts it runs; then the driver sends JSON lines (`report`, `detail`,
`expect`, `kill`) and reads one JSON line back for each. Stdin closing ends it. Timestamps are
`time.monotonic()`, which all processes of one machine share.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthenticationError
from .control_plane_link import BEAT_ID, Link, open_link

SLOW_BEAT = 3.0
"""A beat reply later than `hold` plus this: the real client would think itself cut off."""


def worker_ids(host: int, per_host: int) -> list[str]:
    """The ids of the simulated workers of host `host`."""
    return [f"h{host}-w{i}" for i in range(per_host)]


def source_ip(host: int) -> str:
    """A loopback address of its own for each simulated host (127.1.1.1 and up), so per-address
    connection caps see one address per host, as on a real cluster."""
    return f"127.{1 + host // 62500}.{(host // 250) % 250 + 1}.{host % 250 + 1}"


@dataclass(eq=False)
class SimWorker:
    """One simulated worker and what it saw (times are time.monotonic())."""

    wid: str
    host: str
    src: str | None
    gen: int = 0
    joined_t: float | None = None
    assigned: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    """Generation -> (when its assignment arrived, rank, size)."""
    loss_t: dict[int, float] = field(default_factory=dict)
    """Generation -> when a beat first told it of a loss in that generation."""
    links: list[Link] = field(default_factory=list)
    beat_gen: tuple[int, int | None] = (-1, None)
    seen: int | None = None
    """The coordinator's news version in the last beat reply (sent back, as the client does)."""
    beat_head: bytes = b""
    beat_sent: float = 0.0
    killed: bool = False
    fenced: bool = False
    in_rendezvous: bool = False
    news: asyncio.Event = field(default_factory=asyncio.Event)


class Generator:
    """The simulated workers of one process and the driver's commands on them."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.host, port = cfg["address"].rsplit(":", 1)
        self.port = int(port)
        self.secret, self.hold = cfg["secret"], float(cfg["hold"])
        self.timeout = float(cfg["deadline"])
        self.workers = [SimWorker(wid, f"sim{h}", None if cfg["one_address"] else source_ip(h))
                        for h in range(*cfg["hosts"]) for wid in worker_ids(h, cfg["per_host"])
                        ][:cfg["limit"]]
        self.by_id = {w.wid: w for w in self.workers}
        self.rosters: dict[int, dict[int, str]] = {}
        """Generation -> rank -> worker id, from this process's assignments (the roster on
        the wire names hosts, not workers)."""
        self.expected: set[str] = set()
        self.false_ids: set[str] = set()
        self.errors: Counter[str] = Counter()
        self.slow_beats, self.beat_max, self.lag_max = 0, 0.0, 0.0
        self.tasks: set[asyncio.Task[Any]] = set()
        self._beat_replies: dict[bytes, dict[str, Any]] = {}
        self.joining = asyncio.Semaphore(int(cfg["joining"]))
        """Workers connecting and joining at once: real ones start over seconds, and a
        connection storm from one process would measure this process, not the coordinator."""

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------ one worker's life
    async def live(self, w: SimWorker) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            async with self.joining:
                req = await self._connect(w, deadline, {"op": "hello", "worker": w.wid,
                                                        "heartbeat": False})
                r, _ = await req.ask({"op": "join", "worker": w.wid, "host": w.host,
                                      "rank_hint": -1, "pid": -1}, self.timeout)
                if not r.get("ok"):
                    raise ConnectionError(f"join refused: {r.get('error')}")
                w.joined_t = time.monotonic()
                r, _ = await req.ask({"op": "hello", "worker": w.wid, "heartbeat": True,
                                      "token": r["token"]}, self.timeout)
                if not r.get("ok"):
                    raise ConnectionError(f"heartbeat hello refused: {r.get('error')}")
            hb = req  # one connection for requests and beats, as the real client
            hb.parse = self.parse_beat
            hb.on_frame = lambda reply, _: self.on_beat(w, hb, reply)
            hb.on_close = lambda e: self.fail(w, f"heartbeat {type(e).__name__}: {e}")
            self.beat(w, hb)
            while not (w.killed or w.fenced):
                await self.rendezvous(w, req)
                await w.news.wait()
        except (OSError, asyncio.TimeoutError, AuthenticationError, ValueError, KeyError) as e:
            self.fail(w, f"{type(e).__name__}: {e}")

    def fail(self, w: SimWorker, why: str) -> None:
        if not (w.killed or w.fenced):
            self.errors[why[:200]] += 1

    async def _connect(self, w: SimWorker, deadline: float, hello: dict[str, Any]) -> Link:
        link = await open_link(self.host, self.port, w.src, self.secret, deadline, json.loads)
        w.links.append(link)
        r, _ = await link.ask(hello, max(1.0, deadline - time.monotonic()))
        if not r.get("ok"):
            raise ConnectionError(f"hello refused: {r.get('error')}")
        return link

    async def rendezvous(self, w: SimWorker, req: Link) -> None:
        """Wait for a generation newer than ours, as the runtime's `_form` does."""
        w.in_rendezvous = True
        r, payload = await req.ask({"op": "rendezvous", "worker": w.wid, "after": w.gen,
                                    "step": -1, "timeout": self.timeout}, self.timeout + 30.0)
        if not r.get("ok"):
            w.in_rendezvous = False
            if "lost" in str(r.get("error")) and not w.killed:
                self.false_ids.add(w.wid)
            raise ConnectionError(f"rendezvous refused: {r.get('error')}")
        gen = int(r["generation"])
        self.rosters.setdefault(gen, {})[int(r["rank"])] = w.wid
        w.assigned[gen] = (time.monotonic(), int(r["rank"]), int(r["size"]))
        w.gen, w.in_rendezvous = gen, False
        if isinstance(r.get("version"), int):
            w.seen = r["version"]
        w.news.clear()

    def beat(self, w: SimWorker, hb: Link) -> None:
        """Send the next beat: its header changes only with the generation, so it is encoded
        once per generation."""
        if w.beat_gen != (w.gen, w.seen):  # as the real client: the news it has seen
            beat: dict[str, Any] = {"op": "heartbeat", "worker": w.wid, "hold": self.hold,
                                    "generation": w.gen, "step": -1, "coll": 0, "blocked": 0.0,
                                    "id": BEAT_ID}
            if w.seen is not None:
                beat["seen"] = w.seen
            w.beat_gen = (w.gen, w.seen)
            w.beat_head = json.dumps(beat, separators=(",", ":")).encode()
        w.beat_sent = time.monotonic()
        hb.send_head(w.beat_head)

    def on_beat(self, w: SimWorker, hb: Link, reply: dict[str, Any]) -> None:
        took = time.monotonic() - w.beat_sent
        self.beat_max = max(self.beat_max, took)
        self.slow_beats += took > self.hold + SLOW_BEAT
        if isinstance(reply.get("version"), int) and reply.get("asked") == w.gen:
            w.seen = reply["version"]  # as the client: only news about its generation
        if self.on_status(w, reply) and not w.killed:
            self.beat(w, hb)

    def parse_beat(self, head: bytes) -> dict[str, Any]:
        """Beat replies repeat (one status per piece of news): parse each text once. The
        dicts are shared, read-only."""
        r = self._beat_replies.get(head)
        if r is None:
            if len(self._beat_replies) > 4096:
                self._beat_replies.clear()
            r = self._beat_replies[head] = json.loads(head)
        return r

    def on_status(self, w: SimWorker, r: dict[str, Any]) -> bool:
        """Note what a beat's reply says; False if this worker was fenced."""
        if not r.get("ok"):  # fenced: a real worker is killed by its starter now
            if not w.killed:
                self.false_ids.add(w.wid)
            w.fenced = True
            for link in w.links:
                link.abort()
            w.news.set()
            return False
        asked, lost = r.get("asked"), r.get("lost_ranks") or []
        roster = self.rosters.get(asked, {})  # type: ignore[arg-type]
        for rank in lost:
            wid = roster.get(rank)  # None: a worker of another generator process
            if wid is not None and wid not in self.expected:
                self.false_ids.add(wid)
        if w.gen and asked == w.gen and not w.in_rendezvous and w.gen not in w.loss_t and (
                lost or r.get("broken") or r.get("generation", w.gen) != w.gen):
            w.loss_t[w.gen] = time.monotonic()
            w.news.set()
        return True

    async def watch_lag(self) -> None:
        """How late the event loop runs a timer: past a few ms, this generator is saturated."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.1)
            self.lag_max = max(self.lag_max, time.monotonic() - t - 0.1)

    # ------------------------------------------------------------ the driver's commands
    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("cmd")
        if op == "report":
            return self.report()
        if op == "detail":
            return self.detail(int(cmd["gen"]))
        if op == "expect":
            self.expected.update(cmd["workers"])
            return {"ok": True}
        if op == "kill":
            return {"t": self.kill(cmd["workers"])}
        return {"error": f"unknown command {op!r}"}

    def report(self) -> dict[str, Any]:
        live = [w for w in self.workers if not (w.killed or w.fenced)]
        joined = [w.joined_t for w in self.workers if w.joined_t is not None]
        return {"joined": len(joined), "join_t_max": max(joined, default=None),
                "current": Counter(str(w.gen) for w in live if not w.in_rendezvous),
                "false_ids": sorted(self.false_ids), "errors": sum(self.errors.values()),
                "error_sample": self.errors.most_common(3), "slow_beats": self.slow_beats,
                "beat_max_s": self.beat_max, "lag_max_s": self.take_lag()}

    def take_lag(self) -> float:
        """The event loop's worst lag since the last report."""
        lag, self.lag_max = self.lag_max, 0.0
        return lag

    def detail(self, gen: int) -> dict[str, Any]:
        """Per worker not killed: its assignment in `gen` ([t, rank, size] or null) and when
        it first heard of a loss in `gen` (or null)."""
        live = [w for w in self.workers if not w.killed]
        return {"assigned": [w.assigned.get(gen) for w in live],
                "loss_t": [w.loss_t.get(gen) for w in live]}

    def kill(self, ids: list[str]) -> float:
        """Close every connection of these workers at once, as a SIGKILL would."""
        t = time.monotonic()
        for wid in ids:
            w = self.by_id[wid]
            w.killed = True
            for link in w.links:
                link.abort()
            w.news.set()
        return t

    def close(self) -> None:
        """Stop every worker: its tasks first (so no reply future is left failed and unread),
        then its connections."""
        for task in list(self.tasks):
            task.cancel()
        for w in self.workers:
            w.killed = True
            for link in w.links:
                link.abort()


async def _stdin() -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1 << 24)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run() -> None:
    """Read the settings, start the workers, then answer the driver until stdin closes."""
    stdin = await _stdin()
    line = await stdin.readline()
    if not line:
        return
    gen = Generator(json.loads(line))
    gen.spawn(gen.watch_lag())
    for w in gen.workers:
        gen.spawn(gen.live(w))
    try:
        while line := await stdin.readline():
            _reply(gen.command(json.loads(line)))
    finally:
        gen.close()
        await asyncio.gather(*gen.tasks, return_exceptions=True)


def main() -> int:
    """Entry point of one load-generator process (see the module docstring)."""
    from ..coord.server import raise_fd_limit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when we stop
    raise_fd_limit()
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
