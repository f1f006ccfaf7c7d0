"""`taskrun logs TASK [--run N] [-f] [--raw] [--json]`: a Run's output; with `-f`, a Task's Runs as they come.

Without `--run`, `-f` follows the Task, not one Run: when a Run ends and the
Task runs again (a retry, a Run lost with its Worker), it goes on with the
next Run after a header line `== run 2 on w1 ==`, and ends once the Task is
final (COMPLETED, FAILED, CANCELLED, BLOCKED, INVALID) and its last Run's
output is written whole. With `--run N`, `-f` follows that Run until it ends.

Output goes to stdout as bytes (like `cat`; at a terminal, control characters
escaped unless `--raw`), or with `--json` as JSON Lines (docs/cli.md):

    {"event": "run", "task_id": str, "run": int, "worker": str|null, "agent": str|null, "status": str|null}
    {"event": "output", "task_id": str, "run": int, "text": str}        (UTF-8, invalid bytes as U+FFFD)
    {"event": "end", "task_id": str, "run": int, "status": str|null, "exit_code": int|null,
     "error": str|null, "output_bytes": int, "pruned": int|null}

Errors (UsageError, exit 2): no record of the Task (when it was pruned: in which commit, and how to
see it again), no Run N, no Runs yet (without `-f`), an output.log that is a link or special file.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from rich.console import Console

from taskrunner import gitops
from taskrunner.cli import render
from taskrunner.cli.main import EXIT_OK, POLL_SECONDS, UsageError, believed, find_root, report_ignored
from taskrunner.fulllogs import FullLogs
from taskrunner.model import TaskStatus
from taskrunner.records import Records
from taskrunner.textsafe import StreamCleaner, clean

#: `taskrun logs` reads and writes a log this many bytes at a time: its memory does not grow with the log.
LOG_CHUNK_BYTES = 1024 * 1024

_RUN_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
_TASK_FINAL = frozenset(s.value for s in TaskStatus if s.final)


class Sink:
    """Where `logs` writes: the bytes as they are (or escaped at a terminal). Subclassed for --json."""

    def __init__(self, stream: BinaryIO, cleaner: StreamCleaner | None, encoding: str) -> None:
        self.stream = stream
        self.cleaner = cleaner
        self.encoding = encoding
        self.at_line_start = True
        self.runs_begun = 0

    def begin(self, task_id: str, run: dict[str, Any]) -> None:
        """A Run's output starts: a header line before every Run but the first shown."""
        self.runs_begun += 1
        if self.runs_begun > 1:
            self.write(b"" if self.at_line_start else b"\n")
            self.write(header(run).encode(self.encoding, errors="replace") + b"\n")

    def output(self, task_id: str, number: int, data: bytes) -> None:
        if self.cleaner is not None:
            data = self.cleaner.feed(data).encode(self.encoding, errors="replace")
        self.write(data)

    def end(self, task_id: str, run: dict[str, Any], shown: int, pruned: int | None) -> None:
        if self.cleaner is not None:
            self.write(self.cleaner.feed(b"", final=True).encode(self.encoding, errors="replace"))
            self.cleaner = StreamCleaner()  # the next Run starts clean

    def write(self, data: bytes) -> None:
        if data:
            self.stream.write(data)
            self.stream.flush()
            self.at_line_start = data.endswith(b"\n")


class JsonSink(Sink):
    """JSON Lines, one object per event (the module docstring lists them)."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(stream, None, "utf-8")
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def begin(self, task_id: str, run: dict[str, Any]) -> None:
        self.runs_begun += 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line({"event": "run", "task_id": task_id, "run": run.get("run"), "worker": run.get("worker"),
                    "agent": run.get("agent"), "status": run.get("status")})

    def output(self, task_id: str, number: int, data: bytes) -> None:
        text = self.decoder.decode(data)
        if text:
            self._line({"event": "output", "task_id": task_id, "run": number, "text": text})

    def end(self, task_id: str, run: dict[str, Any], shown: int, pruned: int | None) -> None:
        rest = self.decoder.decode(b"", final=True)
        if rest:
            self._line({"event": "output", "task_id": task_id, "run": run.get("run"), "text": rest})
        self._line({"event": "end", "task_id": task_id, "run": run.get("run"), "status": run.get("status"),
                    "exit_code": run.get("exit_code"), "error": run.get("error"), "output_bytes": shown,
                    "pruned": pruned})

    def _line(self, event: dict[str, Any]) -> None:
        self.write(json.dumps(event, sort_keys=True).encode() + b"\n")


def header(run: dict[str, Any]) -> str:
    """The line before a later Run's output: "== run 2 on w1 ==" ("== run 2 ==" before it has a Worker)."""
    where = f" on {run['worker']}" if run.get("worker") else ""
    return clean(f"== run {run.get('run')}{where} ==")


@dataclass
class _Reader:
    """One `logs` command's state: the records it reads and the messages already said."""

    records: Records
    full_logs: FullLogs
    task_id: str
    follow: bool
    sink: Sink
    shown: set[str] = field(default_factory=set)

    def load_task(self) -> dict[str, Any] | None:
        ignored: list[str] = []
        task = believed(lambda: self.records.load_task(self.task_id), ignored)
        report_ignored(ignored, self.shown)
        return task

    def load_run(self, number: int) -> dict[str, Any] | None:
        ignored: list[str] = []
        run = believed(lambda: self.records.load_run(self.task_id, number), ignored)
        report_ignored(ignored, self.shown)
        return run

    def next_run(self, previous: int | None) -> int | None:
        """The Run to show after `previous` (None: the latest Run); None when the Task is final past it.

        Waits for a record or a Run when following; raises UsageError when not.
        """
        while True:
            task = self.load_task()
            if task is None and not self.follow:
                raise no_record(self.records, self.task_id)
            numbers = run_numbers(task)
            later = [n for n in numbers if previous is None or n > previous]
            if later:
                return later[-1] if previous is None else min(later)
            status = (task or {}).get("status")
            if previous is not None and status in _TASK_FINAL:
                return None
            if previous is None and status == "INVALID":
                reason = clean(str((task or {}).get("error") or "see `taskrun status`"))
                raise UsageError(f"'{self.task_id}' is INVALID and has no Runs: {reason}; fix its file, and it runs")
            if previous is None and not self.follow:
                raise UsageError(f"'{self.task_id}' has no Runs yet")
            if previous is None and status in _TASK_FINAL:
                raise UsageError(f"'{self.task_id}' is {clean(str(status))} and has no Runs")
            time.sleep(POLL_SECONDS)

    def _runs_there(self) -> str:
        """'; its Runs: 1, 2' (what `--run` may name), or '; it has no Runs yet'."""
        numbers = run_numbers(self.load_task())
        return f"; its Runs: {', '.join(map(str, numbers))}" if numbers else "; it has no Runs yet"

    def show(self, number: int) -> None:
        """Write Run `number`'s output; with `follow`, until the Run is final and its output read whole."""
        offset = 0
        source: int | None = None  # the log read, in chunks: the full one when kept (fulllogs.py), else output.log
        pruned: int | None = None
        begun = False
        try:
            while True:
                run = self.load_run(number)
                final = bool(run) and run.get("status") in _RUN_FINAL
                if source is None:
                    source, pruned = open_log(self.records, self.full_logs, self.task_id, number,
                                              run if final else None)
                if not begun and run is not None and (run.get("worker") or final or source is not None):
                    self.sink.begin(self.task_id, run)
                    begun = True
                # Read beneath the work tree without following links: a link counts as no output.
                while source is not None and (data := os.pread(source, LOG_CHUNK_BYTES, offset)):
                    offset += len(data)
                    self.sink.output(self.task_id, number, data)
                if run is None and source is None and not self.follow:
                    raise UsageError(f"'{self.task_id}' has no Run {number}{self._runs_there()}")
                refused = self.records.output_refused(self.task_id, number) if source is None else None
                if refused is not None:
                    raise UsageError(f"runs/{self.task_id}/run-{number}/output.log is {refused}: not read (records "
                                     "are read only from regular files of their own, never through links or other "
                                     "names); restore it with "
                                     "`git checkout -- runs/`")
                if not self.follow or (final and (source is None or os.fstat(source).st_size == offset)):
                    run = run or {"run": number}
                    if not begun:
                        self.sink.begin(self.task_id, run)
                    self.sink.end(self.task_id, run, offset, pruned)
                    if offset == 0 and run.get("status"):  # failed before any output, or has none yet
                        print(render.no_output(self.task_id, run), file=sys.stderr)
                    if pruned is not None:
                        print(f"taskrun: this is the committed log of Run {number}, its head and tail: its full "
                              f"log ({pruned} bytes) was removed (records.keep_full_logs, "
                              "records.full_logs_max_bytes)", file=sys.stderr)
                    return
                time.sleep(POLL_SECONDS)
        finally:
            if source is not None:
                os.close(source)


def open_log(records: Records, full_logs: FullLogs, task_id: str, number: int,
             final_run: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(an fd of the log `taskrun logs` shows, the full size when only the capped one is left).

    A final Run's full log (fulllogs.py) when it is kept and as long as its record says; otherwise
    output.log, read without following links (None when there is none). An fd of output.log keeps
    reading the whole output even when the Run ends meanwhile and output.log is replaced by its capped form.
    """
    size = (final_run or {}).get("output_bytes")
    size = size if isinstance(size, int) and not isinstance(size, bool) else None
    if size is not None:
        fd = full_logs.open_full(task_id, number, size)
        if fd is not None:
            return fd, None
    fd = records.open_output(task_id, number)
    if fd is not None and size is not None and size > os.fstat(fd).st_size:
        return fd, size
    return fd, None


def no_record(records: Records, task_id: str) -> UsageError:
    """The error for a Task without a record: pruned (in which commit, how to see it again) or unknown."""
    from taskrunner.cli.prune import unknown_task  # git is asked only here, on the not-found path

    return unknown_task(records.root, task_id, f"no Task '{task_id}' has a record; see `taskrun status`")


def cmd_logs(args: argparse.Namespace, out: Console) -> int:
    root = find_root(args)
    records = Records(root)
    stdout = sys.stdout.buffer
    if args.json:
        sink: Sink = JsonSink(stdout)
    else:
        # Like `cat` into a pipe or a file; at a terminal, escape sequences in the
        # output are shown, not obeyed (unless --raw).
        cleaner = None if args.raw or not sys.stdout.isatty() else StreamCleaner()
        sink = Sink(stdout, cleaner, sys.stdout.encoding or "utf-8")
    reader = _Reader(records, FullLogs(records, gitops.state_dir(root)), args.task, args.follow, sink)
    if args.run is not None:
        if reader.load_task() is None and not args.follow:
            raise no_record(records, args.task)
        reader.show(args.run)
        return EXIT_OK
    previous: int | None = None
    while (number := reader.next_run(previous)) is not None:
        reader.show(number)
        if not args.follow:
            break
        previous = number
    return EXIT_OK


def run_numbers(task: dict[str, Any] | None) -> list[int]:
    """The Run numbers a Task record lists (entries that are not a number are passed over)."""
    return [e["run"] for e in (task or {}).get("runs") or []
            if isinstance(e, dict) and isinstance(e.get("run"), int) and not isinstance(e["run"], bool)]
