"""This clone's record key: `.git/taskrun/record.key`, 32 random bytes, mode 0600, never committed.

Apart from keys.py (the signing and SSH keys) so that reading records
(records.py, record_index.py, scancache.py: every `taskrun status`) does not
load the cryptography package.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from taskrunner.errors import KeyringError
from taskrunner.safefs import kind_of

#: The key that seals this clone's records (records.py): 32 random bytes, mode 0600.
RECORD_KEY_FILE = "record.key"
RECORD_KEY_BYTES = 32
#: What to do with a record key that cannot be used.
RECORD_KEY_FIX = ("restore it from a backup, or delete it (a new one is made), and every record written so far "
                  "counts as not written by this clone")


class KeyFileError(KeyringError):
    """Raised when a key file (keys.py, the record key) is missing, unreadable or holds something else.

    `what` says which file holds what instead, `fix` what to do; the message is both.
    """

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}: {fix}")
        self.what = what
        self.fix = fix


def record_key(state_dir: Path, create: bool) -> bytes | None:
    """This clone's record key; made on first use when `create`, else None when there is none.

    Each clone has its own: it is never committed, so a record sealed with
    it proves that this clone's daemon wrote it. Made once, exclusively (a
    temp file, fsynced, then hard-linked into place, which fails if another
    process made one first), so two writers can never hold different keys.
    Raises KeyringError when the file is there but unusable.
    """
    path = state_dir / RECORD_KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as exc:  # ELOOP: a link, never followed
        found = _lstat(path)
        what = kind_of(found.st_mode) if found is not None and not stat.S_ISREG(found.st_mode) else None
        reason = f"it is {what}, which taskrun never follows" if what else exc.strerror or str(exc)
        raise KeyFileError(f"cannot read the record key {path}: {reason}",
                           ("remove it if it is a link, and " if what else "") + RECORD_KEY_FIX) from None
    else:
        try:  # a directory, a FIFO, a device: no key (read with os.read: fdopen refuses a directory)
            info = os.fstat(fd)
            data = os.read(fd, RECORD_KEY_BYTES + 1) if stat.S_ISREG(info.st_mode) else b""
        finally:
            os.close(fd)
        if len(data) != RECORD_KEY_BYTES:
            raise KeyFileError(f"the record key {path} is damaged: it {_holds(info, data)}, where a file of exactly "
                               f"{RECORD_KEY_BYTES} random bytes belongs", RECORD_KEY_FIX)
        return data
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{RECORD_KEY_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(RECORD_KEY_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    return record_key(state_dir, create=False)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _holds(info: os.stat_result, data: bytes) -> str:
    """What a record key file that is not 32 bytes is, in words."""
    if not stat.S_ISREG(info.st_mode):
        return f"is {kind_of(info.st_mode)}"
    if not data:
        return "is empty"
    size = max(info.st_size, len(data))
    return f"holds {size} byte{'s' if size != 1 else ''}"
