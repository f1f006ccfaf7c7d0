"""Notifications from a real daemon (`notify` in .taskrun.yaml): real HTTP receivers on 127.0.0.1,
a real command, real Tasks."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import Daemon, taskrun, wait_status, wait_until, write_task

SECRET = "notify-secret-for-tests"
SECRET_ENV = "TASKRUN_TEST_NOTIFY_SECRET"


class Receiver:
    """http.server on 127.0.0.1 in a thread: answers each POST with the next of `codes` (then 200);
    with `hang`, answers nothing until the test ends."""

    def __init__(self, *codes: int, hang: bool = False) -> None:
        self.codes = list(codes)
        self.released = threading.Event()
        self.hang = hang
        self.got: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.got.append((dict(self.headers), data))
                if outer.hang:
                    outer.released.wait(30)
                    return
                self.send_response(outer.codes.pop(0) if outer.codes else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(data) for _, data in self.got]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def configure(root: Path, entries: str) -> None:
    path = root / ".taskrun.yaml"
    path.write_text(path.read_text() + "notify:\n" + entries)


def recording_command(tmp_path: Path) -> tuple[str, Path]:
    """A command that appends the event JSON it reads on stdin, as one line, to a file."""
    out = tmp_path / "events.jsonl"
    script = tmp_path / "record-event.py"
    script.write_text("import json, sys\n"
                      "event = json.load(sys.stdin)\n"
                      f"with open({str(out)!r}, 'a') as f:\n"
                      "    f.write(json.dumps(event) + '\\n')\n")
    return f"[{json.dumps(sys.executable)}, {json.dumps(str(script))}]", out


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_failed_task_is_posted_signed_and_a_completed_one_runs_the_command(
        daemon: Daemon, receivers: list[Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    receivers.append(receiver := Receiver())
    command, out = recording_command(tmp_path)
    configure(daemon.root, f"  - on: [failed]\n    url: {receiver.url}\n    secret_env: {SECRET_ENV}\n"
                           f"  - on: [completed]\n    tasks: 'good-*'\n    command: {command}\n")
    monkeypatch.setenv(SECRET_ENV, SECRET)
    daemon.start()
    write_task(daemon.root, "good-one", "echo fine")
    write_task(daemon.root, "other", "echo fine too")
    write_task(daemon.root, "bad", "echo about to fail\nexit 3")
    wait_status(daemon.root, "bad", "FAILED")
    wait_status(daemon.root, "other", "COMPLETED")

    wait_until(lambda: receiver.got, 20, "the POST for the failed Task")
    headers, body = receiver.got[0]
    assert headers["X-Taskrun-Signature-256"] == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    event = json.loads(body)
    assert (event["kind"], event["task_id"], event["status"], event["agent"], event["worker"]) == \
        ("failed", "bad", "FAILED", "shell", "local")
    assert "code 3" in event["error"] and SECRET not in body.decode()

    wait_until(lambda: lines(out), 20, "the command for the completed Task")
    assert [(e["kind"], e["task_id"], e["status"]) for e in lines(out)] == [("completed", "good-one", "COMPLETED")]
    assert len(receiver.got) == 1  # `other` completed: no entry wants that


def test_up_once_delivers_before_it_exits(repo: Path, receivers: list[Receiver]) -> None:
    receivers.append(receiver := Receiver())
    configure(repo, f"  - on: [failed, blocked]\n    url: {receiver.url}\n"
                    "    template: '{\"text\": {{ (event.task_id ~ \" \" ~ event.status) | tojson }}}'\n")
    write_task(repo, "bad", "exit 2")
    write_task(repo, "after", "true", front="depends_on: [bad]\n")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 1, result.stdout + result.stderr
    assert sorted(e["text"] for e in receiver.events()) == ["after BLOCKED", "bad FAILED"]


@pytest.mark.slow
def test_a_hanging_or_failing_receiver_neither_stops_tasks_nor_is_given_up_at_once(
        daemon: Daemon, receivers: list[Receiver]) -> None:
    receivers.append(hanging := Receiver(hang=True))
    receivers.append(failing := Receiver(500))
    configure(daemon.root, f"  - on: [completed]\n    url: {hanging.url}\n    timeout: 60s\n    retries: 0\n"
                           f"  - on: [completed]\n    url: {failing.url}\n    retries: 2\n")
    daemon.start()
    for n in range(3):
        write_task(daemon.root, f"t{n}", f"echo {n}")
    for n in range(3):
        wait_status(daemon.root, f"t{n}", "COMPLETED")
    # Every Task completed while the first notification still hangs, holding up the ones behind it.
    assert len(hanging.got) == 1 and failing.got == []

    hanging.hang = False
    hanging.released.set()  # the hung POST ends with the connection closed, unanswered: given up (retries: 0)
    wait_until(lambda: len(failing.got) == 4, 40, "three notifications and one retry after the HTTP 500")
    ids = [e["task_id"] for e in failing.events()]
    assert ids[0] == ids[1] and sorted(set(ids)) == ["t0", "t1", "t2"]  # the one retry came before the next
    assert len(hanging.got) == 3
    output = daemon.output()
    assert "not delivered (HTTP 500); trying again" in output
    assert f"notify: notify[0] ({hanging.url.split('/hook')[0]}): completed not delivered (" in output
    assert taskrun(daemon.root, "status").returncode == 0


def test_a_command_sees_neither_the_daemons_secrets_nor_a_token_in_the_error(
        daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "seen.jsonl"
    script = tmp_path / "dump-env.py"
    script.write_text("import json, os, sys\n"
                      "seen = {'env': dict(os.environ), 'event': json.load(sys.stdin)}\n"
                      f"with open({str(out)!r}, 'a') as f:\n"
                      "    f.write(json.dumps(seen) + '\\n')\n")
    configure(daemon.root, f"  - on: [failed]\n    command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}]\n"
                           "    env: [TASKRUN_TEST_EXTRA]\n")
    monkeypatch.setenv("TASKRUN_TEST_SECRET", "daemon-secret-value")
    monkeypatch.setenv("TASKRUN_TEST_EXTRA", "listed")
    daemon.start()
    write_task(daemon.root, "bad", "exit 3")
    wait_status(daemon.root, "bad", "FAILED")

    wait_until(lambda: lines(out), 20, "the command for the failed Task")
    seen = lines(out)[0]
    assert "TASKRUN_TEST_SECRET" not in seen["env"] and "daemon-secret-value" not in json.dumps(seen)
    assert seen["env"]["TASKRUN_TEST_EXTRA"] == "listed" and seen["env"]["TASKRUN_EVENT"] == "failed"
    assert "PATH" in seen["env"] and seen["event"]["task_id"] == "bad"
