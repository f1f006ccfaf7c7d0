"""What the engine does when a Run ends: its one final status, and what its Task does next.

A Run ends with a result from its Worker (sessions.py), lost (its Worker gone
from the configuration or unreachable past the grace period), or cancelled
(asked of its Worker, or settled at once when nobody can be asked).
`_finish` records its final status; `_after_run` then runs its Task again
(a new revision came, or the Worker was lost), retries it after a backoff,
holds it while its Agent's usage limit lasts (pauses.py), or settles it.

`RunEndings` is a part of `Engine` (engine.py), on the engine's one thread:
it works on the engine's state, listed below, and writes behind through the
engine's own `_save_task`, `_save_run` and `_send` (batch.py), except the
Agents' pauses, saved at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from taskrunner import crashpoints, pauses, scheduler
from taskrunner.batch import Pending
from taskrunner.config import Config
from taskrunner.defaults import LOST_RUN_RETRIES
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.hooks import Hooks, emit
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.pauses import Pauses
from taskrunner.protocol import Message
from taskrunner.recorder import CommitItem
from taskrunner.records import Records
from taskrunner.sessions import WorkerSessions
from taskrunner.state import RunState, TaskState


class RunEndings:
    """Run endings, mixed into `Engine`, which provides everything annotated here."""

    config: Config
    fleet: Fleet
    hooks: Hooks
    records: Records
    sessions: WorkerSessions
    state_dir: Path
    pauses: Pauses
    pending: Pending
    tasks: dict[str, TaskState]
    runs: dict[str, RunState]
    _clock: Callable[[], float]
    _rand: Callable[[], float]
    _save_task: Callable[..., None]
    _save_run: Callable[..., None]
    _send: Callable[[WorkerState, Message], None]
    _new_revision: Callable[[TaskState], None]

    def _finish(self, run: RunState, status: RunStatus, exit_code: int | None, error: str | None,
                finished_at: float | None = None) -> None:
        """Record a Run's one final status, then decide what its Task does next."""
        run.move(status)
        run.exit_code = exit_code
        run.error = error
        run.finished_at = finished_at or self._clock()
        crashpoints.reached("daemon.run_finished")
        self.sessions.summarize(run, self.tasks.get(run.task_id))
        self._save_run(run)
        self.runs.pop(run.run_id, None)
        worker = self.fleet.get(run.worker)
        if worker is not None:
            worker.runs.discard(run.run_id)
        self._after_run(self.tasks[run.task_id], run)

    def _after_run(self, task: TaskState, run: RunState) -> None:
        """What RUNNING `task` does now that `run`, its latest Run, is final (run again, retry after a
        backoff, or settle); its record saved and the Run's files queued for commit."""
        status, error = run.status, run.error
        retries = self._retries(task)
        limited = run.usage_limit is not None and status is RunStatus.FAILED
        if limited:
            self._pause(run)
        if task.cancel_requested and status is not RunStatus.COMPLETED:
            next_status, reason = TaskStatus.CANCELLED, error
        elif run.revision != task.revision:
            # A new revision arrived while this one ran: run it now.
            task.move(TaskStatus.PENDING)
            self._new_revision(task)
            next_status, reason = None, None
        elif run.lost and sum(r.lost and not r.refused for r in task.runs if r.revision == run.revision) \
                <= LOST_RUN_RETRIES:
            # The Worker was lost, not the Agent's doing: run it again at once (preferring another Worker)
            # without spending one of its retries. A Run a Worker refused never ran: no limit to those.
            task.attempts -= 1
            task.move(TaskStatus.PENDING)
            task.error = error
            next_status, reason = None, None
        elif limited:
            # The provider's limit, not the Task's doing: no retry spent; it runs once the pause ends.
            # Its `waiting` (the pause, scheduler.py) says why, not the Run's error.
            task.attempts -= 1
            task.move(TaskStatus.PENDING)
            task.error = None
            next_status, reason = None, None
        elif status is RunStatus.FAILED and task.attempts <= retries:
            delay = scheduler.backoff_delay(task.attempts, self.config.scheduler.backoff_base,
                                            self.config.scheduler.backoff_max, self._rand())
            task.not_before = self._clock() + delay
            task.move(TaskStatus.PENDING)
            task.error = error
            next_status, reason = None, None
        else:
            next_status, reason = TaskStatus(status.value), error
        if next_status is not None:
            task.move(next_status)
            task.error = reason
        self._save_task(task)
        self.pending.commit(CommitItem(
            paths=tuple(self.records.run_paths(task.id, run.number)), task_id=task.id, run_id=run.run_id,
            run_number=run.number, worker=run.worker, agent=run.agent, status=run.status.value,
            title=task.spec.title if task.spec else task.id,
        ))

    def _pause(self, run: RunState) -> None:
        """Pause the Run's Agent until its usage limit resets: everywhere, or on its Worker (pause_scope)."""
        agent = self.config.agents.get(run.agent)
        limit, now = run.usage_limit or {}, self._clock()
        pause = self.pauses.add(pauses.Pause(
            agent=run.agent, worker=run.worker if agent is not None and agent.pause_scope == "worker" else None,
            until=pauses.pause_until(limit.get("resets_at"), now), since=now,
            message=str(limit.get("message") or "")[:pauses.MAX_MESSAGE_CHARS]))
        emit(self.hooks, "notice", pauses.reason(pause.agent, pause.until, pause.worker))
        emit(self.hooks, "event", "usage_limited", {"agent": pause.agent, "worker": pause.worker, "until": pause.until})
        self._save_pauses()

    def _save_pauses(self) -> None:
        try:
            pauses.save(self.state_dir, self.pauses)
            crashpoints.reached("daemon.pauses_saved")
        except OSError as exc:
            emit(self.hooks, "notice", f"cannot save the Agents' pauses in {self.state_dir}: {exc}")

    def _run_lost(self, run: RunState, reason: str, status: RunStatus) -> None:
        run.output_size = self.records.output_size(run.task_id, run.number)
        run.lost = status is RunStatus.FAILED
        self._finish(run, status, None, reason)

    def grace_expired(self, worker: WorkerState) -> None:
        for run_id in sorted(worker.runs):
            self._run_lost(self.runs[run_id], f"Worker '{worker.name}' was unreachable for longer than "
                           f"the grace period", RunStatus.FAILED)

    def _cancel_run(self, task: TaskState, run: RunState, reason: str) -> None:
        task.cancel_requested = True
        worker = self.fleet.get(run.worker)
        if worker is not None and worker.online:
            self._send(worker, Message("cancel", {"run_id": run.run_id, "reason": reason}))
        else:
            # Nobody to ask: settle now; the Worker stops it when it says hello.
            self._run_lost(run, reason, RunStatus.CANCELLED)

    def _retries(self, task: TaskState) -> int:
        if task.spec is not None and task.spec.retries is not None:
            return task.spec.retries
        return self.config.scheduler.retries
