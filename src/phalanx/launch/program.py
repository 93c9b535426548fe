"""What `phalanx run` starts on each worker: a Python script, `python [-m] ...`, or any command.

`phalanx run -np 4 train.py`, `phalanx run -np 4 python train.py`, `phalanx run -np 4 python -m
pkg.train` and `phalanx run -np 2 pytest tests/` all work, as with horovodrun and torchrun
--no-python. Python programs run inside the worker bootstrap (exceptions are reported with
file:line); other commands are exec'd and judged by their exit status.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from .child import EXEC, MODULE

_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")


def resolve(program: str, args: list[str]) -> tuple[str, list[str]]:
    """(what the worker bootstrap runs, its arguments); ValueError names what is wrong."""
    if os.path.isfile(program) and (program.endswith(".py") or not os.access(program, os.X_OK)):
        return program, args
    if program.endswith(".py") and not os.path.isfile(program):
        raise ValueError(f"script {program!r} not found (in {os.getcwd()})")
    if _PYTHON.match(os.path.basename(program)) or program == sys.executable:
        return _python(program, args)
    path = program if os.sep in program else shutil.which(program)
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return EXEC + os.path.abspath(path), args
    raise ValueError(f"{program!r} is neither a Python script nor a command on PATH; give a "
                     "script (train.py), `python train.py`, `python -m pkg.mod` or a command")


def _python(python: str, args: list[str]) -> tuple[str, list[str]]:
    """`python script.py ...` / `python -m mod ...` run in the bootstrap; other interpreter
    flags are passed to the real interpreter, exec'd."""
    if args and args[0] == "-m" and len(args) > 1:
        return MODULE + args[1], args[2:]
    if args and not args[0].startswith("-"):
        if not os.path.isfile(args[0]):
            raise ValueError(f"script {args[0]!r} not found (after {python!r})")
        return args[0], args[1:]
    path = shutil.which(python) or python
    return EXEC + os.path.abspath(path), args
