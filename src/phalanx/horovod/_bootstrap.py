"""What each worker of `phalanx.horovod.run` runs: load the function from the run's private
directory (argv[1]), call it, and write what it returned under this worker's rank.

The rank is the one the worker holds when the function returns (`HOROVOD_RANK`, which
`hvd.init()` keeps current), so results come back in rank order as with `horovod.run`.
"""

from __future__ import annotations

import os
import pickle
import sys

from phalanx.horovod.runner import PAYLOAD, write_result


def main(directory: str) -> None:
    # The driver wrote this file, 0600 in a 0700 directory it created, for this job only.
    with open(os.path.join(directory, PAYLOAD), "rb") as f:
        func, args, kwargs = pickle.load(f)
    value = func(*args, **kwargs)
    write_result(directory, int(os.environ.get("HOROVOD_RANK", "0")), value)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m phalanx.horovod._bootstrap RUN_DIRECTORY (phalanx.horovod.run "
                 "starts it)")
    main(sys.argv[1])
