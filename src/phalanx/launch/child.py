"""Worker bootstrap: die with the launcher, then run the user's script as __main__.

Run by path (not as a package module) so it imports nothing heavy before the script does.
"""

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup still applies
        pass
    # The launcher may have died between fork and prctl; then nobody would reap us.
    if os.getppid() == 1:
        sys.exit("phalanx worker: launcher exited before the worker started")
    script, args = sys.argv[1], sys.argv[2:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
