"""What a batch of engine events leaves to do: records to write, commits to hand over, messages to send.

The engine marks what changed while it handles events; `take` turns that into
one `Batch`, which the engine carries out in order: records first, then the
commits and messages that depend on them. Each record is written once per
batch whatever number of changes it saw.

Records marked late (a Task or Run turning RUNNING) are held back until
`due` (monotonic clock: a wall-clock jump neither writes them early nor holds
them back), RECORD_LAG_SECONDS after the first of them, unless the batch is forced:
when the Run ends within that time, the record is written once, finished,
instead of twice. A change that cannot wait takes a held-back one along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from taskrunner.clock import monotonic
from taskrunner.defaults import RECORD_LAG_SECONDS
from taskrunner.fleet import WorkerState
from taskrunner.protocol import Message
from taskrunner.recorder import CommitItem
from taskrunner.state import RunState, TaskState


@dataclass
class Batch:
    manifests: list[tuple[str, int, dict[str, Any]]]
    runs: list[dict[str, Any]]  # Run records, snapshots taken by `take`
    tasks: list[dict[str, Any]]  # Task records, likewise
    commits: list[CommitItem]
    sends: list[tuple[WorkerState, list[Message]]]  # per Worker, in the order queued


@dataclass
class Pending:
    clock: Callable[[], float] = monotonic  # seconds, for durations only (clock.py)
    #: When (on `clock`) the records held back are to be written; None when none are.
    due: float | None = None
    _tasks: dict[str, TaskState] = field(default_factory=dict)
    _runs: dict[str, RunState] = field(default_factory=dict)
    _late_tasks: dict[str, TaskState] = field(default_factory=dict)
    _late_runs: dict[str, RunState] = field(default_factory=dict)
    _manifests: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    _commits: list[CommitItem] = field(default_factory=list)
    _sends: list[tuple[WorkerState, Message]] = field(default_factory=list)

    def task(self, task: TaskState, late: bool = False) -> None:
        self._mark(task.id, task, self._tasks, self._late_tasks, late)

    def run(self, run: RunState, late: bool = False) -> None:
        self._mark(run.run_id, run, self._runs, self._late_runs, late)

    def manifest(self, task_id: str, number: int, manifest: dict[str, Any]) -> None:
        self._manifests.append((task_id, number, manifest))

    def commit(self, item: CommitItem) -> None:
        self._commits.append(item)

    def send(self, worker: WorkerState, message: Message) -> None:
        self._sends.append((worker, message))

    def take(self, force: bool = False) -> Batch:
        if self.due is not None and (force or self.clock() >= self.due):
            self._runs = {**self._late_runs, **self._runs}
            self._tasks = {**self._late_tasks, **self._tasks}
            self._late_runs, self._late_tasks, self.due = {}, {}, None
        sends: dict[str, tuple[WorkerState, list[Message]]] = {}
        for worker, message in self._sends:
            sends.setdefault(worker.name, (worker, []))[1].append(message)
        batch = Batch(self._manifests, [r.record() for r in self._runs.values()],
                      [t.record() for t in self._tasks.values()], self._commits, list(sends.values()))
        self._manifests, self._runs, self._tasks, self._commits, self._sends = [], {}, {}, [], []
        return batch

    def _mark(self, key: str, state: Any, now: dict[str, Any], late_ones: dict[str, Any], late: bool) -> None:
        if late and key not in now:
            late_ones[key] = state
            if self.due is None:
                self.due = self.clock() + RECORD_LAG_SECONDS
        else:
            late_ones.pop(key, None)
            now[key] = state
