"""The engine: Tasks, Runs and Workers, changed only by events, on one thread.

Events come from the watcher (a Task file changed or went away), from Worker
sessions (hello, started, output, result, the link dropping), from the CLI
(cancel, retry) and from the clock (backoff over, grace over). After a batch of
events the daemon calls `schedule()`, which asks the pure scheduler for a plan
and carries it out, then `flush()`.

Changes are written behind: a batch of events marks records dirty and queues
messages and commits, and `flush()` writes each dirty record once, then hands
the commits to the recorder thread (which owns git), then sends the messages.
So a record is on disk before any message or commit that depends on it, and a
Run that is assigned, started and finished within one batch costs one write
of each of its files instead of one per change.

What a Run's end does to its Task (run again, retry, pause, settle) is endings.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path
from typing import Any, Callable, Collection

from taskrunner import crashpoints, gitops, pauses, restore, scheduler
from taskrunner.batch import Batch, Pending
from taskrunner.clock import Deadlines, wall
from taskrunner.config import Config
from taskrunner.endings import RunEndings
from taskrunner.errors import TaskrunError
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.hooks import Hooks, emit
from taskrunner.intake import Intake, RepoFiles, agent_of, read_task, task_paths
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.protocol import Message
from taskrunner.queues import Backlog, TaskViews
from taskrunner.recorder import CommitItem
from taskrunner.fulllogs import FullLogs
from taskrunner.records import Records
from taskrunner.scancache import ScanCache
from taskrunner.sessions import WorkerSessions
from taskrunner.state import RunState, TaskState
from taskrunner.taskfile import dependency_cycles, not_a_task_name, task_id_for, task_id_problem
from taskrunner.unwritten import Unwritten

#: The crash point after a message of each kind that matters to a Run left for its Worker (crashpoints.py).
_SENT_POINTS = {"assign": "daemon.assign_sent", "ack": "daemon.ack_sent", "cancel": "daemon.cancel_sent"}


class Engine(RunEndings):
    def __init__(
        self,
        root: Path,
        config: Config,
        fleet: Fleet,
        commit: Callable[[CommitItem], None],
        hooks: Hooks | None = None,
        clock: Callable[[], float] = wall,  # the wall clock, for records; durations: clock.py
        rand: Callable[[], float] = random.random,
        deliver: Callable[[Callable[[], None]], None] = lambda job: job(),
    ) -> None:
        self.root = root
        self.config = config
        self.fleet = fleet
        self.hooks = hooks or Hooks()
        self.records = Records(root, notice=lambda message: emit(self.hooks, "notice", message))
        self.files = RepoFiles(root, gitops.git_dirs(root))
        self.state_dir = gitops.state_dir(root)
        self.full_logs = FullLogs(self.records, self.state_dir, lambda message: emit(self.hooks, "notice", message))
        #: Agents paused for a usage limit (pauses.py), kept in the state dir across restarts.
        self.pauses = pauses.load(self.state_dir)
        self._commit = commit
        self._deliver = deliver
        self._clock = clock
        self._rand = rand
        self.tasks: dict[str, TaskState] = {}
        self.runs: dict[str, RunState] = {}  # Runs not yet final, by run id
        self.touched: set[str] = set()  # Tasks this daemon brought (or is bringing) to a final state
        # Task files whose id cannot be a path under runs/ (taskfile.task_id_problem), by path:
        # INVALID with this reason, and no record anywhere (README "Decisions").
        self.unusable: dict[str, str] = {}
        self._said: set[str] = set()  # notices said once, not at every scan (_say_once)
        self._trailing: list[str] = []  # Tasks restored RUNNING whose latest Run had ended (restore.read_tasks)
        self.next_wakeup: float | None = None
        self.base_commit: str | None = None
        self._seq = 0
        self._progress = False
        self._cycles_stale = False
        self.pending = Pending()
        self._backoffs = Deadlines()  # retry backoffs (`not_before`), true to the monotonic clock
        self.unwritten = Unwritten()  # records a batch could not write, and what waits for them (unwritten.py)
        self._views = TaskViews()  # the scheduler's view of each Task, and its index (queues.py)
        self.sessions = WorkerSessions(self.fleet, self.records, self.runs, self.hooks, clock, self._send,
                                       self._finish, self._run_lost, self._save_run)
        self.sessions.config = lambda: self.config

    # -- start-up -----------------------------------------------------------

    def restore(self) -> None:
        """Rebuild state from runs/ after a (re)start (restore.py); unfinished Runs await their Worker.

        Through the record index in the state dir (record_index.py): only changed records are read.
        """
        tasks, foreign, trailing = restore.read_indexed(self.records, self.state_dir,
                                                        lambda message: emit(self.hooks, "notice", message))
        self.full_logs.settle_restored(tasks, self.config.records, self.pending.commit)  # fulllogs.py
        for task in tasks:
            self.tasks[task.id] = task
            self._seq = max(self._seq, task.seq + 1)
            run = task.active_run
            if run is None:
                continue
            self.runs[run.run_id] = run
            self.touched.add(task.id)
            worker = self.fleet.get(run.worker)
            if worker is None:
                self._run_lost(run, f"Worker '{run.worker}' is no longer configured", RunStatus.FAILED)
            else:
                worker.runs.add(run.run_id)
        self._trailing = trailing  # settled by the first scan, once each Task's file (its retries) is read
        for message in restore.foreign_notices(foreign):
            emit(self.hooks, "notice", message)
        crashpoints.reached("daemon.restored")

    def scan(self, waiting: Collection[str] = ()) -> None:
        """Bring every Task file into step with its record (start-up, `taskrun trigger`, a rescan).

        Every `*.md` path counts, whatever it is (intake.task_paths): a link or
        a FIFO there becomes INVALID instead of being followed or skipped.
        `waiting`: paths still being written (watcher.Watcher.waiting): kept
        as they are, and read when their writer closes them.
        """
        seen: set[str] = set()
        refused: list[str] = []
        cache = ScanCache(self.state_dir, self.config)  # unchanged files are not parsed again (scancache.py)
        for rel in task_paths(self.files, refused):
            task_id = task_id_for(rel)
            seen.add(task_id or "")  # "" is no Task's id
            if rel not in waiting:
                self.task_file_changed(rel, cache, task_id or None)
        cache.save(lambda message: emit(self.hooks, "notice", message))
        for message in refused:
            self._say_once(message)
        for task in list(self.tasks.values()):
            if task.id not in seen and not task.removed:
                self.task_file_removed(task.file)
        for rel in [r for r in self.unusable if task_id_for(r) not in seen]:
            del self.unusable[rel]
        for task_id in self._trailing:  # restored RUNNING: its record was written before its latest Run ended
            task = self.tasks.get(task_id)
            if task is not None and task.status is TaskStatus.RUNNING and task.active_run is None:
                self._after_run(task, task.runs[-1])
        self._trailing = []

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: Runs on Workers that are gone are retried elsewhere, and every
        INVALID Task is read again through intake, so one the new configuration makes valid (an Agent
        it names was added) becomes PENDING."""
        self.config = config
        self._views.clear()  # the default Agent may have changed
        for worker in self.fleet.configure(config):
            for run_id in sorted(worker.runs):
                self._run_lost(self.runs[run_id], f"Worker '{worker.name}' was removed from the configuration",
                               RunStatus.FAILED)
        for task in [t for t in self.tasks.values() if t.status is TaskStatus.INVALID and not t.removed]:
            self.task_file_changed(task.file)

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            emit(self.hooks, "notice", message)

    # -- Task files ----------------------------------------------------------

    def task_file_changed(self, rel: str, cache: ScanCache | None = None, task_id: str | None = None) -> None:
        """`task_id`: task_id_for(rel) when the caller has it (a scan of 10,000 files asks once)."""
        task_id = task_id or task_id_for(rel)
        if task_id is None:
            self._say_once(f"ignoring {rel}: {not_a_task_name(rel)}")
            return
        problem = task_id_problem(task_id)
        if problem is not None:
            self._unusable(rel, problem)
            return
        try:
            intake = (cache.read if cache else read_task)(self.files, task_id, rel, self.config)
        except FileNotFoundError:
            self.task_file_removed(rel)
            return
        except OSError as exc:
            intake = Intake(task_id, rel, f"unreadable:{exc}", None, f"{rel}: cannot read: {exc}")
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = TaskState(task_id, rel, self._next_seq())
        elif intake.revision == task.revision and not task.removed and not _judged_anew(task, intake):
            # Same bytes: a restart or a touch. Keep the status, refresh the spec.
            task.spec = intake.spec or task.spec
            self._views.pop(task_id, None)
            return
        task.removed = False
        task.file = rel
        task.revision = intake.revision
        task.spec = intake.spec
        task.error = intake.error
        self.touched.add(task_id)
        if task.active_run is None:
            self._new_revision(task)
        # Checked once per batch, in schedule(): a burst of n files costs one check, not n.
        self._cycles_stale = True
        self._save_task(task)

    def _unusable(self, rel: str, problem: str) -> None:
        """A Task file whose id cannot be a record path: INVALID, said in a notice, kept in `unusable`."""
        if not os.path.lexists(self.root / rel):
            self.unusable.pop(rel, None)
            return
        reason = f"{rel}: {problem}"
        if self.unusable.get(rel) != reason:
            emit(self.hooks, "notice", f"INVALID, and no record is written for it: {reason}")
        self.unusable[rel] = reason

    def task_file_removed(self, rel: str) -> None:
        self.unusable.pop(rel, None)
        task_id = task_id_for(rel)
        task = self.tasks.get(task_id) if task_id else None
        if task is None or task.removed:
            return
        task.removed = True
        self._cycles_stale = True
        reason = "the Task file was deleted"
        run = task.active_run
        if run is not None:
            self._cancel_run(task, run, reason)
        elif task.status in (TaskStatus.PENDING, TaskStatus.BLOCKED, TaskStatus.INVALID):
            self._settle(task, TaskStatus.CANCELLED, reason)
        else:
            self._save_task(task, commit=True)

    def forget(self, task_id: str) -> TaskState | None:
        """Drop a Task from memory and the scheduler, writing nothing: it is being pruned (prune.py)."""
        self.touched.discard(task_id)
        self._views.pop(task_id, None)
        return self.tasks.pop(task_id, None)

    def _new_revision(self, task: TaskState) -> None:
        task.attempts = 0
        task.not_before = 0.0
        task.cancel_requested = False
        task.cycle = False
        if task.spec is None:
            self._settle(task, TaskStatus.INVALID, task.error)
        else:
            task.error = None
            task.move(TaskStatus.PENDING)

    def _check_cycles(self) -> None:
        graph = {t.id: t.spec.depends_on for t in self.tasks.values() if t.spec is not None and not t.removed}
        in_cycle: dict[str, tuple[str, ...]] = {}
        for cycle in dependency_cycles(graph):
            for task_id in cycle:
                in_cycle.setdefault(task_id, cycle)
        for task in self.tasks.values():
            if task.active_run is not None:
                continue
            cycle = in_cycle.get(task.id)
            if cycle and not task.cycle:
                task.cycle = True
                path = " -> ".join(cycle)
                self._settle(task, TaskStatus.INVALID, f"{task.file}: key 'depends_on': dependency cycle {path}")
            elif task.cycle and not cycle:
                task.cycle = False
                task.error = None
                task.move(TaskStatus.PENDING)
                self._save_task(task)

    # -- scheduling ----------------------------------------------------------

    def schedule(self) -> None:
        if self._cycles_stale:
            self._cycles_stale = False
            self._check_cycles()
        now = self._clock()
        backing_off = [self.tasks[i] for i in self._backlog().backing_off() if i in self.tasks]
        for task in self._backoffs.keep_true(backing_off, now):  # a wall-clock jump neither ends nor extends a backoff
            self._save_task(task)
        backlog = self._backlog()
        groups = dict(self.config.scheduler.groups)
        if self.pauses.prune(now):
            self._save_pauses()
        plan = backlog.plan(self.fleet.views(self.pauses, now), groups, now, self.pauses.everywhere(now))
        for blocked in plan.blocked:
            self._settle(self.tasks[blocked.task_id], TaskStatus.BLOCKED, blocked.reason)
        for task_id in plan.unblocked:
            task = self.tasks[task_id]
            task.error = None
            task.move(TaskStatus.PENDING)
            # Its BLOCKED record was committed: commit the change back too, so
            # the work tree never holds a record newer than its last commit.
            self._save_task(task, commit=True)
        full = self.records.space.still_full()  # no new Run while runs/ cannot be written (diskspace.py)
        for assignment in () if full else plan.assignments:
            self._assign(self.tasks[assignment.task_id], self.fleet[assignment.worker])
        # Only the Tasks whose reason may have changed since the last plan (queues.py): not the whole backlog.
        changed = {**plan.waiting, **({a.task_id: full for a in plan.assignments} if full else {})}
        for task_id, waiting in changed.items():
            task = self.tasks[task_id]
            if task.status is TaskStatus.PENDING and waiting != task.waiting:
                task.waiting = waiting
                self._save_task(task)
        self.next_wakeup = plan.next_wakeup
        # Unblocked Tasks start in the next plan: that is progress, not idleness.
        self._progress = bool(plan.assignments or plan.unblocked)

    def _backlog(self) -> Backlog:
        """The scheduler's index, told about every Task changed since (deleted and final: absent, queues.py)."""
        return self._views.index(self.tasks, lambda t: None if t.removed and t.status.final else self._view(t))

    def _view(self, task: TaskState) -> scheduler.TaskView:
        """The scheduler's view of a Task, kept until the Task next changes (`_save_task`)."""
        view = self._views.get(task.id)
        if view is None:
            spec = task.spec
            view = self._views[task.id] = scheduler.TaskView(
                id=task.id, status=task.status, priority=task.priority, seq=task.seq,
                agent=agent_of(spec, self.config) if spec else "",
                depends_on=spec.depends_on if spec else (), labels=spec.labels if spec else {},
                group=spec.group if spec else None, not_before=task.not_before,
                tried_workers=tuple(r.worker for r in task.runs if r.revision == task.revision),
            )
        return view

    def idle(self) -> bool:
        """Nothing runs and nothing can start: what `up --once` waits for."""
        return (
            not self.runs
            and not self._progress
            and self.next_wakeup is None
            and self.fleet.all_tried()
        )

    def give_up_waiting(self) -> None:
        """For `up --once`: PENDING Tasks that can never start become BLOCKED, saying why."""
        for task in self.tasks.values():
            if task.status is TaskStatus.PENDING:
                self._settle(task, TaskStatus.BLOCKED, task.waiting or "nothing could run it")

    def _assign(self, task: TaskState, worker: WorkerState) -> None:
        spec = task.spec
        assert spec is not None
        now = self._clock()
        try:
            data = self.files.read(spec.path)
        except OSError:  # gone, unreadable, or refused (UnsafePath): intake says which
            data = b""
        if hashlib.sha256(data).hexdigest() != task.revision:
            # The file changed after intake and the watcher has not told us yet.
            self.task_file_changed(spec.path)
            return
        files = {spec.path: data}
        agent_name = agent_of(spec, self.config)
        agent = self.config.agents[agent_name]
        # Past every Run this daemon knows and every run-<n> on disk: a directory
        # that came with the repository is never taken for this Run's.
        number = max((r.number for r in task.runs), default=0) + 1
        while self.records.run_taken(task.id, number):
            number += 1
        run = RunState(
            run_id=uuid.uuid4().hex[:16], task_id=task.id, number=number,
            revision=spec.revision, attempt=task.attempts + 1, worker=worker.name, agent=agent_name,
            backend_used=agent.backend.as_record() if agent.backend else None, created_at=now,
            authorized_by=spec.authorized_by,
        )
        task.runs.append(run)
        task.attempts += 1
        task.waiting = None
        task.error = None
        task.move(TaskStatus.RUNNING)
        self.runs[run.run_id] = run
        worker.runs.add(run.run_id)
        try:
            # Tracked by git, within MAX_CONTEXT_BYTES together: one `git ls-files` (intake.RepoFiles.contexts).
            files.update(self.files.contexts(spec.path, spec.context))
            run.base_commit = self.base_commit
            # The Task's files, and the repository state the Worker lacks (gitflow/transfer.py).
            package, assign = self.sessions.assignment(run, spec, worker, files, self.fleet.keyring.current, now)
        except TaskrunError as exc:
            self._save_task(task)
            self._finish(run, RunStatus.FAILED, None, str(exc))
            return
        # The record keeps the signatures: the manifest's compact JSON (bundle.manifest_bytes) is what they sign.
        self.pending.manifest(task.id, run.number, {**package.manifest,
                                                    "signatures": package.envelope["signatures"]})
        run.move(RunStatus.ASSIGNED)
        run.assigned_at = now
        self._save_run(run)
        self._save_task(task, late=True)
        # A failed send means the session is down: the link reports that, and
        # the Run is reattached or found lost when the Worker says hello again.
        self._send(worker, assign)

    # -- Worker sessions (sessions.py) -----------------------------------------

    def on_link_event(self, event: LinkEvent) -> None:
        self.sessions.on_link_event(event)

    def refresh_keys(self) -> None:
        """After `taskrun keys rotate`, or when an overlap ends: every online Worker learns the new set."""
        now = self._clock()
        try:
            self.fleet.keyring = Keyring.load(self.fleet.keyring.directory.parent)
        except TaskrunError as exc:
            emit(self.hooks, "notice", f"signing keys not reloaded, the previous ones stay in force: {exc}")
        retired = self.fleet.keyring.prune(now)
        for key in retired:
            emit(self.hooks, "notice", f"signing key {key} retired: its overlap period ended")
        for worker in self.fleet:
            if worker.online:
                self.sessions.check_trust(worker, worker.hello.get("trust"), now)

    # -- requests from the CLI ------------------------------------------------

    def cancel(self, task_id: str) -> dict[str, Any]:
        task = self.tasks.get(task_id)
        if task is None:
            return {"ok": False, "error": f"no Task '{task_id}'"}
        run = task.active_run
        if run is not None:
            self._cancel_run(task, run, "cancelled by `taskrun cancel`")
            return {"ok": True, "message": f"cancelling Run {run.number} of '{task_id}' on {run.worker}"}
        if task.status in (TaskStatus.PENDING, TaskStatus.BLOCKED, TaskStatus.INVALID):
            self._settle(task, TaskStatus.CANCELLED, "cancelled by `taskrun cancel`")
            return {"ok": True, "message": f"'{task_id}' cancelled"}
        return {"ok": False, "error": f"'{task_id}' is already {task.status.value}"}

    def retry(self, task_id: str) -> dict[str, Any]:
        task = self.tasks.get(task_id)
        if task is None:
            return {"ok": False, "error": f"no Task '{task_id}'"}
        if task.removed:
            return {"ok": False, "error": f"the file of '{task_id}' was deleted; add it again to run it"}
        if task.status is TaskStatus.INVALID:
            return {"ok": False, "error": f"'{task_id}' is INVALID; fix the file first: {task.error}"}
        if task.status in (TaskStatus.PENDING, TaskStatus.RUNNING):
            return {"ok": False, "error": f"'{task_id}' is already {task.status.value}"}
        if task.spec is None:  # cancelled while INVALID: no file that can run (it would wait for no Agent)
            return {"ok": False, "error": f"'{task_id}' has no valid Task file to run: fix {task.file}, and it runs "
                                          "again by itself"}
        task.move(TaskStatus.PENDING)
        task.attempts = 0
        task.not_before = 0.0
        task.error = None
        task.cancel_requested = False
        self.touched.add(task_id)
        self._save_task(task, commit=True)  # its final record was committed; so is this one
        return {"ok": True, "message": f"'{task_id}' will run again"}

    # -- records ---------------------------------------------------------------

    def _settle(self, task: TaskState, status: TaskStatus, reason: str | None) -> None:
        task.move(status)
        task.error = reason
        task.waiting = None
        self._save_task(task, commit=True)

    def flush(self, force: bool = False) -> int:
        """Hand over what the last batch changed (see batch.py); the number of commits in it.

        `deliver` runs the job: inline, unless the daemon gives it a thread
        (writeback.py).
        """
        self.sessions.resume_stalled()  # output a full disk held up, once there is room (sessions.py)
        for run_id, reason in self.unwritten.take_refused():  # never sent: the Worker never heard of it
            run = self.runs.get(run_id)
            if run is not None and run.status is RunStatus.ASSIGNED:
                self.sessions.transfer.done(run_id)
                self._finish(run, RunStatus.FAILED, None, f"not started: its records cannot be written ({reason})")
        batch = self.pending.take(force)
        self._deliver(lambda: self._apply(batch))
        return len(batch.commits)

    def _apply(self, batch: Batch) -> None:
        """Write a batch's records, then hand over its commits and send its messages, which depend on them.
        A record not written (a full disk) is kept, written again, and waited for (unwritten.py)."""
        commits, sends = self.unwritten.apply(batch, self.records, lambda text: emit(self.hooks, "notice", text))
        crashpoints.reached("daemon.records_batch_written")
        self.full_logs.settle_commits(commits, batch.runs, self.config.records)  # capped output.log (fulllogs.py)
        for item in commits:
            self._commit(item)
        for worker, messages in sends:
            self.fleet.send(worker, *messages)
            for message in messages:
                if message.type in _SENT_POINTS:
                    crashpoints.reached(_SENT_POINTS[message.type])

    def _send(self, worker: WorkerState, message: Message) -> None:
        self.pending.send(worker, message)

    def _save_task(self, task: TaskState, commit: bool = False, late: bool = False) -> None:
        self._views.pop(task.id, None)
        task.updated_at = self._clock()
        self.pending.task(task, late)
        emit(self.hooks, "task_changed", task)
        if commit:
            self.pending.commit(CommitItem(
                paths=(self.records.relative(self.records.task_file(task.id)),), task_id=task.id,
                run_id=None, run_number=None, worker=None, agent=agent_of(task.spec, self.config) if task.spec else None,
                status=task.status.value, title=task.spec.title if task.spec else task.id,
            ))

    def _save_run(self, run: RunState, late: bool = False) -> None:
        self.pending.run(run, late)
        emit(self.hooks, "run_changed", run)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq


def _judged_anew(task: TaskState, intake: Intake) -> bool:
    """Whether the same bytes read under another configuration change an INVALID Task's verdict:
    now valid, or invalid for another reason (not a dependency cycle, which schedule() judges)."""
    if task.status is not TaskStatus.INVALID or task.cycle or task.active_run is not None:
        return False
    return intake.spec is not None or intake.error != task.error
