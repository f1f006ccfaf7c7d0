"""The daemon's lock: `<state dir>/daemon.lock`, flock'd by `taskrun up` for its whole life.

`taskrun up` takes it first thing, before it reads its configuration or loads
the daemon (cli/main.py `cmd_up`): from then on a command that needs the
daemon waits for its socket (control.request) instead of saying that no
daemon runs. `taskrun prune` takes it too, so that no daemon starts while it
prunes. The file holds the holder's pid, only to name it in the refusal. `held`
looks by taking a shared lock for a moment; `take` tries again for
PROBE_GRACE_SECONDS before it takes a lock it cannot get for a daemon's.
The lock file is never written through a link, FIFO or directory: anything
but a regular file there is refused, with what to do (atomic.open_regular).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from taskrunner import diskspace
from taskrunner.atomic import open_regular
from taskrunner.errors import LockError

LOCK_NAME = "daemon.lock"
#: `take` tries this long before it says the lock is held: `held` (any CLI command) holds a shared lock
#: for a moment, and `taskrun up` started next to one lost to it ("already running (pid unknown)").
PROBE_GRACE_SECONDS = 0.5
PROBE_POLL_SECONDS = 0.01


class LockBusy(LockError):
    """Raised by `take` when another process (a daemon, a prune) holds the lock; `holder`: its pid, as text."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def take(state_dir: Path, root: Path, name_holder: bool = True) -> int:
    """Take the lock of the work tree at `root` (its state dir `state_dir`, made if missing): the fd that holds
    it, for the caller to keep open as long as it holds it. `name_holder`: write this process's pid into it.

    LockBusy when another process holds it; LockError when the lock file is unusable (a link, a FIFO, a
    directory: never written through), saying to remove it.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    try:
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        fix = (f"make {state_dir} writable by this user" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
               else "remove it (the daemon makes it again)")
        raise LockError(f"cannot take the daemon's lock {path}: {exc.strerror or exc}; {fix}") from None
    deadline = time.monotonic() + PROBE_GRACE_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # `held` takes a shared lock for a moment: that is a command looking, not a daemon. Look again.
            if time.monotonic() < deadline:
                time.sleep(PROBE_POLL_SECONDS)
                continue
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockBusy(f"a taskrun daemon is already running in {root} (pid {holder}); use `taskrun status`, "
                           "or stop it before starting another", holder) from None
    if name_holder:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as exc:
            if not diskspace.is_full(exc):
                os.close(fd)
                raise
    return fd


def held(state_dir: Path) -> bool:
    """Whether a process holds the lock (a daemon, running or starting, or `taskrun prune`). A lock file that
    is missing, or not a regular file, is held by none."""
    try:
        fd = open_regular(state_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # a shared lock taken here goes with it
    return False
