"""Records from a broken or hostile Worker (property tests): garbage bytes, truncated and oversized
headers, records out of order, for unknown Runs, with every field's type swapped. On the wire the
reader raises only ProtocolError and the session always ends with a reason; in the engine nothing
raises out of `on_link_event`, and a record that cannot be taken ends the session saying why."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskrunner.config import parse_config
from taskrunner.engine import Engine
from taskrunner.errors import ProtocolError
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent, WorkerLink
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.protocol import FROM_WORKER_LIMITS, MAX_HEADER_BYTES, Message, Reader, encode
from taskrunner.signing import RESULT_TYPE, SigningKey, sign
from taskrunner.state import RunState, TaskState
from taskrunner.taskfile import parse_task
from tests.conftest import git
from tests.unit.test_property_values import budget, nasty_text, nasty_values, swap_types

FROM_WORKER = ("hello", "ready", "heartbeat", "error", "trusted", "started", "output", "result")
KEY = SigningKey.generate()
RUN_ID = "r1"

# ---------------------------------------------------------------- on the wire


def _header(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """A stream a Worker might send: valid headers, headers of any type, cut ones, raw garbage."""
    parts = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        kind = draw(st.sampled_from(["valid", "fields", "cut", "garbage", "payload", "constant", "deep"]))
        if kind == "valid":
            parts.append(_header({"type": "heartbeat", "time": 1.0, "running": 0}))
        elif kind == "fields":
            parts.append(_header({"type": draw(st.sampled_from(FROM_WORKER + ("assign", "x"))),
                                  **draw(st.dictionaries(nasty_text, nasty_values(4), max_size=4))}))
        elif kind == "cut":
            parts.append(_header({"type": "output", "run_id": RUN_ID, "offset": 0, "len": 10})
                         [:draw(st.integers(min_value=0, max_value=30))])
        elif kind == "garbage":
            parts.append(draw(st.binary(max_size=40)))
        elif kind == "payload":
            announced = draw(st.sampled_from([-1, 0, 5, 2 ** 40, 2 ** 64, "5", 1.5, None]))
            parts.append(_header({"type": "output", "run_id": RUN_ID, "offset": 0, "len": announced})
                         + draw(st.binary(max_size=8)))
        elif kind == "constant":
            parts.append(b'{"type":"heartbeat","time":' + draw(st.sampled_from([b"NaN", b"Infinity", b"1" * 5000]))
                         + b"}\n")
        else:
            parts.append(b"[" * draw(st.integers(min_value=900, max_value=5000)) + b"\n")
    return b"".join(parts)


@given(wire_bytes())
@budget(150)
def test_a_workers_bytes_are_records_or_a_protocol_error(data: bytes) -> None:
    reader = Reader(io.BytesIO(data), FROM_WORKER_LIMITS)
    try:
        while (message := reader.read()) is not None:
            assert message.type in FROM_WORKER or message.type == "assign"
    except ProtocolError as exc:
        assert str(exc)


@pytest.mark.parametrize("line", [
    b"[" * 70_000 + b"\n",                                       # deeper than json recurses
    b'{"type":"heartbeat","time":NaN,"running":Infinity}\n',     # not JSON numbers
    b'{"type":"heartbeat","time":' + b"9" * 5000 + b"}\n",       # past int()'s digit limit
    b"x" * (MAX_HEADER_BYTES + 10),                              # no newline within the limit
    b'{"type":"hello","protocol":2}' + b" " * 70_000 + b"\n",    # a small record's header, too long
], ids=["deep", "constants", "digits", "endless", "long-hello"])
def test_headers_that_once_escaped_as_other_errors_are_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        Reader(io.BytesIO(line), FROM_WORKER_LIMITS).read()


class _BytesLink(WorkerLink):
    """A session whose Worker sends `data` and hangs up."""

    data = b""

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        return io.BytesIO(self.data), io.BytesIO()

    def _disconnect(self) -> None:
        pass


@given(wire_bytes())
@budget(60)
def test_a_session_over_any_bytes_always_ends_with_a_reason(data: bytes) -> None:
    events: list[LinkEvent] = []
    config = parse_config("workers: {local: {transport: local}}\n", ".taskrun.yaml")
    link = _BytesLink(config.workers["local"], events.append)
    link.data = data
    link.generation = 1
    link._session(1)  # the session thread's body, run here
    assert events and events[-1].message is None and events[-1].reason, events[-3:]
    assert all(event.message is not None for event in events[:-1])


# ---------------------------------------------------------------- in the engine


class _Link(WorkerLink):
    """The engine's end of a session, keeping what the engine sends."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sent: list[Message] = []

    def send(self, *messages: Message) -> None:
        self.sent.extend(messages)

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        raise AssertionError("no session is opened in these tests")

    def _disconnect(self) -> None:
        pass


class _Plane:
    """An engine with one Worker, `local`, holding one running Run, r1 of Task t."""

    def __init__(self, root: Path) -> None:
        self.root = root
        config = parse_config("workers: {local: {transport: local}}\n", ".taskrun.yaml")
        keyring, _ = Keyring.ensure(root / ".git" / "taskrun", 0.0)
        self.fleet = Fleet(config, root / ".git" / "taskrun", lambda event: None, keyring)
        self.engine = Engine(root, config, self.fleet, commit=lambda item: None, clock=lambda: 1000.0)
        self.worker: WorkerState = self.fleet.workers["local"]
        self.link = self.worker.link = _Link(self.worker.spec, lambda event: None)
        self.reset()

    def reset(self) -> None:
        """A fresh session and a fresh running Run, as if the last example never happened."""
        shutil.rmtree(self.root / "runs", ignore_errors=True)
        spec = parse_task("t", "tasks/t.md", b"# T\n\n```sh\ntrue\n```\n")
        task = TaskState("t", "tasks/t.md", 1, status=TaskStatus.RUNNING, spec=spec, revision=spec.revision)
        run = RunState(run_id=RUN_ID, task_id="t", number=1, revision=spec.revision, attempt=1, worker="local",
                       agent="shell", status=RunStatus.RUNNING)
        task.runs.append(run)
        task.attempts = 1
        self.engine.tasks.clear()
        self.engine.runs.clear()
        self.engine.tasks["t"] = task
        self.engine.runs[RUN_ID] = run
        self.worker.generation += 1
        self.worker.online, self.worker.error, self.worker.result_key = True, None, KEY.public
        self.worker.runs = {RUN_ID}
        self.link.sent.clear()

    def feed(self, message: Message) -> None:
        self.engine.on_link_event(LinkEvent("local", self.worker.generation, message))
        self.engine.flush(force=True)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Plane]:
    root = tmp_path_factory.mktemp("repo")
    git(root, "init", "-q")
    yield _Plane(root)


def _envelope(**fields: Any) -> dict[str, Any]:
    empty = hashlib.sha256(b"").hexdigest()
    body = {"run_id": RUN_ID, "status": "COMPLETED", "exit_code": 0, "error": None, "started_at": 1.0,
            "finished_at": 2.0, "output_size": 0, "output_sha256": empty, "nonce": "n", "change": None, **fields}
    return sign(RESULT_TYPE, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), [KEY])


#: Well-formed records of each type a Worker sends; the properties swap their fields' types.
VALID: dict[str, dict[str, Any]] = {
    "hello": {"protocol": 2, "version": "0.1", "worker": "w", "pid": 1, "agents": ["shell"], "slots": 1,
              "worker_key": KEY.public_line, "trust": {"keys": [], "issued_at": None}, "challenge": "c" * 32},
    "ready": {"runs": [{"run_id": RUN_ID, "state": "running", "size": 0}], "agents": {"shell": {"version": None}},
              "repos": {"x": ["0" * 40]}},
    "heartbeat": {"time": 1.0, "running": 1},
    "error": {"message": "no", "run_id": RUN_ID, "request": "assign"},
    "trusted": {"keys": ["k"]},
    "started": {"run_id": RUN_ID, "pid": 1, "started_at": 1.0},
    "output": {"run_id": RUN_ID, "offset": 0},
    "result": {"run_id": RUN_ID, "output_size": 0, "envelope": _envelope()},
}


@st.composite
def worker_records(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(FROM_WORKER + ("assign", "ack", "bogus")))
    fields = dict(VALID.get(kind, {"run_id": RUN_ID}))
    for name in draw(st.lists(st.sampled_from(sorted(fields) or ["run_id"]), max_size=3, unique=True)):
        how = draw(st.sampled_from(["swap", "drop", "unknown-run"]))
        if how == "swap":
            fields[name] = draw(swap_types(fields.get(name)))
        elif how == "drop":
            fields.pop(name, None)
        else:
            fields[name] = draw(st.sampled_from(["r2", "", "../r1", RUN_ID * 100]))
    if draw(st.booleans()):
        fields.update(draw(st.dictionaries(nasty_text, nasty_values(4), max_size=2)))
    payload = draw(st.binary(max_size=64)) if kind in ("output", "result") else b""
    return Message(kind, fields, payload)


def _over_the_wire(message: Message) -> Message | None:
    """`message` as the engine would get it from a Worker: encoded, then read back as a session's
    reader reads it; None when the reader refuses it (the session then ends: see the tests above)."""
    try:
        return Reader(io.BytesIO(encode(message)), FROM_WORKER_LIMITS).read()
    except (ProtocolError, ValueError):  # ValueError: json.dumps of a NaN or huge int it will not write
        return None


@given(st.lists(worker_records(), min_size=1, max_size=8))
@budget(100, deadline_ms=5000)
def test_no_record_from_a_worker_raises_out_of_the_engine(plane: _Plane, records: list[Message]) -> None:
    plane.reset()
    for record in records:
        message = _over_the_wire(record)
        if message is None:
            continue
        generation = plane.worker.generation
        plane.feed(message)
        if plane.worker.generation != generation or (not plane.worker.online and plane.worker.error):
            # The session was dropped: it says why, and the next records of it are ignored.
            assert plane.worker.error, "a dropped session without a reason"
            break
    run = plane.engine.runs.get(RUN_ID)
    if run is not None:
        assert run.status in (RunStatus.RUNNING, RunStatus.ASSIGNED)


@pytest.mark.parametrize("message", [
    Message("heartbeat", {"time": 1.0, "running": float("inf")}),
    Message("heartbeat", {"time": 1.0, "running": "many"}),
    Message("output", {"run_id": RUN_ID, "offset": float("inf")}, b"x"),
    Message("output", {"run_id": RUN_ID, "offset": float("nan")}, b"x"),
    Message("output", {"run_id": RUN_ID, "offset": -5}, b"x"),
    Message("output", {"run_id": RUN_ID, "offset": 10 ** 30}, b"x"),
    Message("output", {"run_id": [RUN_ID], "offset": 0}, b"x"),
    Message("started", {"run_id": {"a": 1}, "pid": 1}),
    Message("result", {"run_id": RUN_ID, "output_size": "all", "envelope": None}),
    Message("ready", {"runs": [{"run_id": ["x"]}]}),
    Message("trusted", {"keys": 5}),
    Message("error", {"message": None, "request": ["auth"]}),
], ids=lambda m: f"{m.type}:{sorted(m.fields.items(), key=str)!r}"[:60])
def test_a_malformed_record_ends_the_session_or_is_ignored_never_raises(plane: _Plane, message: Message) -> None:
    plane.reset()
    plane.feed(message)
    if not plane.worker.online:
        assert plane.worker.error and ("protocol error" in plane.worker.error or "Worker" in plane.worker.error), \
            plane.worker.error


def test_a_result_for_an_unknown_run_is_acknowledged_and_records_nothing(plane: _Plane) -> None:
    plane.reset()
    plane.feed(Message("result", {"run_id": "r9", "output_size": 0, "envelope": _envelope(run_id="r9")}))
    assert [m.type for m in plane.link.sent] == ["ack"] and plane.link.sent[0]["run_id"] == "r9"
    assert plane.engine.runs[RUN_ID].status is RunStatus.RUNNING and plane.worker.online


def test_output_past_what_is_recorded_asks_for_the_gap_again(plane: _Plane) -> None:
    plane.reset()
    plane.feed(Message("output", {"run_id": RUN_ID, "offset": 100}, b"late"))
    assert [(m.type, m.get("offset")) for m in plane.link.sent] == [("resume", 0)]


def test_a_signed_result_body_nested_too_deep_fails_the_run_and_raises_nothing(plane: _Plane) -> None:
    plane.reset()
    envelope = sign(RESULT_TYPE, b"[" * 100_000, [KEY])
    plane.feed(Message("result", {"run_id": RUN_ID, "output_size": 0, "envelope": envelope}))
    assert RUN_ID not in plane.engine.runs or plane.engine.runs[RUN_ID].status is RunStatus.FAILED
