"""The replay ledger: every bundle a Worker has taken, so none is taken twice.

    <home>/ledger.jsonl   one line per bundle: {"nonce", "run_id", "seq", "expires_at"}
                          and, after pruning, one {"max_seq": N} line first

A bundle is admitted only if its nonce and run id were never seen and its
sequence number is above every one seen; the entry is appended before its
Agent starts. Entries are kept until their bundle's expiry (plus the clock
skew allowance) has passed: from then on the bundle is refused as expired
anyway. The highest sequence number is kept for good.

Sessions of one Worker run as separate processes (a reconnect, or someone
else holding the daemon's SSH key): each admission takes an exclusive lock on
the file and first reads what other sessions appended, so a bundle is admitted
at most once across all of them. Pruning rewrites the file under the same lock;
a session notices the new file by its inode and reads it whole.

Appends are not fsynced: the ledger survives Worker restarts and crashes; a
power loss could lose the newest entries, but only for bundles still within
their expiry window.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from taskrunner.atomic import write_bytes
from taskrunner.defaults import CLOCK_SKEW_SECONDS
from taskrunner.errors import WorkerError

LEDGER_FILE = "ledger.jsonl"


class Replayed(WorkerError):
    """Raised when a bundle was seen before; the message is the specific reason."""


class ReplayLedger:
    def __init__(self, home: Path) -> None:
        self.path = home / LEDGER_FILE
        self._inode: int | None = None
        self._offset = 0
        self._nonces: dict[str, tuple[str, float]] = {}  # nonce -> (run id, expires_at)
        self._run_ids: set[str] = set()
        self._torn = False  # the file ends in a line a crash cut short
        self.max_seq = 0

    def admit(self, nonce: str, run_id: str, seq: int, expires_at: float) -> None:
        """Record the bundle, or raise Replayed saying why it was refused."""
        with self._locked() as handle:
            self._catch_up(handle)
            if nonce in self._nonces:
                raise Replayed("bundle rejected: replayed nonce")
            if run_id in self._run_ids:
                raise Replayed("bundle rejected: replayed run id")
            if seq <= self.max_seq:
                raise Replayed(f"bundle rejected: sequence number {seq} is not above {self.max_seq}, "
                               "the highest this Worker has taken")
            line = json.dumps({"nonce": nonce, "run_id": run_id, "seq": seq, "expires_at": expires_at})
            handle.write((b"\n" if self._torn else b"") + line.encode() + b"\n")
            handle.flush()
            self._offset = handle.tell()
            self._take(nonce, run_id, seq, expires_at)

    def prune(self, now: float) -> int:
        """Drop entries whose bundles can no longer be taken; how many were dropped."""
        with self._locked() as handle:
            self._catch_up(handle)
            cutoff = now - CLOCK_SKEW_SECONDS
            stale = sum(1 for _, expires in self._nonces.values() if expires < cutoff)
            if not stale:
                return 0
            lines = [json.dumps({"max_seq": self.max_seq})]
            for nonce, (run_id, expires) in self._nonces.items():
                if expires >= cutoff:
                    lines.append(json.dumps({"nonce": nonce, "run_id": run_id, "seq": 0, "expires_at": expires}))
            write_bytes(self.path, ("\n".join(lines) + "\n").encode(), mode=0o600)
            self._inode = None  # read the new file whole next time
            return stale

    @contextmanager
    def _locked(self) -> Iterator[BinaryIO]:
        """The ledger file, open and exclusively locked.

        A prune may replace the file while we wait for the lock: the lock we then
        get is on the old, unlinked file, and an entry appended there would be
        lost. So check that the locked file is still the one at `path`.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with open(fd, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                held, current = os.fstat(handle.fileno()), os.stat(self.path)
                if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                    yield handle
                    return

    def _catch_up(self, handle: BinaryIO) -> None:
        inode = os.fstat(handle.fileno()).st_ino
        if inode != self._inode:
            self._inode, self._offset = inode, 0
            self._nonces.clear()
            self._run_ids.clear()
            self.max_seq = 0
        handle.seek(self._offset)
        data = handle.read()
        end = data.rfind(b"\n") + 1
        self._torn = end < len(data)
        for raw in data[:end].splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # a line a crash cut short: its bundle never started
            if "max_seq" in entry:
                self.max_seq = max(self.max_seq, int(entry["max_seq"]))
            else:
                self._take(entry["nonce"], entry["run_id"], int(entry["seq"]), float(entry["expires_at"]))
        self._offset += end

    def _take(self, nonce: str, run_id: str, seq: int, expires_at: float) -> None:
        self._nonces[nonce] = (run_id, expires_at)
        self._run_ids.add(run_id)
        self.max_seq = max(self.max_seq, seq)
