"""Files in a shared place (/dev/shm) that other local users can neither plant nor read.

The one way phalanx makes and opens its shared-memory files (no torch). A file is created
exclusively (``O_CREAT|O_EXCL|O_NOFOLLOW``), mode 0600, by exactly one rank; the others open it
without following links and refuse it unless it is a regular file of our own user with mode
0600. A name that already exists when we must create it is an error naming the path and the
fix, never reused: in a world-writable directory it may have been planted by another user
(a file they can write into, or a link to a file of ours they want grown or overwritten).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from collections.abc import Callable

from ..errors import ConfigError

__all__ = ["Ident", "check_ours", "create", "create_linked", "ident", "open_existing",
           "unlink_if", "wait_open"]

MODE = 0o600
_TMP_BYTES = 8                  # random bytes in the private name a linked file is made under
_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
Ident = tuple[int, int]
"""(st_dev, st_ino) of a file we created or opened: what its name must still point to."""


def _planted(path: str, what: str) -> ConfigError:
    return ConfigError(
        f"shared-memory file {path!r} {what}. phalanx never reuses such a name: it may be a "
        "stale file of an earlier run of this user, or one another local user planted (to "
        "read or corrupt the job's data). Remove it (rm -f -- " + repr(path) + ") and find out "
        "who made it, then run the job again")


def create(path: str) -> int:
    """Create `path` empty, mode 0600, exclusively, never through a link; an O_RDWR fd."""
    try:
        fd = os.open(path, _OPEN | os.O_CREAT | os.O_EXCL, MODE)
    except FileExistsError:
        raise _planted(path, f"already exists{_owner(path)}") from None
    try:
        os.fchmod(fd, MODE)         # exactly 0600 whatever the umask: peers check for it
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_linked(path: str, size: int) -> int:
    """Like `create`, but `path` appears only once it has `size` (zero) bytes.

    The file is made under a private random name and hard-linked into place: a peer waiting for
    `path` never maps it before it has its full size, and link(2), unlike rename(2), fails when
    the name exists instead of replacing what someone else put there."""
    tmp = f"{path}.new-{secrets.token_hex(_TMP_BYTES)}"
    fd = create(tmp)
    try:
        os.ftruncate(fd, size)
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        os.close(fd)
        raise _planted(path, f"already exists{_owner(path)}") from None
    except BaseException:
        os.close(fd)
        raise
    finally:
        unlink_if(tmp, None)
    return fd


def open_existing(path: str) -> int:
    """Open a file a peer created: an O_RDWR fd, FileNotFoundError if there is none yet, and
    ConfigError if the name is a link or not a 0600 regular file of our user."""
    try:
        fd = os.open(path, _OPEN)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _planted(path, "is a symbolic link") from None
        raise
    try:
        check_ours(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def wait_open(path: str, timeout: float, check: Callable[[], None]) -> int | None:
    """`open_existing`, waiting up to `timeout` seconds for the creator to make `path`
    (None if it never did); `check()` runs between tries and may raise to give up."""
    deadline, pause = time.monotonic() + timeout, 5e-5
    while True:
        try:
            return open_existing(path)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                return None
        check()
        time.sleep(pause)
        pause = min(pause * 2, 2e-3)


def check_ours(fd: int, path: str) -> None:
    """ConfigError unless `fd` is a regular file owned by our user with mode 0600."""
    st = os.fstat(fd)
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append("is not a regular file")
    if st.st_uid != os.geteuid():
        problems.append(f"is owned by uid {st.st_uid}, not by this job's user (uid "
                        f"{os.geteuid()})")
    if stat.S_IMODE(st.st_mode) != MODE:
        problems.append(f"has mode {oct(stat.S_IMODE(st.st_mode))}, not {oct(MODE)}")
    if problems:
        raise _planted(path, " and ".join(problems))


def ident(fd: int) -> Ident:
    """What `unlink_if` compares the name against."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def unlink_if(path: str, owned: Ident | None) -> None:
    """Remove the name `path` if it still names our file `owned` (None: any file of ours).

    Once we removed a name, someone else may take it: never remove what is there then."""
    try:
        st = os.lstat(path)
        if st.st_uid != os.geteuid() or (owned is not None and (st.st_dev, st.st_ino) != owned):
            return
        os.unlink(path)
    except (FileNotFoundError, PermissionError):
        pass


def _owner(path: str) -> str:
    try:
        st = os.lstat(path)
    except OSError:
        return ""
    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
    return f" ({kind} owned by uid {st.st_uid}, mode {oct(stat.S_IMODE(st.st_mode))})"
