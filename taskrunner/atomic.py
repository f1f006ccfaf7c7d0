"""Crash-safe file writes: temp file in the same directory, fsync (unless told not to), rename.

The directory work happens through file descriptors (safefs.write_in), so the
temp file and the rename can never land in two different directories.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from taskrunner import safefs
from taskrunner.errors import UnsafePath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def write_bytes(path: Path, data: bytes, mode: int = 0o644, durable: bool = True, *,
                beneath: Path | None = None) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half.

    durable=False skips the fsync: still atomic for readers and across a crash
    of the writer, but not across a power loss. For files a power loss makes
    moot or that are rebuilt after one: a Worker's Run directory (its Agents
    die too), the daemon's records (restart skips a torn one and takes the
    Task up again from its file).

    `path` itself is never followed: the temp file is created exclusively
    without following links and renamed over `path` (a link there is
    replaced, not written through), both through one fd of the parent
    directory. The parent is opened by the path the caller gave, links and
    all, unless `beneath` is given: then every directory below `beneath` is
    opened without following links (safefs), and a link or special file
    there raises UnsafePath (an OSError). Pass `beneath` whenever the
    directories below it are content someone else controls, such as a work
    tree. Missing directories are made either way.
    """
    if beneath is not None:
        try:
            rel = path.relative_to(beneath).as_posix()
        except ValueError:
            raise UnsafePath(str(path), f"outside {beneath}") from None
        parts = safefs.split(rel)
        tree = safefs.Beneath(beneath)
        try:
            fd = tree.open_dir(parts[:-1], create=True)
        finally:
            tree.close()
    else:
        try:
            fd = os.open(path.parent, _DIR_FLAGS)
        except FileNotFoundError:
            # Most writes replace a file in a directory that exists: mkdir only when it does not.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.parent, _DIR_FLAGS)
    try:
        safefs.write_in(fd, path.name, data, mode, durable)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any, mode: int = 0o644, durable: bool = True) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes(path, text.encode(), mode, durable)


#: The most a state file read with `read_file` may hold (keys, trust stores, daemon.json, caches are far smaller).
MAX_STATE_BYTES = 64 * 1024 * 1024


def read_file(path: Path, limit: int = MAX_STATE_BYTES) -> bytes:
    """The bytes of the regular file at `path`: no link followed, no FIFO or device waited on, at most `limit`
    bytes. OSError otherwise (FileNotFoundError when missing; ELOOP for a link; EINVAL, naming the file, for
    anything that is not a regular file; EFBIG over `limit`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        data = os.read(fd, info.st_size + 1)  # at once: one copy of a large file, not chunks and a join
        if len(data) > info.st_size:  # it grew meanwhile
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
                if sum(map(len, chunks)) > limit:
                    raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
            data = b"".join(chunks)
        return data
    finally:
        os.close(fd)


def open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """A descriptor of the regular file at `path` (made with `mode` when `flags` has O_CREAT): no link
    followed, no FIFO waited on. OSError otherwise (EINVAL naming the file for anything not a regular file)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_json(path: Path) -> Any:
    """The JSON document in the regular file at `path` (read_file: OSError as it says; ValueError when it is
    not JSON)."""
    return parse_json(read_file(path))


def parse_json(data: bytes | str) -> Any:
    """json.loads, with nesting too deep for Python's parser (`[[[…]]]`, a RecursionError) a ValueError like
    any other text that is not JSON a file may hold."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
