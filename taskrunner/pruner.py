"""The daemon's side of pruning (prune.py; docs/records.md "Pruning").

The main thread chooses and the engine forgets the Tasks (so neither the
watcher's delete events nor the record writer bring them back); the recorder
thread, which owns git, checks them again, writes the prune down
(prune_journal.py), removes and commits. Once their files are gone the hooks
hear `task_removed` for each (on the main thread); a Task that stays after all
(it changed meanwhile) is given back to the engine and was never removed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from taskrunner import prune_journal
from taskrunner.errors import GitError
from taskrunner.gitops import Git
from taskrunner.hooks import emit
from taskrunner.prune import (PruneError, Removal, Request, answer, facts_of_state, inspect, prune_commit, remove,
                              select, still_clean)

if TYPE_CHECKING:
    from taskrunner.engine import Engine
    from taskrunner.state import TaskState


@dataclass
class _Job:
    request: Request
    removals: list[Removal]
    tasks: dict[str, TaskState]  # what the engine forgot, given back when a Task stays after all
    skipped: list[tuple[str, str]]
    reply: Callable[[dict[str, Any]], None] | None
    removed: bool = False  # its files are gone from the work tree; only the commit is left to make
    journal: Path | None = None  # prune_journal's record of it, deleted once committed
    told: bool = False  # it was said that it waits
    problems: list[str] = field(default_factory=list)
    by: str = "taskrun prune"  # who asked, as the log names it once done without a reply


class DaemonPruner:
    """The daemon's pruning: a recorder.GitJob fed by the main thread (see the module docstring).

    `post(fn)` runs `fn` on the main thread; `flush()` writes the engine's pending records and waits;
    `kick()` wakes the recorder; `committed(sha)` is what a record commit is followed by (push, hooks).
    With `records.prune_after` it prunes by itself at `start()` and then every AUTO_EVERY_SECONDS (or
    every prune_after, when shorter). A commit a rebase in progress holds up is tried again every
    RETRY_SECONDS; the reply says it waits.
    """

    AUTO_EVERY_SECONDS = 86400.0
    RETRY_SECONDS = 2.0

    def __init__(self, engine: Engine, repo: Git, post: Callable[[Callable[[], object]], None],
                 flush: Callable[[], None], kick: Callable[[], None], committed: Callable[[str], None],
                 notice: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._engine, self._repo, self._post, self._flush = engine, repo, post, flush
        self._kick, self._committed, self._notice, self._clock = kick, committed, notice, clock
        self._lock = threading.Lock()
        self._jobs: list[_Job] = []
        self._retry_at = 0.0
        self._auto_at: float | None = None

    # -- the main thread ---------------------------------------------------------------

    def start(self) -> None:
        """The daemon answers on its socket: the first automatic prune is due now."""
        self._auto_at = self._clock()
        self._kick()  # the recorder may be waiting with nothing due

    def handle(self, payload: Mapping[str, Any], reply: Callable[[dict[str, Any]], None] | None) -> None:
        """A prune request (the control socket's, or the automatic one with `reply` None)."""
        engine = self._engine
        try:
            request = Request.from_payload(payload, engine.config.records.prune_after)
            if not engine.config.git.commit and not request.dry_run:
                raise PruneError("git.commit is off: pruning removes files only in a commit, which keeps them")
            chosen, skipped = select([facts_of_state(t) for t in engine.tasks.values()], request, time.time())
            removals, more = inspect(self._repo, chosen, engine.state_dir)
        except (PruneError, GitError) as exc:
            return reply({"ok": False, "error": str(exc)}) if reply else self._notice(f"prune: {exc}")
        if request.dry_run or not removals:
            return reply(answer(request, removals, skipped + more)) if reply else None
        tasks = {r.id: t for r in removals if (t := engine.forget(r.id)) is not None}
        self._flush()  # what was pending for them is on disk before anything goes
        with self._lock:
            self._jobs.append(_Job(request, removals, tasks, skipped + more, reply,
                                   by="taskrun prune" if reply else "records.prune_after"))
        self._kick()

    def resume(self) -> None:
        """Before the restore reads runs/: finish the prunes an interrupted daemon or CLI began
        (prune_journal): what is left of their Tasks goes now, and their commits are made as any prune's."""
        for path, request, removals in prune_journal.pending(self._engine.state_dir, self._notice):
            problems = remove(self._repo.root, self._engine.state_dir, removals)
            self._notice(f"finishing a prune an earlier daemon began: {len(removals)} Task(s)")
            with self._lock:
                self._jobs.append(_Job(request, removals, {}, [], None, removed=True, journal=path,
                                       problems=problems, by="an earlier daemon's prune"))

    def _give_back(self, tasks: list[TaskState]) -> None:
        for task in tasks:
            if self._engine.tasks.setdefault(task.id, task) is task:
                self._engine.task_file_changed(task.file)  # read again: the scheduler sees it again

    def _left(self, tasks: list[TaskState]) -> None:
        """The pruned Tasks left the work tree: the hooks drop what they keep per Task (metrics, the live
        view, notifications), unless a Task of the same id came meanwhile (its file written again)."""
        for task in tasks:
            if task.id not in self._engine.tasks:
                emit(self._engine.hooks, "task_removed", task)

    # -- the recorder thread -----------------------------------------------------------

    def due(self, now: float) -> float | None:
        if self._jobs:
            return self._retry_at
        return self._auto_at if self._engine.config.records.prune_after is not None else None

    def run(self) -> None:
        after = self._engine.config.records.prune_after
        if not self._jobs and after is not None and self._auto_at is not None:
            self._auto_at = self._clock() + max(1.0, min(self.AUTO_EVERY_SECONDS, after))
            self._post(lambda: self.handle({"command": "prune"}, None))
            return
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            try:
                self._run_job(job)
            except Exception as exc:  # git failing, or a bug: tried again after RETRY_SECONDS, never a spin
                self._wait(job, f"the commit waits: {exc}")

    def _run_job(self, job: _Job) -> None:
        busy = self._repo.in_progress()
        if busy and not job.removed:
            return self._wait(job, f"{busy} is in progress in this clone: the Tasks are pruned once it ends")
        if not job.removed:
            job.removals, raced = still_clean(self._repo, job.removals)
            job.skipped += raced
            back = [job.tasks[t] for t, _ in raced if t in job.tasks]
            if back:
                self._post(lambda: self._give_back(back))
            job.journal = prune_journal.begin(self._engine.state_dir, job.request, job.removals)
            job.problems = remove(self._repo.root, self._engine.state_dir, job.removals)
            job.removed = True
            left = [job.tasks[r.id] for r in job.removals if r.id in job.tasks]
            if left:
                self._post(lambda: self._left(left))
        sha = prune_commit(self._repo, job.removals, job.request)
        if job.journal is not None:
            prune_journal.end(job.journal)
        with self._lock:
            self._jobs.remove(job)
        if sha:
            self._committed(sha)
        done = answer(job.request, job.removals, job.skipped, sha, None, job.problems)
        if job.reply is not None:
            job.reply(done)
        elif job.removals:
            self._notice(f"{job.by}: pruned {len(job.removals)} finished Task(s) in {sha}")

    def _wait(self, job: _Job, why: str) -> None:
        self._retry_at = self._clock() + self.RETRY_SECONDS
        if job.reply is not None:
            job.reply(answer(job.request, job.removals, job.skipped, None, why, job.problems))
            job.reply = None
        elif not job.told:
            self._notice(f"prune: {why}")
        job.told = True
