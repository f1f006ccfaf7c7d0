"""A compact index of the records under runs/, kept in the state directory, so a start reads only what changed.

runs/ stays the source of truth: the index only remembers, for each record
this clone's daemon sealed, what the record said and the file it was read
from, and every entry is checked against the file before it is used.

The file's layout, its columns and binary fingerprints, is index_file.py's.

A fingerprint is `(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)` of
the file (or directory) taken with lstat *before* it was read. An entry is
believed only while the same lstat gives the same five numbers. Any write
changes the ctime, which nobody can set, and the daemon replaces records by
rename (a new inode); a directory's mtime and ctime change whenever an entry
is added to, removed from or renamed within it. Entries whose mtime or ctime
is within RACY_NS of the stamp are not written into the index (a file changed
in the same clock tick as the index was written could otherwise keep its
numbers; git's "racy" rule). So the index is stale exactly where a
fingerprint differs, and only those records are read again, through
`Records` (seals checked, links refused).

The index is never believed over a record: it holds only records that
passed their seal check, an entry whose file changed in any way is read
afresh (a record put there by anyone else is then refused as usual), and
the index file itself is used only if its HMAC verifies under this clone's
record key (which is never committed). A missing, corrupt, foreign or
oversized index, one of another version, or one written under another key,
is ignored as a whole and rebuilt from runs/. An entry of the wrong shape
(sealed, so only an older version's bug could write one) is a miss, never a
crash. Records that are not believed (ForeignRecord) or unreadable are never
indexed: they are read, and refused, every time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
import time
from pathlib import Path
from typing import Any, Iterator

from taskrunner import index_file
from taskrunner.atomic import write_bytes
from taskrunner.defaults import RUNS_DIR
from taskrunner.errors import TaskrunError
from taskrunner.index_file import INDEX_NAME, INDEX_VERSION, MAX_INDEX_BYTES, PRINT  # noqa: F401 (names of the index)
from taskrunner.model import RUN_DIR_RE, RunStatus
from taskrunner.recordkey import record_key
from taskrunner.records import Records
from taskrunner.state import RunState

#: Entries changed this close to the index's stamp (ns) are not written into it: timestamps can be coarse.
RACY_NS = 2_000_000_000
#: The fields of a Task record a restart rebuilds its state from (state.TaskState.from_record), in row order.
TASK_FIELDS = ("file", "seq", "status", "revision", "error", "attempts", "not_before", "removed", "updated_at")
#: RunState's fields, the order of a Run's row (an index made for other fields is not used).
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunState))
_STATUS_AT = RUN_FIELDS.index("status")
_NONE = index_file.Loaded(0, [], [], ([], [], [], []), [], ([], [], []), b"", 0, 0, b"{}", b"{}")  # no file read

Fingerprint = tuple[int, int, int, int, int]


def fingerprint(info: os.stat_result) -> Fingerprint:
    """The five numbers an index entry is checked against (see the module doc)."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _print(info: os.stat_result) -> list[int]:
    """A Run record's fingerprint as line 4 stores it (a list compares with a list in one step)."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


class RecordIndex:
    """Records as `Records` reads them (load_task, load_run, task_ids, run_taken), through the index.

    Same results, same exceptions (ForeignRecord, RecordError) as `Records`;
    only unchanged records come from the index. `restored` rebuilds an
    unchanged Task's state without a record parsed, `task_summary` and
    `task_text` give what `taskrun status` needs of one. `save()` writes what
    was consulted back. Not thread-safe: one thread (the engine at start, or the CLI).
    """

    def __init__(self, records: Records, state_dir: Path) -> None:
        self.records = records
        self.root = records.root
        self.path = state_dir / INDEX_NAME
        self._base = str(records.root) + "/"
        self._state_dir = state_dir
        self._file = _NONE  # the file `load` read: columns, fingerprints (the Tasks', then the dirs'), records
        self._dirs: dict[str, int] = {}  # path -> its row in the file's dir columns
        self._tasks: dict[str, int] = {}  # Task id -> its row in the task columns
        self._ntasks = 0  # a directory's fingerprint is at _ntasks + its row
        self._runs: dict[str, Any] = {}
        self._rows: dict[str, Any] = {}
        self._rows_raw: bytes | None = None  # line 3, until a restore row is asked for
        self._runs_raw: bytes | None = None  # line 4, until a Run record is asked for
        self._new_dirs: dict[str, list[Any]] = {}
        #: Consulted Tasks: [fingerprint (a tuple), status, updated_at, seq, record text (bytes) or [offset, length]
        #: or None, record or None, restore row (None: not looked up yet; False: none)].
        self._new_tasks: dict[str, list[Any]] = {}
        #: Consulted Runs: [fingerprint, row (RUN_FIELDS values, the status as text)].
        self._new_runs: dict[str, list[Any]] = {}
        self._fresh_dirs: set[str] = set()
        self._verified: dict[str, int] | None = None  # Tasks summaries() found unchanged: id -> row
        self.hits = self.misses = 0
        self.loaded = False

    # -- the index file -----------------------------------------------------

    def load(self) -> bool:
        """Read and verify the index file; False (and an empty index) when it is missing or not usable."""
        self._file, self._dirs, self._tasks, self._ntasks, self._runs, self._rows = _NONE, {}, {}, 0, {}, {}
        self._rows_raw, self._runs_raw, self.loaded = None, None, False
        try:
            key = record_key(self._state_dir, create=False)
        except TaskrunError:
            return False
        if key is None:
            return False
        loaded = index_file.read(self.path, key)
        if loaded is None:
            return False
        try:
            self._tasks = dict(zip(loaded.ids, range(len(loaded.ids))))
            self._dirs = dict(zip(loaded.paths, range(len(loaded.paths))))
        except TypeError:  # a name that is not a str (unhashable)
            self._tasks, self._dirs = {}, {}
            return False
        self._file, self._ntasks, self.loaded = loaded, len(loaded.ids), True
        # Rows of other fields (another version's RunState) are not used: every Run record is read again.
        self._rows_raw = loaded.rows_raw
        self._runs_raw = loaded.runs_raw if loaded.run_fields == list(RUN_FIELDS) else b"{}"
        return True

    def _print_at(self, row: int) -> tuple[int, ...]:
        """The fingerprint stored at `row` (a Task's row, or _ntasks + a directory's)."""
        return PRINT.unpack_from(self._file.raw, self._file.prints_at + PRINT.size * row)

    def _slice(self, ref: Any) -> bytes | None:
        """The Task record (JSON bytes) an index entry points at with [offset, length]; None if it cannot be."""
        if type(ref) is bytes:
            return ref
        if not (type(ref) is list and len(ref) == 2 and type(ref[0]) is int and type(ref[1]) is int):
            return None
        start, length = ref
        start += self._file.blob_at
        if start < self._file.blob_at or length < 0 or start + length > len(self._file.raw):
            return None
        return self._file.raw[start:start + length]

    def _old_runs(self) -> dict[str, Any]:
        """The Run entries of the file read by `load` (line 4), parsed on first use; {} if unusable."""
        if self._runs_raw is not None:
            self._runs, self._runs_raw = index_file.parse_line(self._runs_raw), None
        return self._runs

    def _old_rows(self) -> dict[str, Any]:
        """The restore rows of the file read by `load` (line 3), parsed on first use; {} if unusable."""
        if self._rows_raw is not None:
            self._rows, self._rows_raw = index_file.parse_line(self._rows_raw), None
        return self._rows

    def save(self) -> bool:
        """Write the index (atomically, mode 0600) from what was consulted since `load`; False if it cannot.

        Kinds of entry not consulted at all (the Runs, for a reader of Task
        records only) are carried over as they were, unparsed: each is still
        checked against its file when used.
        """
        try:
            key = record_key(self._state_dir, create=False)
        except TaskrunError:
            return False
        if key is None:
            return True  # this clone sealed no record yet: there is nothing its index could vouch for
        if self._verified is not None:
            self._consulted()
        stamp = time.time_ns()
        racy = stamp - RACY_NS
        if self._new_runs or self._runs_raw is None:
            runs = {name: entry for name, entry in (self._new_runs.items() if self._new_runs else
                                                    self._carried_runs()) if max(entry[0][3], entry[0][4]) < racy}
            runs_line = json.dumps(runs, separators=(",", ":"), ensure_ascii=False).encode()
        else:
            runs_line = self._runs_raw
        tasks = self._new_tasks if self._new_tasks or self._fresh_dirs else self._carried_tasks()
        blob: list[bytes] = []
        prints: list[bytes] = []
        ids, status, updated, seqs, texts, at = [], [], [], [], [], 0  # the task columns
        rows: dict[str, Any] = {}
        for task_id, (print_, state, when, seq, text, record, row) in tasks.items():
            if max(print_[3], print_[4]) >= racy:
                continue
            data = self._slice(text) if text is not None else None
            if data is None:
                if record is None:
                    continue
                data = json.dumps(record, sort_keys=True).encode()  # no raw newline: one record a line
            try:
                prints.append(PRINT.pack(*print_))
            except struct.error:
                continue  # numbers no fingerprint of ours holds: read again next time
            ids.append(task_id)
            status.append(state)
            updated.append(when)
            seqs.append(seq)
            texts += (at, len(data))
            blob.append(data)
            at += len(data) + 1
            row = self._old_row(task_id) if row is None else row
            if row:
                rows[task_id] = row
        paths: list[str] = []
        dir_cols: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        for path, (print_, subdirs, has_status, numbers) in self._new_dirs.items():
            if max(print_[3], print_[4]) >= racy:
                continue
            try:
                prints.append(PRINT.pack(*print_))
            except struct.error:
                continue
            paths.append(path)
            dir_cols[0].append(subdirs)
            dir_cols[1].append(has_status)
            dir_cols[2].append(numbers)
        head = {"stamp": stamp, "run_fields": list(RUN_FIELDS),
                "tasks": {"ids": ids, "status": status, "updated": updated, "seq": seqs, "text": texts},
                "dirs": {"paths": paths, "subdirs": dir_cols[0], "status": dir_cols[1], "runs": dir_cols[2]}}
        rows_line = json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            write_bytes(self.path, index_file.encode(key, head, rows_line, runs_line, prints, blob), mode=0o600,
                        durable=False)
        except OSError:
            return False
        return True

    def _carried_runs(self) -> Iterator[tuple[str, list[Any]]]:
        """The Run entries of the file read, those of the shape `save` writes."""
        for name, entry in self._old_runs().items():
            if type(entry) is list and len(entry) == 2 and _is_print(entry[0]) and _run_row(entry[1]) is not None:
                yield name, entry

    def _carried_tasks(self) -> dict[str, list[Any]]:
        """The Task entries of the file read, as consulted entries (for a save that consulted none)."""
        entries = ((task_id, self._stored_task(task_id, row)) for task_id, row in self._tasks.items())
        return {task_id: entry for task_id, entry in entries if entry is not None}

    def _stored_task(self, task_id: str, row: int) -> list[Any] | None:
        """The entry (as `_new_tasks` holds one) of row `row` of the file read, None for one of another shape
        (a sealed index holds nothing else, but an older version's bug must make a miss, not a crash)."""
        status, updated, seq, text = self._file.task_cols
        entry = [self._print_at(row), status[row], updated[row], seq[row], text[2 * row:2 * row + 2], None, None]
        return entry if type(entry[1]) is str and type(entry[2]) is float and type(entry[3]) is int else None

    def _old_row(self, task_id: str) -> list[Any] | bool:
        """The restore row line 3 holds for a Task, False when it holds none (or one of another shape)."""
        row = self._old_rows().get(task_id)
        if type(row) is list and len(row) == 2 and type(row[0]) is list and len(row[0]) == len(TASK_FIELDS):
            return row if type(row[1]) is list else False
        return False

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
            if subdirs:
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
        return None if entry is None else (entry[1], entry[2], entry[3])

    def summaries(self) -> Iterator[tuple[str, tuple[str, float, int] | None]]:
        """(task id, (status, updated_at, seq)) for every Task `task_ids` lists, the summary None unless the
        index holds its record unchanged (then `load_task`). One lstat per record and directory; when no
        directory changed (their fingerprints compared as one block), no entry is made per Task until a
        save needs them (`_consulted`)."""
        ids = self._unchanged_tree() if self.loaded and not self._new_dirs and self._verified is None else None
        if ids is None:
            task_entry = self._task_entry
            for task_id in self.task_ids():
                entry = task_entry(task_id)
                yield task_id, None if entry is None else (entry[1], entry[2], entry[3])
            return
        verified = self._verified = {}
        statuses, updated, seqs, _ = self._file.task_cols
        rows, prints, at, size = self._tasks, self._file.raw, self._file.prints_at, PRINT.size
        unpack = PRINT.unpack_from
        lstat, s_isreg, base = os.lstat, stat.S_ISREG, f"{self._base}{RUNS_DIR}/"
        for task_id in ids:
            row = rows.get(task_id)
            summary = None
            if row is not None:
                try:
                    info = lstat(f"{base}{task_id}/status.json")
                except (OSError, ValueError):
                    info = None
                if (info is not None and s_isreg(info.st_mode) and unpack(prints, at + size * row)
                        == (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)):
                    status, when, seq = statuses[row], updated[row], seqs[row]
                    if type(status) is str and type(when) is float and type(seq) is int:
                        summary = (status, when, seq)
                        verified[task_id] = row
            yield task_id, summary

    def _unchanged_tree(self) -> list[str] | None:
        """The Tasks with a record file, in the index's order, when every directory the index lists is there
        with its fingerprint unchanged and their listings reach exactly these directories from runs/
        (so a walk would find what the index says); None otherwise (then walk: task_ids)."""
        paths = self._dirs
        subdirs_col, has_col, runs_col = self._file.dir_cols
        if RUNS_DIR not in paths or len(paths) != len(subdirs_col):
            return None
        lstat, s_isdir, pack, base = os.lstat, stat.S_ISDIR, PRINT.pack, self._base
        packed = []
        try:
            for path in paths:
                info = lstat(base + path)
                if not s_isdir(info.st_mode):
                    return None
                packed.append(pack(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
        except (OSError, ValueError, struct.error):
            return None
        start = self._file.prints_at + PRINT.size * self._ntasks
        if b"".join(packed) != self._file.raw[start:start + PRINT.size * len(paths)]:
            return None
        ids: list[str] = []
        listed: set[str] = set()
        for path, row in paths.items():
            subdirs, has_status = subdirs_col[row], has_col[row]
            if type(subdirs) is not list or type(has_status) is not bool or type(runs_col[row]) is not list:
                return None
            if subdirs:
                if not _listing_shape([None, subdirs, has_status, runs_col[row]]):
                    return None
                listed.update(f"{path}/{name}" for name in subdirs)
            if has_status and path != RUNS_DIR:
                ids.append(path[len(RUNS_DIR) + 1:])
        listed.add(RUNS_DIR)
        return ids if listed == paths.keys() else None

    def _consulted(self) -> None:
        """The entries a save writes for what summaries() found unchanged without making them: every
        directory of the index, every Task it verified."""
        verified, self._verified = self._verified or {}, None
        subdirs, has_status, numbers = self._file.dir_cols
        for path, row in self._dirs.items():
            if path not in self._new_dirs:
                self._new_dirs[path] = [self._print_at(self._ntasks + row), subdirs[row], has_status[row],
                                        numbers[row]]
                self._fresh_dirs.add(path)
        self._new_tasks.update((i, self._stored_task(i, row))  # of the right shape: summaries() checked it
                               for i, row in verified.items() if i not in self._new_tasks)

    def task_text(self, task_id: str) -> str | None:
        """The Task's record as json.dumps(record, sort_keys=True) writes it, when the index holds it unchanged;
        else None. Parses no record."""
        row = self._verified.get(task_id) if self._verified and task_id not in self._new_tasks else None
        if row is not None:  # found unchanged by summaries(): straight from the file read
            data = self._slice(self._file.task_cols[3][2 * row:2 * row + 2])
            try:
                return None if data is None else data.decode()
            except UnicodeDecodeError:
                return None
        entry = self._task_entry(task_id)
        if entry is None:
            return None
        if entry[5] is not None:
            return json.dumps(entry[5], sort_keys=True)
        data = self._slice(entry[4])
        try:
            return None if data is None else data.decode()
        except UnicodeDecodeError:
            return None

    def load_task(self, task_id: str) -> dict[str, Any] | None:
        """As `Records.load_task`."""
        entry = self._task_entry(task_id)
        if entry is not None:
            if entry[5] is None:
                data = self._slice(entry[4])
                try:
                    record = json.loads(data) if data is not None else None
                except (ValueError, RecursionError):
                    record = None
                if isinstance(record, dict):
                    entry[5] = record
            if entry[5] is not None:
                self.hits += 1
                return dict(entry[5])
        self.misses += 1
        rel = f"{RUNS_DIR}/{task_id}/status.json"
        info = self._lstat(rel)
        record = self.records.load_task(task_id)  # ForeignRecord and RecordError go to the caller
        if record is not None and info is not None and stat.S_ISREG(info.st_mode):
            self._new_tasks[task_id] = [fingerprint(info), *_summary(record), None, record, _row(task_id, record)]
        return None if record is None else dict(record)

    def restored(self, task_id: str) -> tuple[dict[str, Any], list[RunState]] | None:
        """(the Task record's fields in TASK_FIELDS, and task_id; its Runs' states, in order) when the index
        holds the Task's record and every Run record it lists unchanged, and no run-<n> past them exists;
        else None (then read it through load_task and load_run). Parses no record."""
        entry = self._task_entry(task_id)
        if entry is None:
            return None
        if entry[6] is None:
            entry[6] = self._old_row(task_id)
        row = entry[6]
        if not row:
            return None
        runs: list[RunState] = []
        try:
            for number in row[1]:
                run = self._run_entry(task_id, number) if type(number) is int else None
                if run is None:
                    return None
                runs.append(run)
            if self.run_taken(task_id, max(row[1], default=0) + 1):
                return None  # a Run record the Task record does not list yet: read the slow way
        except (TypeError, ValueError):
            return None  # an entry of another shape (see _stored_task)
        self.hits += 1 + len(runs)
        data = dict(zip(TASK_FIELDS, row[0]))
        data["task_id"] = task_id
        return data, runs

    def _task_entry(self, task_id: str) -> list[Any] | None:
        """The consulted entry (see _new_tasks) when the index holds this Task's record and its file has not
        changed, else None."""
        entry = self._new_tasks.get(task_id)
        if entry is not None:
            return entry
        row = self._verified.get(task_id) if self._verified else None
        if row is not None:  # found unchanged by summaries() a moment ago
            entry = self._new_tasks[task_id] = self._stored_task(task_id, row)  # of the right shape: verified
            return entry
        row = self._tasks.get(task_id)
        if row is None:
            return None
        try:
            info = os.lstat(f"{self._base}{RUNS_DIR}/{task_id}/status.json")
        except (OSError, ValueError):
            return None
        if (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns) != self._print_at(row):
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        entry = self._stored_task(task_id, row)
        if entry is not None:
            self._new_tasks[task_id] = entry
        return entry

    def _run_entry(self, task_id: str, number: int) -> RunState | None:
        """The state of a Run whose record the index holds unchanged (its entry kept for the save), else None."""
        name = f"{task_id}/{number}"
        entry = self._new_runs.get(name)
        if entry is None:
            info = self._lstat(f"{RUNS_DIR}/{task_id}/run-{number}/status.json")
            if info is None:
                return None
            entry = self._old_runs().get(name)
            if type(entry) is not list or len(entry) != 2 or entry[0] != _print(info) or not stat.S_ISREG(info.st_mode):
                return None
        run = _run_row(entry[1])
        if run is not None:
            self._new_runs[name] = entry
        return run

    def load_run(self, task_id: str, number: int) -> dict[str, Any] | None:
        """As `Records.load_run`; from the index, the record as the Run's state writes it (RunState.record)."""
        run = self._run_entry(task_id, number)
        if run is not None:
            self.hits += 1
            return run.record()
        self.misses += 1
        rel = f"{RUNS_DIR}/{task_id}/run-{number}/status.json"
        info = self._lstat(rel)
        record = self.records.load_run(task_id, number)  # ForeignRecord and RecordError go to the caller
        if record is not None and info is not None and stat.S_ISREG(info.st_mode):
            try:
                state = RunState.from_record(record)
            except (KeyError, ValueError, TypeError):
                return record  # read_tasks says what is wrong with it, each time: not indexed
            row = [getattr(state, name) for name in RUN_FIELDS]
            row[_STATUS_AT] = state.status.value
            self._new_runs[f"{task_id}/{number}"] = [_print(info), row]
        return record

    # -- internals -------------------------------------------------------------

    def _listing(self, rel: str) -> list[Any] | None:
        """[fingerprint, subdirectories, has status.json, run numbers] of runs/<...>, or None if not a directory."""
        info = self._lstat(rel)
        if info is None or not stat.S_ISDIR(info.st_mode):
            return None
        print_ = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        row = self._dirs.get(rel)
        entry = None
        if row is not None and self._print_at(self._ntasks + row) == print_:
            subdirs, has_status, numbers = self._file.dir_cols
            entry = [print_, subdirs[row], has_status[row], numbers[row]]
            if not _listing_shape(entry):
                entry = None
        if entry is None:
            self.misses += 1
            entry = [print_, *self._scan(rel)]
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


def _summary(record: dict[str, Any]) -> list[Any]:
    """[status, updated_at, seq] of a Task record, what `taskrun status` selects on (0 for what is not a number)."""
    updated, seq = record.get("updated_at"), record.get("seq")
    return [str(record.get("status")),
            float(updated) if isinstance(updated, (int, float)) and not isinstance(updated, bool) else 0.0,
            seq if isinstance(seq, int) and not isinstance(seq, bool) else 0]


def _row(task_id: str, record: dict[str, Any]) -> list[Any] | bool:
    """[[the values of TASK_FIELDS], [run numbers listed]] of a Task record, what a restart rebuilds the Task
    from; False for a record that names another Task or lists its Runs in a shape restore.read_tasks refuses."""
    if record.get("task_id") != task_id:
        return False
    try:
        numbers = [int(entry["run"]) for entry in record.get("runs", [])]
    except (KeyError, TypeError, ValueError):
        return False
    return [[record.get(name) for name in TASK_FIELDS], numbers]


def _run_row(row: Any) -> RunState | None:
    """The RunState a stored row holds (RUN_FIELDS values, the status as text); None for another shape."""
    if type(row) is not list or len(row) != len(RUN_FIELDS):
        return None
    try:
        run = RunState(*row)
        run.status = RunStatus(run.status)
    except (TypeError, ValueError):
        return None
    return run


def _is_print(value: Any) -> bool:
    return type(value) is list and len(value) == 5 and all(type(n) is int for n in value)


def _listing_shape(entry: list[Any]) -> bool:
    """Whether a stored listing can be used (its run numbers are only ever looked up, never trusted further)."""
    subdirs = entry[1]
    return (type(subdirs) is list and type(entry[2]) is bool and type(entry[3]) is list
            and (not subdirs or all(type(n) is str and "/" not in n and n not in (".", "..") for n in subdirs)))
