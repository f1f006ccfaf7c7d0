"""Usage-limit pauses: when they end, where they hold, and that they survive a restart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from taskrunner import pauses
from taskrunner.pauses import (
    DEFAULT_PAUSE_SECONDS,
    MAX_PAUSE_SECONDS,
    MIN_PAUSE_SECONDS,
    Pause,
    Pauses,
)

NOW = 1_800_000_000.0


def test_a_pause_ends_at_the_reported_reset_time() -> None:
    assert pauses.pause_until(NOW + 3600, NOW) == NOW + 3600


@pytest.mark.parametrize("resets_at", [None, "soon", True, float("nan"), {}])
def test_a_limit_without_a_usable_reset_time_pauses_for_the_default(resets_at: object) -> None:
    assert pauses.pause_until(resets_at, NOW) == NOW + DEFAULT_PAUSE_SECONDS == NOW + 900


def test_a_reset_time_in_the_past_still_pauses_briefly_and_one_far_away_is_capped() -> None:
    assert pauses.pause_until(NOW - 50, NOW) == NOW + MIN_PAUSE_SECONDS
    assert pauses.pause_until(NOW + 10 * 365 * 86400, NOW) == NOW + MAX_PAUSE_SECONDS


def test_a_reset_time_ahead_is_kept_however_near() -> None:
    assert pauses.pause_until(NOW + 5, NOW) == NOW + 5


def test_the_waiting_reason_names_the_agent_and_the_end_in_utc() -> None:
    until = 1_795_993_200.0  # 2026-11-29T23:00:00Z
    assert pauses.reason("claude", until) == "Agent 'claude' paused: usage limit until 2026-11-29T23:00:00Z"
    assert pauses.reason("claude", until, "build-1") == \
        "Agent 'claude' paused on Worker 'build-1': usage limit until 2026-11-29T23:00:00Z"


def test_pauses_in_force_by_place_and_their_end() -> None:
    table = Pauses([Pause("claude", None, NOW + 60, NOW), Pause("codex", "w1", NOW + 30, NOW)])
    assert table.everywhere(NOW) == {"claude": NOW + 60}
    assert table.on_worker("w1", NOW) == {"codex": NOW + 30} and table.on_worker("w2", NOW) == {}
    assert table.next_end(NOW) == NOW + 30
    # At the end the pause is over: nothing holds, and pruning forgets it.
    assert table.on_worker("w1", NOW + 30) == {}
    assert table.prune(NOW + 30) and len(table) == 1
    assert not table.prune(NOW + 30)


def test_a_later_pause_of_the_same_agent_and_place_wins_and_an_earlier_one_does_not_shorten_it() -> None:
    table = Pauses()
    table.add(Pause("claude", None, NOW + 100, NOW))
    kept = table.add(Pause("claude", None, NOW + 50, NOW))
    assert kept.until == NOW + 100
    table.add(Pause("claude", None, NOW + 200, NOW))
    assert table.everywhere(NOW) == {"claude": NOW + 200}


def test_pauses_are_saved_in_the_state_dir_and_loaded_by_a_new_daemon(tmp_path: Path) -> None:
    table = Pauses([Pause("claude", None, NOW + 60, NOW, "limit reached"), Pause("aider", "w", NOW + 5, NOW)])
    pauses.save(tmp_path, table)
    assert os.stat(tmp_path / "pauses.json").st_mode & 0o777 == 0o600
    again = pauses.load(tmp_path)
    assert [p.record() for p in again] == [p.record() for p in table]


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"pauses": 3}', b"\xff"])
def test_a_damaged_pauses_file_is_read_as_no_pauses(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "pauses.json").write_bytes(content)
    assert len(pauses.load(tmp_path)) == 0


def test_malformed_entries_are_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    good = {"agent": "claude", "worker": None, "until": NOW + 1, "since": NOW, "message": "m" * 1000}
    bad = [{"agent": 3}, {"agent": "x", "until": "later", "since": NOW}, "text",
           {"agent": "y", "worker": 5, "until": NOW, "since": NOW}, {"agent": "z", "until": True, "since": NOW}]
    (tmp_path / "pauses.json").write_text(json.dumps({"version": 1, "pauses": [*bad, good]}))
    loaded = list(pauses.load(tmp_path))
    assert [p.agent for p in loaded] == ["claude"]
    assert len(loaded[0].message) == pauses.MAX_MESSAGE_CHARS


def test_a_link_in_place_of_the_pauses_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"pauses": [{"agent": "a", "worker": None, "until": NOW, "since": NOW}]}))
    (tmp_path / "pauses.json").symlink_to(target)
    assert len(pauses.load(tmp_path)) == 0
