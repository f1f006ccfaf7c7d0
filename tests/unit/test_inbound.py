"""What a Worker reads before it has verified anything: an `assign`'s envelope is checked from its
header, so an unsigned or oversized payload is never buffered, and nothing of it reaches the disk."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from taskrunner import bundle
from taskrunner.protocol import SKIP_CHUNK_BYTES, Message, Reader, encode
from taskrunner.signing import SigningKey
from taskrunner.sessionauth import new_challenge
from taskrunner.worker.inbound import Assignment, Authenticated, Inbound
from taskrunner.worker.trust import TrustStore, worker_key
from tests.signed import ControlPlane, enroll
from tests.unit.test_worker_serve import Session, outcome, output_of

GiB = 1024 ** 3
STRANGER = SigningKey.generate()


class _Stream(io.RawIOBase):
    """Records to read, each header followed by `size` made-up payload bytes; counts what is read."""

    def __init__(self, parts: list[tuple[bytes, int]]) -> None:
        self._parts = parts
        self._left = 0  # payload bytes of the current part still unread
        self.consumed = 0
        self.largest = 0

    def readable(self) -> bool:
        return True

    def readline(self, limit: int = -1) -> bytes:  # type: ignore[override]
        assert self._left == 0, "a header read while a payload was unread"
        if not self._parts:
            return b""
        line, self._left = self._parts.pop(0)
        self.consumed += len(line)
        return line

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        self.largest = max(self.largest, size)
        n = min(size, self._left)
        self._left -= n
        self.consumed += n
        return bytes(n)


def _header(kind: str, size: int, **fields: Any) -> bytes:
    return json.dumps({"type": kind, **fields, "len": size}).encode() + b"\n"


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "worker-home"


@pytest.fixture()
def cp(home: Path, tmp_path: Path) -> ControlPlane:
    return enroll(home, tmp_path / "cp")


class _Screen:
    """An Inbound over made-up records, authenticated already unless told otherwise."""

    def __init__(self, home: Path, parts: list[tuple[bytes, int]], authenticated: bool = True,
                 limits: bundle.Limits = bundle.Limits()) -> None:
        self.stream = _Stream(parts)
        self.sent: list[dict[str, Any]] = []
        self.passed: list[object] = []
        self.inbound = Inbound(Reader(self.stream), lambda kind, **f: self.sent.append({"type": kind, **f}),  # type: ignore[arg-type]
                               home, TrustStore(home), worker_key(home).key_id, new_challenge(), limits)
        self.inbound.authenticated = authenticated

    def run(self) -> None:
        self.inbound.run(self.passed.append)


def test_an_unsigned_one_gib_assign_is_skipped_a_chunk_at_a_time_and_leaves_nothing(
        home: Path, cp: ControlPlane) -> None:
    after = encode(Message("cancel", {"run_id": "r2", "reason": "x"}))
    screen = _Screen(home, [(_header("assign", GiB, run_id="run-big", envelope={"payloadType": "x"}), GiB),
                            (after, 0)])
    tracemalloc.start()
    try:
        screen.run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"{peak} bytes held while refusing a 1 GiB payload"
    assert screen.stream.largest <= SKIP_CHUNK_BYTES
    assert screen.sent == [{"type": "error", "request": "assign", "run_id": "run-big",
                            "message": "bundle rejected: the envelope lacks payloadType, payload or signatures"}]
    assert screen.passed == [Message("cancel", {"run_id": "r2", "reason": "x"})]  # the session went on
    assert not (home / "runs").exists() or list((home / "runs").iterdir()) == []


def test_an_assign_announcing_more_than_the_workers_limit_ends_the_session_unread(
        home: Path, cp: ControlPlane) -> None:
    header = _header("assign", 2 * GiB, run_id="run-huge", envelope=cp.assignment("run-huge")["envelope"])
    screen = _Screen(home, [(header, 2 * GiB), (encode(Message("ack", {"run_id": "x"})), 0)])
    screen.run()
    assert screen.stream.consumed == len(header), "payload bytes were read"
    assert len(screen.sent) == 1 and screen.sent[0]["request"] == "assign"
    assert screen.sent[0]["run_id"] == "run-huge" and "the session ends" in screen.sent[0]["message"]
    assert screen.passed == []


def test_before_the_session_is_authenticated_even_a_signed_assign_is_refused_unread(
        home: Path, cp: ControlPlane) -> None:
    message = cp.assignment("run-early")
    screen = _Screen(home, [(encode(message)[:-len(message.payload)], len(message.payload))], authenticated=False)
    screen.run()
    assert screen.passed == [] and screen.stream.largest <= SKIP_CHUNK_BYTES
    assert screen.sent[0]["request"] == "assign" and "not authenticated" in screen.sent[0]["message"]
    assert not (home / "runs" / "run-early").exists()


@pytest.mark.parametrize(("announced", "limits", "reason"), [
    (lambda size: size + 1, bundle.Limits(), "archive bytes sent, the signed manifest says"),
    (lambda size: size - 1, bundle.Limits(), "archive bytes sent, the signed manifest says"),
    (lambda size: size, bundle.Limits(members=1, total_bytes=10), "over this Worker's limit"),
])
def test_a_signed_assign_whose_length_is_not_the_signed_one_or_over_the_limits_is_refused_before_reading(
        home: Path, cp: ControlPlane, announced: Any, limits: bundle.Limits, reason: str) -> None:
    built = cp.bundle("run-len", "echo hi", files={"tasks/t.md": b"x" * 4096})
    size = announced(len(built.archive))
    header = _header("assign", size, run_id="run-len", envelope=built.envelope)
    screen = _Screen(home, [(header, size)], limits=limits)
    screen.run()
    assert screen.passed == []
    assert screen.sent[0]["request"] == "assign" and reason in screen.sent[0]["message"]
    assert screen.stream.largest <= SKIP_CHUNK_BYTES  # skipped, never read whole


def test_a_verified_assign_passes_with_its_manifest_and_archive(home: Path, cp: ControlPlane) -> None:
    message = cp.assignment("run-good", "echo ok")
    screen = _Screen(home, [])
    screen.inbound._reader = Reader(io.BytesIO(encode(message)))  # real bytes this time
    screen.run()
    [passed] = screen.passed
    assert isinstance(passed, Assignment) and passed.run_id == "run-good" and passed.archive == message.payload
    assert screen.sent == []


def test_auth_passes_once_and_other_records_carry_no_payload(home: Path, cp: ControlPlane) -> None:
    screen = _Screen(home, [], authenticated=False)
    challenge = screen.inbound._challenge
    screen.inbound._reader = Reader(io.BytesIO(
        encode(cp.auth(Message("hello", {"challenge": challenge}))) + encode(Message("resume", {"run_id": "r",
                                                                                                "offset": 0}))))
    screen.run()
    assert isinstance(screen.passed[0], Authenticated) and screen.passed[1] == Message("resume", {"run_id": "r",
                                                                                                  "offset": 0})
    bad = _Screen(home, [(_header("resume", 10, run_id="r", offset=0), 10)])
    with pytest.raises(Exception, match="carries no payload"):
        bad.run()
    assert bad.stream.consumed == len(_header("resume", 10, run_id="r", offset=0))


def test_on_a_real_session_an_unsigned_assign_gets_an_error_and_the_next_run_still_runs(
        home: Path, cp: ControlPlane) -> None:
    session = Session(home)
    try:
        session.authenticate(cp)
        session.send("assign", b"\0" * 300_000, run_id="run-unsigned", envelope={"payloadType": "x"})
        error = session.next()
        assert (error.type, error["request"], error["run_id"]) == ("error", "assign", "run-unsigned")
        assert not (home / "runs" / "run-unsigned").exists()
        session.send_message(cp.assignment("run-next", "echo next"))
        messages = session.until("result", "run-next")
        assert output_of(messages, "run-next") == b"next\n"
        assert outcome(session, messages[-1])["status"] == "COMPLETED"
    finally:
        session.close()
