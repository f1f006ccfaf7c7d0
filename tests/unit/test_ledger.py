"""The replay ledger: no bundle is taken twice, across restarts and concurrent sessions."""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskrunner.defaults import CLOCK_SKEW_SECONDS
from taskrunner.errors import WorkerError
from taskrunner.worker.ledger import LEDGER_FILE, Replayed, ReplayLedger

NOW = 1_700_000_000.0
LATER = NOW + 600


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    path = tmp_path / "worker-home"
    path.mkdir()
    return path


def lines(home: Path) -> list[dict[str, Any]]:
    path = home / LEDGER_FILE
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def refused(ledger: ReplayLedger, nonce: str, run_id: str, seq: int, reason: str,
            expires_at: float = LATER) -> None:
    before = ledger.path.read_bytes()
    with pytest.raises(Replayed, match=re.escape(reason)):
        ledger.admit(nonce, run_id, seq, expires_at)
    assert ledger.path.read_bytes() == before, "a refused bundle was recorded"


# ---------------------------------------------------------------- one session


def test_an_admitted_bundle_is_on_disk_before_admit_returns(home: Path) -> None:
    ReplayLedger(home).admit("n1", "r1", 5, LATER)
    assert lines(home) == [{"nonce": "n1", "run_id": "r1", "seq": 5, "expires_at": LATER}]


def test_fresh_bundles_with_rising_sequence_numbers_are_all_admitted(home: Path) -> None:
    ledger = ReplayLedger(home)
    for seq in (1, 2, 10, 11):
        ledger.admit(f"n{seq}", f"r{seq}", seq, LATER)
    assert ledger.max_seq == 11
    assert [line["seq"] for line in lines(home)] == [1, 2, 10, 11]


def test_a_replayed_nonce_is_refused(home: Path) -> None:
    ledger = ReplayLedger(home)
    ledger.admit("n1", "r1", 1, LATER)
    refused(ledger, "n1", "r2", 2, "bundle rejected: replayed nonce")


def test_a_replayed_run_id_is_refused(home: Path) -> None:
    ledger = ReplayLedger(home)
    ledger.admit("n1", "r1", 1, LATER)
    refused(ledger, "n2", "r1", 2, "bundle rejected: replayed run id")


@pytest.mark.parametrize("seq", [0, 4, 5])
def test_a_sequence_number_not_above_the_highest_taken_is_refused(home: Path, seq: int) -> None:
    ledger = ReplayLedger(home)
    ledger.admit("n1", "r1", 5, LATER)
    refused(ledger, "n2", "r2", seq, f"bundle rejected: sequence number {seq} is not above 5, the highest "
                                     "this Worker has taken")


def test_replayed_is_a_worker_error() -> None:
    assert issubclass(Replayed, WorkerError)


# ---------------------------------------------------------------- restarts and sessions


def test_a_replay_after_a_worker_restart_is_refused(home: Path) -> None:
    ReplayLedger(home).admit("n1", "r1", 7, LATER)
    restarted = ReplayLedger(home)
    refused(restarted, "n1", "r2", 8, "bundle rejected: replayed nonce")
    refused(restarted, "n2", "r1", 8, "bundle rejected: replayed run id")
    refused(restarted, "n2", "r2", 7, "sequence number 7 is not above 7")
    restarted.admit("n2", "r2", 8, LATER)


def test_a_second_session_on_the_same_home_sees_what_the_first_admitted(home: Path) -> None:
    first, second = ReplayLedger(home), ReplayLedger(home)
    first.admit("n1", "r1", 1, LATER)
    refused(second, "n1", "r9", 9, "bundle rejected: replayed nonce")
    second.admit("n2", "r2", 2, LATER)
    # ...and the first sees what the second admitted after it.
    refused(first, "n2", "r9", 9, "bundle rejected: replayed nonce")
    refused(first, "n9", "r2", 9, "bundle rejected: replayed run id")
    refused(first, "n9", "r9", 2, "sequence number 2 is not above 2")
    first.admit("n3", "r3", 3, LATER)
    assert [line["nonce"] for line in lines(home)] == ["n1", "n2", "n3"]


def test_a_line_a_crash_cut_short_is_skipped_and_the_next_entry_still_lands_whole(home: Path) -> None:
    ReplayLedger(home).admit("n1", "r1", 1, LATER)
    with open(home / LEDGER_FILE, "ab") as handle:
        handle.write(b'{"nonce": "n2", "run_id": "r2", "se')  # the crash
    restarted = ReplayLedger(home)
    restarted.admit("n2", "r2", 2, LATER)  # its bundle never started: it may come again
    refused(ReplayLedger(home), "n2", "r9", 9, "bundle rejected: replayed nonce")
    refused(ReplayLedger(home), "n1", "r9", 9, "bundle rejected: replayed nonce")
    assert ReplayLedger(home).path.read_text().endswith("\n")


def test_a_session_notices_a_line_another_one_was_still_writing(home: Path) -> None:
    first = ReplayLedger(home)
    first.admit("n1", "r1", 1, LATER)
    with open(home / LEDGER_FILE, "ab") as handle:
        handle.write(b'{"nonce": "n2", "run_id": "r2", ')
        handle.flush()
        first.admit("n3", "r3", 3, LATER)  # sees a torn tail: starts its own line
    refused(ReplayLedger(home), "n3", "r9", 9, "bundle rejected: replayed nonce")


# ---------------------------------------------------------------- pruning


def test_prune_drops_expired_entries_keeps_live_ones_and_the_highest_sequence_number(home: Path) -> None:
    ledger = ReplayLedger(home)
    ledger.admit("old", "r-old", 1, NOW - 1000)
    ledger.admit("edge", "r-edge", 2, NOW - CLOCK_SKEW_SECONDS)  # still takeable at NOW: kept
    ledger.admit("live", "r-live", 3, NOW + 100)
    ledger.admit("newest-expired", "r-newest", 4, NOW - 2000)
    assert ledger.prune(NOW) == 2
    assert lines(home)[0] == {"max_seq": 4}
    assert {line.get("nonce") for line in lines(home)[1:]} == {"edge", "live"}
    assert os.stat(home / LEDGER_FILE).st_mode & 0o777 == 0o600
    for session in (ledger, ReplayLedger(home)):  # the pruning session and a restarted one agree
        refused(session, "live", "r9", 9, "bundle rejected: replayed nonce")
        refused(session, "edge", "r9", 9, "bundle rejected: replayed nonce")
        refused(session, "n9", "r-live", 9, "bundle rejected: replayed run id")
        refused(session, "n9", "r9", 4, "sequence number 4 is not above 4")
    # The dropped ones are forgotten (their bundles are refused as expired anyway).
    ReplayLedger(home).admit("old", "r-old", 5, NOW + 100)


def test_prune_with_nothing_expired_leaves_the_file_alone(home: Path) -> None:
    ledger = ReplayLedger(home)
    ledger.admit("n1", "r1", 1, LATER)
    inode, content = os.stat(ledger.path).st_ino, ledger.path.read_bytes()
    assert ledger.prune(NOW) == 0
    assert (os.stat(ledger.path).st_ino, ledger.path.read_bytes()) == (inode, content)


def test_prune_on_a_fresh_home_is_harmless(tmp_path: Path) -> None:
    ledger = ReplayLedger(tmp_path / "new-home")
    assert ledger.prune(NOW) == 0
    ledger.admit("n1", "r1", 1, LATER)


def test_pruning_twice_keeps_the_highest_sequence_number(home: Path) -> None:
    ledger = ReplayLedger(home)
    ledger.admit("n1", "r1", 10, NOW - 1000)
    ledger.prune(NOW)
    ledger.admit("n2", "r2", 11, NOW - 500)
    ledger.admit("n3", "r3", 12, NOW + 100)
    assert ledger.prune(NOW) == 1
    assert lines(home)[0] == {"max_seq": 12}
    refused(ReplayLedger(home), "n4", "r4", 12, "sequence number 12 is not above 12")


def test_another_session_reads_a_pruned_ledger_whole(home: Path) -> None:
    first, second = ReplayLedger(home), ReplayLedger(home)
    first.admit("n1", "r1", 1, NOW - 1000)
    first.admit("n2", "r2", 2, NOW + 100)
    refused(second, "n2", "r9", 9, "replayed nonce")  # second has read the old file
    assert first.prune(NOW) == 1
    refused(second, "n2", "r9", 9, "replayed nonce")
    refused(second, "n9", "r9", 2, "sequence number 2 is not above 2")
    second.admit("n1", "r1", 3, NOW + 100)  # dropped by the prune, so taken again
    refused(first, "n1", "r9", 9, "replayed nonce")


def _racing(monkeypatch: pytest.MonkeyPatch, once: Callable[[], object]) -> None:
    """Run `once` (another session's work) while the next lock is being waited for."""
    real = fcntl.flock
    state = {"fired": False}

    def flock(fd: Any, operation: int) -> None:
        if not state["fired"]:
            state["fired"] = True
            once()
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_an_admission_waiting_while_another_session_prunes_is_not_lost(home: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pruner, admitter = ReplayLedger(home), ReplayLedger(home)
    pruner.admit("old", "r-old", 1, NOW - 1000)
    # The admitter has opened the ledger file and waits for its lock while the pruner replaces it.
    _racing(monkeypatch, lambda: pruner.prune(NOW))
    admitter.admit("n2", "r2", 2, LATER)
    monkeypatch.undo()
    refused(ReplayLedger(home), "n2", "r9", 9, "bundle rejected: replayed nonce")
    refused(pruner, "n2", "r9", 9, "bundle rejected: replayed nonce")


def test_two_prunes_racing_keep_every_live_entry(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = ReplayLedger(home), ReplayLedger(home)
    first.admit("old", "r-old", 1, NOW - 1000)
    first.admit("older", "r-older", 2, NOW - 2000)
    first.admit("live", "r-live", 3, LATER)
    _racing(monkeypatch, lambda: first.prune(NOW))
    second.prune(NOW)
    monkeypatch.undo()
    second.admit("n4", "r4", 4, LATER)
    restarted = ReplayLedger(home)
    refused(restarted, "live", "r9", 9, "bundle rejected: replayed nonce")
    refused(restarted, "n4", "r9", 9, "bundle rejected: replayed nonce")
    refused(restarted, "n9", "r9", 4, "sequence number 4 is not above 4")


# ---------------------------------------------------------------- property


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from("uvwxyz"), st.integers(0, 12),
                          st.booleans()), max_size=25))
def test_whatever_the_order_each_nonce_and_run_id_is_taken_at_most_once(
        attempts: list[tuple[str, str, int, bool]]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        sessions = [ReplayLedger(home), ReplayLedger(home)]
        taken: list[tuple[str, str, int]] = []
        for nonce, run_id, seq, use_second in attempts:
            try:
                sessions[use_second].admit(nonce, run_id, seq, LATER)
            except Replayed:
                continue
            taken.append((nonce, run_id, seq))
        assert len({t[0] for t in taken}) == len(taken)
        assert len({t[1] for t in taken}) == len(taken)
        assert [t[2] for t in taken] == sorted({t[2] for t in taken})
        assert [(line["nonce"], line["run_id"], line["seq"]) for line in lines(home)] == taken
