"""Records to a Worker from a broken or hostile control plane (property tests): garbage bytes and
records of every type with hostile fields, before and after the session is authenticated. The
Worker (WorkerServer over pipes, as `taskrun-worker serve` runs) answers with records or closes the
session; its serve loop never raises and never hangs, and what it writes is always well-formed."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskrunner.errors import ProtocolError
from taskrunner.protocol import FROM_WORKER_LIMITS, Message, Reader, Writer, encode
from taskrunner.worker.serve import WorkerServer
from tests.signed import ControlPlane, enroll
from tests.unit.test_property_values import budget, nasty_text, nasty_values, swap_types

DEADLINE = 10.0
TO_WORKER = ("auth", "assign", "trust", "resume", "cancel", "ack")


class _Session:
    """A WorkerServer on pipes; the test is the control plane. `ended` holds what serve() raised, if anything."""

    def __init__(self, home: Path) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        self._server_in, self._server_out = open(to_r, "rb", buffering=0), open(from_w, "wb", buffering=0)
        self._to_worker, self._from_worker = open(to_w, "wb", buffering=0), open(from_r, "rb", buffering=0)
        self.server = WorkerServer(home, "w1", Reader(self._server_in), Writer(self._server_out), slots=1,
                                   agent_probe=lambda: {})
        self.received: queue.Queue[Message | None] = queue.Queue()
        self.raised: list[BaseException] = []
        self.garbled: list[str] = []
        self._serve = threading.Thread(target=self._run, name="serve", daemon=True)
        self._listen = threading.Thread(target=self._listen_loop, name="listen", daemon=True)
        self._serve.start()
        self._listen.start()

    def _run(self) -> None:
        try:
            self.server.serve()
        except BaseException as exc:  # noqa: BLE001 - what the test is looking for
            self.raised.append(exc)

    def _listen_loop(self) -> None:
        reader = Reader(self._from_worker, FROM_WORKER_LIMITS)
        try:
            while (message := reader.read()) is not None:
                self.received.put(message)
        except (ProtocolError, OSError, ValueError) as exc:
            self.garbled.append(str(exc))
        finally:
            self.received.put(None)

    def next(self) -> Message | None:
        """The next record that is not a heartbeat; None when the Worker closed the session."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                message = self.received.get(timeout=0.05)
            except queue.Empty:
                continue
            if message is None or message.type != "heartbeat":
                return message
        raise AssertionError("no record from the Worker within the deadline")

    def write(self, data: bytes) -> bool:
        """False when the Worker has closed its end (it ended the session)."""
        try:
            self._to_worker.write(data)
            return True
        except (BrokenPipeError, ValueError):
            return False

    def finish(self) -> None:
        """EOF to the Worker; serve() must return within the deadline, having raised nothing."""
        try:
            self._to_worker.close()
        except BrokenPipeError:
            pass
        self._serve.join(DEADLINE)
        assert not self._serve.is_alive(), "serve() did not return after EOF on its input"
        self._server_out.close()
        self._listen.join(DEADLINE)
        self._from_worker.close()
        self._server_in.close()
        assert not self.raised, f"serve() raised {self.raised[0]!r}"
        assert not self.garbled, f"the Worker wrote a malformed record: {self.garbled[0]}"


@pytest.fixture(scope="module")
def worker_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ControlPlane]:
    base = tmp_path_factory.mktemp("worker")
    home = base / "home"
    return home, enroll(home, base / "cp")


@st.composite
def control_records(draw: st.DrawFn) -> bytes:
    """What a control plane might send: records of every type with hostile fields, cut, garbage."""
    # Mostly whole records: one bad byte ends the session, and the records after it go untested.
    kind = draw(st.sampled_from(["record"] * 6 + ["garbage", "cut", "payload", "deep"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=60))
    if kind == "deep":
        return b"[" * draw(st.integers(min_value=900, max_value=3000)) + b"\n"
    record_type = draw(st.sampled_from(TO_WORKER + ("resume", "cancel", "ack", "hello", "output", "nonsense")))
    fields: dict[str, Any] = {"run_id": draw(st.one_of(st.just("r1"), swap_types("r1"), nasty_text)),
                              "offset": draw(st.one_of(st.just(0), swap_types(0))),
                              "envelope": draw(st.one_of(st.just({"signatures": []}), nasty_values(4))),
                              "request": draw(nasty_values(4))}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        del fields[name]
    header = json.dumps({"type": record_type, **fields}, separators=(",", ":")).encode()
    if kind == "cut":
        return header[:draw(st.integers(min_value=0, max_value=len(header)))]
    if kind == "payload":
        size = draw(st.sampled_from([1, 10, 2 ** 40, -1]))
        return header[:-1] + f',"len":{size}}}\n'.encode() + draw(st.binary(max_size=10))
    return header + b"\n"


def _encodable(message: Message) -> bytes | None:
    try:
        return encode(message)
    except ValueError:
        return None


@given(st.lists(control_records(), min_size=1, max_size=6))
@budget(40, deadline_ms=30_000)
def test_garbage_before_auth_is_refused_and_the_worker_never_crashes(
        worker_home: tuple[Path, ControlPlane], parts: list[bytes]) -> None:
    home, _cp = worker_home
    session = _Session(home)
    hello = session.next()
    assert hello is not None and hello.type == "hello"
    for part in parts:
        if not session.write(part):
            break
    session.finish()


@given(st.lists(control_records(), min_size=1, max_size=6))
@budget(40, deadline_ms=30_000)
def test_garbage_after_auth_is_answered_or_ends_the_session_and_the_worker_never_crashes(
        worker_home: tuple[Path, ControlPlane], parts: list[bytes]) -> None:
    home, cp = worker_home
    session = _Session(home)
    hello = session.next()
    assert hello is not None
    session.write(encode(cp.auth(hello)))
    ready = session.next()
    assert ready is not None and ready.type == "ready", ready
    for part in parts:
        if not session.write(part):
            break
    session.finish()


@pytest.mark.parametrize("fields", [
    {"run_id": ["r1"], "offset": 0},          # an unhashable run id
    {"run_id": {"a": 1}, "offset": 0},
    {"run_id": None, "offset": 0},
], ids=["list", "mapping", "null"])
@pytest.mark.parametrize("record_type", ["resume", "cancel", "ack"])
def test_a_record_naming_no_run_id_the_worker_can_look_up_is_answered_with_an_error(
        worker_home: tuple[Path, ControlPlane], record_type: str, fields: dict[str, Any]) -> None:
    home, cp = worker_home
    session = _Session(home)
    hello = session.next()
    assert hello is not None
    session.write(encode(cp.auth(hello)))
    assert (ready := session.next()) is not None and ready.type == "ready"
    session.write(encode(Message(record_type, fields)))
    session.write(encode(Message("cancel", {"run_id": "r-probe", "reason": "x"})))
    answers = []
    while (answer := session.next()) is not None:
        answers.append(answer)
        if answer.get("run_id") == "r-probe":
            break
    # The Worker is still serving: it answered the record after the hostile one.
    assert answers and answers[-1].get("run_id") == "r-probe", answers
    session.finish()
