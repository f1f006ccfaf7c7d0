"""Reading runs/ back after a (re)start: the Task states the records hold.

The engine's `restore` takes what `read_tasks` gives and reattaches each
unfinished Run to its Worker. A record this daemon did not write (records.py:
no valid seal) is not believed: its Task is taken up again from its file, as
if it had no record, and `foreign_notices` says so.

`read_indexed` reads through the record index (record_index.py): only
records whose files changed since the index was written are read and their
seals checked again; the index is then written back for the next start. A
Task the index holds unchanged, with all its Runs, is rebuilt from the
index's rows (RecordIndex.restored) without a record parsed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from taskrunner.errors import ForeignRecord, RecordError
from taskrunner.model import TaskStatus
from taskrunner.record_index import RecordIndex
from taskrunner.records import Records
from taskrunner.state import RunState, TaskState

#: Records not written by this daemon named one by one at start; the rest are counted.
FOREIGN_NAMED = 5


class RecordSource(Protocol):
    """What read_tasks reads: `Records`, or a `RecordIndex` in front of it."""

    def task_ids(self) -> Iterator[str]: ...
    def load_task(self, task_id: str) -> dict[str, Any] | None: ...
    def load_run(self, task_id: str, number: int) -> dict[str, Any] | None: ...
    def run_taken(self, task_id: str, number: int) -> bool: ...


def read_indexed(records: Records, state_dir: Path,
                 notice: Callable[[str], None]) -> tuple[list[TaskState], list[str], list[str]]:
    """read_tasks through the record index in `state_dir`, which is then written back.

    A missing or unusable index costs one full read of runs/ (and is rebuilt);
    an index that cannot be written is said in a notice and changes nothing else.
    """
    index = RecordIndex(records, state_dir)
    index.load()
    result = read_tasks(index, notice)
    if (index.misses or not index.loaded) and not index.save():
        notice(f"cannot write the record index {index.path}: the next start reads every record again")
    return result


def read_tasks(records: RecordSource,
               notice: Callable[[str], None]) -> tuple[list[TaskState], list[str], list[str]]:
    """(every Task with a believed record, the messages of records not believed, the ids of the Tasks
    whose record trails their latest Run), each sorted by Task id.

    A record trails when it was written before its latest Run ended (within
    RECORD_LAG_SECONDS, or by a daemon killed while writing it): that Run's
    record is final while the Task is RUNNING, or the Task record does not
    list that Run at all. Such a Task is restored RUNNING, for the engine to
    settle from that Run as if it had just ended; it is never run again for
    it. A record that cannot be read is skipped with a notice.
    """
    tasks: list[TaskState] = []
    foreign: list[str] = []
    trailing: list[str] = []
    indexed = records.restored if isinstance(records, RecordIndex) else None
    for task_id in sorted(records.task_ids()):
        try:
            fast = indexed(task_id) if indexed is not None else None
            if fast is not None:  # every Run listed (else not restored from the index)
                tasks.append(_settled(TaskState.from_record(*fast), None, trailing))
                continue
            data = records.load_task(task_id)
            if data is None:
                continue
            if data.get("task_id") != task_id:
                raise RecordError(f"runs/{task_id}/status.json is the record of '{data.get('task_id')}'")
            runs = []
            for entry in data.get("runs", []):
                try:
                    run_data = records.load_run(task_id, int(entry["run"]))
                except ForeignRecord as exc:
                    foreign.append(str(exc))
                    continue
                if run_data is not None:
                    runs.append(RunState.from_record(run_data))
            # The Task record of a Run just assigned may trail its Run record
            # (RECORD_LAG_SECONDS): a Run record it does not list yet counts.
            # Numbers may skip run-<n> directories this daemon did not make.
            number = max((run.number for run in runs), default=0) + 1
            while records.run_taken(task_id, number):
                try:
                    run_data = records.load_run(task_id, number)
                except ForeignRecord:
                    run_data = None
                if run_data is not None:
                    runs.append(RunState.from_record(run_data))
                number += 1
            listed = {int(entry["run"]) for entry in data.get("runs", [])}
            task = _settled(TaskState.from_record(data, runs), listed, trailing)
        except ForeignRecord as exc:
            foreign.append(str(exc))
            continue
        except (RecordError, KeyError, ValueError, TypeError) as exc:
            notice(f"skipping the record of '{task_id}': {exc}")
            continue
        tasks.append(task)
    return tasks, foreign, trailing


def _settled(task: TaskState, listed: set[int] | None, trailing: list[str]) -> TaskState:
    """The Task as restored: RUNNING when its latest Run is not final, or when its record trails that
    Run's end (read_tasks; then its id goes into `trailing`). `listed`: the Run numbers its record lists
    (None: all of them)."""
    last = task.runs[-1] if task.runs else None
    if last is None or task.status not in (TaskStatus.PENDING, TaskStatus.RUNNING):
        return task
    if not last.status.final:
        if task.status is TaskStatus.PENDING:
            task.status = TaskStatus.RUNNING
            task.attempts = max(task.attempts, last.attempt)
    elif task.status is TaskStatus.RUNNING or (listed is not None and last.number not in listed):
        task.status = TaskStatus.RUNNING
        if last.revision == task.revision:
            task.attempts = max(task.attempts, last.attempt)
        trailing.append(task.id)
    return task


def foreign_notices(foreign: list[str]) -> list[str]:
    """The notices for records not believed: the first FOREIGN_NAMED by name, the rest counted."""
    notices = foreign[:FOREIGN_NAMED]
    if len(foreign) > FOREIGN_NAMED:
        notices.append(f"{len(foreign) - FOREIGN_NAMED} more records under runs/ were not written "
                       "by this daemon (no valid seal); ignored")
    if foreign:
        notices.append("Tasks whose records were ignored are taken up again from their files "
                       "(docs/records.md: records another clone wrote)")
    return notices
