"""Human output: rich tables, and the live view `up` and `demo` show while Runs go.

Every string that came from a Task, a file name, an Agent or a Worker goes
through `textsafe.clean` here and reaches rich as `Text`, never as markup: a
title like ``[/x]`` is shown as written, an ESC as ``\\x1b``.

The Tasks table into a pipe, and past RICH_ROWS rows, is cli/plain.py's:
the same bytes rich writes there, without rich.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterable, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from taskrunner.cli import plain
from taskrunner.cli.plain import when
from taskrunner.hooks import Hooks
from taskrunner.state import RunState, TaskState
from taskrunner.status_query import Selection
from taskrunner.textsafe import clean

#: Tables longer than this are written as plain aligned lines: rich lays a table out
#: cell by cell, which for 10,000 rows took seconds. Up to here the output is rich's.
RICH_ROWS = 200
#: The width of a Console that is not a terminal: tables in a pipe or a log are as wide as their
#: content (rich would otherwise fit them into 80 columns and cut every value with "…").
PIPE_WIDTH = 100_000

STYLES = {
    "PENDING": "yellow", "RUNNING": "cyan", "COMPLETED": "green", "FAILED": "red",
    "CANCELLED": "magenta", "BLOCKED": "red", "INVALID": "bold red", "ASSIGNED": "cyan",
}


def status_text(status: str) -> Text:
    return Text(clean(status), style=STYLES.get(status, ""))


def literal(value: object, style: str = "") -> Text:
    """A table cell or line part shown exactly as written (cleaned, on one line, no markup)."""
    return Text(clean("" if value is None else str(value)), style=style)


def no_output(task_id: str, run: dict[str, Any]) -> str:
    """What is said of a Run whose output.log is missing or empty: "Run 2 of 'x' has no output (FAILED: why)"."""
    status = run.get("status") or "UNKNOWN"
    done = status in ("COMPLETED", "FAILED", "CANCELLED")
    why = f"{status}: {run['error']}" if run.get("error") else str(status)
    return clean(f"Run {run.get('run')} of '{task_id}' has no output{'' if done else ' yet'} ({why})")


def tasks_table(records: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("TASK", "STATUS", "RUNS", "WORKER", "UPDATED", "NOTE"):
        table.add_column(column, overflow="fold" if column == "NOTE" else "ellipsis")
    for record in records:
        runs = record.get("runs") or []
        last = runs[-1] if runs else {}
        note = record.get("error") or record.get("waiting") or record.get("title") or ""
        table.add_row(literal(record["task_id"]), status_text(record["status"]), str(len(runs)),
                      literal(last.get("worker", "-")), when(record.get("updated_at")), literal(note))
    return table


def print_tasks(out: Console, records: list[dict[str, Any]]) -> None:
    """The Tasks table: rich's up to RICH_ROWS rows, beyond that the same columns as plain lines
    (plain.write_tasks: every column padded to its widest cell, two spaces apart, as rich lays out
    `tasks_table`)."""
    if len(records) <= RICH_ROWS:
        out.print(tasks_table(records))
        return
    plain.write_tasks(out.file.write, records)
    out.file.flush()


def summary_line(chosen: Selection[Any], limit: int | None) -> str:
    """What a summarised listing left out: "20 of 10,000 Tasks shown (9,990 COMPLETED, 10 FAILED): …"."""
    return plain.summary_line(len(chosen.shown), chosen.total, chosen.counts, limit)


def write_listing(stream: TextIO, fields: dict[str, Any], name: str, items: Iterable[Any]) -> None:
    """Write the JSON document `{**fields, name: [items]}` and a newline to `stream`, one item at a time
    (the document is never held whole): keys sorted, indented by 2 as `json.dumps(indent=2)` would, except
    that each item is on one line of its own (json.dumps(item, sort_keys=True)): a quarter of the cost of
    indenting 10,000 records, and a line per Task for grep."""
    stream.write("{")
    for n, key in enumerate(sorted([*fields, name])):
        stream.write(f"{',' if n else ''}\n  {json.dumps(key)}: ")
        if key != name:
            stream.write(json.dumps(fields[key], indent=2, sort_keys=True).replace("\n", "\n  "))
            continue
        first = True
        for item in items:
            stream.write(f"{'[' if first else ','}\n    {json.dumps(item, sort_keys=True)}")
            first = False
        stream.write("[]" if first else "\n  ]")
    stream.write("\n}\n")


def runs_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("RUN", "STATUS", "WORKER", "AGENT", "STARTED", "FINISHED", "EXIT", "OUTPUT", "ERROR"):
        table.add_column(column)
    for run in runs:
        exit_code = run.get("exit_code")
        table.add_row(literal(run["run"]), status_text(run["status"]), literal(run.get("worker") or "-"),
                      literal(run.get("agent") or "-"), when(run.get("started_at")), when(run.get("finished_at")),
                      "-" if exit_code is None else literal(exit_code), literal(f"{run.get('output_bytes', 0)} B"),
                      literal(run.get("error") or ""))
    return table


def sandbox_text(worker: dict[str, Any]) -> str:
    """How a Worker runs Agents, from its hello: `bwrap 0.8.0`, `none` (`, accepted` when
    workers.<name>.sandbox is none), or `-` before it has said."""
    seen = worker.get("sandbox")
    accepted = ", accepted" if worker.get("sandbox_accepted") == "none" else ""
    if isinstance(seen, dict) and seen.get("kind"):
        return f"{seen['kind']} {seen.get('version') or ''}".strip()
    if isinstance(seen, dict):
        return f"none{accepted}"
    return f"-{accepted}"


def workers_table(workers: list[dict[str, Any]], daemon: bool) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("WORKER", "TRANSPORT", "REACHABLE", "TRUSTED", "VERSION", "SANDBOX", "SLOTS", "AGENTS", "LABELS",
                   "LAST SEEN", "NOTE"):
        table.add_column(column)
    for w in workers:
        reachable = ("yes" if w.get("reachable") else "no") if daemon else "unknown"
        trusted = {True: "yes", False: "no", None: "-"}[w.get("trusted")]
        labels = ",".join(f"{k}={v}" for k, v in (w.get("labels") or {}).items()) or "-"
        table.add_row(literal(w["name"]), literal(w["transport"]), reachable, trusted,
                      literal(w.get("version") or "-"), literal(sandbox_text(w)),
                      literal(f"{w.get('used', 0)}/{w['slots']}"), literal(",".join(w.get("agents") or [])),
                      literal(labels), when(w.get("last_seen")),
                      literal(w.get("error") or ("" if daemon else "daemon not running")))
    return table


class LiveView(Hooks):
    """Hooks that draw the Tasks as they change: a live table on a terminal, lines otherwise."""

    def __init__(self, console: Console, show_output: bool = False) -> None:
        self.console = console
        self.show_output = show_output
        self._rows: dict[str, tuple[str, str, str, float]] = {}
        self._last_line: dict[str, str] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._started = time.monotonic()

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(get_renderable=self._table, console=self.console, refresh_per_second=8)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def task_changed(self, task: TaskState) -> None:
        run = task.runs[-1] if task.runs else None
        # Cleaned once here: both the live table and the plain lines show these.
        note = clean(task.error or task.waiting or "")
        row = (task.status.value, clean(run.worker or "-") if run else "-", note, time.monotonic())
        with self._lock:
            previous = self._rows.get(task.id)
            self._rows[task.id] = row
        if self._live is None and (previous is None or previous[0] != row[0]):
            where = f" on {row[1]}" if task.status.value == "RUNNING" else ""
            suffix = f": {note}" if note and task.status.value != "RUNNING" else ""
            self._plain(f"{when(time.time())} {clean(task.id)} {task.status.value}{where}{suffix}")

    def task_removed(self, task: TaskState) -> None:
        with self._lock:  # pruned: its row leaves the live table
            self._rows.pop(task.id, None)
            self._last_line.pop(task.id, None)

    def run_changed(self, run: RunState) -> None:
        pass

    def run_output(self, run: RunState, data: bytes) -> None:
        lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
        if lines:
            with self._lock:
                self._last_line[run.task_id] = clean(lines[-1])
        if self.show_output and self._live is None:
            for line in lines:
                self._plain(f"  {clean(run.task_id)} | {clean(line)}")

    def _plain(self, line: str) -> None:
        # Without a live table these lines go to a log or a pipe: rich's
        # rendering of each one cost more than the Run it reports.
        with self._lock:
            self.console.file.write(line + "\n")
            self.console.file.flush()

    def notice(self, message: str) -> None:
        self.console.print(Text.assemble(("note:", "yellow"), " ", clean(message)), highlight=False)

    def committed(self, commit: str, summary: str) -> None:
        if self._live is None:
            self.console.print(f"{when(time.time())} committed {commit[:10]} ({summary})", highlight=False)

    def _table(self) -> Table:
        with self._lock:
            rows = sorted(self._rows.items())
            last = dict(self._last_line)
        table = Table(title=f"taskrun · {time.monotonic() - self._started:.1f}s", box=None, header_style="bold")
        for column in ("TASK", "STATUS", "WORKER", "NOTE"):
            table.add_column(column)
        for task_id, (status, worker, note, _) in rows:
            style = ""
            if status == "RUNNING" and task_id in last:
                note, style = f"│ {last[task_id]}", "dim"
            table.add_row(literal(task_id), status_text(status), literal(worker), literal(note, style))
        return table
