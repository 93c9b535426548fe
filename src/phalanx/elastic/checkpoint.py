"""Durable checkpoints, the second line of defence (for losing the whole job).

Rank 0 writes in a background thread: serialise, checksum (SHA-256), write a 0600 temporary
file, fsync, rename into place, then write the checksum sidecar the same way. A save that fails
(a full disk) leaves no temporary file; it is reported at the next step boundary, to the
launcher's summary, and fails the job after `max_failures` in a row unless `on_error="warn"`.
When space runs short the oldest checkpoints go before the write, not after.

At the start of a job (`@run` calls `at_start`) the newest checkpoint whose checksum verifies
is loaded; if checkpoints exist and none loads, the job fails listing what was tried, unless
it was asked to start fresh (`phalanx run --fresh` or `resume=False`). Checkpoints load with
`torch.load(weights_only=True)` (plus the numpy types of RNG state) from a directory only the
job's user can write (`checkpoint_dir.py`); arbitrary pickles need `trusted_pickle=True`.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import logging
import os
import pickle
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch

from .. import config, env, runtime
from ..errors import ConfigError, PhalanxError
from . import checkpoint_dir as cdir
from .checkpoint_dir import CheckpointError

log = logging.getLogger("phalanx.elastic")
_REPORT_ALL_UP_TO = 100
"""Report each failed save to the launcher up to this many, then every 100th."""


class Checkpointer:
    """Saves a State every `every_steps` steps to `directory`, keeping the newest `keep`.

    `resume`: load the newest checkpoint at the start (None: yes, unless `phalanx run
    --fresh`); False starts from step 0 and removes earlier runs' checkpoints. `on_error`:
    "fail" (None: `--checkpoint-errors`, default fail) fails the job after `max_failures` saves
    in a row failed; "warn" only reports them. `trusted_pickle=True` loads any pickle (runs
    the code a file holds: only for files nobody else could have written).
    """

    def __init__(self, directory: str, *, every_steps: int = 100, keep: int = 3,
                 background: bool = True, resume: bool | None = None,
                 on_error: str | None = None,
                 max_failures: int = config.CHECKPOINT_MAX_FAILURES,
                 trusted_pickle: bool = False) -> None:
        if every_steps < 1:
            raise ConfigError(f"every_steps={every_steps} must be >= 1")
        if keep < 1:
            raise ConfigError(f"keep={keep} must be >= 1 (the newest checkpoint is always kept)")
        if max_failures < 1:
            raise ConfigError(f"max_failures={max_failures} must be >= 1 (saves failing in a row "
                              "before the job fails; on_error='warn' never fails it)")
        if resume is not None and not isinstance(resume, bool):
            raise ConfigError(f"resume={resume!r} must be True, False or None (None: resume "
                              "unless `phalanx run --fresh`)")
        self.directory = directory
        self.every_steps = every_steps
        self.keep = keep
        self.background = background
        self.resume = not env.get_bool(env.FRESH, False) if resume is None else resume
        self.on_error = _policy(on_error)
        self.max_failures = max_failures
        self.trusted_pickle = trusted_pickle
        if trusted_pickle:
            warnings.warn(f"Checkpointer({directory!r}, trusted_pickle=True): checkpoints load "
                          "with torch.load(weights_only=False), which runs any code a file "
                          "holds; use it only for a directory nobody else could ever have "
                          "written", RuntimeWarning, stacklevel=2)
        self._thread: threading.Thread | None = None
        self._outcome: tuple[int, BaseException | None] | None = None
        self._failures = 0
        self._total_failures = 0
        cdir.prepare(directory)
        self._lock = cdir.DirLock(directory)
        atexit.register(self._at_exit)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"ckpt-{step:09d}.pt")

    def list(self) -> list[int]:
        """Steps of the checkpoints present, newest first."""
        steps = [int(m.group(1)) for n in os.listdir(self.directory) if (m := cdir.NAME.match(n))]
        return sorted(steps, reverse=True)

    # ------------------------------------------------------------------ saving
    def maybe_save(self, state: Any) -> None:
        """At a step boundary: report a failed background save; save if due and rank 0."""
        if _rank() != 0:
            return
        self._harvest(block=False)
        if state.step % self.every_steps == 0:
            self.save(state)

    def save(self, state: Any) -> None:
        """Snapshot now (on the caller's thread), write in the background."""
        self._take_lock()
        buf = io.BytesIO()
        torch.save(state.state_dict(), buf)
        data = buf.getvalue()
        self.wait()
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(state.step, data),
                                            name="phalanx-checkpoint", daemon=True)
            self._thread.start()
        else:
            self._write(state.step, data)
            self._harvest(block=True)

    def wait(self) -> None:
        """Block until the background write (if any) is on disk; report it if it failed."""
        self._harvest(block=True)

    def close(self) -> None:
        """Wait for the last write and release the directory's lock."""
        try:
            self.wait()
        finally:
            self._lock.release()
            atexit.unregister(self._at_exit)

    def _write(self, step: int, data: bytes) -> None:
        """Runs on the writer thread: every outcome is kept for `_harvest`, never lost."""
        path = self.path(step)
        meta = {"step": step, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "job": self._lock.job, "time": time.time()}
        try:
            short = cdir.short_of_space(self.directory, len(data))
            if short:
                self._prune(max(self.keep - 1, 1), why=short)
            cdir.atomic_write(path, data)
            try:
                cdir.atomic_write(path + ".json", json.dumps(meta).encode())
            except BaseException:
                cdir.remove(path)  # data without its sidecar would read as damaged
                raise
        except Exception as e:  # any failure, not only OSError: reported at the next boundary
            self._outcome = (step, e)
            return
        self._outcome = (step, None)
        try:
            self._prune(self.keep)
        except OSError as e:  # the checkpoint is durable; only the rotation failed
            log.warning("%s: could not remove old checkpoints: %s", self.directory, e)

    def _prune(self, keep: int, why: str = "") -> None:
        gone = self.list()[keep:]
        for old in gone:
            cdir.remove(self.path(old), self.path(old) + ".json")
        if gone and why:
            log.warning("%s: %s; removed the oldest checkpoint(s) (steps %s) before writing",
                        self.directory, why, ", ".join(map(str, gone)))

    def _harvest(self, *, block: bool) -> None:
        t = self._thread
        if t is not None:
            if t.is_alive() and not block:
                return
            t.join()
            self._thread = None
        outcome, self._outcome = self._outcome, None
        if outcome is None:
            return
        step, err = outcome
        if err is None:
            self._failures = 0
            return
        self._failures += 1
        self._total_failures += 1
        self._failed(step, f"{type(err).__name__}: {err}")

    def _failed(self, step: int, error: str) -> None:
        try:
            newest = next(iter(self.list()), None)
        except OSError:
            newest = None
        durable = f"step {newest}" if newest is not None else "none"
        log.warning("the checkpoint of step %d was not saved in %s (%s); newest durable "
                    "checkpoint: %s; %d failed save(s) in a row (on_error=%r)", step,
                    self.directory, error, durable, self._failures, self.on_error)
        self._report(step, error, newest)
        if self.on_error == "fail" and self._failures >= self.max_failures:
            raise CheckpointError(
                f"{self._failures} checkpoint saves in a row failed in {self.directory} (step "
                f"{step}: {error}). Free space there (or lower keep=), or pass `phalanx run "
                "--checkpoint-errors warn` / Checkpointer(on_error='warn') to train on without "
                f"them; newest durable checkpoint: {durable}")

    def _report(self, step: int, error: str, newest: int | None) -> None:
        """Tell the launcher, for its final summary (bounded: not every save of a long job)."""
        rt = runtime.active()
        n = self._total_failures
        if rt is None or (n > _REPORT_ALL_UP_TO and n % 100):
            return
        info = {"step": step, "error": error[:300], "durable": newest,
                "dir": self.directory[-200:], "total": n}
        try:
            rt.event(cdir.EVENT, info, key=str(step))
        except (OSError, PhalanxError) as e:
            log.warning("could not report the failed checkpoint save to the launcher: %s", e)

    def _at_exit(self) -> None:
        """At interpreter exit: the last write's outcome is reported, not lost with its thread."""
        try:
            self._harvest(block=True)
        except CheckpointError as e:
            log.error("%s", e)

    def _take_lock(self) -> None:
        if self._lock.held or not self._lock.acquire():
            return
        stale = cdir.remove_temps(self.directory)
        if stale:
            log.warning("%s: removed %d temporary file(s) of interrupted writes: %s",
                        self.directory, len(stale), ", ".join(stale[:5]))

    # ------------------------------------------------------------------ loading
    def at_start(self, state: Any) -> int | None:
        """Before the first step: resume from the newest checkpoint (its step), or start fresh
        (None). Rank 0 takes the directory's lock first, so a second job fails here."""
        rank0 = _rank() == 0
        if rank0:
            self._take_lock()
        if not self.resume:
            if rank0:
                self._clear_earlier_runs()
            return None
        step, tried = self.load_newest(state)
        if step is None and tried:
            raise CheckpointError(
                f"{self.directory} holds checkpoints but none can be loaded; tried, newest "
                f"first: {'; '.join(tried)}. Restore a good copy there, or start from step 0 "
                "with `phalanx run --fresh` / Checkpointer(..., resume=False), which removes them")
        return step

    def load_latest(self, state: Any) -> int | None:
        """Load the newest valid checkpoint into `state`; returns its step, or None if none."""
        return self.load_newest(state)[0]

    def load_newest(self, state: Any) -> tuple[int | None, list[str]]:
        """Load the newest valid checkpoint: (its step or None, what was skipped and why)."""
        steps, tried = self.list(), []
        for i, step in enumerate(steps):
            data, why = self._read(step)
            if data is None:
                tried.append(f"{self.path(step)} ({why})")
                more = "falling back to an older one" if i + 1 < len(steps) else \
                    "no older checkpoint is left"
                warnings.warn(f"checkpoint {self.path(step)} is corrupt or partial ({why}); "
                              f"{more}", RuntimeWarning, stacklevel=3)
                continue
            state.load_state_dict(self._unpickle(data, self.path(step)))
            if self._lock.held:  # the writer: damaged ones would outrank new saves in rotation
                for bad in steps[:i]:
                    cdir.remove(self.path(bad), self.path(bad) + ".json")
            return step, tried
        return None, tried

    def verify(self, step: int) -> bytes | None:
        """The checkpoint's bytes if its checksum matches, else None."""
        return self._read(step)[0]

    def _read(self, step: int) -> tuple[bytes | None, str]:
        """(bytes, "") if the checkpoint is ours and whole, else (None, why not)."""
        path = self.path(step)
        try:
            meta = json.loads(cdir.read_owned(path + ".json"))
            data = cdir.read_owned(path)
        except FileNotFoundError as e:
            return None, f"{os.path.basename(e.filename or path)} is missing"
        except (OSError, ValueError) as e:
            return None, f"unreadable: {e}"
        if not isinstance(meta, dict) or meta.get("bytes") != len(data):
            return None, f"{len(data)} bytes where its sidecar says {meta.get('bytes')}" \
                if isinstance(meta, dict) else "its sidecar is not a JSON object"
        if meta.get("sha256") != hashlib.sha256(data).hexdigest():
            return None, "SHA-256 mismatch: damaged"
        return data, ""

    def _unpickle(self, data: bytes, path: str) -> Any:
        if self.trusted_pickle:
            return torch.load(io.BytesIO(data), weights_only=False)
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path} holds something safe loading (torch.load weights_only=True) refuses: "
                f"{_refused(e)}. If it is your own type, allow it with "
                "torch.serialization.add_safe_globals([YourType]) or make its state_dict() "
                "return plain values; Checkpointer(..., trusted_pickle=True) loads any pickle "
                "but runs whatever code the file holds") from None

    def _clear_earlier_runs(self) -> None:
        """Starting fresh: remove checkpoints not written by this job (they would outrank its
        new ones in rotation, and be taken for its own if it lost every worker)."""
        gone = [s for s in self.list() if not self._written_by_this_job(s)]
        for s in gone:
            cdir.remove(self.path(s), self.path(s) + ".json")
        if gone:
            log.warning("starting fresh (--fresh / resume=False): removed %d checkpoint(s) of "
                        "an earlier run from %s (steps %s)", len(gone), self.directory,
                        ", ".join(map(str, gone)))

    def _written_by_this_job(self, step: int) -> bool:
        try:
            meta = json.loads(cdir.read_owned(self.path(step) + ".json"))
        except (OSError, ValueError):
            return False
        return bool(self._lock.job) and isinstance(meta, dict) and meta.get("job") == \
            self._lock.job


def _policy(on_error: str | None) -> str:
    if on_error is not None:
        if on_error not in config.CHECKPOINT_ERROR_POLICIES:
            raise ConfigError(f"on_error={on_error!r} is not one of "
                              f"{config.CHECKPOINT_ERROR_POLICIES}")
        return on_error
    value = env.get_str(env.CHECKPOINT_ERRORS, "fail") or "fail"
    if value not in config.CHECKPOINT_ERROR_POLICIES:
        raise ConfigError(f"{env.CHECKPOINT_ERRORS}={value!r} is not one of "
                          f"{config.CHECKPOINT_ERROR_POLICIES}; use `phalanx run "
                          "--checkpoint-errors fail|warn`")
    return value


def _rank() -> int:
    """This worker's rank; a process not started by `phalanx run` and not initialised is 0."""
    rt = runtime.active()
    if rt is not None:
        return rt.group.place.rank
    if not env.launched():
        return 0
    from .. import api
    return api.rank()


def _numpy_globals() -> list[Any]:
    """What RNG state and numpy scalars in a snapshot need beyond weights_only's defaults:
    numeric arrays, dtypes and scalars (object arrays stay refused)."""
    core = getattr(np, "_core", None) or np.core
    numeric = {type(np.dtype(c)) for c in "?bhilqpBHILQPefdgFDG"}
    out: list[Any] = [np.ndarray, np.dtype, *sorted(numeric, key=str)]
    for fn in (core.multiarray._reconstruct, core.multiarray.scalar):
        out.append(fn)  # and its name under the other numpy major version
        out += [(fn, f"numpy.{m}.multiarray.{fn.__name__}") for m in ("core", "_core")]
    return out


def _refused(e: BaseException) -> str:
    """The line of torch's weights_only error that names what was refused."""
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue",
            "(1)", "(2)", "Re-running")
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(skip):
            return line
    return str(e).splitlines()[0] if str(e) else type(e).__name__
