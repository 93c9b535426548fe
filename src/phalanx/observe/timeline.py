"""Chrome-trace events (the JSON that Perfetto and chrome://tracing open) and the merge of the
per-worker part files into one trace.

Each worker appends its events as JSON lines to `<FILE>.parts/<worker>.jsonl`; the launcher
(or a one-worker job itself) merges them into FILE at the end. Processes are workers (named
with their worker id, sorted by rank); threads are lanes: the training loop, collectives,
elastic events. Times are wall-clock microseconds, so ranks on one host line up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

LANES = {"main": 1, "collectives": 2, "elastic": 3}
"""Thread ids of the lanes: step phases, collectives (with their queue time), recovery."""


def parts_dir(path: str | Path) -> Path:
    return Path(f"{path}.parts")


def part_path(path: str | Path, worker: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker)[:120]
    return parts_dir(path) / f"{safe}.jsonl"


def complete(cat: str, name: str, ts: float, end: float, pid: int, lane: str,
             args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": round(max(end - ts, 0.0), 1),
            "pid": pid, "tid": LANES.get(lane, 1), "args": args}


def instant(cat: str, name: str, ts: float, pid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "i", "s": "p", "ts": ts, "pid": pid,
            "tid": LANES["elastic"], "args": args}


def process_name(worker: str, pid: int) -> dict[str, Any]:
    return {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": worker}}


def process_sort(pid: int, rank: int) -> dict[str, Any]:
    return {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
            "args": {"sort_index": rank}}


def _thread_names(pids: set[int]) -> list[dict[str, Any]]:
    return [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": lane}}
            for pid in sorted(pids) for lane, tid in LANES.items()]


def merge(path: str | Path, *, keep_parts: bool = False) -> int:
    """Join every worker's part file into one Chrome trace at `path`; return the event count.

    A line cut short by a killed worker is skipped. Events are sorted by time."""
    events: list[dict[str, Any]] = []
    folder = parts_dir(path)
    for part in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict) and "ph" in e:
                events.append(e)
    meta = [e for e in events if e["ph"] == "M"]
    timed = sorted((e for e in events if e["ph"] != "M"), key=lambda e: e.get("ts", 0))
    pids = {int(e["pid"]) for e in events if "pid" in e}
    trace = {"traceEvents": meta + _thread_names(pids) + timed, "displayTimeUnit": "ms",
             "otherData": {"producer": "phalanx"}}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(trace), encoding="utf-8")
    tmp.replace(path)
    if not keep_parts:
        shutil.rmtree(folder, ignore_errors=True)
    return len(timed)
