"""Notifications: events from the hooks sent to commands and URLs (`notify` in .taskrun.yaml).

    Notifier (Hooks)  hears task_changed, worker_changed and event(); turns what a `notify`
                      entry wants into Deliveries on a bounded queue; one thread sends them

Events and what they carry (`event_json`; every text field cut at MAX_FIELD_CHARS, then masked
and cleaned with logs.redact: a Task's error may quote a file with a token, and these go to outside
services; never a secret):

    completed, failed, blocked   a Task's status changed to COMPLETED, FAILED or BLOCKED (once per
                                 change): task_id, title, status, run_id, agent, worker, error
                                 (failed) or reason (blocked)
    worker_offline               a Worker that was online is not: worker, error
    usage_limited                event("usage_limited"): agent, worker (None: everywhere), until (epoch s)
    worker_untrusted             event("worker_untrusted"): worker, reason

Each has `kind` and `time` (ISO 8601, UTC). A command gets that JSON on stdin; a URL gets it as
the POST body, or the entry's `template` rendered with `event` (jinja2, sandboxed: agents/prompt.py;
within RENDER_SECONDS, or the try's `timeout` when shorter, and MAX_BODY_CHARS: config_notify.render_body).
A command runs with only COMMAND_ENV of the daemon's environment, its entry's `env` and TASKRUN_EVENT.
With `secret_env`, a POST carries X-Taskrun-Signature-256: sha256=<hex HMAC-SHA256 of the body>
(GitHub's X-Hub-Signature-256 scheme). Redirects are not followed.

Delivery: the queue holds at most QUEUE_SIZE Deliveries; past it the oldest go, and one notice
counts them. Each try has the entry's `timeout` as a wall-clock deadline: a POST's socket is shut
down when it passes (a timeout per read alone lets a receiver sending a byte a second hold the
thread for ever), a command is killed with its process group;
a connection error, a timeout, a 5xx or 429 answer, or a command's non-zero exit is tried again
up to `retries` times after BACKOFF_BASE s, doubling, with jitter; any other answer is final. A
failure is a notice, never an exception: a slow or broken target delays other notifications,
never the daemon. `stop()` drains the queue for at most DRAIN_SECONDS, and waits at most that plus
one try's `timeout` (at most STOP_TRY_SECONDS of it; and STOP_SLACK) for the try under way.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from taskrunner import clock
from taskrunner.config_notify import (
    COMMAND_ENV,
    EVENT_FIELDS,
    RENDER_SECONDS,
    TASK_EVENTS,
    NotifyTarget,
    render_body,
)
from taskrunner.hooks import Hooks
from taskrunner.logs import redact
from taskrunner.model import TaskStatus
from taskrunner.textsafe import clean

if TYPE_CHECKING:
    from taskrunner.config import Config
    from taskrunner.state import TaskState

log = logging.getLogger("taskrun")

#: The most Deliveries waiting; past it the oldest are dropped (and counted in one notice).
QUEUE_SIZE = 1000
#: Seconds before the first retry; each next one waits twice as long (times a jitter of 0.5 to 1).
BACKOFF_BASE = 1.0
#: The longest wait between two tries, in seconds.
BACKOFF_MAX = 60.0
#: Seconds `stop()` waits for the queue to drain; what is left then is dropped with a notice.
DRAIN_SECONDS = 10.0
#: Seconds `stop()` waits beyond DRAIN_SECONDS and the try's `timeout`: a killed command's reaping.
STOP_SLACK = 1.0
#: The most of a try's `timeout` `stop()` waits for beyond DRAIN_SECONDS: so the whole stays within the
#: margin of the service unit's stop timeout (cli/service.py: 30 s), whatever `timeout` (up to 5 min) says.
STOP_TRY_SECONDS = 15.0
#: The longest text field of an event, in characters.
MAX_FIELD_CHARS = 2000
#: How far back from a cut the last word is looked for: the cut text ends at a word, so a token cut in
#: two is not left half there, too short for the redactor to know it.
_CUT_WORD_CHARS = 256
#: The most of an answer or a command's stderr read (and the most of it shown in a notice).
MAX_ANSWER_BYTES = 64 * 1024
SHOWN_CHARS = 200
USER_AGENT = "taskrun"
SIGNATURE_HEADER = "X-Taskrun-Signature-256"

_STATUS_EVENTS: Mapping[TaskStatus, str] = {
    TaskStatus.COMPLETED: "completed", TaskStatus.FAILED: "failed", TaskStatus.BLOCKED: "blocked",
}


# -- the pure core: events, matching, bodies, signatures, backoff ---------------------------


def _text(value: object) -> str | None:
    """`value` as an event's text: cut at MAX_FIELD_CHARS (at a word), secrets masked, cleaned (logs.redact)."""
    if value is None:
        return None
    raw = str(value)
    cut = len(raw) > MAX_FIELD_CHARS
    if cut:
        raw = raw[:MAX_FIELD_CHARS - 3]
        space = max(raw.rfind(c, len(raw) - _CUT_WORD_CHARS) for c in " \t\n")
        raw = raw[:space] if space > 0 else raw[:-_CUT_WORD_CHARS]
    text = redact(raw)  # after the cut: redacting costs at most MAX_FIELD_CHARS, whatever the error holds
    if len(text) > MAX_FIELD_CHARS - 3:  # cleaning escapes control characters: \x1b is four
        text, cut = text[:MAX_FIELD_CHARS - 3], True
    return text + "..." if cut else text


def _time(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def task_event(task: TaskState, default_agent: str, wall: float) -> dict[str, Any] | None:
    """The event of a Task in `task.status` (None when its status is none of TASK_EVENTS)."""
    kind = _STATUS_EVENTS.get(task.status)
    if kind is None:
        return None
    run = task.runs[-1] if task.runs else None
    agent = run.agent if run else (task.spec.agent if task.spec and task.spec.agent else default_agent)
    event: dict[str, Any] = {
        "kind": kind, "time": _time(wall), "task_id": _text(task.id),
        "title": _text(task.spec.title if task.spec else task.id), "status": task.status.value,
        "run_id": run.run_id if run else None, "agent": _text(agent), "worker": _text(run.worker if run else None),
    }
    if kind == "failed":
        event["error"] = _text(task.error or (run.error if run else None))
    elif kind == "blocked":
        event["reason"] = _text(task.error or task.waiting)
    return event


def other_event(kind: str, fields: Mapping[str, Any], wall: float) -> dict[str, Any]:
    """The event of a Worker or an Agent: `fields` (hooks.py) cleaned; unknown fields are left out."""
    event: dict[str, Any] = {"kind": kind, "time": _time(wall)}
    for name in ("agent", "worker", "error", "reason"):
        if name in fields:
            event[name] = _text(fields[name])
    until = fields.get("until")
    if "until" in fields:
        event["until"] = until if isinstance(until, (int, float)) and not isinstance(until, bool) else None
    return event


def matches(target: NotifyTarget, event: Mapping[str, Any]) -> bool:
    """Whether `target` wants `event`: its kind is in `on`; `tasks` filters Task events by id;
    `agents` filters events that name an Agent."""
    if event["kind"] not in target.on:
        return False
    if target.tasks is not None and event["kind"] in TASK_EVENTS and \
            not fnmatch.fnmatchcase(str(event.get("task_id")), target.tasks):
        return False
    if target.agents and "agent" in event and event["agent"] not in target.agents:
        return False
    return True


def body(target: NotifyTarget, event: Mapping[str, Any], seconds: float = RENDER_SECONDS) -> bytes:
    """What is sent: the event JSON, or the target's template rendered with `event` (every field
    of EVENT_FIELDS present, None where it does not apply) within `seconds` and MAX_BODY_CHARS.
    PromptError when the template fails, takes longer or renders more."""
    if target.template is None:
        return json.dumps(dict(event), sort_keys=True).encode()
    full = {name: event.get(name) for name in EVENT_FIELDS}
    return render_body(target.template, full, f"notify[{target.index}].template", seconds).encode()


def signature(secret: str, payload: bytes) -> str:
    """The X-Taskrun-Signature-256 value: "sha256=" + hex HMAC-SHA256 of `payload` keyed with `secret`."""
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def backoff(tried: int, jitter: float) -> float:
    """Seconds before try `tried + 1` (`tried` >= 1): BACKOFF_BASE doubling, times `jitter` (0.5 to 1)."""
    return min(BACKOFF_BASE * 2 ** (tried - 1), BACKOFF_MAX) * jitter


def retryable(status: int) -> bool:
    """Whether an HTTP answer may be worth trying again: 5xx and 429 (rate limited)."""
    return status >= 500 or status == 429


# -- delivery: one try at a target ----------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    target: NotifyTarget
    event: Mapping[str, Any]


@dataclass(frozen=True)
class Outcome:
    """One try: `ok`; when not, `retry` (worth trying again) and `why` (for a notice; no secret)."""

    ok: bool
    retry: bool = False
    why: str = ""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is an answer like any other 3xx: final. Following it would POST the signed body elsewhere.
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


class _Deadline:
    """The wall-clock deadline of one POST: when it passes, every socket the try opened is shut down,
    so a connect or read blocked on it returns at once (as http.py cuts a request at its deadline).
    A name lookup is not interruptible; `Notifier.stop` does not wait on it beyond its bound."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.passed = False
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._pass)
        self._timer.daemon = True
        self._timer.name = "notify-deadline"
        self._timer.start()

    def connect(self, address: tuple[str, int], timeout: object = None,
                source_address: tuple[str, int] | None = None) -> socket.socket:
        """socket.create_connection, its connect within what is left of the deadline (`timeout`: seconds per
        read, or http.client's default marker)."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        per_read = min(timeout, left) if isinstance(timeout, (int, float)) and timeout else left
        sock = socket.create_connection(address, per_read, source_address)
        with self._lock:
            self._sockets.append(sock)
            if self.passed:
                _shut(sock)
        return sock

    def cancel(self) -> None:
        self._timer.cancel()

    def _pass(self) -> None:
        with self._lock:
            self.passed = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


def _within(base: type[http.client.HTTPConnection], deadline: _Deadline) -> type[http.client.HTTPConnection]:
    """`base` whose sockets are made by `deadline` (http.client calls `self._create_connection` in connect(),
    before a TLS handshake or a proxy tunnel, so both are cut too)."""

    class Connection(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = deadline.connect

    return Connection


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_within(http.client.HTTPConnection, self._deadline), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_within(http.client.HTTPSConnection, self._deadline), req,
                            context=self._context)  # type: ignore[attr-defined]


def post(url: str, payload: bytes, headers: Mapping[str, str], timeout: float, spent: float = 0.0) -> Outcome:
    """POST `payload` to `url` with urllib (its proxy settings apply); 2xx is ok. `timeout` is seconds for
    the whole try, a wall-clock deadline (also the limit of each read), of which `spent` seconds are gone
    (rendering the body). The answer's headers are capped by http.client (100 lines of 64 KiB), its body
    read up to MAX_ANSWER_BYTES."""
    deadline = _Deadline(max(timeout - spent, 0.1))
    opener = urllib.request.build_opener(_NoRedirect(), _HTTP(deadline), _HTTPS(deadline))
    try:
        request = urllib.request.Request(url, data=payload, headers=dict(headers), method="POST")
        with opener.open(request, timeout=deadline.seconds) as answer:
            try:
                answer.read(MAX_ANSWER_BYTES)
            except (OSError, http.client.HTTPException):  # answered 2xx: delivered, whatever the rest
                pass
            return Outcome(True)
    except urllib.error.HTTPError as exc:
        with exc:
            return Outcome(False, retryable(exc.code), f"HTTP {exc.code}")
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, a malformed answer
        if deadline.passed:
            return Outcome(False, True, f"timed out after {timeout:g}s (cut off)")
        reason = getattr(exc, "reason", exc)
        return Outcome(False, True, clean(str(reason) or type(reason).__name__)[:SHOWN_CHARS])
    except ValueError as exc:  # a URL urllib cannot use ("http://[::1/", a host label idna refuses): final
        return Outcome(False, False, f"the URL cannot be used: {clean(str(exc))[:SHOWN_CHARS]}")
    finally:
        deadline.cancel()


def command_env(target: NotifyTarget, environ: Mapping[str, str], kind: str) -> dict[str, str]:
    """The environment of `target`'s command: COMMAND_ENV and the entry's `env` (those set in `environ`)
    and TASKRUN_EVENT=`kind`; nothing else of the daemon's (its secrets, tokens and API keys)."""
    env = {name: environ[name] for name in (*COMMAND_ENV, *target.env) if name in environ}
    env["TASKRUN_EVENT"] = kind
    return env


def run_command(argv: tuple[str, ...], payload: bytes, timeout: float, env: Mapping[str, str] | None = None) -> Outcome:
    """Run `argv` with `payload` on stdin in its own process group, with `env` (None: the daemon's);
    killed (the group) after `timeout` s. Exit 0 is ok; a non-zero exit or the timeout may be tried
    again; a command that cannot start may not."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True, env=None if env is None else dict(env))
    except OSError as exc:
        return Outcome(False, False, f"cannot run {clean(argv[0])}: {exc.strerror or exc}")
    except ValueError as exc:  # an argument holding a NUL byte
        return Outcome(False, False, f"cannot run {clean(argv[0])}: {clean(str(exc))}")
    try:
        _, err = proc.communicate(payload, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return Outcome(False, True, f"timed out after {timeout:g}s (killed)")
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode == 0:
        return Outcome(True)
    tail = redact(err[-MAX_ANSWER_BYTES:].decode("utf-8", "replace").strip())[-SHOWN_CHARS:]
    return Outcome(False, True, f"exit code {proc.returncode}" + (f": {tail}" if tail else ""))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:  # a child that left the group may hold stderr open: not waited on beyond STOP_SLACK
        proc.communicate(timeout=STOP_SLACK)
    except subprocess.TimeoutExpired:
        for stream in (proc.stdin, proc.stderr):
            if stream is not None:
                stream.close()
        proc.wait()


def attempt(delivery: Delivery, environ: Mapping[str, str]) -> Outcome:
    """One try at `delivery`'s target."""
    from taskrunner.agents.prompt import PromptError

    target, started = delivery.target, time.monotonic()
    try:
        payload = body(target, delivery.event, min(RENDER_SECONDS, target.timeout))
    except PromptError as exc:  # the template's fault: no try will do better
        return Outcome(False, False, f"the template failed: {exc}")
    if target.command is not None:
        return run_command(target.command, payload, target.timeout,
                           command_env(target, environ, str(delivery.event["kind"])))
    assert target.url is not None
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "X-Taskrun-Event": str(delivery.event["kind"])}
    if target.secret_env is not None:
        secret = environ.get(target.secret_env, "")
        if not secret:  # fail closed: an unsigned POST would teach the receiver to accept them
            return Outcome(False, False, f"the environment variable {target.secret_env} (secret_env) is not set "
                                         "in the daemon's environment; not sent")
        headers[SIGNATURE_HEADER] = signature(secret, payload)
    return post(target.url, payload, headers, target.timeout, time.monotonic() - started)


# -- the Notifier: the hooks, the queue, the delivery thread ---------------------------------


class Notifier(Hooks):
    """The `notify` entries of the configuration, as hooks; one thread ("notify") delivers.

    `notice` is how a failure is told (the daemon's hooks' notice); `environ` holds the secrets.
    Hook calls only build events and queue them: they never wait on a target.
    """

    def __init__(self, config: Config, notice: Callable[[str], None],
                 environ: Mapping[str, str] | None = None,
                 deliver: Callable[[Delivery, Mapping[str, str]], Outcome] = attempt) -> None:
        self._targets: tuple[NotifyTarget, ...] = config.notify
        self._default_agent = config.default_agent
        self._notice = notice
        self._environ = os.environ if environ is None else environ
        self._deliver = deliver
        self._queue: collections.deque[Delivery] = collections.deque()
        self._dropped = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._deadline: float | None = None  # monotonic; set by stop()
        self._busy = False
        self._current: Delivery | None = None  # the Delivery under way
        self._task_status: dict[str, TaskStatus] = {}
        self._online: dict[str, bool] = {}

    # -- lifecycle (the daemon's main thread) --

    def seed(self, tasks: Iterable[TaskState]) -> None:
        """The Tasks as restored at start-up: a status they already had is no change to tell."""
        for task in tasks:
            self._task_status[task.id] = task.status

    def configure(self, config: Config) -> None:
        """A reloaded configuration: new events go to its entries (queued ones to the entries they were for)."""
        with self._cond:
            changed = config.notify != self._targets
            self._targets, self._default_agent = config.notify, config.default_agent
        if changed:
            self._warn_unset(config.notify)
        self._ensure_thread()

    def start(self) -> None:
        with self._cond:
            self._running = True
        self._warn_unset(self._targets)
        self._ensure_thread()

    def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Deliver what is queued for at most `drain` seconds; a try under way then may take its
        `timeout` beyond that (at most STOP_TRY_SECONDS, and STOP_SLACK), no more: past it the thread is
        left to end with the process. Then drop the rest with a notice."""
        with self._cond:
            self._running = False
            self._deadline = time.monotonic() + drain
            self._cond.notify_all()
            thread = self._thread
            # The longest try that may be under way when the drain time ends: one of a queued Delivery's.
            longest = max([t.timeout for t in self._targets] + [d.target.timeout for d in self._queue] +
                          ([self._current.target.timeout] if self._current is not None else []), default=0.0)
        if thread is not None:
            thread.join(drain + min(longest, STOP_TRY_SECONDS) + STOP_SLACK)  # a daemon thread: one past is left
        with self._cond:
            left, self._queue = len(self._queue), collections.deque()
        if left:
            self._notice(f"notify: {left} notification(s) not sent: the daemon stopped before they could be")

    def pending(self) -> int:
        """Deliveries queued or under way."""
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    # -- hooks (the engine's thread: build, match, queue; never wait) --

    def task_changed(self, task: TaskState) -> None:
        previous = self._task_status.get(task.id)
        self._task_status[task.id] = task.status
        if previous is task.status:
            return
        event = task_event(task, self._default_agent, clock.wall())
        if event is not None:
            self._put(event)

    def task_removed(self, task: TaskState) -> None:
        self._task_status.pop(task.id, None)  # pruned: nothing more to tell of it

    def worker_changed(self, worker: dict[str, Any]) -> None:
        name = str(worker.get("name"))
        online = bool(worker.get("online"))
        was = self._online.get(name)
        self._online[name] = online
        if was and not online:
            self._put(other_event("worker_offline", {"worker": name, "error": worker.get("error")}, clock.wall()))

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind in ("usage_limited", "worker_untrusted"):
            self._put(other_event(kind, fields, clock.wall()))

    # -- the queue --

    def _put(self, event: dict[str, Any]) -> None:
        with self._cond:
            for target in self._targets:
                if matches(target, event):
                    if len(self._queue) >= QUEUE_SIZE:
                        self._queue.popleft()
                        self._dropped += 1
                    self._queue.append(Delivery(target, event))
            self._cond.notify_all()

    def _ensure_thread(self) -> None:
        with self._cond:
            if not self._running or not self._targets or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._serve, name="notify", daemon=True)
            self._thread.start()

    def _warn_unset(self, targets: Iterable[NotifyTarget]) -> None:
        for target in targets:
            if target.secret_env is not None and not self._environ.get(target.secret_env):
                self._notice(f"notify: {target.name}: the environment variable {target.secret_env} (secret_env) "
                             "is not set; its notifications will not be sent until the daemon has it")

    def _take(self) -> Delivery | None:
        """The next Delivery; None once stopping and the queue is empty or the drain time is over."""
        while True:
            with self._cond:
                dropped, self._dropped = self._dropped, 0
                if not dropped:
                    if self._deadline is not None and (not self._queue or time.monotonic() >= self._deadline):
                        return None
                    if self._queue:
                        self._busy = True
                        self._current = self._queue.popleft()
                        return self._current
                    self._cond.wait()
                    continue
            # Told outside the lock: a notice goes through every hook, and may take its time.
            self._notice(f"notify: {dropped} notification(s) dropped: more than {QUEUE_SIZE} were waiting")

    def _wait(self, seconds: float) -> bool:
        """Sleep `seconds` between tries; False when the drain time ends first."""
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                now = time.monotonic()
                if self._deadline is not None and end > self._deadline:
                    return False
                if now >= end:
                    return True
                self._cond.wait(end - now)

    def _serve(self) -> None:
        while (delivery := self._take()) is not None:
            try:
                self._send(delivery)
            except Exception:  # a bug here must not end notifications for good
                log.exception("notify: delivery failed")
            finally:
                with self._cond:
                    self._busy, self._current = False, None

    def _send(self, delivery: Delivery) -> None:
        target, tried = delivery.target, 0
        while True:
            outcome = self._deliver(delivery, self._environ)
            tried += 1
            if outcome.ok:
                return
            what = f"notify: {target.name}: {delivery.event['kind']} not delivered ({outcome.why})"
            if not outcome.retry or tried > target.retries:
                self._notice(what + ("; giving up" if outcome.retry else ""))
                return
            delay = backoff(tried, random.uniform(0.5, 1.0))
            self._notice(f"{what}; trying again in {delay:.1f}s ({tried}/{target.retries})")
            if not self._wait(delay):
                self._notice(f"notify: {target.name}: {delivery.event['kind']} not delivered: the daemon stopped")
                return
