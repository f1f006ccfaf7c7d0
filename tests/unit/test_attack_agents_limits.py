"""Hostile values at the ends of the calendar and of the number line, in readers, pauses and Worker records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskrunner import pauses
from taskrunner.agents.codex import CodexReader
from taskrunner.agents.stream import LATEST_EPOCH, MAX_COUNT, count, reset_time
from taskrunner.agents.workspace import TaskDirError, task_dir_rel
from taskrunner.fleet import ready_presets

NOW = 1_796_000_000.0


@pytest.mark.parametrize("date", ["Dec 31st, 9999 11:59 PM", "Dec 31st, 9999 11:59 PM (UTC)"])
def test_a_usage_limit_dated_at_the_calendars_end_is_still_a_usage_limit(date: str) -> None:
    reader = CodexReader(now=lambda: NOW)
    reader.feed(json.dumps({"type": "turn.failed", "error": {
        "message": f"You've hit your usage limit. Upgrade to Pro, or try again at {date}."}}).encode())
    limit = reader.limit()
    assert limit is not None and limit.resets_at == LATEST_EPOCH
    assert reader.verdict(1).usage_limit == limit


def test_an_iso_time_at_the_calendars_start_is_no_reset_time() -> None:
    assert reset_time("usage limit resets 0001-01-01T00:00:00", NOW) is None


def test_a_token_count_too_large_for_a_float_is_capped_and_the_report_is_made() -> None:
    assert count(10 ** 400) == MAX_COUNT
    reader = CodexReader(prices={"input": 1.0, "output": 1.0}, now=lambda: NOW)
    reader.feed(json.dumps({"type": "turn.completed", "usage": {"input_tokens": 10 ** 400, "output_tokens": 1}})
                .encode())
    report = reader.report()
    assert report.usage is not None and report.usage["input_tokens"] == MAX_COUNT
    assert report.cost_usd is not None and report.cost_usd > 0


@pytest.mark.parametrize("content", ['{"pauses": [{"agent": "a", "until": 1' + "0" * 4000 + ', "since": 1}]}',
                                     '{"pauses": [{"agent": "a", "until": Infinity, "since": 1}]}',
                                     '{"pauses": [{"agent": "a", "until": NaN, "since": 1}]}',
                                     '{"pauses": [{"agent": "a", "until": 1e300, "since": 1796000000}]}'])
def test_a_damaged_pauses_file_loads_as_no_pauses_and_breaks_nothing(tmp_path: Path, content: str) -> None:
    (tmp_path / pauses.FILE_NAME).write_text(content)
    loaded = pauses.load(tmp_path)
    assert loaded.records() == pauses.Pauses().records()


def test_malformed_ready_entries_are_dropped() -> None:
    assert ready_presets({"codex": "str", "gemini": None, "claude": {"version": "1.0", "path": "/c"}}) == \
        {"claude": {"version": "1.0", "path": "/c"}}


@pytest.mark.parametrize("task_id", ["a\n@/etc/passwd", "x\u202ey", "tab\there", "p" * 300])
def test_the_worker_refuses_a_task_id_no_control_plane_sends(task_id: str) -> None:
    with pytest.raises(TaskDirError, match="cannot name a directory"):
        task_dir_rel(task_id, 1)
