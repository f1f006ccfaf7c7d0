"""What a start-up scan knows of Task files it parsed before: unchanged files are not read again.

A start (and `taskrun trigger`) brings every Task file into step with its
record (engine.scan). With 10,000 Task files, reading, hashing and parsing
each costs seconds; most are unchanged since the last scan. This cache keeps,
per Task file path, the file's identity when it was last parsed and the
TaskSpec that came out of it, in `.git/taskrun/scan-cache.json`:

    line 1: HMAC-SHA256 (hex) of line 2, keyed with the record key (recordkey.record_key; made here if missing)
    line 2: {"format": 5, "version": "<taskrun version>",
             "entries": [["tasks/a.md", size, mtime_ns, ctime_ns, inode, device,
                          whether the body holds a ```sh or ```bash block, TaskSpec fields in _KINDS order
                          (TaskSpec's own order)...]]}

One list a file, not an object with its keys repeated, and checked by one
HMAC instead of field by field: a cache this clone wrote is loaded with one
JSON parse and a TaskSpec built per entry from its values in place (no
keywords: a twentieth of a second at 10,000 files). A file without a valid HMAC, of another format or taskrun version,
is ignored as a whole.

A cached spec is used only when nothing gives a doubt: the path is a regular
file now (lstat, not followed) with the same size, mtime, ctime (which no
user can set), inode and device; it was older than RACY_SECONDS when it was
cached (a write within the file system's clock tick would keep the stat);
the cache was written by this version of taskrun; and no
`security.allowed_signers` is configured (the verdict on a file depends on
commits, not only its bytes). The checks that depend on the configuration
and on other files (the Agent exists, context files) run again on the cached
spec, as intake.read_task runs them. Anything else, and any cache that cannot
be read or does not parse, means the file is read as if there were no cache.
The file under runs/ stays the source of truth: this is a cache of the Task
files' parse only, and deleting it changes nothing but the time a scan takes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable

from taskrunner import __version__
from taskrunner.atomic import read_file, write_bytes
from taskrunner.config import Config
from taskrunner.errors import TaskFileError, TaskrunError
from taskrunner.intake import Intake, RepoFiles, check_spec, read_task
from taskrunner.model import Priority, TaskSpec
from taskrunner.recordkey import record_key
from taskrunner.taskfile import shell_script

CACHE_FILE = "scan-cache.json"
#: Made anew whenever what parse_task accepts changes (5: a shell block nothing closes is refused).
FORMAT = 5
_DOMAIN = b"taskrun-scan-cache-v4\0"
#: A file changed less than this many seconds before it was parsed is not cached (its stat may not change again).
RACY_SECONDS = 2.0

StatKey = tuple[int, int, int, int, int]


class ScanCache:
    """The parsed Task files of the last scan, by path; see the module doc. Used by one thread at a time."""

    def __init__(self, state_dir: Path, config: Config) -> None:
        self.path = state_dir / CACHE_FILE
        #: Off under security.allowed_signers: a file's verdict depends on commits, not only its bytes.
        self.enabled = config.security.allowed_signers is None
        self._entries: dict[str, tuple[StatKey, TaskSpec, bool]] = {}
        self._seen: set[str] = set()
        self._changed = False
        self.hits = 0
        if self.enabled:
            self._entries = _load(self.path, _key(state_dir, create=False))

    def read(self, files: RepoFiles, task_id: str, rel: str, config: Config) -> Intake:
        """What intake.read_task(files, task_id, rel, config) would say, from the cache when the file is unchanged.

        Raises what read_task raises (FileNotFoundError: the file is gone; OSError).
        """
        self._seen.add(rel)
        key = _stat_key(files.root, rel) if self.enabled and files.problem(rel) is None else None
        cached = self._entries.get(rel)
        if key is not None and cached is not None and cached[0] == key:
            spec = cached[1]
            self.hits += 1
            try:
                check_spec(spec, files, config, has_script=cached[2])
            except TaskFileError as exc:
                return Intake(task_id, rel, spec.revision, None, str(exc))
            return Intake(task_id, rel, spec.revision, spec, None)
        intake = read_task(files, task_id, rel, config)
        if not self.enabled:
            return intake
        if (intake.spec is not None and key is not None and intake.spec.id == task_id
                and _stat_key(files.root, rel) == key and not _racy(key)):
            self._entries[rel] = (key, intake.spec, shell_script(intake.spec.body) is not None)
            self._changed = True
        elif self._entries.pop(rel, None) is not None:
            self._changed = True
        return intake

    def save(self, notice: Callable[[str], None] = lambda message: None) -> bool:
        """Write the cache back (entries of paths this scan did not see are dropped).

        False, said to `notice`, when it cannot be written (the next scan parses every file again).
        """
        if not self.enabled:
            return True
        for rel in [r for r in self._entries if r not in self._seen]:
            del self._entries[rel]
            self._changed = True
        if not self._changed:
            return True
        data = {"format": FORMAT, "version": __version__,
                "entries": [[rel, *key, script, *_spec_json(spec)] for rel, (key, spec, script) in
                            sorted(self._entries.items())]}
        body = json.dumps(data, separators=(",", ":")).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            secret = _key(self.path.parent, create=True)
            if secret is None:
                return True  # the record key is damaged: records say so; the next scan parses every file
            mac = hmac.new(secret, _DOMAIN + body, hashlib.sha256).hexdigest().encode()
            write_bytes(self.path, mac + b"\n" + body, mode=0o600, durable=False)
        except OSError as exc:
            notice(f"cannot write {self.path} ({exc}): the next scan parses every Task file again")
            return False
        self._changed = False
        return True


def _stat_key(root: Path, rel: str) -> StatKey | None:
    """(size, mtime_ns, ctime_ns, inode, device) of the regular file `rel` (not followed); None otherwise."""
    try:
        st = os.lstat(f"{root}/{rel}")
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _racy(key: StatKey) -> bool:
    return max(key[1], key[2]) > time.time_ns() - int(RACY_SECONDS * 1e9)


def _key(state_dir: Path, create: bool) -> bytes | None:
    """The record key the cache is sealed with; None when there is none (or it is damaged)."""
    try:
        return record_key(state_dir, create=create)
    except (TaskrunError, OSError):
        return None


def _load(path: Path, secret: bytes | None) -> dict[str, tuple[StatKey, TaskSpec, bool]]:
    """The entries of the cache file; {} when it is missing, unreadable, not sealed with `secret`, of another
    version, or malformed."""
    if secret is None:
        return {}
    try:
        mac, _, body = read_file(path).partition(b"\n")  # a link, FIFO or device: no cache
    except OSError:
        return {}
    if not hmac.compare_digest(mac, hmac.new(secret, _DOMAIN + body, hashlib.sha256).hexdigest().encode()):
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != __version__:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, list):
        return {}
    result: dict[str, tuple[StatKey, TaskSpec, bool]] = {}
    width = 7 + len(_KINDS)
    for entry in entries:
        # Sealed by this clone with this version: the shape is the one save() wrote; a wrong one (a bug) is
        # skipped, never trusted further.
        try:
            if len(entry) != width:
                continue
            spec = _spec_from_json(entry[7:])
            if spec.path == entry[0]:
                result[entry[0]] = (tuple(entry[1:6]), spec, entry[6] is True)  # type: ignore[assignment]
        except (KeyError, TypeError, ValueError):
            continue
    return result


def _spec_json(spec: TaskSpec) -> list[Any]:
    """The spec's fields in _KINDS order (a list: at 10,000 entries, keys repeated in each would double the parse)."""
    values = {"priority": int(spec.priority), "depends_on": list(spec.depends_on), "labels": dict(spec.labels),
              "context": list(spec.context)}
    return [values[name] if name in values else getattr(spec, name) for name in _KINDS]


#: TaskSpec's fields in the order the cache holds them (TaskSpec's own, so that a spec is made from its values
#: in place), and their kinds: text, optional text, whole number, number, list of text.
_KINDS = {"id": "text", "path": "text", "revision": "text", "title": "text", "body": "text", "agent": "text?",
          "priority": "int", "depends_on": "texts", "labels": "labels", "group": "text?", "timeout": "num?",
          "retries": "int?", "context": "texts", "authorized_by": "text?", "max_turns": "int?",
          "max_cost_usd": "num?"}
_PRIORITY_AT, _DEPENDS_AT, _CONTEXT_AT = (list(_KINDS).index(name) for name in ("priority", "depends_on", "context"))
_PRIORITIES = {int(priority): priority for priority in Priority}


def _spec_from_json(data: Any) -> TaskSpec:
    """A TaskSpec from _spec_json's output (as a cache sealed by this clone holds it: its types are the ones
    _spec_json wrote); TypeError/ValueError for another shape."""
    if len(data) != len(_KINDS):
        raise TypeError("not a TaskSpec of this version")
    values = list(data)
    try:
        values[_PRIORITY_AT] = _PRIORITIES[values[_PRIORITY_AT]]
    except (KeyError, TypeError):
        raise ValueError("not a priority") from None
    values[_DEPENDS_AT] = tuple(values[_DEPENDS_AT])
    values[_CONTEXT_AT] = tuple(values[_CONTEXT_AT])
    return TaskSpec(*values)
