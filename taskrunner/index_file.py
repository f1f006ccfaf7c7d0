"""The record index's file (record_index.py): its layout, reading it whole and verified, and its bytes.

    .git/taskrun/record-index     line 1: HMAC-SHA256 (hex) of everything after it, keyed with the record key
                                  line 2: one JSON object (compact, UTF-8), column by column:
    {"version": 3, "stamp": <ns>,                      when the index was written (time.time_ns)
     "run_fields": [name, ...],                         state.RunState's fields, the order of line 4's rows
     "tasks": {"ids": [task id, ...], "status": [...], "updated": [updated_at, ...], "seq": [...],
               "text": [offset, length, offset, length, ...]},       row n of each column: the Task ids[n]
     "dirs":  {"paths": ["runs/<dir>", ...], "subdirs": [[subdirectory names], ...],
               "status": [has status.json, ...], "runs": [[run numbers], ...]},
     "prints": <how many fingerprints follow line 4>}
                                  line 3: {"<task id>": [[the Task record's values of TASK_FIELDS],
                                                         [the run numbers it lists]]}
                                  line 4: {"<task id>/<n>": [fingerprint, [the RunState the Run record gives
                                           (RunState.from_record), its fields in run_fields order]]}
                                  then: the fingerprints, 40 bytes each (PRINT: little-endian st_dev,
                                        st_ino unsigned, st_size, st_mtime_ns, st_ctime_ns signed), the
                                        Task records' in the order of "ids", then the directories' in the
                                        order of "paths"
                                  then: the Task records (JSON, without seal, as json.dumps(record,
                                        sort_keys=True) writes them: what `taskrun status --json` prints),
                                        one a line; a Task's offset and length (bytes, from the start of the
                                        first) point at its own

Line 2 holds what `taskrun status` selects on (status, time, sequence
number), line 3 what a restart rebuilds a Task's state from (restore.py), so
neither parses a Task record it does not show: `taskrun status` parses line
2 only (and copies a record's text as it is for `--json`), a restart lines
2, 3 and 4 (three JSON parses) and no record at all. Lines 3 and 4 are
parsed only when first asked for. Columns and binary fingerprints, not an
object per entry: 10,000 Tasks parse in a tenth of the time (about 10 ms),
and a fingerprint is compared where it lies, never parsed.

A file whose HMAC does not verify, of another version, or whose columns do
not fit together (lengths, the fingerprints' count and place) is not used at
all (`read` gives None). Values of the wrong type inside a column are the
reader's to refuse, entry by entry (record_index.py: a miss, never a crash).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskrunner.atomic import read_file

INDEX_NAME = "record-index"
INDEX_VERSION = 3
#: An index file larger than this is ignored (and rebuilt): about 10 KiB per Task for 100,000 Tasks.
MAX_INDEX_BYTES = 1 << 30
_DOMAIN = b"taskrun-record-index-v2\0"
#: A Task record's or a directory's fingerprint as the index stores it (see the module doc).
PRINT = struct.Struct("<QQqqq")


@dataclass
class Loaded:
    """An index file read and verified: its columns, the bytes of its fingerprints and records, lines 3 and 4."""

    stamp: int
    run_fields: Any
    ids: list[Any]
    task_cols: tuple[list[Any], list[Any], list[Any], list[Any]]  # status, updated, seq, text (2 a row)
    paths: list[Any]
    dir_cols: tuple[list[Any], list[Any], list[Any]]  # subdirs, has status.json, run numbers
    raw: bytes  # the whole file
    prints_at: int  # where in raw the fingerprints start
    blob_at: int  # where in raw the Task records start
    rows_raw: bytes  # line 3
    runs_raw: bytes  # line 4


def read(path: Path, key: bytes) -> Loaded | None:
    """The index file at `path`, verified under `key`; None when it is missing or not usable (see above)."""
    raw = read_regular(path, MAX_INDEX_BYTES)
    if raw is None:
        return None
    # Offsets, not partitions: each copy of a 10 MB file costs as much as a JSON parse of its first line.
    ends = [raw.find(b"\n")]
    if ends[0] < 0:
        return None
    mac = hmac.new(key, _DOMAIN, hashlib.sha256)
    mac.update(memoryview(raw)[ends[0] + 1:])
    if not hmac.compare_digest(raw[:ends[0]], mac.hexdigest().encode()):
        return None
    for _ in range(3):
        end = raw.find(b"\n", ends[-1] + 1)
        ends.append(len(raw) if end < 0 else end)
        if end < 0:
            break
    if len(ends) < 4:
        return None
    head, rows_raw, runs_raw = (raw[ends[n] + 1:ends[n + 1]] for n in range(3))
    try:
        data = json.loads(head)
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            return None
        stamp, dirs, tasks, prints = data["stamp"], data["dirs"], data["tasks"], data["prints"]
        ids, paths = tasks["ids"], dirs["paths"]
        task_cols = (tasks["status"], tasks["updated"], tasks["seq"], tasks["text"])
        dir_cols = (dirs["subdirs"], dirs["status"], dirs["runs"])
        prints_at = min(ends[3] + 1, len(raw))
        if not (type(stamp) is int and type(ids) is list and type(paths) is list
                and all(type(c) is list and len(c) == len(ids) for c in task_cols[:3])
                and type(task_cols[3]) is list and len(task_cols[3]) == 2 * len(ids)
                and all(type(c) is list and len(c) == len(paths) for c in dir_cols)
                and prints == len(ids) + len(paths) and prints_at + PRINT.size * prints <= len(raw)):
            return None
        return Loaded(stamp, data["run_fields"], ids, task_cols, paths, dir_cols, raw, prints_at,
                      prints_at + PRINT.size * prints, rows_raw, runs_raw)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return None


def encode(key: bytes, head: dict[str, Any], rows_line: bytes, runs_line: bytes, prints: list[bytes],
           records: list[bytes]) -> bytes:
    """The file's bytes: `head` (line 2, given its "version" and "prints" here), lines 3 and 4, the packed
    fingerprints (PRINT) and the Task records (one a line, no raw newline in any), sealed under `key`."""
    head = {**head, "version": INDEX_VERSION, "prints": len(prints)}
    body = b"\n".join([json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode(), rows_line, runs_line,
                       b"".join(prints) + b"\n".join(records)])
    return hmac.new(key, _DOMAIN + body, hashlib.sha256).hexdigest().encode() + b"\n" + body


def parse_line(raw: bytes) -> dict[str, Any]:
    """A line of the index holding one JSON object; {} when it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return data if type(data) is dict else {}


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file at `path` (atomic.read_file: no link followed, no FIFO waited on), or None."""
    try:
        return read_file(path, limit)
    except OSError:
        return None
