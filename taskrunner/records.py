"""runs/ on disk: the Task and Run records the daemon writes.

    runs/<task-id>/status.json          the Task's record (schema: README "Records")
    runs/<task-id>/run-<n>/status.json  one Run's record
    runs/<task-id>/run-<n>/output.log   the Agent's output, appended as it arrives
    runs/<task-id>/run-<n>/events.jsonl the raw event stream of an Agent's tool, as its Worker shipped it
    runs/<task-id>/run-<n>/manifest.json  what was sent to the Worker

JSON records are replaced atomically (temp file, rename), without fsync: a
reader or a killed daemon never sees half a record, and a record a power loss
truncated is skipped with a notice on restart, its Task taken up again from
its file. output.log is only ever appended, at the
offset the Worker says the bytes belong to, so a resumed stream can neither
repeat nor skip a byte.

runs/ is in the work tree, so anyone who can push puts files there. Three
rules keep the daemon's files its own:

- Every read and write goes through safefs, beneath the work tree, without
  following links. A link or special file where the daemon writes is removed
  and replaced by the daemon's own file or directory, with a notice; where
  it reads, it counts as absent (ForeignRecord). A file with other hard links
  is treated the same way: it is a file that is somewhere else too
  (`ln .git/config runs/x/run-1/output.log`), so it is replaced, never
  appended to, and never believed.
- Status records are sealed: `seal` is an HMAC-SHA256, keyed with this
  clone's record key (recordkey.record_key, in .git/taskrun/, never committed),
  over the record's path and its canonical JSON (sorted keys, no spaces,
  without `seal`). A record without a valid seal was not written by this
  daemon and is never believed (ForeignRecord). A seal binds a record to its
  path, not to a moment: an older record of the same path that this clone
  sealed, put back, is believed as the state it was then.
- A Run directory the daemon records into is its own: the engine numbers a
  new Run past every run-<n> that exists, and the first write into a Run
  directory in a process either makes the directory or finds this clone's
  sealed record in it (a restart reattaching); otherwise whatever is in it
  is removed first, so a committed output.log is never taken for output
  already recorded.

Manifests are not sealed: the daemon never reads them back, and they carry
their own Ed25519 signatures.

A full disk (ENOSPC, EDQUOT, EFBIG; EIO and EROFS alike, diskspace.py) fails
a write with RecordsFull, a RecordError that says so in words a user acts
on; `space` remembers it (the engine then starts no new Run and writes the
record again by itself, engine.py; a Run's output stalls until there is
room, sessions.py). Nothing half written stays behind: a record's temp file
is removed, and output.log keeps the bytes that made it, at their offset.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from taskrunner import crashpoints, safefs
from taskrunner.atomic import parse_json
from taskrunner.defaults import RUNS_DIR
from taskrunner.diskspace import RecordsFull, Space, is_full
from taskrunner.errors import ForeignRecord, RecordError, TaskrunError, UnsafePath
from taskrunner.gitbase import state_dir
from taskrunner.model import RECORD_NAMES, RUN_DIR_RE
from taskrunner.recordkey import record_key
from taskrunner.safefs import REFUSAL, Beneath
from taskrunner.taskfile import task_id_for, task_id_problem

__all__ = ["RUN_DIR_RE", "RECORD_NAMES", "Records", "SEAL_KEY"]

#: The field of a status record that holds its seal.
SEAL_KEY = "seal"
#: Run statuses after which nothing more is written into a Run's directory.
_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
#: Run directories remembered as this process's own (see _claim); past this many the memory starts over.
_CLAIMED_MAX = 10_000


class Records:
    """runs/ of one work tree. Shared by the engine thread and the write-behind thread."""

    def __init__(self, root: Path, notice: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.runs = root / RUNS_DIR
        self._notice = notice or (lambda message: None)
        self._tree = Beneath(root, self._notice)
        self._key: bytes | None = None
        self._key_lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._claimed: set[tuple[str, int]] = set()
        self._swept: set[str] = set()  # Task directories swept of temp files a killed daemon left (_sweep)
        #: (task id, Run) -> (inode, size, sha256 so far) of output.log as write_output appended it (output_digest).
        self._digests: dict[tuple[str, int], tuple[int, int, Any]] = {}
        #: Whether the disk holding runs/ is full, and the Runs whose output waits for room (diskspace.py).
        self.space = Space(root)
        self._kept_lock = threading.Lock()
        self._kept: dict[str, tuple[str, int, bytes]] = {}  # path -> (task id, Run, bytes): see _write_kept

    # -- paths -------------------------------------------------------------

    def task_file(self, task_id: str) -> Path:
        return self.runs / task_id / "status.json"

    def run_dir(self, task_id: str, number: int) -> Path:
        return self.runs / task_id / f"run-{number}"

    def output(self, task_id: str, number: int) -> Path:
        return self.run_dir(task_id, number) / "output.log"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def run_paths(self, task_id: str, number: int) -> list[str]:
        """The files of one Run that belong in a commit, the Task's record included.

        Listed whether or not they exist yet (the engine writes records behind):
        a path with no file is simply left out of the commit.
        """
        run_dir = self.run_dir(task_id, number)
        names = ("status.json", "output.log", "events.jsonl", "manifest.json", "summary.md")
        return [self.relative(self.task_file(task_id))] + [self.relative(run_dir / name) for name in names]

    # -- reading -----------------------------------------------------------

    def load_task(self, task_id: str) -> dict[str, Any] | None:
        """The Task's record without its seal; None when it has none.

        Raises ForeignRecord when the record was not written by this daemon
        (treat it as absent), RecordError when it cannot be read.
        """
        if not _usable(task_id):
            return None
        return self._load(f"{RUNS_DIR}/{task_id}/status.json")

    def load_run(self, task_id: str, number: int) -> dict[str, Any] | None:
        """A Run's record without its seal; None, ForeignRecord and RecordError as load_task."""
        if not _usable(task_id):
            return None
        return self._load(f"{RUNS_DIR}/{task_id}/run-{number}/status.json")

    def task_ids(self) -> Iterator[str]:
        """Every Task with a record file (sealed or not), in no particular order. Follows no link."""
        top = self._lstat(RUNS_DIR)
        if top is None or not stat.S_ISDIR(top.st_mode):
            return
        for dirpath, dirnames, filenames in os.walk(self.runs):
            # Run directories hold Run records, not Tasks, and hidden ones temp files: do not descend.
            dirnames[:] = [d for d in dirnames if not RUN_DIR_RE.match(d) and not d.startswith(".")]
            if "status.json" in filenames and Path(dirpath) != self.runs:
                task_id = Path(dirpath).relative_to(self.runs).as_posix()
                if _usable(task_id):
                    yield task_id

    def run_taken(self, task_id: str, number: int) -> bool:
        """True when anything at all is at runs/<id>/run-<n> (a link too): a new Run must not go there."""
        return self._lstat(f"{RUNS_DIR}/{task_id}/run-{number}") is not None

    def output_size(self, task_id: str, number: int) -> int:
        """The size of a Run's output.log; 0 when there is none (or only a link or special file)."""
        try:
            fd = self._tree.open_file(f"{RUNS_DIR}/{task_id}/run-{number}/output.log")
        except (OSError, UnsafePath):
            return 0
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read_output(self, task_id: str, number: int, offset: int = 0, limit: int | None = None) -> bytes | None:
        """A Run's output from `offset` on, at most `limit` bytes (None: to its end); None when there is no
        output.log (a link counts as none). Output can be gigabytes: readers that may meet a whole one pass
        a limit, or read `open_output` in chunks."""
        fd = self.open_output(task_id, number)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as handle:
            handle.seek(offset)
            return handle.read() if limit is None else handle.read(limit)

    def open_output(self, task_id: str, number: int) -> int | None:
        """A read-only fd of a Run's output.log, opened without following links; None when there is none
        (or only a link or special file). The caller closes it; it keeps reading the same file even when
        output.log is replaced meanwhile (a capped log, fulllogs.py)."""
        try:
            return self._tree.open_file(f"{RUNS_DIR}/{task_id}/run-{number}/output.log")
        except (OSError, UnsafePath):
            return None

    def open_run_dir(self, task_id: str, number: int) -> int:
        """An fd of runs/<id>/run-<n>, opened without following links; the caller closes it.
        FileNotFoundError, UnsafePath or OSError when it cannot be opened."""
        self._check_id(task_id)
        return self._tree.open_dir(f"{RUNS_DIR}/{task_id}/run-{number}")

    def write_capped(self, task_id: str, number: int, data: bytes) -> None:
        """Replace a final Run's output.log with `data` (its capped form, fulllogs.py) atomically, following
        no link; RecordError (RecordsFull on a full disk) when it cannot be written."""
        self._check_id(task_id)
        rel = f"{RUNS_DIR}/{task_id}/run-{number}/output.log"
        try:
            self._tree.write_atomic(rel, data, repair=True)
        except (OSError, UnsafePath) as exc:
            raise self._failed(rel, exc) from exc

    def output_refused(self, task_id: str, number: int) -> str | None:
        """Why a Run's output.log is not read although something is there: "a symbolic link", "a FIFO", "a hard
        link (…)", …; None when it is a regular file of its own, or absent."""
        found = self._lstat(f"{RUNS_DIR}/{task_id}/run-{number}/output.log")
        problem = None if found is None else safefs.refused(found)
        return None if problem is None else problem[0]

    def output_digest(self, task_id: str, number: int) -> tuple[int, str]:
        """(size, sha256 hex) of a Run's output.log, read without following links; (0, sha256 of nothing) if none.

        The digest this process kept while appending (write_output) answers when it covers the whole file
        as it is (same inode, same size); otherwise the file is read again, in 1 MiB chunks.
        """
        digest = hashlib.sha256()
        size = 0
        try:
            fd = self._tree.open_file(f"{RUNS_DIR}/{task_id}/run-{number}/output.log")
        except (OSError, UnsafePath):
            return size, digest.hexdigest()
        found = os.fstat(fd)
        kept = self._digests.get((task_id, number))
        if kept is not None and kept[0] == found.st_ino and kept[1] == found.st_size:
            os.close(fd)
            return kept[1], kept[2].copy().hexdigest()
        with os.fdopen(fd, "rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    # -- writing -----------------------------------------------------------

    def save_task(self, record: dict[str, Any]) -> None:
        task_id = record["task_id"]
        self._check_id(task_id)
        if task_id not in self._swept:
            self._sweep(f"{RUNS_DIR}/{task_id}")
            self._swept.add(task_id)
        self._save(f"{RUNS_DIR}/{task_id}/status.json", record, sealed=True)
        crashpoints.reached("daemon.task_record_written")

    def save_run(self, record: dict[str, Any]) -> None:
        task_id, number = record["task_id"], int(record["run"])
        self._claim(task_id, number)  # checks the id too, once per Run directory
        self._save(f"{RUNS_DIR}/{task_id}/run-{number}/status.json", record, sealed=True, claimed=True)
        crashpoints.reached("daemon.run_record_written")
        if record.get("status") in _FINAL:
            # Nothing more is written there; a later write would look again (and find its seal).
            self._claimed.discard((task_id, number))
            self._digests.pop((task_id, number), None)

    def save_manifest(self, task_id: str, number: int, manifest: dict[str, Any]) -> None:
        self._claim(task_id, number)  # checks the id too, once per Run directory
        self._save(f"{RUNS_DIR}/{task_id}/run-{number}/manifest.json", manifest, sealed=False, claimed=True)
        crashpoints.reached("daemon.manifest_written")

    def save_summary(self, task_id: str, number: int, text: str) -> str:
        """Write runs/<id>/run-<n>/summary.md (gitflow/summary.py) atomically, following no link; its path.

        Not sealed, like manifests: the daemon never reads it back.
        """
        rel = f"{RUNS_DIR}/{task_id}/run-{number}/summary.md"
        self._write_kept(task_id, number, rel, text.encode())
        crashpoints.reached("daemon.summary_written")
        return rel

    def save_events(self, task_id: str, number: int, data: bytes) -> str:
        """Write runs/<id>/run-<n>/events.jsonl atomically, following no link; its work-tree path.

        The Worker masked secrets in it and capped it (agentwire.MAX_EVENTS_BYTES); like output.log it is
        never read back as a record.
        """
        rel = f"{RUNS_DIR}/{task_id}/run-{number}/events.jsonl"
        self._write_kept(task_id, number, rel, data)
        crashpoints.reached("daemon.events_written")
        return rel

    def kept(self) -> list[str]:
        """The summary.md and events.jsonl files a full disk kept out, by work-tree path (see `write_kept`)."""
        with self._kept_lock:
            return list(self._kept)

    def write_kept(self) -> list[str]:
        """Write again what a full disk kept out of summary.md and events.jsonl; the paths written now.
        What still fails stays kept (RecordsFull), and so does anything else that fails (it is said once)."""
        with self._kept_lock:
            waiting = list(self._kept.items())
        done = []
        for rel, (task_id, number, data) in waiting:
            try:
                self._write_kept(task_id, number, rel, data)
            except RecordError:
                continue
            done.append(rel)
        return done

    def _write_kept(self, task_id: str, number: int, rel: str, data: bytes) -> None:
        """Write a file of a Run's directory that the daemon never reads back (summary.md, events.jsonl)
        atomically, following no link. On a full disk its bytes are kept here until `write_kept` writes them:
        they came once (events.jsonl from a result the Worker then forgets) and are not lost."""
        try:
            self._claim(task_id, number)  # checks the id too, once per Run directory
            self._tree.write_atomic(rel, data, repair=True, look=False)
        except RecordsFull:
            with self._kept_lock:
                self._kept[rel] = (task_id, number, data)
            raise
        except (OSError, UnsafePath) as exc:
            error = self._failed(rel, exc)
            if isinstance(error, RecordsFull):
                with self._kept_lock:
                    self._kept[rel] = (task_id, number, data)
            raise error from exc
        with self._kept_lock:
            self._kept.pop(rel, None)

    def append_output(self, task_id: str, number: int, offset: int, data: bytes) -> int:
        """Append the part of `data` (which starts at `offset`) not yet recorded.

        Returns the recorded size afterwards; a gap (offset beyond the end) is
        not written, and the caller asks the Worker to resume from the end.
        """
        return self.write_output(task_id, number, offset, data)[1]

    def write_output(self, task_id: str, number: int, offset: int, data: bytes) -> tuple[int, int]:
        """append_output, returning the recorded size before and after: one open of output.log, not two."""
        self._claim(task_id, number)  # checks the id too, once per Run directory
        rel = f"{RUNS_DIR}/{task_id}/run-{number}/output.log"
        try:
            fd = self._tree.open_file(rel, os.O_WRONLY | os.O_APPEND | os.O_CREAT, repair=True)
        except (OSError, UnsafePath) as exc:
            raise self._failed(rel, exc) from exc
        try:
            found = os.fstat(fd)
            size = found.st_size
            if offset > size or offset + len(data) <= size:
                return size, size
            rest = memoryview(data)[size - offset:]
            self._digest_append(task_id, number, found.st_ino, size, rest)
            while rest:
                rest = rest[os.write(fd, rest):]
        except OSError as exc:
            # A full disk, say: what was written stays, at its offset (the size says how much); the
            # caller asks for the rest again once there is room (sessions.py).
            raise self._failed(rel, exc) from exc
        finally:
            os.close(fd)
        return size, offset + len(data)

    def _digest_append(self, task_id: str, number: int, inode: int, size: int, data: memoryview) -> None:
        """Carry the running digest of output.log over `data`, about to be appended at `size`; a digest
        that does not end at `size` (another process wrote, a restart) is dropped and read again later."""
        key = (task_id, number)
        kept = self._digests.pop(key, None)
        if kept is None and size == 0:
            kept = (inode, 0, hashlib.sha256())
        if kept is None or kept[0] != inode or kept[1] != size:
            return
        kept[2].update(data)
        if len(self._digests) >= _CLAIMED_MAX:
            self._digests.clear()
        self._digests[key] = (inode, size + len(data), kept[2])

    # -- seals -------------------------------------------------------------

    def seal(self, rel: str, record: dict[str, Any]) -> str:
        """The seal of `record` at the work-tree path `rel` (HMAC-SHA256 hex); makes the key on first use."""
        return hmac.new(self._secret(create=True), _sealed_bytes(rel, record), hashlib.sha256).hexdigest()

    def check_key(self) -> None:
        """RecordError (saying what to do) when this clone's record key is there but unusable (damaged, a
        FIFO, a link, a directory); nothing when it is usable or not made yet (made with the first record,
        which waits for room on a full disk). The daemon asks before it starts anything: with a damaged key
        no record could ever be written."""
        try:
            key = record_key(state_dir(self.root), create=False)
        except TaskrunError as exc:
            raise RecordError(str(exc)) from None
        if key is not None:
            with self._key_lock:
                self._key = self._key or key

    def _secret(self, create: bool) -> bytes:
        key = self._key
        if key is None:
            with self._key_lock:
                if self._key is None:
                    try:
                        self._key = record_key(state_dir(self.root), create)
                    except TaskrunError as exc:
                        raise RecordError(str(exc)) from None
                key = self._key
        if key is None:
            raise _NoKey()
        return key

    # -- internals -----------------------------------------------------------

    def _check_id(self, task_id: str) -> None:
        if not _usable(task_id):
            raise RecordError(f"'{task_id[:80]}' is not a Task id that can have a record under {RUNS_DIR}/")

    def _claim(self, task_id: str, number: int) -> None:
        """Make sure runs/<id>/run-<n> is this daemon's before the first write into it in this process.

        The id is checked here, past the fast path: every output chunk of a Run
        writes through this, and a claimed id was checked when it was claimed.
        """
        if (task_id, number) in self._claimed:
            return
        self._check_id(task_id)
        rel = f"{RUNS_DIR}/{task_id}/run-{number}"
        with self._claim_lock:
            if (task_id, number) in self._claimed:
                return
            try:
                fresh = self._tree.make_dir(rel)
                if not fresh:
                    self._sweep(rel)
                if not fresh and not self._ours(f"{rel}/status.json"):
                    removed = self._tree.clear_dir(rel)
                    if removed:
                        self._notice(f"{rel} held files this daemon did not write ({', '.join(removed[:5])}"
                                     f"{', …' if len(removed) > 5 else ''}); removed them before recording "
                                     f"Run {number} of '{task_id}' there")
            except (OSError, UnsafePath) as exc:
                raise self._failed(rel, exc) from exc
            if len(self._claimed) >= _CLAIMED_MAX:
                self._claimed.clear()
            self._claimed.add((task_id, number))

    def _sweep(self, rel: str) -> None:
        """Remove the temp files a killed writer left in the directory `rel` (safefs.drop_stale_temps), once per
        directory and process, before this daemon writes there; never raises (a missing directory is fine)."""
        try:
            fd = self._tree.open_dir(rel)
        except (OSError, UnsafePath):
            return
        try:
            safefs.drop_stale_temps(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _ours(self, rel: str) -> bool:
        try:
            return self._load(rel) is not None
        except RecordError:
            return False

    def _save(self, rel: str, record: dict[str, Any], sealed: bool, claimed: bool = False) -> None:
        """Write a record; `claimed`: its Run directory is known to hold only this daemon's files."""
        body = record
        if sealed:
            body = {key: value for key, value in record.items() if key != SEAL_KEY}
            body[SEAL_KEY] = self.seal(rel, body)
        text = json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        try:
            # In a claimed Run directory nothing else is expected: no look at what the rename replaces.
            self._tree.write_atomic(rel, text.encode(), repair=True, look=not claimed)
        except (OSError, UnsafePath) as exc:
            raise self._failed(rel, exc) from exc

    def _failed(self, rel: str, exc: BaseException) -> RecordError:
        """The RecordError for a write of `rel` that raised `exc`: RecordsFull when the disk is full."""
        if not isinstance(exc, UnsafePath) and is_full(exc):
            text = self.space.failed(exc)
            said = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return RecordsFull(f"cannot write {rel}: {said}: {text}", text)
        return RecordError(f"cannot write {rel}: {exc}")

    def _load(self, rel: str) -> dict[str, Any] | None:
        try:
            raw = self._tree.read_bytes(rel)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except UnsafePath as exc:
            where = "it" if exc.path == rel else exc.path
            raise ForeignRecord(f"cannot read {rel}: {where} is {exc.what}; {exc.reason or REFUSAL}; ignored") from None
        except OSError as exc:
            raise RecordError(f"cannot read {rel}: {exc}") from exc
        try:
            data = parse_json(raw)
        except ValueError as exc:  # not JSON, not UTF-8, nested too deeply
            raise RecordError(f"cannot read {rel}: {exc}") from exc
        if not isinstance(data, dict):
            raise RecordError(f"{rel} is not a JSON object")
        seal = data.pop(SEAL_KEY, None)
        try:
            key = self._secret(create=False)
        except _NoKey:
            key = None
        if not isinstance(seal, str) or key is None or not hmac.compare_digest(
                seal, hmac.new(key, _sealed_bytes(rel, data), hashlib.sha256).hexdigest()):
            raise ForeignRecord(f"{rel} was not written by this daemon (no valid seal); ignored")
        return data

    def _lstat(self, rel: str) -> os.stat_result | None:
        try:
            return self._tree.lstat(rel)
        except (OSError, UnsafePath):
            return None


class _NoKey(Exception):
    """This clone has no record key yet: nothing under runs/ was written by its daemon."""


def _sealed_bytes(rel: str, record: dict[str, Any]) -> bytes:
    """What a seal covers: a domain tag, the record's path, and its canonical JSON (without the seal)."""
    canonical = json.dumps({k: v for k, v in record.items() if k != SEAL_KEY}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return f"taskrun-record-v1\0{rel}\0{canonical}".encode()


@functools.lru_cache(maxsize=4096)
def _usable(task_id: str) -> bool:
    """True for an id that task_id_for accepts and the layout can hold (see taskfile.task_id_problem)."""
    return bool(task_id_for(f"tasks/{task_id}.md") == task_id and task_id_problem(task_id) is None)
