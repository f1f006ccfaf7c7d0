"""Pull / merge requests for pushed result branches (`git.pull_requests`), off the daemon's main loop.

    main thread                                   pull-requests thread
    Daemon.result_branch_pushed(run, branch)
      -> BranchPushed on the daemon's queue
    handle(BranchPushed): the Run's title,
      summary.md, base branch -> submit(job)  -->  forges.Forge.open (network I/O, retried)
    handle(PullRequestOpened): the URL on     <--  PullRequestOpened on the daemon's queue
      the Run (`pull_request`), committed
      with the next batch

The forge is called only from this module's thread: a slow or unreachable
forge never holds up the engine. A call that may succeed later
(ForgeError.retry: unreachable, timed out, HTTP 429 or 5xx) is tried again
after each of RETRY_DELAYS_SECONDS, then given up with a notice; one that
cannot (a refused token, an unknown repository, a missing token variable)
is given up at once with a notice saying what to change. Jobs still waiting
when the daemon stops are dropped with a notice: their branches are on the
forge, and the next push of the branch opens or updates the request.

A pull request needs its branch on the forge, so nothing is opened without
`git.push: true` (`problems` says so at start).
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from taskrunner.config import Config, PullRequestConfig
from taskrunner.errors import TaskrunError
from taskrunner.gitflow.forges import ForgeError, PullRequest, Transport, forge_for, token_from_env
from taskrunner.hooks import emit
from taskrunner.recorder import CommitItem
from taskrunner.textsafe import clean

if TYPE_CHECKING:
    from taskrunner.engine import Engine

#: Pauses before the second, third, ... call for a job whose call may succeed later; then it is given up.
RETRY_DELAYS_SECONDS = (5.0, 30.0, 120.0, 600.0)
#: The longest a pull request body may be (GitHub's limit is 65536 characters); a longer summary is cut.
MAX_BODY_CHARS = 60000
#: How long `stop()` waits for a call in progress.
STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class BranchPushed:
    """Event: a Run's result branch is on the forge. `run_id` may be empty: the latest Run with that branch."""

    run_id: str
    branch: str


@dataclass(frozen=True)
class PullRequestJob:
    """One request to open or update: the Run it is for, the branch into `base`, its title and body."""

    task_id: str
    run_id: str
    branch: str
    base: str
    title: str
    body: str


@dataclass(frozen=True)
class PullRequestOpened:
    """Event: the pull / merge request for `job` is open at `url`."""

    job: PullRequestJob
    url: str


def problems(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Why `git.pull_requests` will not open anything as configured (for notices at start and reload)."""
    settings = config.git.pull_requests
    if settings is None:
        return []
    found = []
    if not config.git.push:
        found.append("git.pull_requests needs git.push: true (a pull request is for a branch on the forge); "
                     "no pull request is opened until it is set")
    try:
        token_from_env(settings, environ)
    except ForgeError as exc:
        found.append(str(exc))
    return found


class PullRequests:
    """The pull-requests thread and its main-thread side (`handle`); see the module doc."""

    def __init__(self, post: Callable[[object], None], notice: Callable[[str], None],
                 transport: Transport | None = None, environ: Mapping[str, str] | None = None,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS_SECONDS) -> None:
        """`post` puts an event on the daemon's queue (thread-safe); `notice` logs a line (thread-safe)."""
        self._post = post
        self._notice = notice
        self._transport = transport
        self._environ = environ
        self._delays = retry_delays
        self._queue: queue.Queue[tuple[PullRequestConfig, PullRequestJob] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pull-requests", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread; jobs not done are dropped, each named in a notice."""
        self._stop.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(STOP_GRACE_SECONDS)

    def submit(self, settings: PullRequestConfig, job: PullRequestJob) -> None:
        """Open or update the pull request for `job` on the thread; returns at once."""
        self._queue.put((settings, job))

    # -- the main thread's side --------------------------------------------------

    def handle(self, event: BranchPushed | PullRequestOpened, engine: Engine, config: Config,
               base: Callable[[], str | None]) -> None:
        """Act on an event from the daemon's queue, on the main thread. `base`: the branch records go to."""
        if isinstance(event, PullRequestOpened):
            record(engine, event)
            return
        settings = config.git.pull_requests
        if settings is None or not config.git.push:
            return
        target = base()
        if target is None:
            self._notice(f"no pull request for {event.branch}: the daemon's clone is on no branch (detached HEAD)")
            return
        job = job_for(engine, event, target)
        if job is None:
            self._notice(f"no pull request for {event.branch}: no Run of this daemon has it as its result branch")
            return
        self.submit(settings, job)

    # -- the thread --------------------------------------------------------------

    def _loop(self) -> None:
        waiting: list[tuple[float, int, int, PullRequestConfig, PullRequestJob]] = []  # (due, seq, tries, ...)
        order = itertools.count()
        while not self._stop.is_set():
            timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            else:
                if item is None:
                    continue  # stop() woke us
                heapq.heappush(waiting, (time.monotonic(), next(order), 0, *item))
            while waiting and waiting[0][0] <= time.monotonic() and not self._stop.is_set():
                _, _, tries, settings, job = heapq.heappop(waiting)
                delay = self._attempt(settings, job, tries)
                if delay is not None:
                    heapq.heappush(waiting, (time.monotonic() + delay, next(order), tries + 1, settings, job))
        left = [job for _, _, _, _, job in waiting]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                left.append(item[1])
        for job in left:
            self._notice(f"pull request for {job.branch} not opened: the daemon stopped first; the next push "
                         "of the branch opens or updates it")

    def _attempt(self, settings: PullRequestConfig, job: PullRequestJob, tries: int) -> float | None:
        """One call to the forge for `job`; the pause before trying again, or None (done, or given up)."""
        try:
            token = token_from_env(settings, self._environ)
            opened = forge_for(settings, token, self._transport).open(
                PullRequest(branch=job.branch, base=job.base, title=job.title, body=job.body))
        except ForgeError as exc:
            if exc.retry and tries < len(self._delays):
                self._notice(f"pull request for {job.branch}: {exc} (try {tries + 1})")
                return self._delays[tries]
            self._notice(f"pull request for {job.branch} not opened: {exc}")
            return None
        except TaskrunError as exc:  # a forge client's own error, never fatal to the thread
            self._notice(f"pull request for {job.branch} not opened: {exc}")
            return None
        verb = "opened" if opened.created else "updated"
        self._notice(f"pull request for {job.branch} {verb}: {opened.url}")
        self._post(PullRequestOpened(job, opened.url))
        return None


def job_for(engine: Engine, event: BranchPushed, base: str) -> PullRequestJob | None:
    """The job for a pushed branch: its Run's Task title and summary.md as the body; None when no Run has it."""
    run = None
    for task in engine.tasks.values():
        for candidate in task.runs:
            if candidate.run_id == event.run_id or (not event.run_id and candidate.result_branch == event.branch):
                if run is None or candidate.created_at >= run.created_at:
                    run = candidate
    if run is None:
        return None
    task = engine.tasks[run.task_id]
    title = task.spec.title if task.spec else run.task_id
    return PullRequestJob(task_id=run.task_id, run_id=run.run_id, branch=event.branch, base=base,
                          title=clean(title), body=_body(engine, run.summary, run.task_id, run.number))


def _body(engine: Engine, summary: str | None, task_id: str, number: int) -> str:
    """summary.md, read without following a link, cut to MAX_BODY_CHARS; a line naming the Run without one."""
    text = ""
    if summary:
        try:
            text = engine.files.read(summary).decode("utf-8", errors="replace")
        except OSError:
            text = ""
    if not text:
        text = f"Run {number} of Task `{task_id}` (no summary.md was recorded).\n"
    if len(text) > MAX_BODY_CHARS:
        text = text[:MAX_BODY_CHARS] + f"\n\n… cut here: the whole summary is in `{summary}`.\n"
    return text


def record(engine: Engine, opened: PullRequestOpened) -> bool:
    """Put the URL on its Run (`pull_request`) and queue the record's commit; False when nothing changed."""
    task = engine.tasks.get(opened.job.task_id)
    run = next((r for r in task.runs if r.run_id == opened.job.run_id), None) if task else None
    if task is None or run is None or run.pull_request == opened.url:
        return False
    run.pull_request = opened.url
    engine.pending.run(run, False)
    emit(engine.hooks, "run_changed", run)
    engine.pending.commit(CommitItem(
        paths=tuple(engine.records.run_paths(task.id, run.number)), task_id=task.id, run_id=run.run_id,
        run_number=run.number, worker=run.worker, agent=run.agent, status=run.status.value,
        title=task.spec.title if task.spec else task.id,
    ))
    return True
