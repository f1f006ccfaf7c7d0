"""Human output: rich tables, and the live view `up` and `demo` show while Runs go."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from taskrunner.hooks import Hooks
from taskrunner.state import RunState, TaskState

STYLES = {
    "PENDING": "yellow", "RUNNING": "cyan", "COMPLETED": "green", "FAILED": "red",
    "CANCELLED": "magenta", "BLOCKED": "red", "INVALID": "bold red", "ASSIGNED": "cyan",
}


def status_text(status: str) -> Text:
    return Text(status, style=STYLES.get(status, ""))


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")


def tasks_table(records: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("TASK", "STATUS", "RUNS", "WORKER", "UPDATED", "NOTE"):
        table.add_column(column, overflow="fold" if column == "NOTE" else "ellipsis")
    for record in records:
        runs = record.get("runs") or []
        last = runs[-1] if runs else {}
        note = record.get("error") or record.get("waiting") or record.get("title") or ""
        table.add_row(record["task_id"], status_text(record["status"]), str(len(runs)),
                      last.get("worker", "-"), when(record.get("updated_at")), note)
    return table


def runs_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("RUN", "STATUS", "WORKER", "AGENT", "STARTED", "FINISHED", "EXIT", "OUTPUT", "ERROR"):
        table.add_column(column)
    for run in runs:
        exit_code = run.get("exit_code")
        table.add_row(str(run["run"]), status_text(run["status"]), run.get("worker") or "-",
                      run.get("agent") or "-", when(run.get("started_at")), when(run.get("finished_at")),
                      "-" if exit_code is None else str(exit_code), f"{run.get('output_bytes', 0)} B",
                      run.get("error") or "")
    return table


def workers_table(workers: list[dict[str, Any]], daemon: bool) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("WORKER", "TRANSPORT", "REACHABLE", "TRUSTED", "SLOTS", "AGENTS", "LABELS", "LAST SEEN", "NOTE"):
        table.add_column(column)
    for w in workers:
        reachable = ("yes" if w.get("reachable") else "no") if daemon else "unknown"
        trusted = {True: "yes", False: "no", None: "-"}[w.get("trusted")]
        labels = ",".join(f"{k}={v}" for k, v in (w.get("labels") or {}).items()) or "-"
        table.add_row(w["name"], w["transport"], reachable, trusted, f"{w.get('used', 0)}/{w['slots']}",
                      ",".join(w.get("agents") or []), labels, when(w.get("last_seen")),
                      w.get("error") or ("" if daemon else "daemon not running"))
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
        note = task.error or task.waiting or ""
        row = (task.status.value, run.worker if run else "-", note, time.monotonic())
        with self._lock:
            previous = self._rows.get(task.id)
            self._rows[task.id] = row
        if self._live is None and (previous is None or previous[0] != row[0]):
            where = f" on {row[1]}" if task.status.value == "RUNNING" else ""
            suffix = f": {note}" if note and task.status.value != "RUNNING" else ""
            self._plain(f"{when(time.time())} {task.id} {task.status.value}{where}{suffix}")

    def run_changed(self, run: RunState) -> None:
        pass

    def run_output(self, run: RunState, data: bytes) -> None:
        lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
        if lines:
            with self._lock:
                self._last_line[run.task_id] = lines[-1]
        if self.show_output and self._live is None:
            for line in lines:
                self._plain(f"  {run.task_id} | {line}")

    def _plain(self, line: str) -> None:
        # Without a live table these lines go to a log or a pipe: rich's
        # rendering of each one cost more than the Run it reports.
        with self._lock:
            self.console.file.write(line + "\n")
            self.console.file.flush()

    def notice(self, message: str) -> None:
        self.console.print(f"[yellow]note:[/] {message}", highlight=False)

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
            if status == "RUNNING" and task_id in last:
                note = Text(f"│ {last[task_id]}", style="dim")
            table.add_row(task_id, status_text(status), worker, note)
        return table
