"""A full disk, recognised in one place and said the same way everywhere.

The daemon and `taskrun-worker` write records, logs and git objects. When the
filesystem holding them runs out of space or quota, a write fails with
ENOSPC or EDQUOT (EFBIG for a file past its size limit). Neither process
stops for that: what could not be written stays in memory (the daemon's
records, engine.py), is asked for again (a Run's output, sessions.py), or is
refused before anything of it is on disk (a new Run), and everything catches
up by itself once space returns. This module says which errors those are
(`is_full`), how to say so (`reason`), and whether there is room again
(`has_room`, from statvfs).

`Space` is the daemon's memory of it for runs/ (Records.space): the reason
the last write failed, while it is full, and the Runs whose output is not
being recorded meanwhile ("stalled": the Worker keeps the Agent's output and
is asked to send it again from the recorded offset once there is room).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from taskrunner.errors import RecordError

#: errno values that mean "no room": no space left, quota exceeded, file too large.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: errno values of a disk that cannot be written for now (an I/O error, remounted read-only): treated
#: like a full one (kept, tried again, no new work), said differently.
FAULT_ERRNOS = frozenset({errno.EIO, errno.EROFS})
#: What git and other tools print for a full disk or quota (strerror of FULL_ERRNOS), when only their
#: stderr is known.
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "Out of diskspace", "File too large")
#: Free bytes (for an unprivileged writer) below which a filesystem counts as still full.
ROOM_BYTES = 1024 * 1024
#: Seconds between two looks for room while something waits for it (a stalled Run's output).
RETRY_SECONDS = 1.0


class RecordsFull(RecordError):
    """A record under runs/ could not be written because its disk is full (ENOSPC, EDQUOT, EFBIG).

    `reason` is the sentence for users (`reason()`); str() names the file too.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def full_errno(exc: BaseException) -> int | None:
    """The errno of `exc`, or of an OSError it was raised from, when it means "no room" (FULL_ERRNOS) or
    "cannot write for now" (FAULT_ERRNOS); else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS | FAULT_ERRNOS:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def is_full(exc: BaseException) -> bool:
    """True when `exc` (or the OSError behind it) says the disk or quota is full, or cannot be written
    for now (EIO, EROFS): either way the write is kept and tried again, and no new work is taken."""
    return full_errno(exc) is not None


def full_text(text: str) -> str | None:
    """The line of a tool's stderr `text` that says the disk or quota is full (FULL_TEXTS), or None."""
    return next((line.strip() for line in text.splitlines() if any(words in line for words in FULL_TEXTS)), None)


def git_full(text: str, where: Path | str) -> str | None:
    """Why a failed git command (its stderr `text`) failed for want of room, or None: the line that says so
    (full_text), else, since git does not always say so (a ref's lock file it could not write: "couldn't
    write '….lock'"), "no room left" when the disk holding `where` has none now (has_room)."""
    return full_text(text) or (None if has_room(where) else f"no room left on the disk holding {where}")


def errno_name(code: int | None) -> str:
    return errno.errorcode.get(code, str(code)) if code is not None else "ENOSPC"


def reason(what: str, where: Path | str, exc: BaseException | None = None, *, resumes: str = "") -> str:
    """The sentence a user reads, e.g. "the disk holding runs/ is full (ENOSPC): free space on it; …".

    `what` names the files ("runs/", "the Worker home"), `where` the directory
    (its path is said so the user knows which disk), `resumes` what happens
    once space returns ("assignments resume by themselves").
    """
    code = full_errno(exc) if exc is not None else None
    tail = f"; {resumes}" if resumes else ""
    if code in FAULT_ERRNOS:
        return f"the disk holding {what} cannot be written ({errno_name(code)}): check it ({where}){tail}"
    return f"the disk holding {what} is full ({errno_name(code)}): free space on it ({where}){tail}"


def free_bytes(path: Path | str) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem of `path` (statvfs); None when unknown."""
    try:
        info = os.statvfs(path)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def has_room(path: Path | str, need: int = ROOM_BYTES) -> bool:
    """True unless statvfs says fewer than `need` bytes are free (an unknown answer counts as room)."""
    free = free_bytes(path)
    return free is None or free >= need


@dataclass
class Stall:
    """A Run whose output is not being recorded: the Worker is asked to resume it once there is room."""

    run_id: str
    worker: str
    task_id: str
    number: int


class Space:
    """What the daemon knows of the disk holding runs/. Shared by the engine and write-behind threads.

    `full` is the reason of the last failed write while the disk is full
    (None once `still_full` finds room again); `stalls` the Runs whose output waits.
    """

    def __init__(self, root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self._clock = clock
        self._lock = threading.Lock()
        self._full: str | None = None
        self._stalls: dict[str, Stall] = {}
        self._next_look = 0.0  # for stalled output
        self._next_full_look = 0.0  # for `full` itself

    @property
    def full(self) -> str | None:
        return self._full

    def still_full(self) -> str | None:
        """`full`, looked at again (at most every RETRY_SECONDS): cleared once statvfs shows room and no Run's
        output waits for it (a small write that fits proves nothing), so new work resumes by itself."""
        if self._full is not None and not self._stalls:
            now = self._clock()
            if now >= self._next_full_look:
                self._next_full_look = now + RETRY_SECONDS
                if has_room(self.root):
                    self._full = None
        return self._full

    def failed(self, exc: BaseException) -> str:
        """A write failed because the disk is full: remember why; the reason."""
        text = reason("runs/", self.root, exc, resumes="what waits is written and assignments resume by "
                                                       "themselves once there is room")
        self._full = text
        self._next_full_look = self._clock() + RETRY_SECONDS
        return text

    def stall(self, stall: Stall) -> bool:
        """Stop recording a Run's output until there is room; True the first time for this Run."""
        with self._lock:
            fresh = stall.run_id not in self._stalls
            self._stalls[stall.run_id] = stall
            return fresh

    def stalled(self, run_id: str) -> bool:
        return run_id in self._stalls

    def release(self, run_id: str) -> None:
        with self._lock:
            self._stalls.pop(run_id, None)

    def due(self) -> list[Stall]:
        """The stalled Runs to resume now: all of them once there is room (looked at every RETRY_SECONDS),
        else none. Those returned are no longer stalled; a failing write stalls them again."""
        if not self._stalls:
            return []
        now = self._clock()
        if now < self._next_look:
            return []
        self._next_look = now + RETRY_SECONDS
        if not has_room(self.root):
            return []
        with self._lock:
            ready, self._stalls = list(self._stalls.values()), {}
        return ready
