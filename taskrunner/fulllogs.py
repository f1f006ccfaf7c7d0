"""Full logs: a finished Run's output over `records.max_log_bytes`, kept outside the tracked tree.

What is committed of a Run's output is capped; the whole of it stays on the
control plane, beside the daemon's other local state:

    <state dir>/logs/<task-id>/run-<n>.log    the full output of Run n (state dir: gitops.state_dir)

While a Run runs, runs/<id>/run-<n>/output.log grows in full (`tail -f`,
`taskrun logs -f`). Once its final records are written and before they are
committed (`settle`, called by the engine), an output.log over the cap goes
through two steps, each of which a SIGKILL may follow:

1. output.log is renamed to its full-log path (crash point
   `daemon.full_log_moved`). Across file systems it is copied to a temp name
   there and renamed into place instead, and output.log stays until step 2.
2. output.log is replaced atomically (temp file, rename) by the full log's
   head, one marker line (`MARKER`: how many bytes were left out, and how to
   read them) and its tail: at most `max_log_bytes` in all, cut at line ends
   where one is near.

`settle` is idempotent: run again, it finds the full log at the old place
(step 1 to do) or at the new one (step 2 to do), and finishes. A restarted
daemon runs it for every restored final Run whose record says its output
was over the cap (`settle_restored`), before anything is committed.

Everything under the state dir is opened beneath it without following links
(safefs.Beneath), like runs/. Full logs are removed by `prune`: those whose
last byte is older than `records.keep_full_logs`, then the oldest while all
of them hold more than `records.full_logs_max_bytes`; the daemon prunes on
a timer (`Pruner`, a recorder GitJob), after each new full log and at start.
A pruned Run's `taskrun logs` shows the committed, capped log and says so.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from taskrunner import crashpoints
from taskrunner.errors import RecordError, UnsafePath
from taskrunner.safefs import Beneath

if TYPE_CHECKING:
    from taskrunner.config import RecordsConfig
    from taskrunner.recorder import CommitItem
    from taskrunner.records import Records
    from taskrunner.state import TaskState

#: The directory of full logs, beneath the state dir.
LOGS_DIR = "logs"
#: The line between a capped log's head and tail. `left`: bytes left out; `task`, `run`; `path`: the full log.
MARKER = "[taskrun: {left} bytes left out here; the full log: taskrun logs {task} --run {run}, or {path}]\n"
#: Bytes copied at a time (full logs moved across file systems).
COPY_CHUNK_BYTES = 1024 * 1024
#: A cut moves to a line end when one is within this fraction of the head (or tail) kept.
_LINE_SLACK = 4
#: How often the daemon prunes full logs (Pruner), in seconds.
PRUNE_EVERY_SECONDS = 3600.0
#: A temp file of a copy that a killed daemon left is removed by prune after this many seconds.
STALE_TEMP_SECONDS = 3600.0
_FULL_NAME = re.compile(r"run-[1-9][0-9]*\.log")
_TEMP_NAME = re.compile(r"\.run-[1-9][0-9]*\.log\.[0-9]+\.tmp")


class FullLogs:
    """The full logs of one work tree's Runs. Methods raise nothing for a missing file; see each."""

    def __init__(self, records: Records, state_dir: Path, notice: Callable[[str], None] | None = None) -> None:
        self.records = records
        self.state_dir = state_dir
        self._notice = notice or (lambda message: None)
        self._tree: Beneath | None = None

    # -- paths ---------------------------------------------------------------

    def rel(self, task_id: str, number: int) -> str:
        """The full log's path beneath the state dir: `logs/<task-id>/run-<n>.log`."""
        return f"{LOGS_DIR}/{task_id}/run-{number}.log"

    def shown(self, task_id: str, number: int) -> str:
        """The full log's path as a person reads it: relative to the work tree when beneath it."""
        path = self.state_dir / self.rel(task_id, number)
        try:
            return path.relative_to(self.records.root).as_posix()
        except ValueError:
            return str(path)

    # -- reading ---------------------------------------------------------------

    def open_full(self, task_id: str, number: int, size: int | None = None) -> int | None:
        """A read-only fd of the Run's full log (the caller closes it); None when none is kept, or when
        `size` is given and the kept one is not that long (a Run number used again: not this Run's)."""
        try:
            fd = self.tree().open_file(self.rel(task_id, number))
        except (OSError, UnsafePath):
            return None
        if size is not None and os.fstat(fd).st_size != size:
            os.close(fd)
            return None
        return fd

    # -- settling ---------------------------------------------------------------

    def settle(self, task_id: str, number: int, cap: int, size: int | None = None) -> int | None:
        """Cap a final Run's output.log at `cap` bytes, keeping its full log; the bytes left out, or None
        when there was nothing to do (output.log within the cap, or already capped).

        `size`: the output's size as the Run's record says; a full log found alone (step 1 done, output.log
        gone) is capped from only when it is that long. RecordError when a step fails (its notice says
        what stays where); what was done stays done, and the next call finishes it.
        """
        try:
            run_fd = self.records.open_run_dir(task_id, number)
        except (OSError, UnsafePath, RecordError):
            return None
        try:
            out = _lstat("output.log", run_fd)
            if out is not None and stat.S_ISREG(out.st_mode) and out.st_size > cap:
                self._move(task_id, number, run_fd)
                crashpoints.reached("daemon.full_log_moved")
            elif out is not None or size is None or size <= cap:
                return None
            fd = self.open_full(task_id, number, None if out is not None else size)
            if fd is None:
                return None
            try:
                capped, left = self.capped(fd, task_id, number, cap)
            finally:
                os.close(fd)
            self.records.write_capped(task_id, number, capped)
            return left
        except OSError as exc:
            raise RecordError(f"cannot keep the full log of Run {number} of '{task_id}' in "
                              f"{self.shown(task_id, number)}: {exc.strerror or exc}; it is kept in whichever "
                              "place it is, and moved on the next start") from exc
        finally:
            os.close(run_fd)

    def settle_commits(self, items: Iterable[CommitItem], runs: Iterable[dict[str, Any]],
                       settings: RecordsConfig) -> None:
        """`settle` the Run of each of `items` (a batch's commits, their records just written; `runs`: the
        batch's Run records, for their sizes), then `prune` if a full log was kept. Failures are notices."""
        sizes = {run.get("run_id"): run.get("output_bytes") for run in runs}
        kept = False
        for item in items:
            if item.run_number is None:
                continue
            size = sizes.get(item.run_id)
            try:
                left = self.settle(item.task_id, item.run_number, settings.max_log_bytes,
                                   size if isinstance(size, int) else None)
            except RecordError as exc:
                self._notice(str(exc))
                continue
            kept = kept or left is not None
        if kept:
            self.prune(settings.keep_full_logs, settings.full_logs_max_bytes)

    def settle_restored(self, tasks: Iterable[TaskState], settings: RecordsConfig,
                        commit: Callable[[CommitItem], None]) -> None:
        """At start: `settle` every final Run of `tasks` whose record says its output is over the cap (a
        daemon killed between a Run's final record and its capped log), hand each Run capped now to `commit`
        (its files, as the engine commits a Run's), then `prune`. Failures are notices."""
        from taskrunner.recorder import CommitItem

        cap = settings.max_log_bytes
        for task in tasks:
            for run in task.runs:
                if not run.status.final or run.output_size <= cap:
                    continue
                try:
                    left = self.settle(task.id, run.number, cap, run.output_size)
                except RecordError as exc:
                    self._notice(str(exc))
                    continue
                if left is not None:
                    commit(CommitItem(paths=tuple(self.records.run_paths(task.id, run.number)), task_id=task.id,
                                      run_id=run.run_id, run_number=run.number, worker=run.worker, agent=run.agent,
                                      status=run.status.value, title=f"the capped log of Run {run.number}"))
        self.prune(settings.keep_full_logs, settings.full_logs_max_bytes)

    def capped(self, fd: int, task_id: str, number: int, cap: int) -> tuple[bytes, int]:
        """(the capped form of the log open at `fd`, bytes left out): head, MARKER, tail; at most `cap` bytes."""
        size = os.fstat(fd).st_size
        room = cap - len(self._marker(10 ** 20, task_id, number)) - 1  # and a line end before the marker
        head = os.pread(fd, room // 2, 0)
        tail = os.pread(fd, room - room // 2, max(0, size - (room - room // 2)))
        cut = head.rfind(b"\n")
        if cut >= len(head) - len(head) // _LINE_SLACK:
            head = head[:cut + 1]
        cut = tail.find(b"\n")
        if 0 <= cut < len(tail) // _LINE_SLACK:
            tail = tail[cut + 1:]
        left = size - len(head) - len(tail)
        marker = self._marker(left, task_id, number)
        return head + (b"" if head.endswith(b"\n") else b"\n") + marker + tail, left

    def _marker(self, left: int, task_id: str, number: int) -> bytes:
        return MARKER.format(left=left, task=task_id, run=number, path=self.shown(task_id, number)).encode()

    def _move(self, task_id: str, number: int, run_fd: int) -> None:
        """Step 1: output.log to the full-log path (a rename; a copy and a rename across file systems)."""
        rel = self.rel(task_id, number)
        parent = self.tree().open_dir(rel.rsplit("/", 1)[0], create=True, repair=True)
        name = rel.rsplit("/", 1)[1]
        try:
            try:
                os.rename("output.log", name, src_dir_fd=run_fd, dst_dir_fd=parent)
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            temp = f".{name}.{os.getpid()}.tmp"
            source = os.open("output.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=run_fd)
            try:
                target = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=parent)
                try:
                    while chunk := os.read(source, COPY_CHUNK_BYTES):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(target, view):]
                finally:
                    os.close(target)
            finally:
                os.close(source)
            os.replace(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            os.close(parent)

    # -- pruning ----------------------------------------------------------------

    def prune(self, keep_seconds: float, max_bytes: int, now: float | None = None) -> list[str]:
        """Remove full logs older than `keep_seconds` (since their last byte), then the oldest while the rest
        hold more than `max_bytes`; temp files of copies a killed daemon left. The paths removed (beneath
        the state dir). Never raises: what cannot be removed is tried again next time."""
        now = time.time() if now is None else now
        found: list[tuple[float, int, str]] = []
        removed: list[str] = []
        top = self.state_dir / LOGS_DIR
        for dirpath, dirnames, filenames in os.walk(top):  # follows no link to a directory
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    seen = os.lstat(path)
                except OSError:
                    continue
                rel = os.path.relpath(path, self.state_dir)
                if not stat.S_ISREG(seen.st_mode):
                    continue
                if _FULL_NAME.fullmatch(name):
                    found.append((seen.st_mtime, seen.st_size, rel))
                elif _TEMP_NAME.fullmatch(name) and now - seen.st_mtime > STALE_TEMP_SECONDS:
                    removed += self._remove(rel)
        found.sort()
        total = sum(size for _, size, _ in found)
        for mtime, size, rel in found:
            if now - mtime <= keep_seconds and total <= max_bytes:
                break
            gone = self._remove(rel)
            removed += gone
            total -= size if gone else 0
        self._drop_empty(top)
        return removed

    def _remove(self, rel: str) -> list[str]:
        parent, _, name = rel.rpartition("/")
        try:
            fd = self.tree().open_dir(parent)
        except (OSError, UnsafePath):
            return []
        try:
            os.unlink(name, dir_fd=fd)
        except OSError:
            return []
        finally:
            os.close(fd)
        return [rel]

    def _drop_empty(self, top: Path) -> None:
        for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            if Path(dirpath) != top:
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass

    def tree(self) -> Beneath:
        """The state dir, opened beneath itself (made when missing, mode 0700)."""
        if self._tree is None:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            self._tree = Beneath(self.state_dir, self._notice)
        return self._tree


class Pruner:
    """The recorder's GitJob that prunes full logs every PRUNE_EVERY_SECONDS (recorder.GitJob).

    `config` gives the `records` section in force (a reloaded configuration counts from its next run).
    """

    def __init__(self, logs: FullLogs, config: Callable[[], RecordsConfig], notice: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logs = logs
        self._config = config
        self._notice = notice
        self._clock = clock
        self._due = clock()

    def due(self, now: float) -> float | None:
        return self._due

    def run(self) -> None:
        self._due = self._clock() + PRUNE_EVERY_SECONDS
        settings = self._config()
        removed = self._logs.prune(settings.keep_full_logs, settings.full_logs_max_bytes)
        if removed:
            self._notice(f"removed {len(removed)} full log(s) past records.keep_full_logs or "
                         f"records.full_logs_max_bytes (the committed, capped logs stay)")


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None

