"""Worker bootstrap: die with the launcher, run the user's script (or `-m` module) as
__main__, or exec any other command, and report an exception a Python program raises (type,
message, file:line, traceback) so the launcher can name it.

Run by path (not as a package module) so it imports nothing heavy before the script does.
An exception is a bug in the script, not a fault: the record goes to the file named by
PHALANX_ERROR_FILE and, if the script had joined the job, to the coordinator; the traceback
is printed once; the worker exits with code 1 without leaving the job cleanly.
"""

import ctypes
import json
import os
import runpy
import signal
import sys
import sysconfig
import time
import traceback

PR_SET_PDEATHSIG = 1
EXEC, MODULE = "exec:", "module:"
"""How the launcher names what a worker runs besides a script: `exec:/usr/bin/pytest` (any
command, exec'd) and `module:pkg.mod` (python -m pkg.mod). See `launch.program`."""
ERROR_FILE = "PHALANX_ERROR_FILE"
# Errors phalanx raises when a *peer* failed: consequences, never the root cause of a failure.
# (A CollectiveMismatch is not one: ranks that call different collectives are a bug.)
CASCADE = {"WorkerLost", "RendezvousError", "JobFinished"}


def error_record(exc: BaseException) -> dict:
    """Type, message and the innermost frame of the user's script where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    paths = sysconfig.get_paths()
    libs = tuple(os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib"))
    libs += (os.path.dirname(os.path.dirname(os.path.realpath(__file__))),)
    user = [f for f in frames if not f.filename.startswith("<")
            and not os.path.realpath(f.filename).startswith(libs)] or frames
    where = f"{user[-1].filename}:{user[-1].lineno}" if user else "?"
    name = type(exc).__name__
    return {"type": name, "message": str(exc)[:2000], "where": where, "time": time.time(),
            "cascade": name in CASCADE,
            "traceback": "".join(traceback.format_exception(exc))[-20000:]}


def report(exc: BaseException) -> None:
    record = error_record(exc)
    path = os.environ.get(ERROR_FILE)
    if path:
        try:
            import tempfile  # here, not at the top: a worker's start stays light
            # A private temporary name (O_EXCL, 0600): never a fixed one someone could plant.
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        except OSError:
            pass
    runtime = sys.modules.get("phalanx.runtime")
    rt = runtime.active() if runtime is not None else None
    if rt is not None:
        try:
            rt.report_failure(record)
        except Exception:  # the coordinator may be gone; the file still tells the launcher
            pass
    # A consequence of a peer's failure gets one line; the root cause its whole traceback.
    sys.stderr.write(f"{record['type']}: {record['message']}\n" if record["cascade"]
                     else record["traceback"])
    sys.stderr.flush()


def main() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup still applies
        pass
    # The launcher may have died between fork and prctl; then nobody would reap us.
    if os.getppid() == 1:
        sys.exit("phalanx worker: launcher exited before the worker started")
    program, args = sys.argv[1], sys.argv[2:]
    if program.startswith(EXEC) and not os.path.isfile(program):
        path = program[len(EXEC):]       # any command: it replaces this process
        os.execv(path, [os.path.basename(path), *args])
    module = program[len(MODULE):] if program.startswith(MODULE) else None
    if module is not None and not os.path.isfile(program):
        sys.argv = [module, *args]
        sys.path[0] = os.getcwd()
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        sys.argv = [program, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(program))
        run = lambda: runpy.run_path(program, run_name="__main__")  # noqa: E731
    try:
        run()
    except SystemExit:
        raise
    except BaseException as e:
        report(e)
        sys.stdout.flush()
        # Not sys.exit: atexit would leave the job cleanly, as if this worker had finished.
        os._exit(1)


if __name__ == "__main__":
    main()
