"""A maintained home for Horovod users: ``import phalanx.horovod.torch as hvd``.

`phalanx.horovod.torch` follows the API and documented behaviour of ``horovod.torch`` (its
last release was in June 2023), written fresh on top of phalanx's public API. A Horovod
script changes one import line and runs under ``phalanx run -np N script.py``; it gains
phalanx's recovery from lost workers. See `phalanx.horovod.torch` for what differs.

Scripts that start their own workers with ``horovod.run(fn, args=..., np=N)`` change one more
line, ``import horovod`` to ``import phalanx.horovod as horovod`` (see `runner`); and
``horovod.common.exceptions`` is `phalanx.horovod.common.exceptions`.
"""

from .runner import run

__all__ = ["run"]
