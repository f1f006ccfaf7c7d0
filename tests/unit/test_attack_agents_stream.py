"""Hostile Agent output against the stream readers, the Worker's stream pump and the result's checks.

An Agent's tool writes its stream, but so can anything the Agent runs: a
process it starts can write to the tool's stdout (`/proc/<pid>/fd/1`). Every
line here is one a misled Agent could print. Each test names the behaviour a
safe reader, pump or control plane has, and fails when it is missing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from taskrunner import agentwire
from taskrunner.agents.claude import ClaudeReader
from taskrunner.agents.stream import MAX_LINE_BYTES, UsageLimit
from taskrunner.pauses import MAX_PAUSE_SECONDS, MIN_PAUSE_SECONDS, pause_until
from taskrunner.textsafe import StreamCleaner
from taskrunner.worker import secrets as secret_values
from taskrunner.worker import streaming
from taskrunner.worker.streaming import Pump, limit_record

SECRET = "sk-test-5ecret-value-0123456789"
NOW = 1_790_000_000.0


def result(**over: Any) -> bytes:
    event: dict[str, Any] = {"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
                             "result": "done", "session_id": "s", "total_cost_usd": 0.01}
    event.update(over)
    return json.dumps(event).encode()


def assistant(*content: dict[str, Any], ident: str = "msg_1") -> bytes:
    return json.dumps({"type": "assistant", "session_id": "s",
                       "message": {"id": ident, "model": "m", "content": list(content)}}).encode()


def rate_limited(resets_at: str) -> bytes:
    return ('{"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": '
            + resets_at + "}}").encode()


def pump_over(tmp_path: Path, data: bytes, *, budget: dict[str, Any] | None = None,
              values: list[bytes] | None = None) -> Pump:
    (tmp_path / streaming.EVENTS_FILE).write_bytes(data)
    return Pump(tmp_path, ClaudeReader(now=lambda: NOW), budget, values or [])


def drain(pump: Pump, deadline_seconds: float = 120.0) -> list[str]:
    """Step the pump until it has read the whole file; the reasons to stop it gave."""
    reasons = []
    pump.ending()
    deadline = time.monotonic() + deadline_seconds
    while not pump.caught_up():
        assert time.monotonic() < deadline, "the pump did not read the stream in time"
        reason = pump.step()
        if reason is not None:
            reasons.append(reason)
    return reasons


# ---------------------------------------------------------------- forged and repeated results


def test_a_success_result_printed_after_an_error_result_does_not_make_the_run_completed() -> None:
    reader = ClaudeReader()
    reader.feed(result(subtype="error_during_execution", is_error=True, result="the API failed"))
    reader.feed(result())  # forged by something the Agent ran
    assert reader.verdict(0).status == "FAILED"


def test_a_second_result_cannot_hide_the_cost_the_first_one_reported_from_the_budget(tmp_path: Path) -> None:
    pump = pump_over(tmp_path, result(total_cost_usd=0.62) + b"\n" + result(total_cost_usd=0.0) + b"\n",
                     budget={"max_turns": None, "max_cost_usd": 0.5})
    reasons = drain(pump)
    assert reasons == ["budget max_cost_usd exceeded: limit $0.50, reached $0.62"]


def test_output_after_the_result_is_logged_and_the_verdict_stands(tmp_path: Path) -> None:
    pump = pump_over(tmp_path, result() + b"\nstill printing after the result\n")
    drain(pump)
    ended = pump.outcome(0)
    assert ended.status == "COMPLETED"
    assert b"still printing after the result" in (tmp_path / "output.log").read_bytes()


# ---------------------------------------------------------------- usage limits with hostile reset times


HOSTILE_RESETS = ["1e999", "-1e999", "NaN", "-1e20", "1e300", "253402300799", "-1", "0"]


@pytest.mark.parametrize("resets_at", HOSTILE_RESETS)
def test_a_hostile_reset_time_never_raises_and_the_pause_is_bounded(resets_at: str) -> None:
    reader = ClaudeReader(now=lambda: NOW)
    assert reader.feed(rate_limited(resets_at)).startswith("[limit]")
    limit = reader.limit()
    assert isinstance(limit, UsageLimit)
    assert limit.error().startswith("usage limit, ")
    verdict = reader.verdict(1)
    assert verdict.status == "FAILED" and verdict.usage_limit is not None
    record = limit_record(limit)
    assert record is not None
    until = pause_until(record["resets_at"], NOW)
    assert NOW + MIN_PAUSE_SECONDS <= until <= NOW + MAX_PAUSE_SECONDS


@pytest.mark.parametrize("resets_at", ["1e999", "NaN", "1e300", "-1e20"])
def test_a_run_stopped_on_a_limit_with_a_hostile_reset_time_still_ends_as_a_usage_limit(
        tmp_path: Path, resets_at: str) -> None:
    pump = pump_over(tmp_path, rate_limited(resets_at) + b"\n")
    reasons = drain(pump)
    assert len(reasons) == 1 and reasons[0].startswith("usage limit, "), reasons
    ended = pump.outcome(None)
    assert ended.status == "FAILED" and ended.usage_limit is not None, ended
    assert (ended.error or "").startswith("usage limit, ")


def test_a_reset_time_in_seconds_far_ahead_is_not_read_as_one_long_past() -> None:
    # 9999-12-31T23:59:59Z in seconds: read as milliseconds it is 1978, and the Agent is paused a minute.
    reader = ClaudeReader(now=lambda: NOW)
    reader.feed(rate_limited("253402300799"))
    limit = reader.limit()
    assert limit is not None and limit.resets_at is not None and limit.resets_at > NOW


# ---------------------------------------------------------------- escapes and control characters


ESC_NAME = "Ba\x1b]52;c;ZXZpbA==\x07sh\x1b[2J"


def test_escape_sequences_in_tool_names_and_text_are_inert_when_the_log_is_shown() -> None:
    reader = ClaudeReader()
    text = reader.feed(assistant({"type": "tool_use", "id": "t", "name": ESC_NAME,
                                  "input": {"command": "ls\x1b[31m\rX\x9b2J"}},
                                 {"type": "text", "text": "hi\x1b]8;;http://evil\x07\u202e\x00"}))
    text += reader.feed(b"raw \x1b[2J line \x00 \xff")
    shown = StreamCleaner().feed(text.encode(), final=True)
    for bad in ("\x1b", "\x07", "\x9b", "\u202e", "\x00", "\r"):
        assert bad not in shown, repr(bad)


def test_an_error_with_escape_sequences_does_not_reach_the_summary_raw() -> None:
    from taskrunner.gitflow import summary
    from taskrunner.state import RunState, RunStatus

    reader = ClaudeReader()
    reader.feed(result(is_error=True, result="bad \x1b[2J\x1b]0;owned\x07 thing\rX", final="x"))
    error = reader.verdict(0).error or ""
    run = RunState(run_id="r1", task_id="t", number=1, revision="0" * 40, attempt=1, worker="w", agent="claude",
                   status=RunStatus.FAILED)
    run.error = error
    run.final_message = "final \x1b[2J message\x07"
    page = summary.render(run, "Title \x1b[2J", b"", None, [])
    assert "\x1b" not in page and "\x07" not in page and "\r" not in page


# ---------------------------------------------------------------- secrets


def test_a_non_ascii_secret_escaped_by_the_tool_is_masked_in_the_events_shipped(tmp_path: Path) -> None:
    # A tool that writes ASCII-only JSON prints "é" as \u00e9. (An Agent that encodes a secret on purpose,
    # every character escaped or base64, is not caught by masking: it holds the secrets its Agent names;
    # README "Threat model".)
    secret = "clé-secrète-0123"
    line = ('{"type": "assistant", "session_id": "s", "message": {"id": "m", "model": "m", "content": '
            '[{"type": "text", "text": "the key is ' + json.dumps(secret)[1:-1] + '"}]}}\n').encode()
    values = [secret.encode()]
    pump = pump_over(tmp_path, line, values=values)
    drain(pump)
    shipped = streaming.shipped_bytes(tmp_path, streaming.shipped(tmp_path, values), values)
    decoded = json.dumps([json.loads(row) for row in shipped.splitlines()], ensure_ascii=False)
    assert secret not in decoded, "the events shipped hold the secret, JSON-escaped"


def test_a_secret_with_a_quote_printed_by_the_tool_is_masked_in_the_events_shipped(tmp_path: Path) -> None:
    secret = 'pa"ss\\word-0123'
    line = assistant({"type": "text", "text": f"the password is {secret}"}) + b"\n"  # the tool escapes " and \
    values = [secret.encode()]
    pump = pump_over(tmp_path, line, values=values)
    drain(pump)
    shipped = streaming.shipped_bytes(tmp_path, streaming.shipped(tmp_path, values), values)
    assert secret not in json.loads(shipped)["message"]["content"][0]["text"]


def test_a_json_escaped_secret_is_masked_in_the_output_sent(tmp_path: Path) -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in SECRET)
    line = ('{"type": "assistant", "message": {"id": "m", "content": [{"type": "text", "text": "k='
            + escaped + '"}]}}\n').encode()
    values = [SECRET.encode()]
    drain(pump_over(tmp_path, line, values=values))
    log = tmp_path / "output.log"
    with open(log, "rb") as handle:
        sent = secret_values.masked_range(handle, 0, log.stat().st_size, log.stat().st_size, values)
    assert SECRET.encode() not in sent and b"k=" + b"*" * len(SECRET) in sent


# ---------------------------------------------------------------- sizes, encodings, nesting, numbers


def test_a_50_mb_line_without_a_newline_is_cut_and_never_held_whole(tmp_path: Path) -> None:
    pump = pump_over(tmp_path, b"y" * (50 * 1024 * 1024))
    drain(pump)
    assert len(pump.cutter._partial) <= MAX_LINE_BYTES
    ended = pump.outcome(0)
    assert ended.status == "FAILED"
    assert (tmp_path / "output.log").stat().st_size <= MAX_LINE_BYTES + 1


def test_a_million_tiny_lines_are_read_in_bounded_steps(tmp_path: Path) -> None:
    pump = pump_over(tmp_path, b"x\n" * 1_000_000)
    started = time.monotonic()
    steps = 0
    pump.ending()
    while not pump.caught_up():
        pump.step()
        steps += 1
        assert time.monotonic() - started < 120
    assert (tmp_path / "output.log").read_bytes() == b"x\n" * 1_000_000
    assert steps >= 1


@pytest.mark.parametrize("line", [
    b"\xff\xfe\xfd not utf-8", b"nul \x00 inside", b'{"type": "assistant", "message": {"content": "\x00\xff"}}',
    b'{"a":' * 200_000, b"[" * 500_000, ('{"type":"assistant","message":{"id":"m","content":[{"type":"tool_use",'
                                         '"name":"X","input":' + "[" * 950 + "]" * 950 + "}]}}").encode(),
    (b'{"type":"result","subtype":"success","is_error":false,"num_turns":1e999,"total_cost_usd":1e999,'
     b'"usage":{"input_tokens":1e999,"output_tokens":-5,"cache_read_input_tokens":NaN},"modelUsage":{"m":1e999}}'),
    (b'{"type":"result","subtype":"success","is_error":false,"num_turns":"5","total_cost_usd":"0.1",'
     b'"usage":{"input_tokens":{"deep":[1]}},"result":{"not":"text"},"modelUsage":[1,2]}'),
])
def test_a_hostile_line_never_raises_and_the_report_stays_json(line: bytes) -> None:
    reader = ClaudeReader()
    assert isinstance(reader.feed(line), str)
    record = reader.report().as_record()
    json.dumps(record, allow_nan=False)
    for key in ("turns", "cost_usd"):
        assert record[key] is None or (isinstance(record[key], (int, float)) and math.isfinite(record[key]))
    assert reader.verdict(0).status in ("COMPLETED", "FAILED")


# ---------------------------------------------------------------- the control plane's checks of a result


def test_a_result_report_with_hostile_types_is_checked_field_by_field() -> None:
    report = agentwire.run_report({
        "provider": {"x": 1}, "model": "m\x1b[2J" + "x" * 10_000, "cli_version": 5, "session_id": ["s"],
        "turns": "5", "cost_usd": "0.10", "cost_estimated": "yes",
        "usage": {"input_tokens": {"nested": 1}, "output_tokens": 1e999, "x\x1b": 3, "ok": 7},
        "final_message": "é" * (10 * 1024 * 1024)})
    assert report is not None
    assert report.provider is None and report.cli_version is None and report.session_id is None
    assert report.model is not None and "\x1b" not in report.model and len(report.model) <= 200
    assert report.turns is None and report.cost_usd is None and report.cost_estimated is False
    assert report.usage == {"ok": 7}
    assert report.final_message is not None and len(report.final_message.encode()) <= 16 * 1024
    for value in ("a string", 5, None, [1]):
        assert agentwire.run_report(value) is None


@pytest.mark.parametrize("events", [
    {"size": 10 ** 9, "sha256": "0" * 64}, {"size": -1, "sha256": "0" * 64}, {"size": True, "sha256": "0" * 64},
    {"size": 3, "sha256": "Z" * 64}, {"size": 3.0, "sha256": "0" * 64}, "garbage", [3],
])
def test_an_events_description_that_lies_keeps_the_whole_payload_as_the_pack(events: Any) -> None:
    pack, data, notice = agentwire.split_payload(b"PACKDATA", events)
    assert (pack, data) == (b"PACKDATA", None) and notice is not None


def test_events_bytes_that_do_not_match_their_digest_are_not_recorded() -> None:
    pack, data, notice = agentwire.split_payload(b"PACKevents", {"size": 6, "sha256": "0" * 64})
    assert pack == b"PACK" and data is None and notice is not None and "digest" in notice


@pytest.mark.parametrize("value", [
    {"resets_at": "tomorrow", "message": 5}, {"resets_at": float("nan"), "message": "x"},
    {"resets_at": float("inf"), "message": "x"}, {"resets_at": -5, "message": "x"}, {"resets_at": True},
])
def test_a_hostile_usage_limit_in_a_result_pauses_for_a_bounded_time(value: dict[str, Any]) -> None:
    limit = agentwire.usage_limit(value)
    assert limit is not None and isinstance(limit["message"], str)
    until = pause_until(limit["resets_at"], NOW)
    assert NOW + MIN_PAUSE_SECONDS <= until <= NOW + MAX_PAUSE_SECONDS
