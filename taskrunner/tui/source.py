"""Where `taskrun top` gets what it shows: the running daemon and the records under runs/.

Everything here blocks (a socket, files) and runs on a Textual thread worker,
one call at a time (app.py never starts a poll while one is going on).

- Tasks: the daemon's `status` request, as `taskrun status` asks it
  (cli/status.from_daemon); Workers: its `workers` request, as
  `taskrun workers`; cancel and retry: its `cancel` and `retry` requests, as
  `taskrun cancel` and `taskrun retry` (control.request).
- The selected Task's Runs: their records under runs/<id>/run-<n>/status.json.
- Output: what `taskrun logs -f` reads (cli/logs.open_log): a running Run's
  output.log, a finished Run's full log when it is kept. The tail of it
  first (TAIL_BYTES), then what is appended, escaped for the terminal
  (textsafe.StreamCleaner).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskrunner import control, gitops
from taskrunner.cli import status as status_cli
from taskrunner.cli.logs import open_log
from taskrunner.errors import DaemonNotRunning, TaskrunError
from taskrunner.fulllogs import FullLogs
from taskrunner.records import Records
from taskrunner.status_query import StatusQuery
from taskrunner.textsafe import StreamCleaner, clean
from taskrunner.tui.view import FINAL, MAX_RUN_ROWS

#: How much of a Run's output is shown when it is first selected, in bytes.
TAIL_BYTES = 64 * 1024
#: Most output read in one refresh, in bytes; beyond it the view jumps to the last TAIL_BYTES.
MAX_READ_BYTES = 1024 * 1024
#: How long one request to the daemon may take, in seconds, before the dashboard says it is not answering.
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class Output:
    """New output of the selected Run: `text` to append, or with `reset` to show instead of what is shown."""

    task_id: str | None
    run: int | None
    text: str
    reset: bool


@dataclass
class Snapshot:
    """One refresh. `error` says why the daemon gave nothing (the rest is then empty); tasks are Task
    records (as `taskrun status --json` lists them), workers the daemon's Worker views, runs the
    selected Task's Run records (oldest first)."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    total: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    output: Output | None = None
    error: str | None = None


class OutputTail:
    """One Run's output as it grows: the tail first, then each new piece. Not thread-safe (one poller)."""

    def __init__(self, records: Records, full_logs: FullLogs, task_id: str, number: int) -> None:
        self.task_id = task_id
        self.number = number
        self._records = records
        self._full_logs = full_logs
        self._fd: int | None = None
        self._offset = 0
        self._cleaner = StreamCleaner()

    def read(self, run: dict[str, Any] | None) -> str:
        """The cleaned output appended since the last call ("" for none); `run` is the Run's record, if any.

        OSError when the log cannot be read.
        """
        if self._fd is None:
            final = run if run is not None and run.get("status") in FINAL else None
            self._fd, _ = open_log(self._records, self._full_logs, self.task_id, self.number, final)
            if self._fd is None:
                return ""
        size = os.fstat(self._fd).st_size
        note = ""
        if size - self._offset > MAX_READ_BYTES or (self._offset == 0 and size > TAIL_BYTES):
            skipped = size - TAIL_BYTES - self._offset
            self._offset = size - TAIL_BYTES
            self._cleaner = StreamCleaner()
            note = clean(f"[{skipped:,} bytes before this not shown: taskrun logs {self.task_id} "
                         f"--run {self.number}]") + "\n"
        data = os.pread(self._fd, size - self._offset, self._offset) if size > self._offset else b""
        self._offset += len(data)
        return note + self._cleaner.feed(data) if data or note else ""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Source:
    """The dashboard's view of one repository and its daemon (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = gitops.state_dir(root)
        self.records = Records(root)
        self._full_logs = FullLogs(self.records, self.state_dir)
        self._tail: OutputTail | None = None
        self._lock = threading.Lock()  # the tail's fd: the poller reads it, close() may come from the app

    def snapshot(self, query: StatusQuery, selected: str | None) -> Snapshot:
        """Tasks matching `query`, Workers, and Runs and new output of the Task `selected` (None: none)."""
        try:
            chosen = status_cli.from_daemon(self.records, query)
            workers = control.request(self.state_dir, {"command": "workers"}, REQUEST_TIMEOUT,
                                      wait_start=False).get("workers")
        except DaemonNotRunning as exc:
            return Snapshot(error=str(exc))
        if chosen is None:
            return Snapshot(error="the daemon is not answering (busy, or stopping); trying again")
        snap = Snapshot(chosen.shown, chosen.counts, chosen.total,
                        [w for w in workers if isinstance(w, dict)] if isinstance(workers, list) else [])
        task = next((t for t in chosen.shown if t.get("task_id") == selected), None) if selected else None
        snap.runs = self._runs(selected, task) if selected else []
        snap.output = self._output(selected, snap.runs[-1] if snap.runs else None)
        return snap

    def _runs(self, task_id: str, task: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The Task's latest Runs: each one's record, or the Task's summary of it when that cannot be read."""
        summaries = [r for r in (task or {}).get("runs") or [] if isinstance(r, dict)]
        runs = []
        for summary in summaries[-MAX_RUN_ROWS:]:
            number = summary.get("run")
            record = None
            if isinstance(number, int) and not isinstance(number, bool):
                try:
                    record = self.records.load_run(task_id, number)
                except TaskrunError:  # not this daemon's record, or unreadable: the summary will do
                    record = None
            runs.append(record if record and record.get("run") == number else summary)
        return runs

    def _output(self, task_id: str | None, run: dict[str, Any] | None) -> Output:
        number = run.get("run") if run else None
        if not isinstance(number, int) or isinstance(number, bool):
            task_id = number = None
        with self._lock:
            reset = self._tail is None or (self._tail.task_id, self._tail.number) != (task_id, number)
            if reset:
                if self._tail is not None:
                    self._tail.close()
                self._tail = OutputTail(self.records, self._full_logs, task_id, number) if task_id and number else None
            try:
                text = self._tail.read(run) if self._tail is not None else ""
            except OSError as exc:
                text = f"[cannot read the output: {clean(str(exc))}]\n"
        return Output(task_id, number, text, reset)

    def ask(self, command: str, task_id: str) -> tuple[bool, str]:
        """Send `cancel` or `retry` for `task_id`: (accepted, what the daemon said)."""
        try:
            reply = control.request(self.state_dir, {"command": command, "task": task_id}, REQUEST_TIMEOUT)
        except DaemonNotRunning as exc:
            return False, clean(str(exc))
        if not reply.get("ok"):
            return False, clean(str(reply.get("error") or "the daemon refused the request"))
        return True, clean(str(reply.get("message") or f"{command}: {task_id}"))

    def close(self) -> None:
        with self._lock:
            if self._tail is not None:
                self._tail.close()
                self._tail = None
