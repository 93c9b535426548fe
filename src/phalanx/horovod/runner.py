"""`phalanx.horovod.run`: Horovod's `horovod.run(fn, args, kwargs, np=...)`, which runs a
function on N workers and returns what each returned, in rank order.

    import phalanx.horovod as horovod           # was: import horovod
    results = horovod.run(train, args=(cfg,), np=2)

It starts a real `phalanx run -np N` job (so the workers get phalanx's supervision and
recovery) whose workers load the function, call it, and write what it returned. The function
and its arguments travel as a cloudpickle (standard pickle when cloudpickle is not installed:
then `fn` must be importable by name, not defined in ``__main__``), through a private
directory (0700, files 0600, created exclusively) that is removed afterwards. Workers' output
goes to this process's stdout and stderr, each line prefixed with its rank.

Horovod's arguments map onto `phalanx run`: `num_proc` (or the deprecated `np`) to -np,
`min_num_proc`/`max_num_proc` to --min-np/--max-np, `hosts` to -H, `hostfile` to --hostfile,
`reset_limit` to --max-restarts, `executable` to the interpreter workers run. `use_mpi=True`
and `mpi_args` are refused (phalanx has no MPI); the other ones (ssh, network interfaces,
timeouts, caching, verbosity) are accepted and have no effect.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

PAYLOAD = "payload.pkl"
"""The pickled (fn, args, kwargs) in the run's directory."""


def result_name(rank: int) -> str:
    """The file rank `rank` writes its result to."""
    return f"result.{rank}.pkl"


def run(func: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
        num_proc: int | None = None, min_num_proc: int | None = None,
        max_num_proc: int | None = None, slots: int | None = None,
        reset_limit: int | None = None, hosts: str | None = None, hostfile: str | None = None,
        executable: str | None = None, use_mpi: bool | None = None,
        mpi_args: str | None = None, np: int | None = None, min_np: int | None = None,
        max_np: int | None = None, **ignored: Any) -> list[Any]:
    """Run `func(*args, **kwargs)` on every worker of a new job; the list of what each
    returned, index = rank. RuntimeError naming the failure if the job fails."""
    if not callable(func):
        raise TypeError(f"run(func={func!r}): func must be callable")
    if use_mpi or mpi_args:
        raise ValueError("run(use_mpi=True / mpi_args=...): phalanx has no MPI; leave them unset "
                         "(workers talk over Gloo, as with use_gloo=True)")
    num_proc = _renamed(num_proc, np, "np", "num_proc")
    min_num_proc = _renamed(min_num_proc, min_np, "min_np", "min_num_proc")
    max_num_proc = _renamed(max_num_proc, max_np, "max_np", "max_num_proc")
    n = 1 if num_proc is None else num_proc
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"run(num_proc={num_proc!r}): must be an int >= 1")
    flags = _flags(n, min_num_proc, max_num_proc, reset_limit, hosts, hostfile)
    directory = tempfile.mkdtemp(prefix="phalanx-hvdrun-")   # 0700, unguessable
    try:
        _write(os.path.join(directory, PAYLOAD), _dumps((func, tuple(args), dict(kwargs or {}))))
        cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", *flags,
               executable or sys.executable, "-m", "phalanx.horovod._bootstrap", directory]
        code = subprocess.run(cmd, env=_env(), check=False).returncode
        if code != 0:
            raise RuntimeError(f"horovod.run: the job of {n} worker(s) failed (phalanx run exit "
                               f"status {code}); the launcher's last line above names the rank "
                               "and the reason")
        return [_read(directory, r) for r in range(_ranks(directory, n))]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _renamed(new: Any, old: Any, old_name: str, new_name: str) -> Any:
    if old is None:
        return new
    warnings.warn(f"run({old_name}=...) is deprecated, use {new_name}= (as in Horovod)",
                  DeprecationWarning, stacklevel=3)
    return old


def _flags(n: int, min_np: int | None, max_np: int | None, reset_limit: int | None,
           hosts: str | None, hostfile: str | None) -> list[str]:
    flags = ["-np", str(n)]
    for flag, value in (("--min-np", min_np), ("--max-np", max_np),
                        ("--max-restarts", reset_limit), ("-H", hosts),
                        ("--hostfile", hostfile)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def _env() -> dict[str, str]:
    """This environment, with this phalanx importable by the workers."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _dumps(obj: Any) -> bytes:
    try:
        import cloudpickle
    except ImportError:
        return pickle.dumps(obj)
    return bytes(cloudpickle.dumps(obj))


def _write(path: str, data: bytes) -> None:
    """Create `path` exclusively, 0600, and write `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_result(directory: str, rank: int, value: Any) -> None:
    """A worker's half: store what `func` returned for the driver."""
    _write(os.path.join(directory, result_name(rank)), _dumps(value))


def _ranks(directory: str, n: int) -> int:
    """How many ranks wrote results (fewer than `n` after an elastic job shrank)."""
    k = 0
    while os.path.exists(os.path.join(directory, result_name(k))):
        k += 1
    if k == 0:
        raise RuntimeError(f"horovod.run: the job finished but none of its {n} worker(s) wrote "
                           "a result")
    return k


def _read(directory: str, rank: int) -> Any:
    # Written by this job's own workers into a 0700 directory this process created.
    with open(os.path.join(directory, result_name(rank)), "rb") as f:
        return pickle.load(f)
