"""What every Agent stream reader shares (agents/stream.py): bad input never wins, reset times, budgets, cost."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from taskrunner.agents.aider import AiderReader
from taskrunner.agents.claude import ClaudeReader
from taskrunner.agents.codex import CodexReader
from taskrunner.agents.gemini import GeminiReader
from taskrunner.agents.stream import Report, UsageLimit, estimate_cost, exceeded, reset_time

UTC = timezone.utc
#: 2026-11-29 22:00:00 UTC, a Sunday.
NOW = datetime(2026, 11, 29, 22, 0, tzinfo=UTC).timestamp()
READERS = {"claude": ClaudeReader, "codex": CodexReader, "gemini": GeminiReader, "aider": AiderReader}


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


def utc_reset(text: str) -> float | None:
    return reset_time(text, NOW, UTC)


# ---------------------------------------------------------------------------- every reader: bad input


@pytest.mark.parametrize("preset", sorted(READERS))
@pytest.mark.parametrize("line", [
    b'{"type": "assistant", "message": {"content": [{"type": "text", "text": "cut in the mid',
    b"not json at all",
    b"\xff\xfe\x00garbage\x80",
    b'{"type": ["list"], "item": 5, "message": "x", "msg": 3}',
    b'{"type": "result", "usage": "lots", "num_turns": "3", "stats": [], "modelUsage": 7, "errors": 5}',
    b'{"type": "item.completed", "item": {"type": "command_execution", "command": null, "exit_code": "x"}}',
    b"[1, 2, 3]",
    b'"just a string"',
    b'{"type": "system", "subtype": "init", "tools": 5, "model": 7}',
    b'{"type": "tool_use", "parameters": null, "tool_name": {"x": 1}}',
    b"{" * 100_000,
])
def test_any_line_is_read_without_raising(preset: str, line: bytes) -> None:
    reader = READERS[preset]()
    text = reader.feed(line)
    assert isinstance(text, str) and (text == "" or text.endswith("\n"))
    assert reader.verdict(0).status in ("COMPLETED", "FAILED")
    assert isinstance(reader.report().as_record(), dict)


@pytest.mark.parametrize("preset", ["claude", "codex", "gemini"])
def test_malformed_lines_are_kept_verbatim(preset: str) -> None:
    reader = READERS[preset]()
    assert reader.feed(b'{"type": "result", "subtype": "succ') == '{"type": "result", "subtype": "succ\n'
    assert reader.feed(b"Warning: 256-color support not detected") == "Warning: 256-color support not detected\n"
    assert reader.feed(b"") == ""


@pytest.mark.parametrize("preset", sorted(READERS))
def test_a_huge_line_is_read(preset: str) -> None:
    reader = READERS[preset]()
    big = json.dumps({"type": "assistant", "message": {"id": "m", "content": [{"type": "text", "text": "x" * 2_000_000}]},
                      "item": {"type": "agent_message", "text": "y"}}).encode()
    assert isinstance(reader.feed(big[: 1024 * 1024]), str)


@pytest.mark.parametrize("preset", sorted(READERS))
def test_unknown_events_render_nothing_and_are_counted(preset: str) -> None:
    reader = READERS[preset]()
    if preset == "aider":
        return
    assert reader.feed(b'{"type": "brand_new_event", "x": 1}') == ""
    assert reader.ignored == 1


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(READERS)), st.lists(st.binary(max_size=300), max_size=12))
def test_feed_never_raises_on_arbitrary_bytes(preset: str, lines: list[bytes]) -> None:
    reader = READERS[preset]()
    for line in lines:
        text = reader.feed(line)
        assert isinstance(text, str)
    assert reader.verdict(None).status in ("COMPLETED", "FAILED")
    reader.report()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=20)
event_types = st.sampled_from(["system", "assistant", "user", "result", "rate_limit_event", "thread.started",
                               "turn.completed", "turn.failed", "item.started", "item.completed", "error", "init",
                               "message", "tool_use", "tool_result"])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(READERS)),
       st.lists(st.fixed_dictionaries({"type": event_types}, optional={
           "subtype": st.sampled_from(["init", "api_retry", "success", "error_max_turns"]) | json_values,
           "message": json_values, "item": json_values, "result": json_values, "usage": json_values,
           "rate_limit_info": json_values, "stats": json_values, "error": json_values, "msg": json_values,
           "is_error": json_values, "num_turns": json_values, "total_cost_usd": json_values,
           "content": json_values, "parameters": json_values, "modelUsage": json_values}), max_size=8))
def test_feed_never_raises_on_arbitrary_events(preset: str, events: list[dict[str, Any]]) -> None:
    reader = READERS[preset]()
    for event in events:
        assert isinstance(reader.feed(json.dumps(event).encode()), str)
    verdict = reader.verdict(0)
    assert verdict.status in ("COMPLETED", "FAILED")
    json.dumps(reader.report().as_record())


# ---------------------------------------------------------------------------- stream.py helpers


MINUTE = 60


@pytest.mark.parametrize(("text", "expected"), [
    ("usage limit reached|1764450000", 1764450000),
    ("resets at 2026-11-30T01:00:00Z", at(2026, 11, 30, 1, 0)),
    ("reset 2026-11-30T03:00:00+02:00", at(2026, 11, 30, 1, 0)),
    ("limit · resets 3pm (UTC)", at(2026, 11, 30, 15, 0) + MINUTE),
    ("limit · resets 11:30pm", at(2026, 11, 29, 23, 30) + MINUTE),
    ("resets 3:30pm (Europe/Berlin)", at(2026, 11, 30, 14, 30) + MINUTE),
    ("try again at 2:15 PM", at(2026, 11, 30, 14, 15) + MINUTE),
    ("try again at 22:45", at(2026, 11, 29, 22, 45) + MINUTE),
    ("try again at Dec 4th, 2026 10:03 PM.", at(2026, 12, 4, 22, 3) + MINUTE),
    ("resets Jan 2 at 9am", at(2027, 1, 2, 9, 0) + MINUTE),
    ("try again in 2 hours 5 minutes", NOW + 7500),
    ("Please retry in 37.5s", NOW + 37.5),
    ("retry in 250ms", NOW + 0.25),
    ("try again later", None),
    ("resets 3 (nothing)", None),
    ("resets 13pm", None),
    ("", None),
])
def test_reset_time_forms(text: str, expected: float | None) -> None:
    # A clock time in text is given to the minute: the reset is the end of that minute.
    assert utc_reset(text) == expected


def test_a_clock_time_within_the_current_minute_is_todays_not_tomorrows() -> None:
    # Seen live: "resets 10:38pm (UTC)" printed at 22:38:20 for a reset at 22:38:55.
    now = at(2026, 11, 29, 22, 38) + 20
    assert reset_time("limit · resets 10:38pm (UTC)", now) == at(2026, 11, 29, 22, 39)


def test_reset_time_without_a_zone_is_the_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert reset_time("resets 9am", NOW) == at(2026, 11, 30, 0, 0) + MINUTE  # 09:00 JST = 00:00 UTC
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(("report", "budget", "expected"), [
    (Report(turns=4), {"max_turns": 3}, "budget max_turns exceeded: limit 3, reached 4"),
    (Report(turns=3), {"max_turns": 3}, None),
    (Report(cost_usd=0.62), {"max_cost_usd": 0.5}, "budget max_cost_usd exceeded: limit $0.50, reached $0.62"),
    (Report(cost_usd=0.503), {"max_cost_usd": 0.5}, "budget max_cost_usd exceeded: limit $0.500, reached $0.503"),
    (Report(cost_usd=0.5), {"max_cost_usd": 0.5}, None),
    (Report(turns=9, cost_usd=9.0), {"max_turns": None, "max_cost_usd": None}, None),
    (Report(turns=None, cost_usd=None), {"max_turns": 1, "max_cost_usd": 0.1}, None),
    (Report(turns=2), None, None),
])
def test_exceeded_names_the_budget_its_limit_and_the_figure(report: Report, budget: Any, expected: str | None) -> None:
    assert exceeded(report, budget) == expected


def test_estimate_cost_uses_the_price_table_per_million_tokens() -> None:
    usage = {"input_tokens": 1_000_000, "output_tokens": 100_000, "cache_read_tokens": 2_000_000,
             "cache_write_tokens": 0}
    assert estimate_cost(usage, {"input": 3, "output": 15, "cache_read": 0.3, "cache_write": 3.75}) == 3 + 1.5 + 0.6
    assert estimate_cost(usage, {"input": 3, "output": 15}) == 3 + 1.5 + 6  # cache reads at the input price
    assert estimate_cost(usage, None) is None
    assert estimate_cost(None, {"input": 1, "output": 1}) is None
    assert estimate_cost(usage, {"output": 1}) is None


def test_usage_limit_error_texts() -> None:
    assert UsageLimit(at(2026, 11, 29, 23), "").error() == "usage limit, resets at 2026-11-29T23:00:00Z"
    assert UsageLimit(None, "quota gone").error() == "usage limit, reset time unknown — quota gone"
    assert UsageLimit(None, "x" * 300).error() == "usage limit, reset time unknown"
