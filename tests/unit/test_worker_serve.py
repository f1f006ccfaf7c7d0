"""WorkerServer: the Worker side of a session, driven over in-memory pipes.

The control plane's side is played by protocol.Writer/Reader on os.pipe()
pairs; the server runs `serve()` in a thread, exactly as `taskrun-worker
serve` does over stdin/stdout.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from taskrunner import bundle
from taskrunner.protocol import PROTOCOL_VERSION, Message, Reader, Writer
from taskrunner.worker.serve import WorkerServer

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
        reader = Reader(self._from_worker)
        try:
            while (message := reader.read()) is not None:
                self.received.put(message)
        finally:
            self.received.put(None)

    def send(self, kind: str, payload: bytes = b"", **fields: Any) -> None:
        self.writer.write(Message(kind, fields, payload))

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


def task_md(script: str | None) -> bytes:
    body = f"```sh\n{script}\n```\n" if script is not None else "Just prose, no code block.\n"
    return f"---\n---\n# T\n\n{body}".encode()


def assign(session: Session, run_id: str, script: str | None, timeout: float | None = None,
           task: bytes | None = None) -> None:
    built = bundle.build({"tasks/t.md": task if task is not None else task_md(script)}, run_id=run_id)
    session.send("assign", built.archive, run_id=run_id, task_id="t", revision="r", attempt=1,
                 agent={"name": "shell", "preset": "shell", "command": [], "env": []}, timeout=timeout,
                 task_file="tasks/t.md", manifest=built.manifest)


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


def test_hello_on_a_fresh_home_lists_no_runs(sessions: Callable[[], Session]) -> None:
    session = sessions()
    hello = session.next()
    assert hello.type == "hello"
    assert hello["protocol"] == PROTOCOL_VERSION
    assert hello["worker"] == "w1"
    assert hello["runs"] == []
    assert hello["slots"] == 2
    assert "shell" in hello["agents"]


# ---------------------------------------------------------------- running a Run


def test_an_assigned_run_starts_streams_its_output_and_completes(sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-ok", "echo hi")
    messages = session.until("result", "run-ok")
    assert messages[0].type == "started" and messages[0]["run_id"] == "run-ok"
    assert isinstance(messages[0]["pid"], int)
    assert output_of(messages, "run-ok") == b"hi\n"
    result = messages[-1]
    assert result["status"] == "COMPLETED"
    assert result["exit_code"] == 0
    assert result["error"] is None
    assert result["output_size"] == 3
    assert only(messages, "error") == []


def test_output_is_complete_before_the_result_even_for_many_lines(sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-many", "for i in $(seq 1 2000); do echo \"line $i\"; done")
    messages = session.until("result", "run-many")
    expected = b"".join(f"line {i}\n".encode() for i in range(1, 2001))
    assert output_of(messages, "run-many") == expected
    assert messages[-1]["output_size"] == len(expected)


def test_a_failing_script_fails_the_run_with_its_exit_code(sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-bad", "echo before\nexit 7")
    messages = session.until("result", "run-bad")
    assert output_of(messages, "run-bad") == b"before\n"
    result = messages[-1]
    assert result["status"] == "FAILED"
    assert result["exit_code"] == 7
    assert "7" in result["error"]


def test_a_failing_command_stops_the_script_under_errexit(sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-errexit", "false\necho not reached")
    messages = session.until("result", "run-errexit")
    assert output_of(messages, "run-errexit") == b""
    assert messages[-1]["status"] == "FAILED"
    assert messages[-1]["exit_code"] == 1


def test_a_task_without_a_sh_block_fails_without_starting_a_process(
        sessions: Callable[[], Session], home: Path) -> None:
    session = sessions()
    session.next()
    assign(session, "run-nosh", None)
    messages = session.until("result", "run-nosh")
    assert only(messages, "started") == []
    result = messages[-1]
    assert result["status"] == "FAILED"
    assert "no ```sh" in result["error"]
    assert result["exit_code"] is None
    assert not (home / "runs" / "run-nosh" / "pid").exists()
    assert not (home / "runs" / "run-nosh" / "exit_code").exists()


def test_a_bundle_that_breaks_a_rule_fails_the_run_with_the_reason(sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    built = bundle.build({"tasks/t.md": task_md("echo hi")}, run_id="run-tampered")
    manifest = dict(built.manifest, files=[dict(built.manifest["files"][0], sha256="0" * 64)])
    session.send("assign", built.archive, run_id="run-tampered", task_id="t", revision="r", attempt=1,
                 agent={"name": "shell", "preset": "shell", "command": [], "env": []}, timeout=None,
                 task_file="tasks/t.md", manifest=manifest)
    messages = session.until("result", "run-tampered")
    assert only(messages, "started") == []
    assert messages[-1]["status"] == "FAILED"
    assert "does not match its manifest hash" in messages[-1]["error"]


def test_the_agent_sees_the_run_and_task_ids_and_runs_in_its_workspace(sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-env", 'echo "$TASKRUN_RUN_ID $TASKRUN_TASK_ID"\ntest "$PWD" = "$TASKRUN_WORKSPACE"\n'
                               "cat tasks/t.md >/dev/null")
    messages = session.until("result", "run-env")
    assert output_of(messages, "run-env") == b"run-env t\n"
    assert messages[-1]["status"] == "COMPLETED"


# ---------------------------------------------------------------- cancel and timeout


def test_cancel_ends_the_run_as_cancelled_and_kills_its_whole_process_group(
        sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-cancel", "sleep 300 &\necho started\nsleep 30")
    messages = session.until("output", "run-cancel")
    pid = only(messages, "started", "run-cancel")[0]["pid"]
    if output_of(messages, "run-cancel") != b"started\n":
        messages += session.until("output", "run-cancel")
    assert output_of(messages, "run-cancel") == b"started\n"
    assert group_alive(pid)
    session.send("cancel", run_id="run-cancel", reason="user asked")
    messages += session.until("result", "run-cancel", timeout=10)
    result = messages[-1]
    assert result["status"] == "CANCELLED"
    assert result["error"] == "user asked"
    poll_until(lambda: group_gone(pid), "the cancelled Run's process group to be gone", timeout=10)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_a_run_past_its_timeout_fails_as_timed_out_and_its_group_is_killed(
        sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-slow", "sleep 300 &\nsleep 30", timeout=0.5)
    messages = session.until("result", "run-slow", timeout=10)
    pid = only(messages, "started", "run-slow")[0]["pid"]
    result = messages[-1]
    assert result["status"] == "FAILED"
    assert "timed out" in result["error"]
    poll_until(lambda: group_gone(pid), "the timed-out Run's process group to be gone", timeout=10)


def test_cancel_of_an_unknown_run_is_answered_with_an_error(sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    session.send("cancel", run_id="nope", reason="x")
    error = session.next()
    assert error.type == "error"
    assert error["run_id"] == "nope"


# ---------------------------------------------------------------- bad assignments


def test_assigning_a_run_id_twice_is_answered_with_an_error_and_the_first_run_is_unharmed(
        sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    assign(session, "run-dup", "echo once")
    assign(session, "run-dup", "echo twice")
    messages = session.until("result", "run-dup")
    errors = only(messages, "error", "run-dup")
    if not errors:
        messages += session.until("error", "run-dup")
        errors = only(messages, "error", "run-dup")
    assert len(errors) == 1
    assert "already assigned" in errors[0]["message"]
    assert len(only(messages, "started", "run-dup")) == 1
    assert output_of(messages, "run-dup") == b"once\n"
    assert only(messages, "result", "run-dup")[0]["status"] == "COMPLETED"


def test_an_invalid_run_id_is_answered_with_an_error_and_writes_nothing(
        sessions: Callable[[], Session], home: Path) -> None:
    session = sessions()
    session.next()
    assign(session, "../escape", "echo hi")
    error = session.next()
    assert error.type == "error"
    assert "invalid run id" in error["message"]
    assert list((home / "runs").iterdir()) == []
    assert not (home / "escape").exists()


def test_a_malformed_manifest_fails_the_run_and_the_session_keeps_serving(
        sessions: Callable[[], Session]) -> None:
    session = sessions()
    session.next()
    built = bundle.build({"tasks/t.md": task_md("echo hi")}, run_id="run-badmanifest")
    manifest = dict(built.manifest, files=[{"path": "tasks/t.md"}])  # no sha256, no size
    session.send("assign", built.archive, run_id="run-badmanifest", task_id="t", revision="r", attempt=1,
                 agent={"name": "shell", "preset": "shell", "command": [], "env": []}, timeout=None,
                 task_file="tasks/t.md", manifest=manifest)
    messages = session.until("result", "run-badmanifest", timeout=5)
    assert messages[-1]["status"] == "FAILED"
    assert only(messages, "started") == []
    assign(session, "run-after", "echo still serving")
    messages = session.until("result", "run-after", timeout=5)
    assert output_of(messages, "run-after") == b"still serving\n"


# ---------------------------------------------------------------- reconnect, resume, ack


def test_a_new_session_reports_a_still_running_run_and_resumes_its_output_from_an_offset(
        sessions: Callable[[], Session], home: Path, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    script = f"echo first\nwhile [ ! -e '{flag}' ]; do sleep 0.02; done\necho second"
    first = sessions()
    first.next()
    assign(first, "run-long", script)
    messages = first.until("output", "run-long")
    pid = only(messages, "started", "run-long")[0]["pid"]
    assert output_of(messages, "run-long") == b"first\n"
    first.close_input()
    assert not first.serving, "serve() must return when its input ends"
    assert group_alive(pid), "the Agent must outlive the session"

    second = sessions()
    hello = second.next()
    assert hello.type == "hello"
    assert hello["runs"] == [{"run_id": "run-long", "state": "running", "size": 6}]
    second.send("resume", run_id="run-long", offset=3)
    flag.touch()
    messages = second.until("result", "run-long")
    assert all(m["offset"] >= 3 for m in only(messages, "output", "run-long"))
    assert output_of(messages, "run-long", start=3) == b"st\nsecond\n"
    result = messages[-1]
    assert result["status"] == "COMPLETED"
    assert result["exit_code"] == 0
    assert result["output_size"] == len(b"first\nsecond\n")

    second.send("ack", run_id="run-long")
    poll_until(lambda: not (home / "runs" / "run-long").exists(), "the acknowledged Run's directory to be removed")


def test_a_run_that_finished_between_sessions_is_reported_finished_and_resumed_to_its_result(
        sessions: Callable[[], Session], home: Path, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    first = sessions()
    first.next()
    assign(first, "run-done", f"echo one\nwhile [ ! -e '{flag}' ]; do sleep 0.02; done\necho two\nexit 3")
    first.until("output", "run-done")
    first.close_input()
    flag.touch()
    poll_until(lambda: (home / "runs" / "run-done" / "exit_code").exists(), "the Agent to finish")

    second = sessions()
    hello = second.next()
    assert hello["runs"] == [{"run_id": "run-done", "state": "finished", "size": 8}]
    second.send("resume", run_id="run-done", offset=8)
    messages = second.until("result", "run-done")
    assert only(messages, "output") == []
    assert messages[-1]["status"] == "FAILED"
    assert messages[-1]["exit_code"] == 3


def test_a_run_is_not_streamed_to_a_new_session_until_it_is_resumed(
        sessions: Callable[[], Session], home: Path) -> None:
    first = sessions()
    first.next()
    assign(first, "run-quiet", "echo one")
    first.until("result", "run-quiet")
    first.close_input()

    second = sessions()
    assert second.next()["runs"] == [{"run_id": "run-quiet", "state": "finished", "size": 4}]
    # Two round trips through the loop: anything it streamed unasked would arrive in between.
    second.send("cancel", run_id="unknown-1", reason="x")
    assert second.next().type == "error"
    second.send("cancel", run_id="unknown-2", reason="x")
    assert second.next().type == "error"
    assert [m.type for m in second.history if m.type != "heartbeat"] == ["hello", "error", "error"]
    second.send("resume", run_id="run-quiet", offset=0)
    messages = second.until("result", "run-quiet")
    assert output_of(messages, "run-quiet") == b"one\n"


def test_ack_removes_the_run_directory_and_a_later_hello_no_longer_lists_it(
        sessions: Callable[[], Session], home: Path) -> None:
    first = sessions()
    first.next()
    assign(first, "run-ack", "echo hi")
    first.until("result", "run-ack")
    assert (home / "runs" / "run-ack").is_dir()
    first.send("ack", run_id="run-ack")
    poll_until(lambda: not (home / "runs" / "run-ack").exists(), "the acknowledged Run's directory to be removed")
    first.close_input()
    second = sessions()
    assert second.next()["runs"] == []
