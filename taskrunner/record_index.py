"""A compact index of the records under runs/, kept in the state directory, so a start reads only what changed.

runs/ stays the source of truth: the index only remembers, for each record
this clone's daemon sealed, what the record said and the file it was read
from, and every entry is checked against the file before it is used.

    .git/taskrun/record-index     line 1: HMAC-SHA256 (hex) of everything after it, keyed with the record key
                                  line 2: one JSON object (compact, UTF-8):
    {"version": 1, "stamp": <ns>,                      when the index was written (time.time_ns)
     "dirs":  {"runs/<dir>": [fingerprint, [subdirectory names], has status.json, [run numbers]]},
     "shapes": [[key, ...], ...],                       the key sets of the Run records (line 3)
     "tasks": {"<task id>": [fingerprint, [status, updated_at, seq], [offset, length] (or, as
                                earlier versions wrote it, the Task record's JSON text itself)]}}
                                  line 3: {"<task id>/<n>": [fingerprint, shape, Run record without its
                                           seal and its null values]}
                                  then: the Task records (JSON, without seal), one a line; a Task's
                                        [offset, length] (bytes, from the start of the first) points at its own

Line 3 is parsed only when a Run record is asked for, and a Task record only
when it is (its bytes sliced out by offset): `taskrun status` selects Tasks by
the status, time and sequence number beside each record in line 2, which
stays small, and parses only the records it shows.

A fingerprint is `[st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]` of
the file (or directory) taken with lstat *before* it was read. An entry is
believed only while the same lstat gives the same five numbers. Any write
changes the ctime, which nobody can set, and the daemon replaces records by
rename (a new inode); a directory's mtime and ctime change whenever an entry
is added to, removed from or renamed within it. Entries whose mtime or ctime
is within RACY_NS of the stamp are not believed (a file changed in the same
clock tick as the index was written could otherwise keep its numbers; git's
"racy" rule). So the index is stale exactly where a fingerprint differs, and
only those records are read again, through `Records` (seals checked,
links refused).

The index is never believed over a record: it holds only records that
passed their seal check, an entry whose file changed in any way is read
afresh (a record put there by anyone else is then refused as usual), and
the index file itself is used only if its HMAC verifies under this clone's
record key (which is never committed). A missing, corrupt, foreign or
oversized index, or one written under another key, is ignored as a whole
and rebuilt from runs/. Records that are not believed (ForeignRecord) or
unreadable are never indexed: they are read, and refused, every time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Iterator

from taskrunner.atomic import write_bytes
from taskrunner.defaults import RUNS_DIR
from taskrunner.errors import TaskrunError
from taskrunner.keys import record_key
from taskrunner.model import RUN_DIR_RE
from taskrunner.records import Records

INDEX_NAME = "record-index"
INDEX_VERSION = 1
#: Entries changed this close to the index's stamp (ns) are read again: timestamps can be coarse.
RACY_NS = 2_000_000_000
#: An index file larger than this is ignored (and rebuilt): about 10 KiB per Task for 100,000 Tasks.
MAX_INDEX_BYTES = 1 << 30
_DOMAIN = b"taskrun-record-index-v1\0"

Fingerprint = tuple[int, int, int, int, int]


def fingerprint(info: os.stat_result) -> Fingerprint:
    """The five numbers an index entry is checked against (see the module doc)."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class RecordIndex:
    """Records as `Records` reads them (load_task, load_run, task_ids, run_taken), through the index.

    Same results, same exceptions (ForeignRecord, RecordError) as `Records`;
    only unchanged records come from the index. `save()` writes what was
    consulted back. Not thread-safe: one thread (the engine at start, or the CLI).
    """

    def __init__(self, records: Records, state_dir: Path) -> None:
        self.records = records
        self.root = records.root
        self.path = state_dir / INDEX_NAME
        self._base = str(records.root) + "/"
        self._state_dir = state_dir
        self._stamp = 0
        self._dirs: dict[str, list[Any]] = {}
        self._tasks: dict[str, list[Any]] = {}
        self._runs: dict[str, list[Any]] = {}
        self._runs_raw: bytes | None = None  # line 3, until a Run record is asked for
        self._blob = b""  # the Task records after line 3, each found by its [offset, length]
        self._shapes: list[Any] = []
        self._new_dirs: dict[str, list[Any]] = {}
        self._new_tasks: dict[str, list[Any]] = {}
        self._new_runs: dict[str, list[Any]] = {}
        self._fresh_dirs: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.loaded = False

    # -- the index file -----------------------------------------------------

    def load(self) -> bool:
        """Read and verify the index file; False (and an empty index) when it is missing or not usable."""
        self._dirs, self._tasks, self._runs, self._stamp, self.loaded = {}, {}, {}, 0, False
        self._runs_raw, self._shapes, self._blob = None, [], b""
        try:
            key = record_key(self._state_dir, create=False)
        except TaskrunError:
            return False
        if key is None:
            return False
        raw = _read_regular(self.path, MAX_INDEX_BYTES)
        if raw is None:
            return False
        mac, _, body = raw.partition(b"\n")
        expected = hmac.new(key, _DOMAIN + body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(mac, expected):
            return False
        head, _, rest = body.partition(b"\n")
        runs_raw, _, blob = rest.partition(b"\n")
        try:
            data = json.loads(head)
            if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
                return False
            stamp, dirs, shapes = data["stamp"], data["dirs"], data["shapes"]
            if not (isinstance(stamp, int) and isinstance(dirs, dict) and isinstance(shapes, list)):
                return False
            tasks = data["tasks"]
            if not isinstance(tasks, dict):
                return False
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            return False
        self._stamp, self._dirs, self._tasks, self.loaded = stamp, dirs, tasks, True
        self._shapes, self._runs_raw, self._blob = shapes, runs_raw, blob
        return True

    def _text(self, ref: Any) -> str | None:
        """The Task record (JSON text) an index entry points at with [offset, length]; None if it cannot be."""
        if isinstance(ref, str):
            return ref
        if not (isinstance(ref, list) and len(ref) == 2 and all(type(n) is int for n in ref)):
            return None
        start, length = ref
        if start < 0 or length < 0 or start + length > len(self._blob):
            return None
        try:
            return self._blob[start:start + length].decode()
        except UnicodeDecodeError:
            return None

    def _old_runs(self) -> dict[str, list[Any]]:
        """The Run entries of the file read by `load` (line 3), parsed on first use; {} if unusable."""
        if self._runs_raw is not None:
            raw, self._runs_raw = self._runs_raw, None
            try:
                self._runs = _expand(json.loads(raw), self._shapes)
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                self._runs = {}
        return self._runs

    def save(self) -> bool:
        """Write the index (atomically, mode 0600) from what was consulted since `load`; False if it cannot.

        Kinds of entry not consulted at all (the Runs, for a reader of Task
        records only) are carried over as they were: each is still checked
        against its file when used.
        """
        try:
            key = record_key(self._state_dir, create=False)
        except TaskrunError:
            return False
        if key is None:
            return True  # this clone sealed no record yet: there is nothing its index could vouch for
        stamp = time.time_ns()
        dirs = self._new_dirs  # directories not walked are listed afresh next time
        shapes: dict[tuple[str, ...], int] = {}
        runs = _compact(self._new_runs if self._new_runs else self._old_runs(), shapes)
        tasks = self._new_tasks if self._new_tasks or self._fresh_dirs else {
            k: [e[0], e[1], text] for k, e in self._tasks.items()
            if isinstance(e, list) and len(e) == 3 and (text := self._text(e[2])) is not None}
        blob: list[bytes] = []
        at = 0
        refs: dict[str, list[int]] = {}
        for task_id, e in tasks.items():
            # Compact JSON holds no raw newline: one record a line.
            text = (e[2] if e[2] is not None else json.dumps(e[3], separators=(",", ":"), ensure_ascii=False)).encode()
            refs[task_id] = [at, len(text)]
            blob.append(text)
            at += len(text) + 1
        data = {"version": INDEX_VERSION, "stamp": stamp,
                "dirs": {k: v for k, v in dirs.items() if not self._racy(v[0], stamp)},
                "tasks": {k: [e[0], e[1], refs[k]] for k, e in tasks.items()},
                "shapes": [list(shape) for shape in shapes]}
        body = (json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
                + json.dumps(runs, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" + b"\n".join(blob))
        mac = hmac.new(key, _DOMAIN + body, hashlib.sha256).hexdigest().encode()
        try:
            write_bytes(self.path, mac + b"\n" + body, mode=0o600, durable=False)
        except OSError:
            return False
        return True

    # -- Records, through the index -------------------------------------------

    def task_ids(self) -> Iterator[str]:
        """Every Task with a record file, as `Records.task_ids`; unchanged directories are not listed again."""
        stack = [RUNS_DIR]
        while stack:
            rel = stack.pop()
            listing = self._listing(rel)
            if listing is None:
                continue
            subdirs, has_status = listing[1], listing[2]
            if has_status and rel != RUNS_DIR:
                yield rel[len(RUNS_DIR) + 1:]
            stack.extend(f"{rel}/{name}" for name in subdirs)

    def run_taken(self, task_id: str, number: int) -> bool:
        """As `Records.run_taken`; from the listing when this Task's directory was looked at by task_ids."""
        rel = f"{RUNS_DIR}/{task_id}"
        listing = self._new_dirs.get(rel)
        if rel in self._fresh_dirs and listing is not None:
            return number in listing[3]
        return self.records.run_taken(task_id, number)

    def task_summary(self, task_id: str) -> tuple[str, float, int] | None:
        """(status, updated_at, seq) of the Task's record when the index holds it unchanged, else None
        (then `load_task` says what the record is). Parses no record."""
        entry = self._task_entry(task_id)
        return None if entry is None else (entry[1][0], entry[1][1], entry[1][2])

    def load_task(self, task_id: str) -> dict[str, Any] | None:
        """As `Records.load_task`."""
        entry = self._task_entry(task_id)
        if entry is not None:
            if entry[3] is None:
                try:
                    record = json.loads(entry[2])
                except (ValueError, RecursionError):
                    record = None
                if isinstance(record, dict):
                    entry[3] = record
            if entry[3] is not None:
                self.hits += 1
                return dict(entry[3])
        self.misses += 1
        rel = f"{RUNS_DIR}/{task_id}/status.json"
        info = self._lstat(rel)
        record = self.records.load_task(task_id)  # ForeignRecord and RecordError go to the caller
        if record is not None and info is not None and stat.S_ISREG(info.st_mode):
            self._new_tasks[task_id] = [list(fingerprint(info)), _summary(record), None, record]
        return None if record is None else dict(record)

    def _task_entry(self, task_id: str) -> list[Any] | None:
        """[fingerprint, summary, record JSON or None, record or None] when the index holds this Task's
        record and its file has not changed, else None."""
        entry = self._new_tasks.get(task_id)
        if entry is not None:
            return entry
        entry = self._tasks.get(task_id)
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], list) and len(entry[1]) == 3):
            return None
        info = self._lstat(f"{RUNS_DIR}/{task_id}/status.json")
        if info is None or not stat.S_ISREG(info.st_mode):
            return None
        print_ = fingerprint(info)
        if not _same(entry[0], print_) or self._racy(print_, self._stamp):
            return None
        status, updated, seq = entry[1]
        if not (isinstance(status, str) and isinstance(updated, (int, float)) and isinstance(seq, int)):
            return None
        text = self._text(entry[2])
        if text is None:
            return None
        if isinstance(entry[2], str):
            self.misses += 1  # the earlier form (the record inline in line 2): counted so the index is rewritten
        fresh = self._new_tasks[task_id] = [entry[0], [status, float(updated), seq], text, None]
        return fresh

    def load_run(self, task_id: str, number: int) -> dict[str, Any] | None:
        """As `Records.load_run`."""
        return self._load(self._old_runs(), self._new_runs, f"{task_id}/{number}",
                          f"{RUNS_DIR}/{task_id}/run-{number}/status.json",
                          lambda: self.records.load_run(task_id, number))

    # -- internals -------------------------------------------------------------

    def _load(self, old: dict[str, list[Any]], new: dict[str, list[Any]], key: str, rel: str,
              read: Any) -> dict[str, Any] | None:
        info = self._lstat(rel)
        if info is None or not stat.S_ISREG(info.st_mode):
            return read()  # absent, or a link or special file: Records says which
        print_ = fingerprint(info)
        entry = old.get(key)
        if (isinstance(entry, list) and len(entry) == 2 and _same(entry[0], print_)
                and isinstance(entry[1], dict) and not self._racy(print_, self._stamp)):
            self.hits += 1
            new[key] = entry
            return dict(entry[1])
        self.misses += 1
        record = read()  # ForeignRecord and RecordError go to the caller, and nothing is indexed
        if record is not None:
            new[key] = [list(print_), record]
        return None if record is None else dict(record)

    def _listing(self, rel: str) -> list[Any] | None:
        """[fingerprint, subdirectories, has status.json, run numbers] of runs/<...>, or None if not a directory."""
        info = self._lstat(rel)
        if info is None or not stat.S_ISDIR(info.st_mode):
            return None
        print_ = fingerprint(info)
        entry = self._dirs.get(rel)
        if not (isinstance(entry, list) and len(entry) == 4 and _same(entry[0], print_)
                and not self._racy(print_, self._stamp) and _listing_shape(entry)):
            self.misses += 1
            entry = [list(print_), *self._scan(rel)]
        self._new_dirs[rel] = entry
        self._fresh_dirs.add(rel)
        return entry

    def _scan(self, rel: str) -> tuple[list[str], bool, list[int]]:
        subdirs: list[str] = []
        runs: list[int] = []
        has_status = False
        try:
            with os.scandir(self._base + rel) as entries:
                for entry in entries:
                    match = RUN_DIR_RE.match(entry.name)
                    if match:
                        runs.append(int(match.group(1)))
                    elif entry.name == "status.json":
                        has_status = not entry.is_dir(follow_symlinks=False)
                    elif not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
        except OSError:
            return [], False, []
        return sorted(subdirs), has_status, sorted(runs)

    def _lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self._base + rel)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _racy(print_: Any, stamp: int) -> bool:
        return max(int(print_[3]), int(print_[4])) >= stamp - RACY_NS


def _summary(record: dict[str, Any]) -> list[Any]:
    """[status, updated_at, seq] of a Task record, kept beside it in the index (0 for what is not a number)."""
    updated, seq = record.get("updated_at"), record.get("seq")
    return [str(record.get("status")),
            float(updated) if isinstance(updated, (int, float)) and not isinstance(updated, bool) else 0.0,
            seq if isinstance(seq, int) and not isinstance(seq, bool) else 0]


def _compact(entries: dict[str, list[Any]], shapes: dict[tuple[str, ...], int]) -> dict[str, list[Any]]:
    """Entries as stored: [fingerprint, shape number, {the record's non-null values}].

    A shape is a record's key set (sorted): listed once in "shapes", its null
    values are left out of each record, so a Run record costs a third of its size.
    """
    out: dict[str, list[Any]] = {}
    for key, (print_, record) in entries.items():
        if not isinstance(record, dict):
            continue
        shape = shapes.setdefault(tuple(sorted(record)), len(shapes))
        out[key] = [print_, shape, {k: v for k, v in record.items() if v is not None}]
    return out


def _expand(stored: Any, shapes: list[Any]) -> dict[str, list[Any]]:
    """The entries `_compact` stored, as [fingerprint, record]; TypeError/ValueError for a bad shape."""
    if not isinstance(stored, dict):
        raise TypeError("entries")
    keys = [tuple(shape) for shape in shapes]
    out: dict[str, list[Any]] = {}
    for name, (print_, shape, values) in stored.items():
        if not isinstance(values, dict) or not isinstance(shape, int) or not 0 <= shape < len(keys):
            raise TypeError("entry")
        record = dict.fromkeys(keys[shape])
        record.update(values)
        out[name] = [print_, record]
    return out


def _same(stored: Any, print_: Fingerprint) -> bool:
    return isinstance(stored, list) and len(stored) == 5 and tuple(stored) == print_


def _listing_shape(entry: list[Any]) -> bool:
    return (isinstance(entry[1], list) and all(isinstance(n, str) and "/" not in n and n not in (".", "..")
                                               for n in entry[1])
            and isinstance(entry[2], bool) and isinstance(entry[3], list)
            and all(isinstance(n, int) for n in entry[3]))


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file at `path` (no link followed, no FIFO waited on), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)
