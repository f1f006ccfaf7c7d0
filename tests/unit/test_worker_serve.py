"""WorkerServer: the Worker side of a session, driven over in-memory pipes.

The control plane's side is played by protocol.Writer/Reader on os.pipe()
pairs; the server runs `serve()` in a thread, exactly as `taskrun-worker
serve` does over stdin/stdout. Assignments are signed bundles from a control
plane the Worker home is enrolled with (tests/signed.py); results are read
only through their signed envelopes.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from taskrunner.defaults import BUNDLE_TTL_SECONDS, CLOCK_SKEW_SECONDS
from taskrunner.protocol import FROM_WORKER_LIMITS, PROTOCOL_VERSION, Message, Reader, Writer
from taskrunner.results import ResultRejected, verified_result
from taskrunner.signing import SigningKey
from taskrunner import bundle
from taskrunner.worker.rundir import RunDir, wrapped
from taskrunner.worker.serve import WorkerServer
from taskrunner.worker.trust import worker_key
from tests.signed import NO_HURRY, TASK_FILE, ControlPlane, enroll, signed_result

DEADLINE = 15.0
_PR_SET_CHILD_SUBREAPER = 36


# ---------------------------------------------------------------- process helpers


@pytest.fixture(scope="module", autouse=True)
def reap_orphans_here() -> Iterator[None]:
    """Make this test process the subreaper of the Agents' orphans.

    A killed Run's background children are re-parented; if PID 1 of the test
    environment does not reap zombies (it does not in some containers), a
    zombie keeps `os.killpg(pgid, 0)` succeeding long after every process of
    the group is dead. As subreaper we can reap those zombies ourselves.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    enabled = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    if enabled:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _group_members(pgid: int) -> list[tuple[int, int, str]]:
    """(pid, ppid, state) of every process in group `pgid`, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, ppid, group = fields[0], int(fields[1]), int(fields[2])
        if group == pgid:
            members.append((int(entry), ppid, state))
    return members


def _reap_zombies_of(pgid: int) -> None:
    """Reap zombies of group `pgid` that are our children, but never the group
    leader, which belongs to the server's Popen."""
    for pid, ppid, state in _group_members(pgid):
        if state == "Z" and ppid == os.getpid() and pid != pgid:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def group_gone(pgid: int) -> bool:
    _reap_zombies_of(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def group_alive(pgid: int) -> bool:
    return any(state != "Z" for _, _, state in _group_members(pgid))


def go_flag(home: Path, run_id: str) -> Path:
    """A file the test creates to let a waiting Agent go on: in the Run's workspace, the
    only place outside its sandbox that the Agent sees."""
    return home / "runs" / run_id / "workspace" / "go"


def poll_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is only the poll interval
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        pause.wait(0.02)


# ---------------------------------------------------------------- the session harness


class Session:
    """One WorkerServer on a pair of pipes, with the control plane's end in the test."""

    def __init__(self, home: Path, name: str = "w1") -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        self._server_in = open(to_worker_r, "rb", buffering=0)
        self._server_out = open(from_worker_w, "wb", buffering=0)
        self._to_worker = open(to_worker_w, "wb", buffering=0)
        self._from_worker = open(from_worker_r, "rb", buffering=0)
        self.home = home
        self.writer = Writer(self._to_worker)
        self.server = WorkerServer(home, name, Reader(self._server_in), Writer(self._server_out), slots=2)
        self.received: queue.Queue[Message | None] = queue.Queue()
        self.history: list[Message] = []
        self.pids: list[int] = []
        self._serve = threading.Thread(target=self.server.serve, name="serve", daemon=True)
        self._listen = threading.Thread(target=self._listen_loop, name="listen", daemon=True)
        self._serve.start()
        self._listen.start()
        self._input_closed = False

    def _listen_loop(self) -> None:
        reader = Reader(self._from_worker, FROM_WORKER_LIMITS)  # as the control plane reads a Worker
        try:
            while (message := reader.read()) is not None:
                self.received.put(message)
        finally:
            self.received.put(None)

    def authenticate(self, cp: ControlPlane) -> Message:
        """Read the hello, answer its challenge as the control plane `cp` does; the `ready` record."""
        hello = self.next()
        assert hello.type == "hello" and "runs" not in hello.fields, hello
        self.send_message(cp.auth(hello))
        ready = self.next()
        assert ready.type == "ready", ready
        return ready

    def send(self, kind: str, payload: bytes = b"", **fields: Any) -> None:
        self.writer.write(Message(kind, fields, payload))

    def send_message(self, message: Message) -> None:
        self.writer.write(message)

    def next(self, timeout: float = DEADLINE) -> Message:
        """The next record that is not a heartbeat."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.received.get(timeout=0.05)
            except queue.Empty:
                if not self._input_closed and not self._serve.is_alive():
                    raise AssertionError(f"serve() ended by itself; so far: {self.history}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"no record within {timeout}s; so far: {self.history}") from None
                continue
            if message is None:
                raise AssertionError(f"the Worker closed the session; so far: {self.history}")
            self.history.append(message)
            if message.type == "started":
                self.pids.append(message["pid"])
            if message.type != "heartbeat":
                return message

    def until(self, kind: str, run_id: str | None = None, timeout: float = DEADLINE) -> list[Message]:
        """Every record up to and including the first `kind` record (for `run_id`)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            message = self.next(max(0.0, deadline - time.monotonic()))
            seen.append(message)
            if message.type == kind and (run_id is None or message.get("run_id") == run_id):
                return seen

    def close_input(self) -> None:
        """EOF on the Worker's stdin: the control plane went away."""
        if not self._input_closed:
            self._input_closed = True
            self._to_worker.close()
        self._serve.join(timeout=DEADLINE)

    @property
    def serving(self) -> bool:
        return self._serve.is_alive()

    @property
    def serve_thread(self) -> threading.Thread:
        """The thread running `serve()`: the one that ticks this session's Runs."""
        return self._serve

    def close(self) -> None:
        self.close_input()
        serve_ended = not self._serve.is_alive()
        if serve_ended:
            self._server_out.close()
            self._listen.join(timeout=DEADLINE)
            self._from_worker.close()
            self._server_in.close()
        assert serve_ended, "WorkerServer.serve() did not return after EOF on its input"


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "worker-home"


@pytest.fixture()
def sessions(home: Path) -> Iterator[Callable[[], Session]]:
    opened: list[Session] = []

    def open_session() -> Session:
        session = Session(home)
        opened.append(session)
        return session

    yield open_session
    errors = []
    for session in opened:
        try:
            session.close()
        except AssertionError as exc:
            errors.append(exc)
    # Nothing a test started may outlive it: kill leftovers and reap our children.
    for session in opened:
        for pid in session.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for session in opened:
        # A session that ended while its Agent ran leaves that Agent's Popen
        # behind (by design: Agents outlive sessions). In a real Worker the
        # serve process exits; here we wait on it so it is reaped, not leaked.
        for run in session.server._runs.values():
            if run.proc is not None:
                run.proc.wait(timeout=DEADLINE)
        for pid in session.pids:
            poll_until(lambda: group_gone(pid), f"process group {pid} to end")
    if errors:
        raise errors[0]


@pytest.fixture()
def cp(home: Path, tmp_path: Path) -> ControlPlane:
    """The control plane the Worker home is enrolled with."""
    return enroll(home, tmp_path / "cp")


def assign(session: Session, cp: ControlPlane, run_id: str, script: str | None, timeout: float = NO_HURRY,
           task: bytes | None = None, **kwargs: Any) -> Message:
    """Send a signed assignment of `script` (or of the Task file `task`); returns the record sent."""
    files = {TASK_FILE: task} if task is not None else None
    message = cp.assignment(run_id, script, timeout=timeout, files=files, **kwargs)
    session.send_message(message)
    return message


def outcome(session: Session, record: Message) -> dict[str, Any]:
    """What a `result` record's envelope says, once it verifies with the Worker's result key."""
    assert record.type == "result"
    result = signed_result(record["envelope"], session.home)
    assert result["run_id"] == record["run_id"]
    assert result["output_size"] == record["output_size"]
    return result


def output_of(messages: list[Message], run_id: str, start: int = 0) -> bytes:
    """Concatenate output chunks by offset; fails on a gap or a repeated byte."""
    data = b""
    for message in messages:
        if message.type == "output" and message["run_id"] == run_id:
            assert message["offset"] == start + len(data), f"chunk at {message['offset']}, expected {start + len(data)}"
            data += message.payload
    return data


def only(messages: list[Message], kind: str, run_id: str | None = None) -> list[Message]:
    return [m for m in messages if m.type == kind and (run_id is None or m.get("run_id") == run_id)]


# ---------------------------------------------------------------- hello


def test_hello_on_a_fresh_home_lists_no_runs_and_ready_lists_none_either(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    session = sessions()
    hello = session.next()
    assert hello.type == "hello"
    assert hello["protocol"] == PROTOCOL_VERSION
    assert hello["worker"] == "w1"
    assert "runs" not in hello.fields
    assert len(hello["challenge"]) == 32
    assert hello["slots"] == 2
    assert "shell" in hello["agents"]
    assert hello["worker_key"] == worker_key(home).public_line
    assert hello["trust"]["keys"] == [cp.key.key_id]
    session.send_message(cp.auth(hello))
    ready = session.next()
    assert ready.type == "ready" and set(ready.fields) == {"runs", "agents"}
    assert ready["runs"] == []
    assert ready["agents"]["shell"] == {"version": None, "path": ""}


def test_hello_of_a_worker_not_yet_enrolled_says_it_trusts_no_key(sessions: Callable[[], Session],
                                                                   home: Path) -> None:
    hello = sessions().next()
    assert hello["trust"] == {"keys": [], "issued_at": None}
    assert hello["worker_key"] == worker_key(home).public_line


# ---------------------------------------------------------------- running a Run


def test_an_assigned_run_starts_streams_its_output_and_completes(sessions: Callable[[], Session],
                                                                 cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-ok", "echo hi")
    messages = session.until("result", "run-ok")
    assert messages[0].type == "started" and messages[0]["run_id"] == "run-ok"
    assert isinstance(messages[0]["pid"], int)
    assert output_of(messages, "run-ok") == b"hi\n"
    assert messages[-1]["output_size"] == 3
    result = outcome(session, messages[-1])
    assert result["status"] == "COMPLETED"
    assert result["exit_code"] == 0
    assert result["error"] is None
    assert only(messages, "error") == []


def test_output_is_complete_before_the_result_even_for_many_lines(sessions: Callable[[], Session],
                                                                  cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-many", "for i in $(seq 1 2000); do echo \"line $i\"; done")
    messages = session.until("result", "run-many")
    expected = b"".join(f"line {i}\n".encode() for i in range(1, 2001))
    assert output_of(messages, "run-many") == expected
    assert messages[-1]["output_size"] == len(expected)
    assert outcome(session, messages[-1])["status"] == "COMPLETED"


def test_a_failing_script_fails_the_run_with_its_exit_code(sessions: Callable[[], Session],
                                                           cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-bad", "echo before\nexit 7")
    messages = session.until("result", "run-bad")
    assert output_of(messages, "run-bad") == b"before\n"
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert result["exit_code"] == 7
    assert "7" in result["error"]


def test_a_failing_command_stops_the_script_under_errexit(sessions: Callable[[], Session],
                                                          cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-errexit", "false\necho not reached")
    messages = session.until("result", "run-errexit")
    assert output_of(messages, "run-errexit") == b""
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert result["exit_code"] == 1


def test_a_task_without_a_sh_block_fails_without_starting_a_process(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-nosh", None)
    messages = session.until("result", "run-nosh")
    assert only(messages, "started") == []
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert "no ```sh" in result["error"]
    assert result["exit_code"] is None
    assert not (home / "runs" / "run-nosh" / "pid").exists()
    assert not (home / "runs" / "run-nosh" / "exit_code").exists()


def test_a_signed_bundle_whose_archive_breaks_a_rule_fails_the_run_with_the_reason(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    built = cp.bundle("run-tampered", "echo hi")
    manifest = dict(built.manifest, files=[dict(built.manifest["files"][0], sha256="0" * 64)])
    session.send("assign", built.archive, run_id="run-tampered", envelope=cp.resigned(manifest))
    messages = session.until("result", "run-tampered")
    assert only(messages, "started") == []
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert "does not match its manifest hash" in result["error"]


def test_the_agent_sees_the_run_and_task_ids_and_runs_in_its_workspace(sessions: Callable[[], Session],
                                                                       cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-env", 'echo "$TASKRUN_RUN_ID $TASKRUN_TASK_ID"\n'
                                   'test "$PWD" = "$TASKRUN_WORKSPACE"\ncat tasks/t.md >/dev/null')
    messages = session.until("result", "run-env")
    assert output_of(messages, "run-env") == b"run-env t\n"
    assert outcome(session, messages[-1])["status"] == "COMPLETED"


# ---------------------------------------------------------------- refused bundles


STRANGER = SigningKey.generate()  # a control plane key no Worker here trusts
ELSEWHERE = SigningKey.generate()  # another Worker's result key


def _unknown_key(cp: ControlPlane, run_id: str, script: str) -> tuple[Message, str]:
    return (cp.assignment(run_id, script, signer=STRANGER),
            f"bundle rejected: signed by unknown key id {STRANGER.key_id}")


def _another_worker(cp: ControlPlane, run_id: str, script: str) -> tuple[Message, str]:
    return (cp.assignment(run_id, script, worker="w2", audience=ELSEWHERE.key_id),
            f"bundle rejected: addressed to another Worker (w2, {ELSEWHERE.key_id})")


def _expired(cp: ControlPlane, run_id: str, script: str) -> tuple[Message, str]:
    issued = time.time() - BUNDLE_TTL_SECONDS - CLOCK_SKEW_SECONDS - 60
    return cp.assignment(run_id, script, now=issued), "bundle rejected: expired"


def _another_run(cp: ControlPlane, run_id: str, script: str) -> tuple[Message, str]:
    built = cp.bundle("run-elsewhere", script)
    return (Message("assign", {"run_id": run_id, "envelope": built.envelope}, built.archive),
            f"bundle rejected: signed for Run run-elsewhere, assigned as Run {run_id}")


def _altered_after_signing(cp: ControlPlane, run_id: str, script: str) -> tuple[Message, str]:
    # Someone on the path swaps the signed Agent for a command of their own.
    message = cp.assignment(run_id, "true")
    envelope = dict(message["envelope"])
    manifest = json.loads(base64.b64decode(envelope["payload"]))
    manifest["agent"] = {"name": "x", "preset": "command", "command": ["bash", "-c", script], "env": []}
    envelope["payload"] = base64.b64encode(json.dumps(manifest).encode()).decode()
    return (Message("assign", {"run_id": run_id, "envelope": envelope}, message.payload),
            "bundle rejected: signature does not verify")


def _archive_swapped(cp: ControlPlane, run_id: str, script: str) -> tuple[Message, str]:
    signed = cp.assignment(run_id, "true")
    other = cp.bundle(run_id, script)
    return (Message("assign", signed.fields, other.archive),
            "bundle rejected: the archive does not match the manifest's hash")


def _not_an_envelope(cp: ControlPlane, run_id: str, script: str) -> tuple[Message, str]:
    built = cp.bundle(run_id, script)
    return (Message("assign", {"run_id": run_id, "envelope": built.manifest}, built.archive),
            "bundle rejected: the envelope lacks payloadType, payload or signatures")


@pytest.mark.parametrize("refused", [_unknown_key, _another_worker, _expired, _another_run, _altered_after_signing,
                                     _archive_swapped, _not_an_envelope], ids=lambda f: f.__name__.strip("_"))
def test_a_refused_bundle_runs_nothing_is_answered_with_the_reason_leaves_nothing_and_the_session_keeps_serving(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path,
        refused: Callable[[ControlPlane, str, str], tuple[Message, str]]) -> None:
    marker = tmp_path / "agent-ran"
    session = sessions()
    session.authenticate(cp)
    ledger_before = (home / "ledger.jsonl").read_bytes() if (home / "ledger.jsonl").exists() else b""
    message, reason = refused(cp, "run-refused", f"touch '{marker}'")
    session.send_message(message)
    messages = session.until("error", "run-refused")
    assert only(messages, "started") == []
    # Only a bundle signed by a key the Worker does not trust says so: the control plane then stops
    # sending it Runs (sessions.WorkerSessions._worker_error); the others fail just their Run.
    untrusted = {"untrusted": True} if refused is _unknown_key else {}
    assert messages[-1].fields == {"run_id": "run-refused", "request": "assign", "message": reason, **untrusted}
    assert not (home / "runs" / "run-refused").exists()
    ledger_after = (home / "ledger.jsonl").read_bytes() if (home / "ledger.jsonl").exists() else b""
    assert ledger_after == ledger_before

    assign(session, cp, "run-after", "echo still serving")
    messages = session.until("result", "run-after")
    assert output_of(messages, "run-after") == b"still serving\n"
    assert outcome(session, messages[-1])["status"] == "COMPLETED"
    assert not marker.exists(), "the refused bundle's Agent ran"


def test_a_worker_that_trusts_no_key_yet_refuses_the_session_and_every_bundle(
        sessions: Callable[[], Session], home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "agent-ran"
    stranger = ControlPlane.make(home, tmp_path / "cp")  # never enrolled
    session = sessions()
    hello = session.next()
    assert hello["trust"]["keys"] == []
    assign(session, stranger, "run-unenrolled", f"touch '{marker}'")
    refused = session.next()
    assert refused.fields["request"] == "assign" and "not authenticated" in refused["message"]
    session.send_message(stranger.auth(hello))
    error = session.next()
    assert error["request"] == "auth"
    assert error["message"].startswith("session refused: this Worker trusts no control plane key yet")
    assert "taskrun worker add" in error["message"]
    session.close_input()
    assert not session.serving
    assert not marker.exists()
    assert not (home / "runs" / "run-unenrolled").exists()


def test_an_assignment_replayed_to_a_restarted_worker_is_refused_and_runs_nothing(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path) -> None:
    first = sessions()
    first.authenticate(cp)
    sent = assign(first, cp, "run-once", "echo ran")
    messages = first.until("result", "run-once")
    assert outcome(first, messages[-1])["status"] == "COMPLETED"
    assert output_of(messages, "run-once") == b"ran\n"
    first.send("ack", run_id="run-once")
    poll_until(lambda: not (home / "runs" / "run-once").exists(), "the acknowledged Run's directory to be removed")
    first.close_input()

    second = sessions()
    assert second.authenticate(cp)["runs"] == []
    second.send_message(sent)
    messages = second.until("error", "run-once")
    assert only(messages, "started") == []
    assert messages[-1].fields == {"run_id": "run-once", "request": "assign", "message": "bundle rejected: replayed nonce"}
    assert not (home / "runs" / "run-once").exists()


# ---------------------------------------------------------------- signed results


def test_the_result_is_signed_by_the_workers_key_over_exactly_the_output_streamed(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    sent = assign(session, cp, "run-signed", "echo hi\nprintf 'no newline'")
    messages = session.until("result", "run-signed")
    record = messages[-1]
    output = tmp_path / "output.log"
    output.write_bytes(output_of(messages, "run-signed"))
    key = worker_key(home).public

    result = verified_result(record["envelope"], key, "run-signed", output)
    assert (result["status"], result["exit_code"], result["output_size"]) == ("COMPLETED", 0, len(b"hi\nno newline"))
    manifest = json.loads(base64.b64decode(sent["envelope"]["payload"]))
    assert result["nonce"] == manifest["nonce"]

    with pytest.raises(ResultRejected, match="signed for another Run"):
        verified_result(record["envelope"], key, "run-other", output)
    with pytest.raises(ResultRejected, match="unknown key id"):
        verified_result(record["envelope"], ELSEWHERE.public, "run-signed", output)
    output.write_bytes(b"hi\nno newlinE")
    with pytest.raises(ResultRejected, match="does not match the output the Worker signed"):
        verified_result(record["envelope"], key, "run-signed", output)


# ---------------------------------------------------------------- secrets


SECRET = "s3cr3t-Value-42"


def test_a_secret_the_agent_prints_is_masked_in_the_output_even_when_split_across_writes(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_TEST_SECRET", SECRET)
    session = sessions()
    session.authenticate(cp)
    # The pause leaves the secret's first part alone in output.log across a few of the Worker's reads: the
    # split it must mask is made of time, there is nothing to wait for.
    script = ('echo before\nprintf "key=%s\\n" "$TASKRUN_TEST_SECRET"\n'
              'printf %s "${TASKRUN_TEST_SECRET:0:3}"\nsleep 0.2\nprintf "%s\\n" "${TASKRUN_TEST_SECRET:3}"\n'
              "echo after")
    assign(session, cp, "run-secret", script, env=["TASKRUN_TEST_SECRET"])
    messages = session.until("result", "run-secret")
    stars = b"*" * len(SECRET)
    streamed = output_of(messages, "run-secret")
    assert streamed == b"before\nkey=" + stars + b"\n" + stars + b"\nafter\n"
    assert not any(SECRET.encode() in m.payload or SECRET in json.dumps(m.fields) for m in messages)
    # The signature covers the output as streamed: masked.
    output = tmp_path / "output.log"
    output.write_bytes(streamed)
    result = verified_result(messages[-1]["envelope"], worker_key(home).public, "run-secret", output)
    assert result["status"] == "COMPLETED"


def test_a_secret_that_resolves_nowhere_fails_the_run_naming_it_before_the_agent_starts(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKRUN_TEST_MISSING", raising=False)
    marker = tmp_path / "agent-ran"
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-nosecret", f"touch '{marker}'", env=["TASKRUN_TEST_MISSING"])
    messages = session.until("result", "run-nosecret")
    assert only(messages, "started") == []
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert "TASKRUN_TEST_MISSING" in result["error"]
    assert str(home / "secrets.env") in result["error"]
    assert not marker.exists()


def test_a_secret_from_the_workers_secrets_file_reaches_the_agent_and_is_masked(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKRUN_TEST_FILE_SECRET", raising=False)
    value = "from-the-file-123"
    secrets_file = home / "secrets.env"
    secrets_file.write_text(f"# for the Agents\nTASKRUN_TEST_FILE_SECRET={value}\n")
    secrets_file.chmod(0o600)
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-filesecret", 'echo "${#TASKRUN_TEST_FILE_SECRET}"\necho "$TASKRUN_TEST_FILE_SECRET"',
           env=["TASKRUN_TEST_FILE_SECRET"])
    messages = session.until("result", "run-filesecret")
    assert output_of(messages, "run-filesecret") == f"{len(value)}\n".encode() + b"*" * len(value) + b"\n"
    assert outcome(session, messages[-1])["status"] == "COMPLETED"


# ---------------------------------------------------------------- trust over the session


def test_a_newer_trust_statement_is_taken_and_a_replayed_one_is_answered_with_an_error(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    request = cp.trust_request()
    session.send("trust", request=request)
    reply = session.next()
    assert reply.type == "trusted"
    assert reply["keys"] == [cp.key.key_id]

    session.send("trust", request=request)
    error = session.next()
    assert error.type == "error"
    assert error["message"].startswith("trust refused: replayed or out-of-date statement")

    assign(session, cp, "run-still-trusted", "echo ok")
    messages = session.until("result", "run-still-trusted")
    assert outcome(session, messages[-1])["status"] == "COMPLETED"


def test_a_trust_statement_from_another_control_plane_is_refused_and_changes_nothing(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path) -> None:
    other = ControlPlane.make(home, tmp_path / "other-cp")
    session = sessions()
    session.authenticate(cp)
    session.send("trust", request=other.trust_request())
    error = session.next()
    assert error.type == "error"
    assert error["message"].startswith(f"trust refused: signed by unknown key id {other.key.key_id}")
    session.close_input()
    assert sessions().next()["trust"]["keys"] == [cp.key.key_id]


def test_a_rotated_key_taken_over_the_session_signs_runs_and_the_old_one_still_does_in_its_overlap(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    old = cp.key
    new = cp.keyring.rotate(3600.0, time.time())
    session.send("trust", request=cp.trust_request())
    reply = session.next()
    assert reply.type == "trusted"
    assert sorted(reply["keys"]) == sorted([old.key_id, new.key_id])

    assign(session, cp, "run-new-key", "echo new")
    assign(session, cp, "run-old-key", "echo old", signer=old)
    messages = session.until("result", "run-new-key")
    if not only(messages, "result", "run-old-key"):  # either may end first
        messages += session.until("result", "run-old-key")
    for run_id in ("run-new-key", "run-old-key"):
        assert outcome(session, only(messages, "result", run_id)[0])["status"] == "COMPLETED"
    session.close_input()
    assert sorted(sessions().next()["trust"]["keys"]) == sorted([old.key_id, new.key_id])


# ---------------------------------------------------------------- cancel and timeout


def test_cancel_ends_the_run_as_cancelled_and_kills_its_whole_process_group(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-cancel", "sleep 300 &\necho started\nsleep 30")
    messages = session.until("output", "run-cancel")
    pid = only(messages, "started", "run-cancel")[0]["pid"]
    if output_of(messages, "run-cancel") != b"started\n":
        messages += session.until("output", "run-cancel")
    assert output_of(messages, "run-cancel") == b"started\n"
    assert group_alive(pid)
    session.send("cancel", run_id="run-cancel", reason="user asked")
    messages += session.until("result", "run-cancel", timeout=10)
    result = outcome(session, messages[-1])
    assert result["status"] == "CANCELLED"
    assert result["error"] == "user asked"
    poll_until(lambda: group_gone(pid), "the cancelled Run's process group to be gone", timeout=10)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_a_run_past_its_timeout_fails_as_timed_out_and_its_group_is_killed(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-slow", "sleep 300 &\nsleep 30", timeout=0.5)
    messages = session.until("result", "run-slow", timeout=10)
    pid = only(messages, "started", "run-slow")[0]["pid"]
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert "timed out" in result["error"]
    poll_until(lambda: group_gone(pid), "the timed-out Run's process group to be gone", timeout=10)


def test_cancel_of_an_unknown_run_is_answered_with_an_error(sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    session.send("cancel", run_id="nope", reason="x")
    error = session.next()
    assert error.type == "error"
    assert error["run_id"] == "nope"


# ---------------------------------------------------------------- bad assignments


def test_assigning_a_run_id_twice_is_answered_with_an_error_and_the_first_run_is_unharmed(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-dup", "echo once")
    assign(session, cp, "run-dup", "echo twice")
    messages = session.until("result", "run-dup")
    errors = only(messages, "error", "run-dup")
    if not errors:
        messages += session.until("error", "run-dup")
        errors = only(messages, "error", "run-dup")
    assert len(errors) == 1
    assert "already assigned" in errors[0]["message"]
    assert len(only(messages, "started", "run-dup")) == 1
    assert output_of(messages, "run-dup") == b"once\n"
    assert outcome(session, only(messages, "result", "run-dup")[0])["status"] == "COMPLETED"


def test_an_invalid_run_id_is_answered_with_an_error_and_writes_nothing(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "../escape", "echo hi")
    error = session.next()
    assert error.type == "error"
    assert "invalid run id" in error["message"] and error["request"] == "assign"
    assert list((home / "runs").iterdir()) == []
    assert not (home / "escape").exists()


def test_a_malformed_manifest_fails_the_run_and_the_session_keeps_serving(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    built = cp.bundle("run-badmanifest", "echo hi")
    manifest = dict(built.manifest, files=[{"path": TASK_FILE}])  # no sha256, no size; signed all the same
    session.send("assign", built.archive, run_id="run-badmanifest", envelope=cp.resigned(manifest))
    messages = session.until("result", "run-badmanifest", timeout=5)
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert "lacks a path, sha256 or size" in result["error"]
    assert only(messages, "started") == []
    assign(session, cp, "run-after", "echo still serving")
    messages = session.until("result", "run-after", timeout=5)
    assert output_of(messages, "run-after") == b"still serving\n"


# ---------------------------------------------------------------- reconnect, resume, ack


def test_a_new_session_reports_a_still_running_run_and_resumes_its_output_from_an_offset(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path) -> None:
    flag = go_flag(home, "run-long")
    script = "echo first\nwhile [ ! -e go ]; do sleep 0.02; done\necho second"
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-long", script)
    messages = first.until("output", "run-long")
    pid = only(messages, "started", "run-long")[0]["pid"]
    assert output_of(messages, "run-long") == b"first\n"
    first.close_input()
    assert not first.serving, "serve() must return when its input ends"
    assert group_alive(pid), "the Agent must outlive the session"

    second = sessions()
    ready = second.authenticate(cp)
    assert ready["runs"] == [{"run_id": "run-long", "state": "running", "size": 6}]
    second.send("resume", run_id="run-long", offset=3)
    flag.touch()
    messages = second.until("result", "run-long")
    assert all(m["offset"] >= 3 for m in only(messages, "output", "run-long"))
    assert output_of(messages, "run-long", start=3) == b"st\nsecond\n"
    assert messages[-1]["output_size"] == len(b"first\nsecond\n")
    result = outcome(second, messages[-1])
    assert result["status"] == "COMPLETED"
    assert result["exit_code"] == 0

    second.send("ack", run_id="run-long")
    poll_until(lambda: not (home / "runs" / "run-long").exists(), "the acknowledged Run's directory to be removed")


def test_a_run_that_finished_between_sessions_is_reported_finished_and_resumed_to_its_result(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path) -> None:
    flag = go_flag(home, "run-done")
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-done", "echo one\nwhile [ ! -e go ]; do sleep 0.02; done\necho two\nexit 3")
    first.until("output", "run-done")
    first.close_input()
    flag.touch()
    poll_until(lambda: RunDir(home / "runs" / "run-done").exit_code() is not None, "the Agent to finish")

    second = sessions()
    ready = second.authenticate(cp)
    assert ready["runs"] == [{"run_id": "run-done", "state": "finished", "size": 8}]
    second.send("resume", run_id="run-done", offset=8)
    messages = second.until("result", "run-done")
    assert only(messages, "output") == []
    result = outcome(second, messages[-1])
    assert result["status"] == "FAILED"
    assert result["exit_code"] == 3


def test_a_secret_is_still_masked_when_a_new_session_resumes_a_run_from_an_offset(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_TEST_SECRET", SECRET)
    flag = go_flag(home, "run-secret-resume")
    # A first line longer than the secret: a running Run's last len(SECRET)-1 bytes are held back.
    first_line = b"a first line longer than the secret\n"
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-secret-resume", f"echo '{first_line.decode().strip()}'\n"
                                           "while [ ! -e go ]; do sleep 0.02; done\n"
                                           'echo "$TASKRUN_TEST_SECRET"', env=["TASKRUN_TEST_SECRET"])
    first.until("output", "run-secret-resume")
    first.close_input()

    second = sessions()
    second.authenticate(cp)
    second.send("resume", run_id="run-secret-resume", offset=3)
    flag.touch()
    messages = second.until("result", "run-secret-resume")
    streamed = first_line[:3] + output_of(messages, "run-secret-resume", start=3)
    assert streamed == first_line + b"*" * len(SECRET) + b"\n"
    output = tmp_path / "output.log"
    output.write_bytes(streamed)
    assert verified_result(messages[-1]["envelope"], worker_key(home).public, "run-secret-resume",
                           output)["status"] == "COMPLETED"


def test_a_run_is_not_streamed_to_a_new_session_until_it_is_resumed(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-quiet", "echo one")
    first.until("result", "run-quiet")
    first.close_input()

    second = sessions()
    assert second.authenticate(cp)["runs"] == [{"run_id": "run-quiet", "state": "finished", "size": 4}]
    # Two round trips through the loop: anything it streamed unasked would arrive in between.
    second.send("cancel", run_id="unknown-1", reason="x")
    assert second.next().type == "error"
    second.send("cancel", run_id="unknown-2", reason="x")
    assert second.next().type == "error"
    assert [m.type for m in second.history if m.type != "heartbeat"] == ["hello", "ready", "error", "error"]
    second.send("resume", run_id="run-quiet", offset=0)
    messages = second.until("result", "run-quiet")
    assert output_of(messages, "run-quiet") == b"one\n"
    assert outcome(second, messages[-1])["status"] == "COMPLETED"


def test_ack_removes_the_run_directory_and_a_later_hello_no_longer_lists_it(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-ack", "echo hi")
    first.until("result", "run-ack")
    assert (home / "runs" / "run-ack").is_dir()
    first.send("ack", run_id="run-ack")
    poll_until(lambda: not (home / "runs" / "run-ack").exists(), "the acknowledged Run's directory to be removed")
    first.close_input()
    second = sessions()
    assert second.authenticate(cp)["runs"] == []


def test_a_secret_is_masked_on_resume_even_if_the_new_session_no_longer_has_it(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_TEST_SECRET", SECRET)
    flag = go_flag(home, "run-secret-gone")
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-secret-gone", "while [ ! -e go ]; do sleep 0.02; done\n"
                                         'echo "$TASKRUN_TEST_SECRET"', env=["TASKRUN_TEST_SECRET"])
    first.until("started", "run-secret-gone")
    first.close_input()
    # The next session is started with another environment (another SSH login, a restarted service).
    monkeypatch.delenv("TASKRUN_TEST_SECRET")
    second = sessions()
    second.authenticate(cp)
    second.send("resume", run_id="run-secret-gone", offset=0)
    flag.touch()
    messages = second.until("result", "run-secret-gone")
    assert SECRET.encode() not in output_of(messages, "run-secret-gone")


# ---------------------------------------------------------------- several sessions on one Worker home


def judged(run: Path) -> bool:
    """A session judged the Run in directory `run`: it wrote its result or the reason it stops it."""
    return (run / "result.json").exists() or (run / "stop.json").exists()


def test_a_run_another_session_is_still_starting_is_neither_judged_by_a_stranger_nor_by_a_new_session(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extracting, release = threading.Event(), threading.Event()
    extract = bundle.extract

    def slow_extract(*args: Any, **kwargs: Any) -> Any:
        extracting.set()
        release.wait(DEADLINE)
        return extract(*args, **kwargs)

    looked: list[threading.Thread] = []  # each look that found the Run still being started, by its thread
    being_started = RunDir.being_started

    def counted(run_dir: RunDir) -> bool:
        answer = being_started(run_dir)
        if answer and run_dir.run_id == "run-slow-start":
            looked.append(threading.current_thread())
        return answer

    monkeypatch.setattr(bundle, "extract", slow_extract)
    monkeypatch.setattr(RunDir, "being_started", counted)
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-slow-start", "echo started")
    poll_until(extracting.is_set, "the first session to be extracting the archive")
    run = home / "runs" / "run-slow-start"
    assert (run / "assignment.json").exists() and not (run / "pid").exists()

    # The daemon's SSH key alone opens a session, reads hello, goes: it touched nothing.
    stranger = sessions()
    assert stranger.next().type == "hello"
    stranger.close_input()
    # A reconnect while the first session still starts the Run: it goes on, it has not ended.
    second = sessions()
    assert second.authenticate(cp)["runs"] == [{"run_id": "run-slow-start", "state": "running", "size": 0}]
    looked.clear()
    second.send("resume", run_id="run-slow-start", offset=0)
    # It looks again every ADOPTED_PROBE_SECONDS; five looks find the start under way and judge nothing.
    poll_until(lambda: looked.count(second.serve_thread) >= 5 or judged(run),
               "the second session to look at the Run five times")
    assert not judged(run)

    release.set()
    messages = first.until("result", "run-slow-start")
    assert outcome(first, messages[-1])["status"] == "COMPLETED"
    resumed = second.until("result", "run-slow-start")
    assert output_of(resumed, "run-slow-start") == b"started\n"
    # Both sessions judged it: the first to write its result decided, the other sends the same one.
    assert resumed[-1]["envelope"] == messages[-1]["envelope"]


def test_a_run_cancelled_while_another_session_starts_it_is_stopped_once_its_agent_runs(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    extract = bundle.extract
    monkeypatch.setattr(bundle, "extract", lambda *a, **k: release.wait(DEADLINE) and extract(*a, **k))
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-cancel-early", "echo started\nsleep 60")
    poll_until(lambda: (home / "runs" / "run-cancel-early" / "assignment.json").exists(), "the start to begin")
    second = sessions()
    second.authenticate(cp)
    second.send("cancel", run_id="run-cancel-early", reason="user asked")
    second.send("resume", run_id="run-cancel-early", offset=0)
    release.set()
    pid = first.until("started", "run-cancel-early")[-1]["pid"]
    result = outcome(second, second.until("result", "run-cancel-early", timeout=10)[-1])
    assert (result["status"], result["error"]) == ("CANCELLED", "user asked")
    poll_until(lambda: group_gone(pid), "the cancelled Run's process group to be gone")


def test_a_run_whose_starter_died_before_recording_its_agent_is_dropped_and_that_agent_is_killed(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    # It never really started: not listed in ready (the control plane runs it again as a lost Run),
    # whatever it started is killed and its directory is gone.
    run = RunDir.at(home, "run-orphan")
    run.path.mkdir(parents=True)
    os.close(run.begin_start())  # the starter died holding it: the kernel dropped its lock
    run.write_assignment({"run_id": "run-orphan", "assigned_at": time.time(), "deadline": None, "nonce": "n1"})
    # It got as far as starting the Agent, not as far as writing its pid.
    agent = subprocess.Popen(wrapped(run.path, ["sleep", "60"]), start_new_session=True)
    try:
        session = sessions()
        assert session.authenticate(cp)["runs"] == []
        assert agent.wait(timeout=10) == -signal.SIGKILL
        assert not run.path.exists()
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


def test_two_live_sessions_send_one_result_and_an_ack_on_one_is_forgotten_by_the_other(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-both", "echo one\nwhile [ ! -e go ]; do sleep 0.02; done\necho two")
    first.until("output", "run-both")
    second = sessions()  # the first lingers: its control plane reconnected
    second.authenticate(cp)
    second.send("resume", run_id="run-both", offset=0)
    go_flag(home, "run-both").touch()
    mine = first.until("result", "run-both")[-1]
    theirs = second.until("result", "run-both")[-1]
    assert theirs["envelope"] == mine["envelope"]

    second.send("ack", run_id="run-both")
    poll_until(lambda: not (home / "runs" / "run-both").exists(), "the acknowledged Run's directory to be removed")
    first.send("resume", run_id="run-both", offset=0)
    first.send("cancel", run_id="unknown", reason="x")
    assert first.next()["run_id"] == "unknown"  # still serving; the Run is forgotten, not failed
    # Forgotten on the loop's next look at it, which may come after the records above were handled.
    poll_until(lambda: "run-both" not in first.server._runs, "the first session to forget the acknowledged Run")
    first.send("resume", run_id="run-both", offset=0)
    error = first.next()
    assert error.type == "error" and error["message"] == "this Worker holds no Run run-both"


# ---------------------------------------------------------------- an Agent tampering with its output


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("tamper", "said"), [
    ("import os; os.ftruncate(1, 0)", "the Agent truncated its output: 6 bytes were sent, output.log now holds 0"),
    # Clears O_APPEND, then writes over a byte already sent (pwrite on an O_APPEND fd appends on Linux): the
    # result counts the bytes as they were sent, what the control plane holds, and the Run ends as it would.
    ("import fcntl, os; fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) & ~os.O_APPEND); "
     "os.pwrite(1, b'J', 0)", None),
], ids=["truncated", "rewritten"])
def test_an_agent_that_tampers_with_output_already_sent_gets_a_result_covering_what_was_sent(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tamper: str, said: str) -> None:
    session = sessions()
    session.authenticate(cp)
    # After the tampering the Agent lives on a moment: whether the Worker sees it then or once the Agent
    # ended, the result is the same, so nothing waits on that moment.
    assign(session, cp, "run-tamper", "echo hello\nwhile [ ! -e go ]; do sleep 0.02; done\n"
                                      f"{sys.executable} -c \"{tamper}\"\nsleep 0.5")
    messages = session.until("output", "run-tamper")
    assert output_of(messages, "run-tamper") == b"hello\n"
    go_flag(home, "run-tamper").touch()
    messages += session.until("result", "run-tamper")
    assert output_of(messages, "run-tamper") == b"hello\n"
    assert messages[-1]["output_size"] == 6
    result = verified_result(messages[-1]["envelope"], worker_key(home).public, "run-tamper", (6, _sha256(b"hello\n")))
    assert (result["status"], result["error"]) == ("FAILED", said) if said else ("COMPLETED", None)


def test_output_truncated_after_the_run_ended_turns_its_result_into_one_covering_what_was_recorded(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path) -> None:
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-shrunk", "echo 0123456789")
    assert first.until("result", "run-shrunk")[-1]["output_size"] == 11
    first.close_input()
    # Something that outlived the Agent (say, unconfined) truncates the file after the result was signed.
    os.truncate(home / "runs" / "run-shrunk" / "output.log", 4)

    second = sessions()
    second.authenticate(cp)
    second.send("resume", run_id="run-shrunk", offset=3)  # the control plane recorded 3 bytes
    messages = second.until("result", "run-shrunk")
    assert output_of(messages, "run-shrunk", start=3) == b""
    assert messages[-1]["output_size"] == 3
    result = verified_result(messages[-1]["envelope"], worker_key(home).public, "run-shrunk", (3, _sha256(b"012")))
    assert result["status"] == "FAILED" and "truncated its output" in result["error"]
    # One result per resume: the session says nothing more about it.
    second.send("cancel", run_id="unknown", reason="x")
    assert second.next().type == "error"
