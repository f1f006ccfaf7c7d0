"""The daemon's log: engine events and `logging` records as JSON lines or plain text.

`taskrun up --log-format json` writes one JSON object per line on stdout
(docs/logging.md):

    {"time": "2026-11-30T05:14:13.120Z", "level": "ERROR", "event": "task_status",
     "message": "first FAILED: exit code 3", "task_id": "first", "run_id": "...",
     "worker": "local", "agent": "shell", "status": "FAILED"}

`time` is RFC 3339 in UTC with milliseconds; `level` one of DEBUG, INFO,
WARNING, ERROR; `event` a short fixed name (EVENTS); `message` one line for
people; the other keys appear where they apply. The plain `logging` calls
of the package (the logger "taskrun") go through the same handler, with the
event "log".

`LogHooks` turns Hooks calls into `logging` records on the logger "taskrun";
`configure` puts one handler on that logger (JSON lines, or text lines on
stderr beside the live view); `FilteredView` applies `--log-level` and the
redaction to the text view (cli/render.py LiveView) without changing a byte
of what it prints otherwise.

No secret is logged: every message and field goes through `redact`, which
masks token-shaped strings (forge, cloud and model API tokens, bearer
credentials, passwords in URLs, `token=...` pairs, private key blocks) and
then `textsafe.clean`. Nothing here raises into the daemon: a hook that
fails is logged by hooks.emit, a stream that fails is dropped by the handler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from taskrunner.hooks import Hooks
from taskrunner.leaks import PRIVATE_KEY_PATTERN
from taskrunner.state import RunState, TaskState
from taskrunner.textsafe import clean

#: The logger every part of the package logs to (hooks.py, and this module's LogHooks).
LOGGER = "taskrun"
#: What `--log-format` accepts; "text" is the default.
FORMATS = ("text", "json")
#: What `--log-level` accepts, least severe first; "INFO" is the default.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: The `event` names a JSON line can carry (an operational event's kind from Hooks.event is passed through).
EVENTS = ("daemon_started", "daemon_stopped", "task_status", "task_waiting", "run_status", "run_output",
          "worker_status", "committed", "notice", "push", "rejected", "usage_limited", "worker_untrusted", "log")
#: What a secret is replaced with.
MASK = "[redacted]"

_TASK_LEVELS = {"FAILED": logging.ERROR, "INVALID": logging.ERROR, "BLOCKED": logging.WARNING,
                "CANCELLED": logging.WARNING}
_RUN_LEVELS = {"FAILED": logging.WARNING, "CANCELLED": logging.WARNING}
#: Longest field value written (a Task's error can quote a whole file).
MAX_FIELD_CHARS = 4000

#: Longest text `redact` reads (characters): the rest of a longer message is cut, with a note saying so,
#: so one huge message costs bounded time and no secret shows past the cut unredacted.
MAX_REDACT_CHARS = 64 * 1024
#: How far past MAX_REDACT_CHARS `redact` reads, so a secret that straddles the cut is still masked whole.
_REDACT_MARGIN = 4096

# Every pattern below runs in time linear in its input (tests/unit/test_logs.py measures it): each
# repeat is either bounded, or the last thing a match needs (nothing after it can fail and make it
# give characters back), and no two repeats next to each other can match the same characters.
#
# Token shapes, whole: the issuers' documented prefixes (GitHub ghp_/gho_/ghu_/ghs_/ghr_ and
# github_pat_, GitLab glpat-, Slack xox?-, OpenAI and Anthropic sk-, AWS access key ids, Google API keys).
# The open `{20,}` ends the match: a token is masked however long it is.
_TOKENS = (r"\b(?:gh[opusr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}"
           r"|xox[abposr]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35})")
# Where a secret follows a name: `Authorization: Bearer x`, `token=x`, `"password": "x y"`; a password in a URL.
# The name is a whole word (at most 64 characters of [a-z0-9_-]) that holds one of the words: the lookahead
# finds the word within the first 64 characters, then the name takes the word whole, at once (the
# negative lookahead after it refuses every shorter split, so nothing is tried twice).
_KEY = (r"(?i:\b(?=[a-z0-9_-]{0,58}?(?:token|secret|passw(?:or)?d|api[_-]?key|access[_-]?key|private[_-]?key))"
        r"[a-z0-9_-]{1,64}(?![a-z0-9_-])"
        r"(?<![_-]env)(?<![_-]file)(?<![_-]path)[\"']?\s{0,16}[:=]\s{0,16})")  # not `secret_env: NAME`
_SECRET = re.compile(rf"{_TOKENS}"
                     rf"|(?P<quoted>{_KEY}[\"'])(?P<inside>[^\"'\n]{{1,400}})(?=[\"'])"
                     rf"|(?P<name>(?i:\b(?:bearer|basic)\s{{1,16}})|{_KEY})(?P<value>[^\s\"'@,;&]{{8,}})"
                     r"|(?P<user>(?<=://)[^/\s:@]{1,256}:)(?P<password>[^\s/@]{1,1024})(?=@)")
# A private key block, from its BEGIN line (leaks.PRIVATE_KEY_PATTERN) to its END line or the end of the text.
_PRIVATE_KEY = re.compile(f"(?:{PRIVATE_KEY_PATTERN})" + r"[\s\S]*?(?:-----END [A-Z0-9 ]{0,64}-----|\Z)")


def _mask(match: re.Match[str]) -> str:
    if match.group("inside"):
        return match.group("quoted") + MASK
    if match.group("value"):
        return match.group("name") + MASK
    if match.group("password"):
        return match.group("user") + MASK
    return MASK


def redact_secrets(text: str) -> str:
    """`text` with every token-shaped string (see the module doc) replaced by MASK; the rest as it was.

    Reads at most MAX_REDACT_CHARS (plus a margin, so a secret across the cut is masked whole):
    a longer text comes back cut there, ending in "[... N characters cut]". Linear in that length.
    """
    cut = len(text) > MAX_REDACT_CHARS
    if cut:
        size, text = len(text), text[:MAX_REDACT_CHARS + _REDACT_MARGIN]
    if "PRIVATE KEY" in text or "PuTTY-User-Key-File-" in text:
        text = _PRIVATE_KEY.sub(MASK, text)
    text = _SECRET.sub(_mask, text)
    if cut:
        text = f"{text[:MAX_REDACT_CHARS]}[... {size - MAX_REDACT_CHARS} characters cut]"
    return text


def redact_output(text: str) -> str:
    """Run output (`text`, any length) with secrets masked, line by line, for the text view.

    Lines are redacted in pieces of at most MAX_REDACT_CHARS, cut at a line end, so the cost is
    linear in the whole length; one line longer than MAX_REDACT_CHARS is cut (`redact_secrets`).
    """
    if len(text) <= MAX_REDACT_CHARS:
        return redact_secrets(text)
    pieces, start = [], 0
    while start < len(text):
        end = text.rfind("\n", start, start + MAX_REDACT_CHARS) + 1 or len(text)
        if end - start > MAX_REDACT_CHARS:  # one long line: up to its end, cut by redact_secrets
            end = text.find("\n", start) + 1 or len(text)
        pieces.append(redact_secrets(text[start:end]))
        start = end
    return "".join(pieces)


def last_line(data: bytes) -> bytes | None:
    """The last line of `data` holding more than whitespace (lines end at \\n or \\r), or None.

    It reads `data` from its end only as far as that line starts: a chunk of a
    big output (1 MiB, whose last line is a few dozen bytes) is neither copied
    (`rstrip` of the whole) nor searched to its start for a \\r it lacks.
    """
    stripped = _content_end(data)
    if not stripped:
        return None
    newline = data.rfind(b"\n", 0, stripped)
    start = max(newline, data.rfind(b"\r", newline + 1, stripped)) + 1
    ends = [at for at in (data.find(b"\n", stripped), data.find(b"\r", stripped)) if at >= 0]
    return data[start:min(ends, default=len(data))]


def _content_end(data: bytes) -> int:
    """len(data.rstrip()), from slices of the end that double in size: no copy of a big `data`."""
    span = 256
    while True:
        tail = data[-span:]
        kept = len(tail.rstrip())
        if kept or len(tail) == len(data):
            return len(data) - len(tail) + kept
        span *= 2


def redact(text: str, multiline: bool = False) -> str:
    """What is safe to log of `text`: secrets masked (`redact_secrets`, so cut at MAX_REDACT_CHARS),
    then `textsafe.clean`ed."""
    return clean(redact_secrets(text), multiline=multiline)


def _safe(value: Any) -> Any:
    """A field value fit for a JSON line: numbers, booleans and None as they are, the rest redacted text."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_safe(v) for v in value][:100]
    return redact(str(value))[:MAX_FIELD_CHARS]


def rfc3339(timestamp: float) -> str:
    """`timestamp` (epoch seconds) as RFC 3339 in UTC with milliseconds: "2026-11-30T05:14:13.120Z"."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time, level, event, message and the record's `fields` (module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": rfc3339(record.created), "level": record.levelname,
                                "event": getattr(record, "event", "log"), "message": redact(record.getMessage())}
        for key, value in (getattr(record, "fields", None) or {}).items():
            if key not in line and value is not None:  # a key that does not apply is left out
                line[key] = _safe(value)
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info), multiline=True)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A record as "05:14:13 WARNING message" (local time, like the view's lines), redacted."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname} {redact(record.getMessage())}"
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info), multiline=True)
        return text


class StreamLog(logging.Handler):
    """Writes each record to sys.<stream> as it is at the time (rich's live view swaps sys.stderr).

    A stream that fails (a closed pipe) loses the line, silently: the log never stops the daemon.
    """

    def __init__(self, stream: str = "stdout") -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            out = getattr(sys, self.stream)
            out.write(line + "\n")
            out.flush()
        except Exception:  # noqa: BLE001,S110 - a log line is never worth the daemon (and logging it would loop)
            pass


def configure(log_format: str, level: str) -> logging.Handler:
    """Route the logger "taskrun" to one handler: JSON lines on stdout, or text lines on stderr.

    `log_format` in FORMATS, `level` in LEVELS (ValueError otherwise). Undo with `unconfigure`.
    """
    if log_format not in FORMATS or level not in LEVELS:
        raise ValueError(f"log format {log_format!r} or level {level!r} is not one of {FORMATS} / {LEVELS}")
    handler = StreamLog("stdout" if log_format == "json" else "stderr")
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def unconfigure(handler: logging.Handler) -> None:
    logger = logging.getLogger(LOGGER)
    logger.removeHandler(handler)
    if not logger.handlers:
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def started(root: Path) -> None:
    """Log that the daemon in `root` started (event daemon_started, with its pid)."""
    logging.getLogger(LOGGER).info("taskrun daemon in %s (pid %d)", root, os.getpid(),
                                   extra={"event": "daemon_started", "fields": {"pid": os.getpid()}})


def stopped(code: int) -> None:
    """Log that the daemon stopped with exit code `code` (event daemon_stopped)."""
    logging.getLogger(LOGGER).info("taskrun daemon stopped (exit code %d)", code,
                                   extra={"event": "daemon_stopped", "fields": {"exit_code": code}})


# -- what each hook call is ------------------------------------------------------------------


def task_level(task: TaskState) -> int:
    """A Task change's level: ERROR for FAILED and INVALID, WARNING for BLOCKED and CANCELLED, else INFO."""
    return _TASK_LEVELS.get(task.status.value, logging.INFO)


#: How the routine notices begin (daemon.py): what the daemon did or where it listens, nothing to act on.
#: They are INFO, so `--log-level WARNING` shows only what needs attention.
INFO_NOTICES = ("configuration reloaded from ", "sync requested (", "webhook receiver listening on ",
                "metrics listening on ")


def notice_level(message: str) -> int:
    """A notice's level: ERROR when its first word is "error"; INFO when it is "info" or "note" or the
    notice is a routine one (INFO_NOTICES); WARNING otherwise."""
    head = message[:10].lower()
    if head.startswith("error"):
        return logging.ERROR
    if head.startswith(("info", "note")) or message.startswith(INFO_NOTICES):
        return logging.INFO
    return logging.WARNING


def event_level(kind: str, fields: dict[str, Any]) -> int:
    """An operational event's level: a push that worked is INFO, any other known kind WARNING, unknown INFO."""
    if kind == "push":
        return logging.INFO if fields.get("ok") else logging.WARNING
    return logging.WARNING if kind in ("rejected", "usage_limited", "worker_untrusted") else logging.INFO


def _run_fields(run: RunState | None) -> dict[str, Any]:
    if run is None:
        return {}
    return {"run_id": run.run_id, "run": run.number, "worker": run.worker, "agent": run.agent}


class LogHooks(Hooks):
    """Hooks that log each event as a record on the logger "taskrun" (its `event` and `fields` attributes).

    A Task is logged when its status changes (task_status), or at DEBUG when only its waiting
    reason does; a Run when its status changes; a Worker when it comes online, goes offline or
    changes trust (at DEBUG when only its load changes). Run output is logged line by line only
    with `output` (like `up --output`).
    """

    def __init__(self, output: bool = False, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger(LOGGER)
        self.output = output
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[str, str | None]] = {}
        self._runs: dict[str, str] = {}
        self._workers: dict[str, tuple[Any, Any]] = {}

    def _record(self, level: int, event: str, message: str, **fields: Any) -> None:
        if self.log.isEnabledFor(level):
            self.log.log(level, "%s", message, extra={"event": event, "fields": fields})

    def task_changed(self, task: TaskState) -> None:
        status = task.status.value
        with self._lock:
            before = self._tasks.get(task.id)
            self._tasks[task.id] = (status, task.waiting)
        run = task.runs[-1] if task.runs else None
        fields = {"task_id": task.id, **_run_fields(run), "status": status}
        if before is None or before[0] != status:
            note = task.error or (task.waiting if status not in ("RUNNING", "COMPLETED") else None)
            where = f" on {run.worker}" if status == "RUNNING" and run else ""
            self._record(task_level(task), "task_status", f"{task.id} {status}{where}{f': {note}' if note else ''}",
                         **fields, error=task.error, waiting=task.waiting)
        elif task.waiting and before[1] != task.waiting:
            self._record(logging.DEBUG, "task_waiting", f"{task.id} waits: {task.waiting}", **fields,
                         waiting=task.waiting)

    def task_removed(self, task: TaskState) -> None:
        with self._lock:  # pruned (the prune's commit is what is logged)
            self._tasks.pop(task.id, None)

    def run_changed(self, run: RunState) -> None:
        status = run.status.value
        with self._lock:
            if self._runs.get(run.run_id) == status:
                return
            if run.status.final:
                self._runs.pop(run.run_id, None)  # nothing follows a final status: keep the map small
            else:
                self._runs[run.run_id] = status
        level = _RUN_LEVELS.get(status, logging.INFO)
        text = f"{run.task_id} Run {run.number} {status} on {run.worker}"
        if run.error:
            text += f": {run.error}"
        self._record(level, "run_status", text, task_id=run.task_id, **_run_fields(run), status=status,
                     exit_code=run.exit_code, error=run.error)

    def run_output(self, run: RunState, data: bytes) -> None:
        if not self.output or not self.log.isEnabledFor(logging.INFO):
            return
        for line in data.decode(errors="replace").splitlines():
            if line.strip():
                self._record(logging.INFO, "run_output", line, task_id=run.task_id, **_run_fields(run))

    def worker_changed(self, worker: dict[str, Any]) -> None:
        name = str(worker.get("name"))
        state = (worker.get("reachable"), worker.get("trusted"))
        with self._lock:
            before = self._workers.get(name)
            self._workers[name] = state
        changed = before != state
        status = "online" if state[0] else "offline"
        text = f"Worker {name} {status}" + (f": {worker['error']}" if worker.get("error") else "")
        self._record(logging.INFO if changed else logging.DEBUG, "worker_status", text, worker=name,
                     status=status, trusted=state[1], used=worker.get("used"), slots=worker.get("slots"),
                     error=worker.get("error"))

    def committed(self, commit: str, summary: str) -> None:
        self._record(logging.INFO, "committed", f"committed {commit[:10]} ({summary})", commit=commit)

    def notice(self, message: str) -> None:
        self._record(notice_level(message), "notice", message)

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        name = re.sub(r"[^a-z0-9_]", "_", str(kind).lower())[:40] or "event"
        text = name + "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
        self._record(event_level(name, fields), name, text, **{k: v for k, v in fields.items() if k != "message"})


class FilteredView(Hooks):
    """The text view (`inner`) behind `--log-level` and the redaction: an event below `level` is not
    shown; a secret in a Task's note, a notice, a commit summary or Run output is masked. At INFO
    and without secrets it passes every call through unchanged."""

    def __init__(self, inner: Hooks, level: str = "INFO") -> None:
        self.inner = inner
        self.level = logging.getLevelName(level)

    def task_changed(self, task: TaskState) -> None:
        if task_level(task) < self.level:
            return
        safe = {k: redact_secrets(v) for k, v in (("error", task.error), ("waiting", task.waiting)) if v}
        if any(safe[k] != getattr(task, k) for k in safe):
            task = dataclasses.replace(task, **safe)
        self.inner.task_changed(task)

    def task_removed(self, task: TaskState) -> None:
        self.inner.task_removed(task)

    def run_changed(self, run: RunState) -> None:
        if _RUN_LEVELS.get(run.status.value, logging.INFO) >= self.level:
            self.inner.run_changed(run)

    def run_output(self, run: RunState, data: bytes) -> None:
        if self.level > logging.INFO:
            return
        if not getattr(self.inner, "show_output", False):
            # Without --output the view shows at most the last line (the live table's note): only that
            # is redacted and passed on, not every byte of a big output on the engine's thread.
            last = last_line(data)
            if last is None:
                return
            data = last
        text = data.decode(errors="replace")
        safe = redact_output(text)
        self.inner.run_output(run, data if safe == text else safe.encode())

    def worker_changed(self, worker: dict[str, Any]) -> None:
        if self.level <= logging.INFO:
            self.inner.worker_changed(worker)

    def committed(self, commit: str, summary: str) -> None:
        if self.level <= logging.INFO:
            self.inner.committed(commit, redact_secrets(summary))

    def notice(self, message: str) -> None:
        if notice_level(message) >= self.level:
            self.inner.notice(redact_secrets(message))

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if event_level(kind, fields) >= self.level:
            self.inner.event(kind, fields)
