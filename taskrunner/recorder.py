"""The recorder thread: the one thread that owns git.

The engine hands it a CommitItem whenever a Run (or a Task without a Run)
reaches a final state; items arriving within COMMIT_WINDOW_SECONDS of each
other share one commit. A commit that fails is retried with the next batch;
the records stay on disk either way.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from taskrunner.defaults import COMMIT_WINDOW_SECONDS
from taskrunner.errors import GitError
from taskrunner.gitops import Git
from taskrunner.textsafe import clean

_STOP = object()
_KICK = object()
#: A batch that fails this many times in a row is dropped from the queue
#: (its records stay in runs/ and are committed with the Task's next change).
MAX_ATTEMPTS = 3


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
                 window: float = COMMIT_WINDOW_SECONDS) -> None:
        self._repo = repo
        self._enabled = enabled
        self._on_commit = on_commit or (lambda sha, items: None)
        self._on_error = on_error or (lambda message: None)
        self._window = window
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: CommitItem) -> None:
        if self._enabled:
            self._queue.put(item)

    def kick(self) -> None:
        """Commit what is pending now instead of at the end of the window."""
        if self._enabled:
            self._queue.put(_KICK)

    def stop(self) -> None:
        """Commit everything submitted so far, then end the thread."""
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        pending: list[CommitItem] = []
        attempts = 0
        stopping = False
        while not stopping or pending:
            if not stopping:
                stopping = self._collect(pending)
            if not pending:
                continue
            paths = sorted({path for item in pending for path in item.paths})
            try:
                sha = self._repo.commit_paths(paths, commit_message(pending))
            except GitError as exc:
                attempts += 1
                self._on_error(f"could not commit records: {exc}")
                if attempts < MAX_ATTEMPTS and not stopping:
                    continue
                sha = None
            if sha:
                self._on_commit(sha, pending)
            pending = []
            attempts = 0

    def _collect(self, pending: list[CommitItem]) -> bool:
        """Add a window's worth of items to `pending`; True once asked to stop."""
        first = self._queue.get() if not pending else self._get(self._window)
        if first is _STOP:
            return True
        if first is _KICK:
            return False
        if first is not None:
            pending.append(first)  # type: ignore[arg-type]
        deadline = time.monotonic() + self._window
        while (item := self._get(deadline - time.monotonic())) is not None:
            if item is _STOP:
                return True
            if item is _KICK:
                break
            pending.append(item)  # type: ignore[arg-type]
        return False

    def _get(self, timeout: float) -> object | None:
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
