"""The recorder thread: the one thread that owns git.

The engine hands it a CommitItem whenever a Run (or a Task without a Run)
reaches a final state; items arriving within COMMIT_WINDOW_SECONDS of each
other share one commit. A commit's cost grows with the repository: git
writes the whole runs/ tree again (about 36 bytes a Task: with 10,000 Tasks
fast-import takes 35 ms instead of 7), so the window grows with it, to at
least COMMIT_COST_RATIO times as long as the last commit took, up to
COMMIT_WINDOW_MAX_SECONDS: a slower commit holds more Runs, and git's work
per Run stays about the same. Records are never dropped: a commit that fails (HEAD
kept moving, a ref locked, git failing) keeps its batch, which grows with the
items that arrive meanwhile and is tried again after a backoff
(RETRY_BASE_SECONDS doubling up to RETRY_MAX_SECONDS, with jitter), for as
long as the daemon runs. What is still uncommitted when it stops is on disk
and committed by the next daemon (`recover`, run first on this thread).

It also keeps the user's index in step (gitops.refresh_index: entries a held
index.lock kept pending are tried again every INDEX_RETRY_SECONDS and with
every batch; git rewrites the whole index for any change, so while more
records wait for their commit a refresh covers several commits, at most one
every INDEX_REFRESH_SECONDS, and once nothing waits it runs at once; an
index.lock that keeps it pending for INDEX_LOCK_STALE_SECONDS or longer, most
likely left behind by a killed git or editor, is named in a notice once, with
how to remove it, and its end in another), commits again the records a
user's commit removed (gitops.Git.recommit), pushes after each commit
(`pusher`, with `git.push`) and syncs the clone with its remote (`sync`, from
`taskrun trigger`, hooks, polling and webhooks).
"""

from __future__ import annotations

import os
import queue
import random
import shlex
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from taskrunner import crashpoints
from taskrunner.defaults import COMMIT_WINDOW_SECONDS
from taskrunner.errors import GitError
from taskrunner.gitops import Git
from taskrunner.textsafe import clean

_STOP = object()
_KICK = object()
_WAKE = object()
#: First pause after a failed commit; it doubles with each failure in a row.
RETRY_BASE_SECONDS = 0.05
#: Longest pause between two attempts at a failing commit.
RETRY_MAX_SECONDS = 10.0
#: A refresh of the user's index kept pending by their index.lock is tried again this often.
INDEX_RETRY_SECONDS = 0.5
#: An index.lock at least this old when it keeps the index refresh pending is named in a notice (and by
#: `taskrun doctor`): git holds one for a moment, `git commit` for as long as its editor is open, and one a
#: killed git left behind stays until someone removes it.
INDEX_LOCK_STALE_SECONDS = 60.0
#: How long `stop()` keeps trying a failing commit before leaving it to the next daemon.
STOP_GRACE_SECONDS = 10.0
#: A batch collects for at least this many times as long as the last commit took (its wall time), so git's
#: share of the recorder's time stays under about 1/(1 + ratio) however big the repository grows.
COMMIT_COST_RATIO = 8.0
#: The longest a batch collects for, however slow the last commit was.
COMMIT_WINDOW_MAX_SECONDS = 2.0
#: While more records wait for their commit, the user's index is refreshed at most this often (once nothing
#: waits, at once): each refresh rewrites the whole index, a cost that grows with the records.
INDEX_REFRESH_SECONDS = 1.0


class GitJob(Protocol):
    """A piece of git work the recorder thread does besides commits (push.Pusher, sync.Syncer)."""

    def due(self, now: float) -> float | None:
        """When (time.monotonic) it wants to run next; None: not until asked."""

    def run(self) -> None:
        """Do it; never raises (failures are reported and retried by the job itself)."""


@dataclass(frozen=True)
class CommitItem:
    paths: tuple[str, ...]
    task_id: str
    run_id: str | None
    run_number: int | None
    worker: str | None
    agent: str | None
    status: str
    title: str

    def line(self) -> str:
        if not self.task_id:
            return clean(self.title)
        where = f" on {self.worker}" if self.worker else ""
        run = f" (run {self.run_number})" if self.run_number else ""
        return clean(f"{self.task_id} {self.status}{where}{run}")

    def trailers(self) -> list[str]:
        pairs = [("Task-Id", self.task_id), ("Run-Id", self.run_id), ("Worker", self.worker),
                 ("Agent", self.agent), ("Status", self.status)]
        # One line each, no control characters: a value can neither add a trailer nor reach a terminal raw.
        return [f"{key}: {clean(value)}" for key, value in pairs if value]


def commit_message(items: list[CommitItem]) -> str:
    if len(items) == 1:
        item = items[0]
        subject = f"taskrun: {item.line()}"
        body = clean(item.title)  # the Task's own heading, on one line, no control characters
        if body.startswith("---"):
            # `git interpret-trailers` takes a "---" line for the start of a
            # patch and would not see the trailers after it.
            body = f" {body}"
    else:
        counts = Counter(item.status for item in items)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        subject = f"taskrun: record {len(items)} results ({summary})"
        body = "\n".join(f"- {item.line()}" for item in items)
    trailers = "\n".join(line for item in items for line in item.trailers())
    return f"{subject}\n\n{body}\n\n{trailers}\n"


class Recorder:
    def __init__(self, repo: Git, enabled: bool = True,
                 on_commit: Callable[[str, list[CommitItem]], None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 window: float = COMMIT_WINDOW_SECONDS,
                 recover: Callable[[], list[CommitItem]] | None = None,
                 stop_grace: float = STOP_GRACE_SECONDS) -> None:
        self._repo = repo
        self._enabled = enabled
        self._on_commit = on_commit or (lambda sha, items: None)
        self._on_error = on_error or (lambda message: None)
        self._window = window
        self._recover = recover
        self._stop_grace = stop_grace
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)
        self._jobs: list[GitJob] = []
        self._sync: Callable[[str], None] | None = None
        self._sync_reasons: list[str] = []
        self._sync_lock = threading.Lock()
        self._failures = 0
        self._commit_due = 0.0
        self._index_due = 0.0
        self._refreshed_at = float("-inf")  # time.monotonic() of the last index refresh
        self._cost = 0.0  # seconds the last commit took (wall time)
        #: The stale index.lock a notice named (its path, st_dev and st_ino), until the index refresh goes through.
        self._stale_lock: tuple[Path, int, int] | None = None
        #: Called after each commit (on this thread), e.g. the pusher's `wanted`.
        self.after_commit: list[Callable[[str], None]] = []

    def add_job(self, job: GitJob) -> None:
        """Run `job` on this thread whenever it is due (before `start`)."""
        self._jobs.append(job)

    def set_sync(self, sync: Callable[[str], None]) -> None:
        """What `sync(reason)` runs on this thread (sync.Syncer.sync), before `start`."""
        self._sync = sync

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: CommitItem) -> None:
        if self._enabled:
            self._queue.put(item)

    def kick(self) -> None:
        """Commit what is pending now instead of at the end of the window."""
        if self._enabled:
            self._queue.put(_KICK)

    def sync(self, reason: str) -> None:
        """Queue a sync of the clone with its remote (see sync.Syncer); repeats before it runs coalesce.

        `reason` says who asked ("trigger", "post-receive", "poll", "webhook github ...") for the log.
        Returns at once; the sync runs on this thread, after the commit in progress.
        """
        with self._sync_lock:
            wake = not self._sync_reasons
            if reason not in self._sync_reasons:
                self._sync_reasons.append(reason)
        if wake:
            self._queue.put(_WAKE)

    def stop(self) -> None:
        """Commit everything submitted so far, then end the thread."""
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join()

    # -- the thread ---------------------------------------------------------

    def _loop(self) -> None:
        pending: list[CommitItem] = []
        stopping = False
        stop_by = 0.0
        if self._recover is not None and self._enabled:
            try:
                pending.extend(self._recover())
            except (GitError, OSError) as exc:
                # A full disk, a held lock: looked for again with backoff until it succeeds (_Recovery).
                self._on_error(f"could not look for records left uncommitted (trying again): {exc}")
                self._jobs.append(_Recovery(self._recover, self.submit, self._on_error))
        while True:
            if not stopping:
                stopping = self._collect(pending, self._next_due(pending))
                if stopping:
                    stop_by = time.monotonic() + self._stop_grace
            now = time.monotonic()
            if self._repo.recommit:
                pending.append(_restore_item(sorted(self._repo.recommit)))
                self._repo.recommit.clear()
            if pending and (now >= self._commit_due or stopping):
                if self._commit(pending):
                    pending = []
            if self._repo.index_pending and now >= self._index_due:
                self._refresh_index()
            self._run_jobs(stopping)
            if stopping:
                if not pending and not self._repo.recommit:
                    self._settle_index(stop_by)
                    return
                if time.monotonic() >= stop_by:
                    self._on_error(f"stopping with {len(pending)} record(s) not committed: they are on disk "
                                   "and the next daemon commits them")
                    return
                time.sleep(min(0.2, max(0.0, self._commit_due - time.monotonic())))

    def _commit(self, pending: list[CommitItem]) -> bool:
        """One attempt at committing the batch; True when it is done (committed, or nothing changed)."""
        paths = sorted({path for item in pending for path in item.paths})
        started = time.monotonic()
        try:
            sha = self._repo.commit_paths(paths, commit_message(pending), refresh=False)
        except GitError as exc:
            self._failures += 1
            pause = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (self._failures - 1))
            self._commit_due = time.monotonic() + pause * random.uniform(0.5, 1.0)
            if self._failures & (self._failures - 1) == 0:  # the 1st, 2nd, 4th, 8th... failure in a row
                self._on_error(f"could not commit records (attempt {self._failures}, {len(pending)} kept, "
                               f"trying again): {exc}")
            return False
        if self._failures:
            self._on_error(f"records committed after {self._failures} failed attempt(s)")
        self._failures = 0
        self._commit_due = 0.0
        self._cost = time.monotonic() - started
        if self._repo.index_pending:
            # More records on their way: one refresh of the index for several commits (INDEX_REFRESH_SECONDS).
            self._index_due = self._refreshed_at + INDEX_REFRESH_SECONDS if self._queue.qsize() else 0.0
            if self._index_due <= time.monotonic():
                self._refresh_index()
        if sha:
            self._on_commit(sha, list(pending))
            for hook in self.after_commit:
                hook(sha)
            crashpoints.reached("daemon.commit_done")
        return True

    def _refresh_index(self) -> None:
        try:
            done = self._repo.refresh_index(wait=0.0)
        except GitError as exc:
            self._on_error(f"could not update the index for committed records (trying again): {exc}")
            done = False
        if done:
            self._refreshed_at = time.monotonic()
            if self._stale_lock is not None:
                self._on_error(f"{self._stale_lock[0]} is gone: git's index lists the committed records again")
                self._stale_lock = None
        else:
            self._index_due = time.monotonic() + INDEX_RETRY_SECONDS
            self._note_stale_lock()

    def _note_stale_lock(self) -> None:
        """A notice naming the index.lock that keeps the refresh pending, once it is INDEX_LOCK_STALE_SECONDS old;
        once per lock (by its inode), not at every retry."""
        try:
            index = self._repo.index_file()
            lock = index.with_name(index.name + ".lock")
            info = os.lstat(lock)  # the lock itself: a link there is never followed
        except (GitError, OSError):
            return  # gone already (the next refresh goes through), or git failed: said where it fails
        age = time.time() - info.st_mtime
        if 0 <= age < INDEX_LOCK_STALE_SECONDS or self._stale_lock == (lock, info.st_dev, info.st_ino):
            return
        self._stale_lock = (lock, info.st_dev, info.st_ino)
        self._on_error(f"{lock} has been there for {age_words(age)}: git's index stays locked, so it lacks "
                       f"{len(self._repo.index_pending)} committed record file(s) (`git status` shows them as "
                       f"staged deletions until it is gone; nothing is lost); {remove_lock_advice(lock, info)}")

    def _settle_index(self, until: float) -> None:
        """Before the thread ends: wait (until `until`) for the user's index.lock to set what is pending."""
        while self._repo.index_pending:
            try:
                if self._repo.refresh_index(wait=max(0.0, min(0.5, until - time.monotonic()))):
                    continue
            except GitError:
                pass
            if time.monotonic() >= until:
                paths = sorted(self._repo.index_pending)
                self._on_error(f"git's index stayed locked: it does not list {len(paths)} committed record file(s) "
                               f"yet (`git reset -q -- {' '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}` "
                               "makes it agree with HEAD)")
                return

    def _run_jobs(self, stopping: bool) -> None:
        with self._sync_lock:
            reasons, self._sync_reasons = self._sync_reasons, []
        if reasons and self._sync is not None and not stopping:
            try:
                self._sync(", ".join(reasons))
            except Exception as exc:  # a job's bug must not end the thread that owns git
                self._on_error(f"sync failed: {exc}")
        now = time.monotonic()
        for job in self._jobs:
            due = job.due(now)
            if due is not None and due <= now:
                try:
                    job.run()
                except Exception as exc:  # as above
                    self._on_error(f"{type(job).__name__} failed: {exc}")

    def _next_due(self, pending: list[CommitItem]) -> float | None:
        """Seconds until something is due without a new item (a retry, an index refresh, a job); None: nothing."""
        times = [job_due for job in self._jobs if (job_due := job.due(time.monotonic())) is not None]
        if pending:
            times.append(self._commit_due)
        if self._repo.index_pending:
            times.append(self._index_due)
        if self._repo.recommit:
            times.append(0.0)
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def _collect(self, pending: list[CommitItem], timeout: float | None) -> bool:
        """Add a window's worth of items to `pending`; True once asked to stop.

        Waits up to `timeout` seconds (None: until something arrives) for the first.
        """
        first = self._queue.get() if timeout is None else self._get(timeout)
        if first is _STOP:
            return True
        if first is None or first is _KICK or first is _WAKE:
            return False
        pending.append(first)  # type: ignore[arg-type]
        window = max(self._window, min(COMMIT_WINDOW_MAX_SECONDS, COMMIT_COST_RATIO * self._cost))
        deadline = time.monotonic() + window
        while (item := self._get(deadline - time.monotonic())) is not None:
            if item is _STOP:
                return True
            if item is _KICK or item is _WAKE:
                break
            pending.append(item)  # type: ignore[arg-type]
        return False

    def _get(self, timeout: float) -> object | None:
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None


class _Recovery:
    """The start-up search for records left uncommitted (`recover`) when it failed: a GitJob tried again
    RETRY_BASE_SECONDS after, doubling up to RETRY_MAX_SECONDS, until it succeeds; what it finds is
    submitted like any record."""

    def __init__(self, recover: Callable[[], list[CommitItem]], submit: Callable[[CommitItem], None],
                 on_error: Callable[[str], None]) -> None:
        self._recover, self._submit, self._on_error = recover, submit, on_error
        self._failures = 1
        self._at: float | None = time.monotonic() + RETRY_BASE_SECONDS

    def due(self, now: float) -> float | None:
        return self._at

    def run(self) -> None:
        try:
            items = self._recover()
        except (GitError, OSError) as exc:
            self._failures += 1
            self._at = time.monotonic() + min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** self._failures)
            if self._failures & (self._failures - 1) == 0:
                self._on_error(f"could not look for records left uncommitted (attempt {self._failures}, "
                               f"trying again): {exc}")
            return
        self._at = None
        if self._failures:
            self._on_error(f"looked for records left uncommitted after {self._failures} failed attempt(s)")
        for item in items:
            self._submit(item)


def age_words(seconds: float) -> str:
    """How long something has been there, for a message: '90 seconds', '5 minutes', '3 hours', '2 days'; a
    negative age (a time in the future: the clock was set back) is 'an unknown time (…)'."""
    if seconds < 0:
        return "an unknown time (its modification time is in the future)"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}s"
    whole = int(seconds)
    return f"{whole} second{'' if whole == 1 else 's'}"


def remove_lock_advice(lock: Path, info: os.stat_result) -> str:
    """What to do about an index.lock nobody released (`info`: its lstat), as a notice and `taskrun doctor` say."""
    remove = "rm -r" if stat.S_ISDIR(info.st_mode) else "rm"
    return f"if no git command is running in this clone, remove it: {remove} {shlex.quote(str(lock))}"


def _restore_item(paths: list[str]) -> CommitItem:
    """The batch entry for records a later commit removed from HEAD (gitops.Git.recommit)."""
    return CommitItem(paths=tuple(paths), task_id="", run_id=None, run_number=None, worker=None, agent=None,
                      status="RESTORED", title=f"{len(paths)} record file(s) that a later commit removed")
