"""Crash-safe file writes: temp file in the same directory, fsync (unless told not to), rename."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half.

    durable=False skips the fsync: still atomic for readers and across a crash
    of the writer, but not across a power loss. For files a power loss makes
    moot or that are rebuilt after one: a Worker's Run directory (its Agents
    die too), the daemon's records (restart skips a torn one and takes the
    Task up again from its file).
    """
    # One writer per process and thread at a time, so this name is ours alone;
    # cheaper than mkstemp's random names, which showed in profiles.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, mode)
    except FileNotFoundError:
        # Most writes replace a file in a directory that exists: mkdir only when it does not.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, data: Any, mode: int = 0o644, durable: bool = True) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes(path, text.encode(), mode, durable)


def read_json(path: Path) -> Any:
    with open(path, "rb") as handle:
        return json.loads(handle.read())
