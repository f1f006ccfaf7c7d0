"""What `taskrun top` shows, as plain data: the filter, the rows of its tables, their order.

No I/O and no Textual here. Rows hold cleaned text (textsafe.clean) for
display and the raw values they sort on.

The filter is one line of words separated by spaces (README "taskrun top"):

- a status name, in any case (`running`, `FAILED`): only Tasks in that status
  (several: any of them);
- any other word: a Task id glob as `taskrun status` takes it (`auth/*`,
  `t-00[0-4]?`); a word without `*`, `?` or `[` matches the ids that contain it.

A Task shows when it matches one of the statuses (if any are given) and one
of the globs (if any are given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from taskrunner.cli.render import sandbox_text, when
from taskrunner.status_query import MAX_PATTERN_CHARS, MAX_PATTERNS, STATUSES, StatusQuery, is_glob
from taskrunner.textsafe import clean

#: Finished Tasks (COMPLETED, FAILED, CANCELLED) asked of the daemon each refresh: the latest this many;
#: every other matching Task is always listed (status_query.StatusQuery.limit).
FINISHED_SHOWN = 200
#: Rows the Tasks table holds at most; the title says how many more match.
MAX_TASK_ROWS = 1000
#: Runs of the selected Task shown (the latest).
MAX_RUN_ROWS = 20

TASK_COLUMNS = ("TASK", "STATUS", "WORKER", "RUNS", "UPDATED", "NOTE")
WORKER_COLUMNS = ("WORKER", "ONLINE", "TRUSTED", "SANDBOX", "SLOTS", "AGENTS", "LAST SEEN")
RUN_COLUMNS = ("RUN", "STATUS", "WORKER", "AGENT", "STARTED", "FINISHED", "EXIT", "OUTPUT")
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
_STATUS_ORDER = {status: n for n, status in enumerate(STATUSES)}


def parse_filter(text: str, finished: int | None = FINISHED_SHOWN) -> StatusQuery:
    """The query the filter line `text` asks for (see the module docstring); never raises.

    Words beyond status_query.MAX_PATTERNS globs are ignored, each glob is cut at MAX_PATTERN_CHARS:
    the daemon refuses larger queries.
    """
    statuses: set[str] = set()
    patterns: list[str] = []
    for word in text.split():
        if word.upper() in STATUSES:
            statuses.add(word.upper())
        elif len(patterns) < MAX_PATTERNS:
            patterns.append((word if is_glob(word) else f"*{word}*")[:MAX_PATTERN_CHARS])
    return StatusQuery(tuple(patterns), frozenset(statuses), finished)


def _text(value: object) -> str:
    return clean("" if value is None else str(value))


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass(frozen=True)
class TaskRow:
    """One line of the Tasks table, from a Task record (state.TaskState.record, or the daemon's answer)."""

    task_id: str
    status: str
    worker: str
    runs: int
    updated: float
    note: str
    seq: int  # the order Tasks arrived in: the table's order until a column is chosen

    @classmethod
    def of(cls, record: dict[str, Any], seq: int) -> TaskRow:
        runs = record.get("runs") if isinstance(record.get("runs"), list) else []
        last = runs[-1] if runs and isinstance(runs[-1], dict) else {}
        note = record.get("error") or record.get("waiting") or record.get("title") or ""
        return cls(_text(record.get("task_id")), _text(record.get("status")), _text(last.get("worker") or "-"),
                   len(runs), _number(record.get("updated_at")), _text(note), seq)

    def cells(self) -> tuple[str, ...]:
        """The cells, in TASK_COLUMNS order."""
        return (self.task_id, self.status, self.worker, str(self.runs), when(self.updated or None), self.note)

    def sort_key(self, column: str) -> tuple[Any, ...]:
        """How this row sorts on `column` (one of TASK_COLUMNS); ties keep the arrival order."""
        value: Any = {
            "TASK": self.task_id, "STATUS": _STATUS_ORDER.get(self.status, len(STATUSES)), "WORKER": self.worker,
            "RUNS": self.runs, "UPDATED": self.updated, "NOTE": self.note,
        }[column]
        return (value, self.seq, self.task_id)


def task_rows(records: Sequence[dict[str, Any]], column: str | None = None, reverse: bool = False,
              limit: int = MAX_TASK_ROWS) -> list[TaskRow]:
    """The Tasks table's rows: the records in the daemon's order (arrival), or sorted on `column`
    (TASK_COLUMNS; `reverse` for descending), at most `limit` of them."""
    rows = [TaskRow.of(r, n) for n, r in enumerate(records) if isinstance(r, dict)]
    if column is not None:
        rows.sort(key=lambda row: row.sort_key(column), reverse=reverse)
    return rows[:limit]


def next_column(column: str | None) -> str | None:
    """The sort column after `column` as the sort key steps through them: arrival order, then each column."""
    order: list[str | None] = [None, *TASK_COLUMNS]
    return order[(order.index(column) + 1) % len(order)] if column in order else None


def worker_cells(worker: dict[str, Any]) -> tuple[str, ...]:
    """A Worker's cells in WORKER_COLUMNS order, from the daemon's `workers` answer (fleet.WorkerState.view)."""
    trusted = {True: "yes", False: "no"}.get(worker.get("trusted"), "-")  # type: ignore[arg-type]
    agents = worker.get("agents") if isinstance(worker.get("agents"), list) else []
    return (_text(worker.get("name")), "yes" if worker.get("online") else "no", trusted, _text(sandbox_text(worker)),
            f"{_text(worker.get('used', 0))}/{_text(worker.get('slots'))}", _text(",".join(map(str, agents)) or "-"),
            when(_number(worker.get("last_seen")) or None))


def run_cells(run: dict[str, Any]) -> tuple[str, ...]:
    """A Run's cells in RUN_COLUMNS order, from its record (state.RunState.record) or the Task's summary of it."""
    exit_code = run.get("exit_code")
    size = run.get("output_bytes")
    return (_text(run.get("run")), _text(run.get("status")), _text(run.get("worker") or "-"),
            _text(run.get("agent") or "-"), when(_number(run.get("started_at")) or None),
            when(_number(run.get("finished_at")) or None), "-" if exit_code is None else _text(exit_code),
            "-" if size is None else f"{_text(size)} B")


def tasks_title(shown: int, total: int, counts: dict[str, int], query: StatusQuery) -> str:
    """The Tasks panel's title: "Tasks 12 of 340 (RUNNING 2, COMPLETED 338) · filter: running *auth*"."""
    per_status = ", ".join(f"{_text(status)} {n:,}" for status, n in counts.items())
    title = f"Tasks {shown:,} of {total:,}" + (f" ({per_status})" if per_status else "")
    words = [*sorted(query.statuses), *query.patterns]
    return title + (f" · filter: {_text(' '.join(words))}" if words else "")
