"""Notifications (taskrunner/notify.py, config_notify.py): the `notify` entries, events, matching,
bodies and signatures, the queue, retries, a real HTTP receiver on 127.0.0.1 and real commands."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from taskrunner import notify
from taskrunner.config import Config, parse_config
from taskrunner.config_notify import MAX_BODY_CHARS, NotifyTarget
from taskrunner.errors import ConfigError
from taskrunner.model import TaskSpec, TaskStatus
from taskrunner.notify import Delivery, Notifier, Outcome
from taskrunner.state import RunState, TaskState
from tests.conftest import process_gone, wait_until

BASE = "agents:\n  shell:\n    preset: shell\n  claude:\n    preset: claude\n"


def config(notify_yaml: str) -> Config:
    return parse_config(BASE + "notify:\n" + notify_yaml, ".taskrun.yaml")


def refused(notify_yaml: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config(notify_yaml)
    return str(caught.value)


# -- configuration ------------------------------------------------------------------------


def test_the_documented_example_parses_with_an_unquoted_on() -> None:
    targets = config(
        "  - on: [failed, blocked]\n    tasks: 'release-*'\n    agents: [claude]\n"
        "    command: [notify-send, taskrun]\n"
        "  - on: [failed]\n    url: https://chat.example/hook\n"
        "    template: '{\"text\": \"{{ event.task_id }} {{ event.status }}\"}'\n"
        "    secret_env: TASKRUN_NOTIFY_SECRET\n    timeout: 10s\n    retries: 3\n").notify
    assert targets[0] == NotifyTarget(index=0, on=("failed", "blocked"), tasks="release-*", agents=("claude",),
                                      command=("notify-send", "taskrun"))
    assert targets[1].url == "https://chat.example/hook" and targets[1].secret_env == "TASKRUN_NOTIFY_SECRET"
    assert targets[1].timeout == 10.0 and targets[1].retries == 3 and targets[1].on == ("failed",)


def test_the_example_of_the_documentation_parses() -> None:
    page = (Path(__file__).parents[2] / "docs" / "notifications.md").read_text()
    example = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    targets = parse_config(BASE + example, ".taskrun.yaml").notify
    assert [t.on for t in targets] == [("failed", "blocked"), ("failed",)]
    event = notify.task_event(task("release-2", TaskStatus.FAILED, "exit code 3"), "shell", 0.0)
    assert event and all(notify.matches(t, event) for t in targets)
    assert json.loads(notify.body(targets[1], event)) == {"text": "release-2 FAILED"}


def test_no_notify_key_means_no_targets() -> None:
    assert parse_config(BASE, ".taskrun.yaml").notify == ()


@pytest.mark.parametrize(("entry", "key", "reason"), [
    ("  - command: [x]\n", "notify[0].on", "required"),
    ("  - on: [exploded]\n    command: [x]\n", "notify[0].on", "event names"),
    ("  - on: [failed]\n", "notify[0]", "exactly one of"),
    ("  - on: [failed]\n    command: [x]\n    url: http://a.example/\n", "notify[0]", "exactly one of"),
    ("  - on: [failed]\n    command: notify-send taskrun\n", "notify[0].command", "not a shell string"),
    ("  - on: [failed]\n    url: ftp://a.example/\n", "notify[0].url", "http(s) URL"),
    ("  - on: [failed]\n    url: https://user:pw@a.example/\n", "notify[0].url", "http(s) URL"),
    ("  - on: [failed]\n    url: http://a.example/\n    template: '{{ event.taks_id }}'\n",
     "notify[0].template", "taks_id"),
    ("  - on: [failed]\n    url: http://a.example/\n    template: '{% if %}'\n", "notify[0].template", "line 1"),
    ("  - on: [failed]\n    command: [x]\n    secret_env: S\n", "notify[0].secret_env", "only with `url`"),
    ("  - on: [failed]\n    url: http://a.example/\n    secret_env: lower-case\n", "notify[0].secret_env",
     "environment variable"),
    ("  - on: [failed]\n    url: http://a.example/\n    timeout: 1h\n", "notify[0].timeout", "at most"),
    ("  - on: [failed]\n    url: http://a.example/\n    retries: 99\n", "notify[0].retries", "from 0 to 10"),
    ("  - on: [failed]\n    url: http://a.example/\n    colour: blue\n", "notify[0].colour", "unknown key"),
    ("  - on: [failed]\n    url: http://a.example/\n    tasks: 3\n", "notify[0].tasks", "glob"),
])
def test_a_malformed_entry_is_refused_naming_its_index_and_key(entry: str, key: str, reason: str) -> None:
    message = refused("  - on: [completed]\n    command: ['true']\n" + entry.replace("notify[0]", "notify[1]"))
    assert f"key '{key.replace('notify[0]', 'notify[1]')}'" in message and reason in message, message


def test_notify_must_be_a_list() -> None:
    assert "key 'notify'" in refused("  on: [failed]\n")


def test_the_url_is_not_repeated_in_a_refusal() -> None:
    assert "s3cr3t" not in refused("  - on: [failed]\n    url: 'https://hooks.example/services/s3cr3t x'\n")


# -- events and matching ------------------------------------------------------------------


def task(task_id: str, status: TaskStatus, error: str | None = None, agent: str = "claude") -> TaskState:
    made = TaskState(id=task_id, file=f"tasks/{task_id}.md", seq=1, status=status, error=error,
                     spec=TaskSpec(id=task_id, path=f"tasks/{task_id}.md", revision="abc", title=f"Title of {task_id}",
                                   body=""))
    made.runs.append(RunState(run_id=f"r-{task_id}", task_id=task_id, number=1, revision="abc", attempt=1,
                              worker="local", agent=agent, error=error))
    return made


def test_a_failed_task_event_carries_its_task_run_agent_worker_and_cleaned_error() -> None:
    event = notify.task_event(task("db", TaskStatus.FAILED, "exit code 2\x1b[31m"), "shell", 0.0)
    assert event == {"kind": "failed", "time": "1970-01-01T00:00:00Z", "task_id": "db", "title": "Title of db",
                     "status": "FAILED", "run_id": "r-db", "agent": "claude", "worker": "local",
                     "error": "exit code 2\\x1b[31m"}


def test_a_running_task_is_no_event() -> None:
    assert notify.task_event(task("db", TaskStatus.RUNNING), "shell", 0.0) is None


def test_matching_by_kind_task_glob_and_agent() -> None:
    target = NotifyTarget(index=0, on=("failed", "worker_offline"), tasks="release-*", agents=("claude",),
                          command=("x",))
    failed = notify.task_event(task("release-2", TaskStatus.FAILED), "shell", 0.0)
    assert failed and notify.matches(target, failed)
    assert not notify.matches(target, {**failed, "task_id": "other"})
    assert not notify.matches(target, {**failed, "agent": "codex"})
    assert not notify.matches(target, {**failed, "kind": "completed"})
    # `tasks` filters Task events only; a Worker's event names no Agent.
    assert notify.matches(target, notify.other_event("worker_offline", {"worker": "gpu"}, 0.0))


def test_the_signature_is_githubs_hmac_sha256_scheme() -> None:
    # The example of GitHub's "Validating webhook deliveries" documentation.
    assert notify.signature("It's a Secret to Everybody", b"Hello, World!") == \
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_a_template_body_sees_every_field_and_can_quote_as_json() -> None:
    target = NotifyTarget(index=0, on=("failed",), url="http://a.example/",
                          template='{"text": {{ event.error | tojson }}, "worker": {{ event.reason | tojson }}}')
    sent = json.loads(notify.body(target, {"kind": "failed", "error": 'say "hi"'}))
    assert sent == {"text": 'say "hi"', "worker": None}


def test_backoff_doubles_from_one_second_with_jitter() -> None:
    assert [notify.backoff(n, 1.0) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert notify.backoff(1, 0.5) == 0.5 and notify.backoff(30, 1.0) == notify.BACKOFF_MAX


# -- the Notifier: hooks, queue, retries --------------------------------------------------


class Recorded:
    """A delivery function answering from a script of Outcomes, recording each try."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.tries: list[Delivery] = []

    def __call__(self, delivery: Delivery, environ: Mapping[str, str]) -> Outcome:
        self.tries.append(delivery)
        return self.outcomes.pop(0) if self.outcomes else Outcome(True)


def notifier(targets: str, deliver: Recorded, notices: list[str]) -> Notifier:
    return Notifier(config(targets), notices.append, environ={}, deliver=deliver)


ALL = "  - on: [completed, failed, blocked, usage_limited, worker_offline, worker_untrusted]\n    command: [x]\n"


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "BACKOFF_BASE", 0.01)


def test_a_task_is_told_once_per_change_of_status() -> None:
    sent, notices = Recorded(), []
    hooks = notifier(ALL, sent, notices)
    hooks.start()
    item = task("db", TaskStatus.RUNNING)
    hooks.task_changed(item)
    item.status = TaskStatus.FAILED
    hooks.task_changed(item)
    hooks.task_changed(item)  # a waiting reason changed, say: no new event
    item.status = TaskStatus.PENDING
    hooks.task_changed(item)
    item.status = TaskStatus.COMPLETED
    hooks.task_changed(item)
    hooks.stop()
    assert [d.event["kind"] for d in sent.tries] == ["failed", "completed"]


def test_a_status_restored_at_start_is_not_told_again() -> None:
    sent, notices = Recorded(), []
    hooks = notifier(ALL, sent, notices)
    hooks.seed([task("db", TaskStatus.FAILED)])
    hooks.start()
    hooks.task_changed(task("db", TaskStatus.FAILED))
    hooks.stop()
    assert sent.tries == []


def test_a_worker_is_told_offline_only_when_it_was_online() -> None:
    sent, notices = Recorded(), []
    hooks = notifier(ALL, sent, notices)
    hooks.start()
    hooks.worker_changed({"name": "gpu", "online": False})  # never reached: not "gone offline"
    hooks.worker_changed({"name": "gpu", "online": True})
    hooks.worker_changed({"name": "gpu", "online": False, "error": "connection reset"})
    hooks.worker_changed({"name": "gpu", "online": False})
    hooks.stop()
    assert [(d.event["kind"], d.event["worker"], d.event["error"]) for d in sent.tries] == \
        [("worker_offline", "gpu", "connection reset")]


def test_usage_limited_and_worker_untrusted_events_are_told() -> None:
    sent, notices = Recorded(), []
    hooks = notifier(ALL, sent, notices)
    hooks.start()
    hooks.event("usage_limited", {"agent": "claude", "worker": None, "until": 1767225600})
    hooks.event("worker_untrusted", {"worker": "gpu", "reason": "refused the trust statement"})
    hooks.event("push", {"ok": False, "error": "rejected"})
    hooks.stop()
    events = [d.event for d in sent.tries]
    assert [(e["kind"], e.get("agent"), e.get("worker"), e.get("until"), e.get("reason")) for e in events] == [
        ("usage_limited", "claude", None, 1767225600, None),
        ("worker_untrusted", None, "gpu", None, "refused the trust statement")]


def test_a_reloaded_configuration_takes_effect_for_the_next_event() -> None:
    sent, notices = Recorded(), []
    hooks = Notifier(parse_config(BASE, ".taskrun.yaml"), notices.append, environ={}, deliver=sent)
    hooks.start()
    hooks.event("worker_untrusted", {"worker": "before", "reason": "r"})
    hooks.configure(config(ALL))
    hooks.event("worker_untrusted", {"worker": "after", "reason": "r"})
    hooks.stop()
    assert [d.event["worker"] for d in sent.tries] == ["after"]


def test_a_full_queue_drops_the_oldest_with_one_notice_counting_them() -> None:
    sent, notices = Recorded(), []
    hooks = notifier(ALL, sent, notices)
    for n in range(notify.QUEUE_SIZE + 5):
        hooks.event("worker_untrusted", {"worker": f"w{n}", "reason": "r"})
    hooks.start()
    hooks.stop()
    assert sent.tries[0].event["worker"] == "w5" and len(sent.tries) == notify.QUEUE_SIZE
    assert [n for n in notices if "dropped" in n] == [
        f"notify: 5 notification(s) dropped: more than {notify.QUEUE_SIZE} were waiting"]


def test_a_retryable_failure_is_tried_again_then_given_up(fast_backoff: None) -> None:
    sent, notices = Recorded(*[Outcome(False, True, "HTTP 503")] * 3), []
    hooks = notifier(ALL + "    retries: 2\n", sent, notices)
    hooks.start()
    hooks.event("worker_untrusted", {"worker": "gpu", "reason": "r"})
    wait_until(lambda: any("giving up" in n for n in notices), 10, "the last try")
    hooks.stop()
    assert len(sent.tries) == 3
    assert sum("trying again" in n for n in notices) == 2 and "HTTP 503" in notices[-1]


def test_a_final_failure_is_not_tried_again() -> None:
    sent, notices = Recorded(Outcome(False, False, "HTTP 404")), []
    hooks = notifier(ALL, sent, notices)
    hooks.start()
    hooks.event("worker_untrusted", {"worker": "gpu", "reason": "r"})
    hooks.stop()
    assert len(sent.tries) == 1
    assert notices == ["notify: notify[0] (command x): worker_untrusted not delivered (HTTP 404)"]


def test_stop_gives_up_on_what_the_drain_time_leaves() -> None:
    release = threading.Event()

    def slow(delivery: Delivery, environ: Mapping[str, str]) -> Outcome:
        release.wait(10)
        return Outcome(True)

    notices: list[str] = []
    hooks = Notifier(config(ALL), notices.append, environ={}, deliver=slow)
    hooks.start()
    for n in range(3):
        hooks.event("worker_untrusted", {"worker": f"w{n}", "reason": "r"})
    wait_until(lambda: hooks.pending() == 3, 5, "the first delivery to start")
    timer = threading.Timer(0.3, release.set)
    timer.start()
    hooks.stop(drain=0.1)
    timer.join()
    assert "notify: 2 notification(s) not sent: the daemon stopped before they could be" in notices


def test_a_secret_not_in_the_environment_is_warned_of_and_nothing_is_sent() -> None:
    notices: list[str] = []
    target = config("  - on: [failed]\n    url: http://127.0.0.1:9/\n    secret_env: NOTIFY_TEST_SECRET\n").notify[0]
    hooks = Notifier(replace(config(ALL), notify=(target,)), notices.append, environ={})
    hooks.start()
    hooks.stop()
    assert "NOTIFY_TEST_SECRET" in notices[0]
    outcome = notify.attempt(Delivery(target, {"kind": "failed"}), {})
    assert not outcome.ok and not outcome.retry and "not set" in outcome.why


# -- real HTTP on 127.0.0.1, real commands ------------------------------------------------


class Receiver:
    """http.server on 127.0.0.1 in a thread, answering each POST with the next of `codes` (then 200)."""

    def __init__(self, *codes: int, hang: threading.Event | None = None) -> None:
        self.codes, self.hang = list(codes), hang
        self.got: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.got.append((dict(self.headers), data))
                if outer.hang is not None:
                    outer.hang.wait(10)
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                if code in (301, 302, 307):
                    self.send_header("Location", f"http://127.0.0.1:{outer.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def target_for(port: int, **fields: Any) -> NotifyTarget:
    return NotifyTarget(index=0, on=("failed",), url=f"http://127.0.0.1:{port}/hook", **fields)


def test_a_url_is_named_by_scheme_and_host_only() -> None:
    target = NotifyTarget(index=2, on=("failed",), url="https://hooks.example/services/T0/B0/s3cr3t?k=v")
    assert target.name == "notify[2] (https://hooks.example)"


def test_a_post_is_signed_and_answered(receivers: list[Receiver]) -> None:
    receivers.append(receiver := Receiver())
    event = {"kind": "failed", "task_id": "db"}
    outcome = notify.attempt(Delivery(target_for(receiver.port, secret_env="S"), event), {"S": "the-secret"})
    assert outcome.ok
    headers, data = receiver.got[0]
    assert json.loads(data) == event and headers["Content-Type"] == "application/json"
    expected = "sha256=" + hmac.new(b"the-secret", data, hashlib.sha256).hexdigest()
    assert headers[notify.SIGNATURE_HEADER] == expected and "the-secret" not in data.decode()


@pytest.mark.parametrize(("code", "retry"), [(500, True), (503, True), (429, True), (404, False), (400, False)])
def test_5xx_and_429_are_retryable_other_answers_final(receivers: list[Receiver], code: int, retry: bool) -> None:
    receivers.append(receiver := Receiver(code))
    outcome = notify.attempt(Delivery(target_for(receiver.port), {"kind": "failed"}), {})
    assert (outcome.ok, outcome.retry, outcome.why) == (False, retry, f"HTTP {code}")


def test_a_redirect_is_not_followed(receivers: list[Receiver]) -> None:
    receivers.append(receiver := Receiver(307))
    outcome = notify.attempt(Delivery(target_for(receiver.port), {"kind": "failed"}), {})
    assert not outcome.ok and not outcome.retry and len(receiver.got) == 1


def test_a_hanging_receiver_times_out_and_is_retryable(receivers: list[Receiver]) -> None:
    receivers.append(receiver := Receiver(hang=threading.Event()))
    outcome = notify.attempt(Delivery(target_for(receiver.port, timeout=0.3), {"kind": "failed"}), {})
    assert not outcome.ok and outcome.retry and "timed out" in outcome.why


def test_a_refused_connection_is_retryable() -> None:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        outcome = notify.attempt(Delivery(target_for(port), {"kind": "failed"}), {})
    assert not outcome.ok and outcome.retry


def test_a_command_gets_the_event_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "event.json"
    script = f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())"
    target = NotifyTarget(index=0, on=("failed",), command=(sys.executable, "-c", script))
    assert notify.attempt(Delivery(target, {"kind": "failed", "task_id": "db"}), {}).ok
    assert json.loads(out.read_text()) == {"kind": "failed", "task_id": "db"}


def test_a_failing_command_is_retryable_and_shows_its_stderr() -> None:
    target = NotifyTarget(index=0, on=("failed",), command=(sys.executable, "-c", "import sys; sys.exit('no route')"))
    outcome = notify.attempt(Delivery(target, {"kind": "failed"}), {})
    assert (outcome.ok, outcome.retry, outcome.why) == (False, True, "exit code 1: no route")


def test_a_missing_command_is_final() -> None:
    target = NotifyTarget(index=0, on=("failed",), command=("/nonexistent/notify-me",))
    outcome = notify.attempt(Delivery(target, {"kind": "failed"}), {})
    assert not outcome.ok and not outcome.retry and "cannot run" in outcome.why


def test_a_command_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    target = NotifyTarget(index=0, on=("failed",), timeout=0.5,
                          command=("sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"))
    outcome = notify.attempt(Delivery(target, {"kind": "failed"}), {})
    assert not outcome.ok and outcome.retry and "timed out" in outcome.why
    child = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 5, "the child's pid"))
    wait_until(lambda: process_gone(child), 5, "the command's child to be killed")


# -- bounds: a try's deadline, the template's time and size, redaction, a command's environment ----------


class Trickler:
    """A raw HTTP receiver on 127.0.0.1: reads each POST, answers the first one byte a second (a
    status line that never ends in time), the next ones at once with 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.requests = 0
        self.answered = 0
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests += 1
            thread = threading.Thread(target=self._answer, args=(conn, self.requests == 1), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _answer(self, conn: socket.socket, trickle: bool) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            try:
                if not trickle:
                    conn.sendall(answer)
                    self.answered += 1
                    return
                for byte in answer * 100:
                    conn.sendall(bytes([byte]))
                    if self.stopping.wait(1.0):  # the pace of the trickle, not a synchronisation
                        return
            except OSError:  # the client cut the connection: what the test wants
                return

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.accepting.join(5)
        for thread in self.threads:
            thread.join(5)


def test_a_trickling_receiver_is_cut_off_at_the_tries_deadline_and_the_next_delivery_goes_out() -> None:
    trickler = Trickler()
    try:
        notices: list[str] = []
        targets = config(f"  - on: [worker_untrusted]\n    url: http://127.0.0.1:{trickler.port}/hook\n"
                         "    timeout: 2s\n    retries: 0\n")
        hooks = Notifier(targets, notices.append, environ={})
        hooks.start()
        hooks.event("worker_untrusted", {"worker": "first", "reason": "r"})
        hooks.event("worker_untrusted", {"worker": "second", "reason": "r"})
        # A timeout per read alone would never end the first try: a byte comes every second.
        wait_until(lambda: trickler.answered == 1, 20, "the second delivery after the first was cut off")
        assert any("worker_untrusted not delivered (timed out after 2s (cut off))" in n for n in notices), notices
        hooks.stop()
        assert hooks._thread is not None and not hooks._thread.is_alive()
    finally:
        trickler.close()


def test_stop_waits_at_most_the_drain_time_plus_the_tries_timeout() -> None:
    release = threading.Event()

    def stuck(delivery: Delivery, environ: Mapping[str, str]) -> Outcome:
        release.wait(60)
        return Outcome(True)

    hooks = Notifier(config(ALL + "    timeout: 0.5s\n"), [].append, environ={}, deliver=stuck)
    hooks.start()
    hooks.event("worker_untrusted", {"worker": "w", "reason": "r"})
    wait_until(lambda: hooks.pending() == 1 and hooks._current is not None, 5, "the delivery to start")
    stopping = threading.Thread(target=hooks.stop, kwargs={"drain": 0.1})
    stopping.start()
    try:
        stopping.join(0.1 + 0.5 + notify.STOP_SLACK + 5)  # a generous bound: stop() must not wait on the stuck try
        assert not stopping.is_alive()
    finally:
        release.set()
        stopping.join()


TOKEN = "ghp_" + "A1b2C3d4" * 5


def test_a_failed_tasks_error_is_redacted_before_it_is_sent() -> None:
    error = f"deploy failed: Authorization: Bearer sekrit-value-123 and {TOKEN} in config.yaml"
    event = notify.task_event(task("db", TaskStatus.FAILED, error), "shell", 0.0)
    assert event is not None and TOKEN not in event["error"] and "sekrit-value-123" not in event["error"]
    assert event["error"].startswith("deploy failed: Authorization: Bearer [redacted] and [redacted]")
    sent = notify.body(NotifyTarget(index=0, on=("failed",), command=("x",)), event).decode()
    assert TOKEN not in sent and "[redacted]" in sent


def test_a_token_cut_in_two_at_the_field_limit_leaves_no_part_behind() -> None:
    error = "word " * ((notify.MAX_FIELD_CHARS - 10) // 5) + TOKEN + " the rest"
    event = notify.task_event(task("db", TaskStatus.FAILED, error), "shell", 0.0)
    assert event is not None and len(event["error"]) <= notify.MAX_FIELD_CHARS
    assert "ghp" not in event["error"] and "A1b2" not in event["error"] and event["error"].endswith("...")


NESTED = ("{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}"
          "{% endfor %}{% endfor %}{% endfor %}")


def test_a_template_that_never_ends_is_refused_at_load_time() -> None:
    message = refused(f"  - on: [failed]\n    url: http://a.example/\n    template: '{NESTED}'\n")
    assert "key 'notify[0].template'" in message and "rendering took over 2 s" in message, message


def test_a_template_too_large_is_refused_at_load_time() -> None:
    template = json.dumps("{{ 'x' * 300000 }}")
    message = refused(f"  - on: [failed]\n    url: http://a.example/\n    template: {template}\n")
    assert "key 'notify[0].template'" in message and f"over {MAX_BODY_CHARS} characters" in message


@pytest.mark.parametrize(("task_id", "reason"), [("slow", "rendering took over 0.5 s"),
                                                 ("big", "the body is over 262144 characters")])
def test_a_template_past_its_bounds_at_delivery_fails_without_retry(task_id: str, reason: str) -> None:
    # The sample event of the load-time trial is neither: the bounds at delivery are what stops these.
    template = ("{% if event.task_id == 'slow' %}" + NESTED + "{% elif event.task_id == 'big' %}"
                "{{ 'x' * 300000 }}{% endif %}{{ event.kind | tojson }}")
    target = config(f"  - on: [failed]\n    url: http://127.0.0.1:9/\n    timeout: 0.5s\n"
                    f"    template: {json.dumps(template)}\n").notify[0]
    outcome = notify.attempt(Delivery(target, {"kind": "failed", "task_id": task_id}), {})
    assert not outcome.ok and not outcome.retry and reason in outcome.why, outcome.why


def test_a_command_sees_a_minimal_environment_and_the_names_its_entry_lists(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    script = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    target = config(f"  - on: [failed]\n    command: [{json.dumps(sys.executable)}, -c, {json.dumps(script)}]\n"
                    "    env: [TASKRUN_TEST_EXTRA]\n").notify[0]
    environ = {"PATH": "/usr/bin:/bin", "HOME": "/home/t", "LANG": "C.UTF-8", "TASKRUN_TEST_SECRET": "s3cr3t",
               "TASKRUN_TEST_EXTRA": "passed", "GITHUB_TOKEN": "ghp_x"}
    assert notify.attempt(Delivery(target, {"kind": "failed"}), environ).ok
    seen = json.loads(out.read_text())
    seen.pop("LC_CTYPE", None)  # the interpreter may set it for itself (PEP 538)
    assert seen == {"PATH": "/usr/bin:/bin", "HOME": "/home/t", "LANG": "C.UTF-8", "TASKRUN_TEST_EXTRA": "passed",
                    "TASKRUN_EVENT": "failed"}


def test_env_is_refused_with_a_url() -> None:
    message = refused("  - on: [failed]\n    url: http://a.example/\n    env: [EXTRA]\n")
    assert "key 'notify[0].env'" in message and "only with `command`" in message


def test_a_template_looping_over_strings_without_output_is_refused_at_load_time() -> None:
    # No range() and no output inside the loops: only reading the clock as the template's code runs ends it.
    nested = "{% for a in \"x\" * 100000 %}{% for b in \"x\" * 100000 %}{% endfor %}{% endfor %}"
    message = refused(f"  - on: [failed]\n    url: http://a.example/\n    template: '{nested}'\n")
    assert "key 'notify[0].template'" in message and "rendering took over 2 s" in message, message


@pytest.mark.parametrize("url", ["http://a..b/h", "http://[::1/h", "http://" + "a" * 70 + ".example/h"])
def test_a_url_urllib_cannot_use_fails_once_without_retry(url: str) -> None:
    outcome = notify.post(url, b"{}", {}, 2.0)
    assert (outcome.ok, outcome.retry) == (False, False) and "the URL cannot be used" in outcome.why


@pytest.mark.parametrize("url", ["http://a..b/h", "http://[::1/h", "http://[not-v6]/h", "http://" + "a" * 70 + ".example/h",
                                 "http://host:99999/h", "http://host:0/h", "http://-host/h", "https://bücher.example/h"])
def test_a_url_urllib_cannot_use_is_refused_at_load_time_saying_why(url: str) -> None:
    message = refused(f"  - on: [failed]\n    url: '{url}'\n")
    assert "key 'notify[0].url'" in message and "expected an http(s) URL" in message
    assert any(why in message for why in ("its port is not", "its IPv6 address", "its host is not")), message


def test_a_command_argument_with_a_nul_byte_fails_once_without_retry() -> None:
    outcome = notify.run_command(("printf", "a\x00b"), b"{}", 2.0)
    assert (outcome.ok, outcome.retry) == (False, False) and "embedded null byte" in outcome.why
