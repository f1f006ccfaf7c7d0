"""Sessions are authenticated both ways (DESIGN.md §5.9): the proof itself, and what a session that
has not given it can do on a real WorkerServer (nothing: no Run listed, streamed, cancelled or acked)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from taskrunner.defaults import CLOCK_SKEW_SECONDS
from taskrunner.protocol import Message
from taskrunner.sessionauth import AuthRefused, auth_envelope, new_challenge, verify_auth
from taskrunner.signing import BUNDLE_TYPE, TRUST_TYPE, SigningKey, sign
from taskrunner.worker import serve as serve_module
from taskrunner.worker.rundir import RunDir
from taskrunner.worker.trust import worker_key
from tests.signed import ControlPlane, enroll
from tests.unit.test_worker_serve import Session, go_flag, group_gone, outcome, output_of, poll_until
from tests.unit.test_worker_serve import reap_orphans_here  # noqa: F401 (autouse: the killed Agents are reaped here)

NOW = 1_700_000_000.0
CONTROL = SigningKey.generate()
STRANGER = SigningKey.generate()  # the SSH key's holder signs with a key of its own
WORKER = SigningKey.generate()  # the Worker's result key: the proof's audience
TRUSTED = {CONTROL.key_id: CONTROL.public}


def _proof(challenge: str, audience: str = WORKER.key_id, signer: SigningKey = CONTROL,
           issued_at: float = NOW) -> dict[str, Any]:
    return auth_envelope([signer], challenge, audience, issued_at)


# ---------------------------------------------------------------- the proof


def test_a_proof_by_a_trusted_key_over_this_sessions_challenge_is_accepted() -> None:
    challenge = new_challenge()
    assert verify_auth(_proof(challenge), challenge, WORKER.key_id, TRUSTED, {}, NOW + 1) == CONTROL.key_id


def test_a_proof_signed_by_every_live_key_is_accepted_by_a_worker_that_knows_only_one() -> None:
    successor = SigningKey.generate()
    challenge = new_challenge()
    envelope = auth_envelope([successor, CONTROL], challenge, WORKER.key_id, NOW)
    assert verify_auth(envelope, challenge, WORKER.key_id, TRUSTED, {}, NOW) == CONTROL.key_id


def test_challenges_are_fresh_random_hex() -> None:
    challenges = {new_challenge() for _ in range(100)}
    assert len(challenges) == 100
    assert all(len(c) == 32 and int(c, 16) >= 0 for c in challenges)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda c: _proof(new_challenge()), "answers another session's challenge"),
    (lambda c: _proof(c, audience=STRANGER.key_id), f"addressed to '{STRANGER.key_id}'"),
    (lambda c: _proof(c, signer=STRANGER), f"signed by unknown key id {STRANGER.key_id}"),
    (lambda c: _proof(c, issued_at=NOW - CLOCK_SKEW_SECONDS - 60), "stale"),
    (lambda c: _proof(c, issued_at=NOW + CLOCK_SKEW_SECONDS + 60), "issued in the future"),
    (lambda c: sign(TRUST_TYPE, json.dumps({"format": 1, "challenge": c, "audience": WORKER.key_id,
                                             "issued_at": NOW}).encode(), [CONTROL]), "payload type"),
    (lambda c: sign(BUNDLE_TYPE, b"{}", [CONTROL]), "payload type"),
    (lambda c: {"payloadType": "x"}, "lacks payloadType, payload or signatures"),
    (lambda c: None, "not a signed envelope"),
])
def test_a_proof_that_is_not_this_sessions_from_a_trusted_key_is_refused(
        make: Callable[[str], Any], reason: str) -> None:
    challenge = new_challenge()
    with pytest.raises(AuthRefused, match=re.escape(reason)) as caught:
        verify_auth(make(challenge), challenge, WORKER.key_id, TRUSTED, {}, NOW)
    assert str(caught.value).startswith("session refused: ")


def test_a_proof_by_a_retired_key_is_refused_saying_so() -> None:
    challenge = new_challenge()
    with pytest.raises(AuthRefused, match="was retired"):
        verify_auth(_proof(challenge), challenge, WORKER.key_id, {}, {CONTROL.key_id: f"key {CONTROL.key_id} was retired"},
                    NOW)


def test_a_worker_that_trusts_no_key_refuses_every_proof() -> None:
    challenge = new_challenge()
    with pytest.raises(AuthRefused, match="trusts no control plane key yet"):
        verify_auth(_proof(challenge), challenge, WORKER.key_id, {}, {}, NOW)


# ---------------------------------------------------------------- a session without the proof


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "worker-home"


@pytest.fixture()
def cp(home: Path, tmp_path: Path) -> ControlPlane:
    return enroll(home, tmp_path / "cp")


@pytest.fixture()
def sessions(home: Path) -> Iterator[Callable[[], Session]]:
    opened: list[Session] = []

    def open_session() -> Session:
        opened.append(Session(home))
        return opened[-1]

    yield open_session
    for session in opened:
        session.close()
    # Nothing a test started may outlive it: the Agents (each its own process group) are killed and reaped.
    for session in opened:
        for pid in session.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for session in opened:
        for run in session.server._runs.values():
            if run.proc is not None:
                run.proc.kill()
                run.proc.wait(timeout=15)
        for pid in session.pids:
            poll_until(lambda: group_gone(pid), f"process group {pid} to end")


def _daemons_run(session: Session, cp: ControlPlane) -> str:
    """The daemon's session runs a Run that goes on until the test creates `go_flag` in its workspace
    (or kills it at the end); returns its run id."""
    session.authenticate(cp)
    session.send_message(cp.assignment("run-real", "echo started\nwhile [ ! -e go ]; do sleep 0.02; done\n"
                                                   "echo finished"))
    session.until("started", "run-real")
    return "run-real"


def test_a_second_session_without_the_proof_lists_streams_cancels_and_acks_nothing(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path) -> None:
    daemon = sessions()
    run_id = _daemons_run(daemon, cp)

    attacker = sessions()
    hello = attacker.next()
    assert hello.type == "hello" and "runs" not in hello.fields
    for kind, fields in (("resume", {"run_id": run_id, "offset": 0}), ("cancel", {"run_id": run_id, "reason": "mine"}),
                         ("ack", {"run_id": run_id}), ("trust", {"request": cp.trust_request()}),
                         ("assign", {"run_id": "run-mine", "envelope": cp.assignment("run-mine")["envelope"]})):
        attacker.send(kind, **fields)
        error = attacker.next()
        assert error.type == "error" and error["request"] == kind, error
        assert "not authenticated" in error["message"]
    # A proof made for the daemon's own session does not open this one.
    attacker.send_message(cp.auth(Message("hello", {"challenge": new_challenge()})))
    error = attacker.next()
    assert (error["request"], error["message"]) == ("auth", "session refused: the proof answers another session's "
                                                            "challenge")
    attacker.close_input()
    assert [m.type for m in attacker.history if m.type != "heartbeat"] == ["hello"] + ["error"] * 6
    assert not (home / "runs" / "run-mine").exists()

    go_flag(home, run_id).touch()  # it ran all along: a cancel or ack taken above would show in its result
    messages = daemon.until("result", run_id)
    result = outcome(daemon, messages[-1])
    assert result["status"] == "COMPLETED", result
    assert output_of(messages, run_id, 0).endswith(b"finished\n")


def test_a_proof_signed_by_another_key_ends_the_session_before_anything_is_listed(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, tmp_path: Path) -> None:
    daemon = sessions()
    _daemons_run(daemon, cp)
    attacker = sessions()
    hello = attacker.next()
    forged = auth_envelope([STRANGER], hello["challenge"], worker_key(home).key_id, time.time())
    attacker.send("auth", envelope=forged)
    error = attacker.next()
    assert error["request"] == "auth" and f"signed by unknown key id {STRANGER.key_id}" in error["message"]
    poll_until(lambda: not attacker.serving, "the refused session to end")
    assert "ready" not in [m.type for m in attacker.history]


def test_a_session_that_never_authenticates_is_closed(
        sessions: Callable[[], Session], cp: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_module, "AUTH_TIMEOUT_SECONDS", 0.3)
    session = sessions()
    assert session.next().type == "hello"
    error = session.next(timeout=10)
    assert error["request"] == "auth" and "not authenticated within" in error["message"]
    poll_until(lambda: not session.serving, "the session to end")


def test_an_authenticated_session_lists_its_runs_only_in_ready(
        sessions: Callable[[], Session], cp: ControlPlane, tmp_path: Path) -> None:
    first = sessions()
    run_id = _daemons_run(first, cp)
    first.close_input()

    second = sessions()
    hello = second.next()
    assert "runs" not in hello.fields
    second.send_message(cp.auth(hello))
    ready = second.next()
    assert ready.type == "ready" and [r["run_id"] for r in ready["runs"]] == [run_id]


def test_a_session_that_never_authenticates_adopts_checks_stops_and_judges_no_run(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_module, "AUTH_TIMEOUT_SECONDS", 1.0)
    # A Run the daemon's session is still starting (its archive being extracted: no pid yet) ...
    starting = RunDir.at(home, "run-starting")
    starting.path.mkdir(parents=True)
    lock = os.open(starting.path / "starting", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # rundir.py's starting lock, as the starting session holds it
    starting.write_assignment({"run_id": "run-starting", "assigned_at": time.time(), "deadline": None})
    # ... and one past its deadline whose Agent still runs.
    overdue = RunDir.at(home, "run-overdue")
    overdue.path.mkdir()
    overdue.write_assignment({"run_id": "run-overdue", "assigned_at": time.time() - 60, "deadline": time.time() - 1,
                              "timeout": 59})
    agent = subprocess.Popen(["sleep", "60"], start_new_session=True)
    overdue.write_pid(agent.pid)
    try:
        stranger = sessions()
        assert stranger.next().type == "hello"
        error = stranger.next(timeout=10)
        assert error["request"] == "auth" and "not authenticated within" in error["message"]
        poll_until(lambda: not stranger.serving, "the session to end")
        for run in (starting, overdue):
            assert run.result() is None and run.stop() is None, run.run_id
        assert agent.poll() is None, "an unauthenticated session stopped a Run"
    finally:
        os.close(lock)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
