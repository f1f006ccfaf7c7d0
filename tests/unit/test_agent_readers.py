"""The Agents' stream readers (agents/stream.py, claude.py, codex.py, gemini.py, aider.py): pure.

The fixture streams under tests/fixtures/streams/ were captured from the
pinned CLIs (Claude Code 2.1.332, Codex 0.171.0, Gemini CLI 0.61.0, aider
0.86.2) against the scripted model API; the hand-written lines below cover
what the real tools cannot be made to emit.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from taskrunner.agents.aider import AiderReader
from taskrunner.agents.claude import ClaudeReader
from taskrunner.agents.codex import CodexReader
from taskrunner.agents.gemini import GeminiReader
from taskrunner.agents.stream import MAX_FINAL_MESSAGE_BYTES, UsageLimit, exceeded, reset_time

STREAMS = Path(__file__).resolve().parents[1] / "fixtures" / "streams"
UTC = timezone.utc
#: 2026-11-29 22:00:00 UTC, a Sunday.
NOW = datetime(2026, 11, 29, 22, 0, tzinfo=UTC).timestamp()
READERS = {"claude": ClaudeReader, "codex": CodexReader, "gemini": GeminiReader, "aider": AiderReader}


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


def read(reader: Any, lines: list[Any]) -> str:
    return "".join(reader.feed(line if isinstance(line, bytes) else json.dumps(line).encode()) for line in lines)


def fixture(name: str) -> list[bytes]:
    return [line.rstrip(b"\n") for line in (STREAMS / name).read_bytes().splitlines(keepends=True)]


def replay(name: str, **kwargs: Any) -> tuple[Any, str]:
    reader = READERS[name.split("-")[0]](now=lambda: NOW, **kwargs)
    return reader, read(reader, fixture(name))


def utc_reset(text: str) -> float | None:
    return reset_time(text, NOW, UTC)


# ---------------------------------------------------------------------------- the captured streams


def test_claude_write_stream_is_a_completed_run_with_its_report() -> None:
    reader, text = replay("claude-write.jsonl")
    assert "-> Write: " in text and "hello.txt" in text
    assert "Created hello.txt.\n" in text
    assert '{"type"' not in text
    report = reader.report()
    assert (report.provider, report.model, report.cli_version) == ("anthropic", "claude-opus-5-5", "2.1.332")
    assert report.session_id == "d981f643-08e9-45b7-a545-b9b046912b9a"
    assert (report.turns, report.cost_usd, report.cost_estimated) == (2, 0.0016, False)
    assert report.usage == {"input_tokens": 200, "output_tokens": 40, "cache_read_tokens": 0, "cache_write_tokens": 0}
    assert report.final_message == "Created hello.txt."
    assert reader.verdict(0).status == "COMPLETED"
    assert reader.verdict(1).status == "FAILED"


def test_claude_max_turns_stream_fails_naming_the_turn_limit() -> None:
    reader, text = replay("claude-max-turns.jsonl", budget={"max_turns": 2})
    assert text.count("-> Bash: echo again") == 2
    verdict = reader.verdict(1)
    assert verdict.status == "FAILED"
    assert "turn limit reached" in verdict.error and "max_turns 2" in verdict.error
    assert reader.report().turns == 3  # the result's num_turns wins over the streamed count
    assert reader.report().final_message is None


def test_claude_max_budget_stream_fails_naming_the_cost_limit() -> None:
    reader, _ = replay("claude-max-budget.jsonl")
    verdict = reader.verdict(1)
    assert verdict.status == "FAILED" and "cost limit reached" in verdict.error
    assert reader.report().cost_usd == 4


def test_claude_usage_limit_stream_pauses_until_the_reset_it_reports() -> None:
    reader, text = replay("claude-usage-limit.jsonl")
    limit = reader.limit()
    assert limit is not None and limit.resets_at == 1795993804
    assert "5-hour limit" in limit.message
    verdict = reader.verdict(1)
    assert verdict.status == "FAILED" and verdict.usage_limit == limit
    assert verdict.error.startswith("usage limit, resets at 2026-11-29T23:10:04Z — You've hit your 5-hour limit")
    assert reader.report().turns == 1


def test_claude_api_key_429_is_a_usage_limit_with_an_unknown_reset() -> None:
    reader, _ = replay("claude-rate-limit-apikey.jsonl")
    assert reader.limit() is not None and reader.limit().resets_at is None
    assert reader.verdict(1).error.startswith("usage limit, reset time unknown")


@pytest.mark.parametrize("name", ["claude-server-error.jsonl", "claude-cut.jsonl"])
def test_claude_api_errors_fail_with_the_tools_message(name: str) -> None:
    reader, text = replay(name)
    assert "[retry] attempt 1/1" in text
    verdict = reader.verdict(1)
    assert verdict.status == "FAILED" and "API Error" in verdict.error and reader.limit() is None
    # An API error arrives as subtype success with is_error true: never COMPLETED, even on exit 0.
    assert reader.verdict(0).status == "FAILED"


def test_claude_expensive_stream_reports_its_cost_and_passes_a_cost_budget() -> None:
    reader, _ = replay("claude-expensive.jsonl")
    assert exceeded(reader.report(), {"max_cost_usd": 5}) == "budget max_cost_usd exceeded: limit $5.00, reached $6.00"


def test_codex_write_stream_is_a_completed_run_with_an_estimated_cost() -> None:
    reader, text = replay("codex-write.jsonl", backend={"model": "gpt-5.5"},
                          prices={"input": 1.25, "output": 10, "cache_read": 0.125})
    assert text == ("Creating hello.txt.\n-> edit: add /tmp/cap-6nznh6e9/ws/hello.txt\n"
                    "Created hello.txt with the text hi.\n")
    report = reader.report()
    assert (report.provider, report.model, report.session_id) == ("openai", "gpt-5.5",
                                                                  "01a2295f-71c8-7233-b6ae-0e31303754c4")
    assert report.turns == 2
    assert report.usage == {"input_tokens": 2500, "output_tokens": 42, "cache_read_tokens": 0, "cache_write_tokens": 0}
    assert report.cost_estimated and report.cost_usd == pytest.approx(2500 * 1.25e-6 + 42 * 10e-6)
    assert report.final_message == "Created hello.txt with the text hi."
    assert reader.verdict(0).status == "COMPLETED"


def test_codex_shell_overrun_counts_one_turn_per_round_trip_and_passes_max_turns() -> None:
    reader, text = replay("codex-shell-overrun.jsonl")
    assert text.count("-> $ /bin/bash -lc 'echo again >> runs.txt'") == 4
    assert reader.report().turns == 4
    assert exceeded(reader.report(), {"max_turns": 3}) == "budget max_turns exceeded: limit 3, reached 4"
    verdict = reader.verdict(-9)
    assert verdict.status == "FAILED" and "ended without a result" in verdict.error and "signal 9" in verdict.error


@pytest.mark.parametrize(("name", "resets_at"), [
    ("codex-usage-limit.jsonl", at(2026, 12, 2, 9, 31)),  # the end of the minute the text names
    ("codex-usage-limit-today.jsonl", at(2026, 11, 29, 22, 25)),
    ("codex-usage-limit-unknown.jsonl", None),
])
def test_codex_usage_limits_are_recognised_with_their_reset_time(name: str, resets_at: float | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    import time
    time.tzset()
    try:
        reader, _ = replay(name)
        limit = reader.limit()
        assert limit is not None and limit.resets_at == resets_at
        assert "usage limit" in limit.message
        assert reader.verdict(1).usage_limit == limit
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("name", ["codex-rate-limit.jsonl", "codex-server-error.jsonl", "codex-cut.jsonl"])
def test_codex_failed_turns_fail_the_run_and_are_not_usage_limits(name: str) -> None:
    reader, text = replay(name)
    assert "[failed] " in text
    verdict = reader.verdict(1)
    assert verdict.status == "FAILED" and verdict.error.startswith("Codex turn failed: ")
    assert reader.limit() is None


@pytest.mark.parametrize("name", ["codex-retry-then-done.jsonl", "codex-unknown-model.jsonl", "codex-expensive.jsonl"])
def test_codex_non_fatal_errors_still_complete(name: str) -> None:
    reader, _ = replay(name)
    assert reader.verdict(0).status == "COMPLETED"


def test_gemini_write_stream_is_a_completed_run() -> None:
    reader, text = replay("gemini-write.jsonl", prices={"input": 1.25, "output": 10})
    assert text == "[init] Gemini CLI, model gemini-2.5-pro\n-> write_file: hello.txt\nCreated hello.txt.\n[result] success\n"
    report = reader.report()
    assert (report.provider, report.model, report.turns) == ("google", "gemini-2.5-pro", 2)
    assert report.final_message == "Created hello.txt."
    assert report.cost_estimated and report.cost_usd == pytest.approx(200 * 1.25e-6 + 40 * 10e-6)
    assert reader.verdict(0).status == "COMPLETED"


@pytest.mark.parametrize("name", ["gemini-usage-limit.jsonl", "gemini-rate-limit.jsonl"])
def test_gemini_quota_errors_are_usage_limits(name: str) -> None:
    reader, _ = replay(name)
    limit = reader.limit()
    assert limit is not None and limit.resets_at is None and limit.message.startswith("[API Error: ")
    verdict = reader.verdict(173)
    assert verdict.status == "FAILED" and verdict.error.startswith("usage limit, reset time unknown — [API Error")


def test_gemini_turn_limit_names_the_limit() -> None:
    reader, _ = replay("gemini-turn-limit.jsonl")
    verdict = reader.verdict(53)
    assert verdict.status == "FAILED" and verdict.error.startswith("turn limit reached")


@pytest.mark.parametrize(("name", "code", "words"), [
    ("gemini-server-error.jsonl", 244, "HTTP status mod 256"),
    ("gemini-cut.jsonl", 1, "[API Error: terminated]"),
])
def test_gemini_api_errors_fail_with_the_message(name: str, code: int, words: str) -> None:
    reader, text = replay(name)
    verdict = reader.verdict(code)
    assert verdict.status == "FAILED" and words in verdict.error and reader.limit() is None


def test_gemini_partial_text_is_flushed_before_the_result() -> None:
    _, text = replay("gemini-cut.jsonl")
    assert "I will now wri\n[result] error: [API Error: terminated]\n" in text


def test_aider_write_reports_model_tokens_and_cost_and_keeps_the_text() -> None:
    reader, text = replay("aider-write.txt")
    assert text == (STREAMS / "aider-write.txt").read_text()
    assert reader.keeps_events is False
    report = reader.report()
    assert (report.model, report.cli_version, report.turns, report.cost_usd) == ("openai/gpt-test", "0.86.2", 1, 0.0024)
    assert report.usage == {"input_tokens": 1000, "output_tokens": 50, "cache_read_tokens": 0, "cache_write_tokens": 0}
    assert reader.verdict(0).status == "COMPLETED"


@pytest.mark.parametrize(("name", "words"), [
    ("aider-auth-error.txt", "AuthenticationError"), ("aider-errors.txt", "AuthenticationError"),
    ("aider-server-error.txt", "InternalServerError"), ("aider-cut.txt", "AuthenticationError"),
])
def test_aider_exiting_0_after_a_failed_model_call_fails(name: str, words: str) -> None:
    reader, _ = replay(name)
    verdict = reader.verdict(0)
    assert verdict.status == "FAILED" and words in verdict.error and verdict.usage_limit is None


def test_aider_giving_up_on_a_rate_limit_is_a_usage_limit() -> None:
    reader, _ = replay("aider-rate-limit.txt")
    verdict = reader.verdict(0)
    assert verdict.status == "FAILED" and verdict.usage_limit is not None
    assert verdict.error.startswith("usage limit, reset time unknown — litellm.RateLimitError")


def test_aider_offline_write_without_cost_is_estimated() -> None:
    reader, _ = replay("aider-write-offline.txt", prices={"input": 2, "output": 8})
    report = reader.report()
    assert report.cost_estimated and report.cost_usd == pytest.approx(100 * 2e-6 + 20 * 8e-6)
    assert reader.verdict(0).status == "COMPLETED"


@pytest.mark.parametrize("name", sorted(p.name for p in STREAMS.glob("*") if p.suffix in (".jsonl", ".txt")))
def test_feed_is_deterministic_for_every_captured_stream(name: str) -> None:
    first, second = replay(name), replay(name)
    assert first[1] == second[1]
    assert first[0].report() == second[0].report()


# ---------------------------------------------------------------------------- claude, by event


def claude_assistant(ident: str, *blocks: dict[str, Any], model: str = "claude-x", usage: Any = None) -> dict:
    return {"type": "assistant", "session_id": "s1",
            "message": {"id": ident, "model": model, "content": list(blocks),
                        "usage": usage or {"input_tokens": 10, "output_tokens": 2}}}


def test_claude_renders_each_event_type_readably() -> None:
    reader = ClaudeReader(now=lambda: NOW)
    text = read(reader, [
        {"type": "system", "subtype": "init", "session_id": "s1", "model": "claude-x",
         "claude_code_version": "2.1.0", "tools": ["Bash", "Write"], "new_field": 1},
        claude_assistant("m1", {"type": "thinking", "thinking": "plan: write the file\nthen check"},
                         {"type": "text", "text": "I will write it."},
                         {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls -la\nwc"}}),
        {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1",
                                                  "content": "a\nb\nc\nd\ne"}]}},
        claude_assistant("m2", {"type": "tool_use", "id": "t2", "name": "Write", "input": {"file_path": "/w/x.py",
                                                                                          "content": "x"}}),
        {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t2", "is_error": True,
                                                  "content": [{"type": "text", "text": "denied"}]}]}},
        claude_assistant("m3", {"type": "tool_use", "id": "t3", "name": "TodoWrite", "input": {"todos": [1, 2]}},
                         {"type": "tool_use", "id": "t4", "name": "mcp__x__y", "input": {"q": "find"}}),
        {"type": "system", "subtype": "api_retry", "attempt": 2, "max_retries": 10, "retry_delay_ms": 1500,
         "error_status": 529, "error": "overloaded"},
        {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed_warning", "rateLimitType": "five_hour"}},
        {"type": "system", "subtype": "compact_boundary"},
        {"type": "stream_event", "event": {}},
        {"type": "result", "subtype": "success", "is_error": False, "num_turns": 3, "total_cost_usd": 0.25,
         "result": "All done.", "usage": {"input_tokens": 30, "output_tokens": 6, "cache_read_input_tokens": 100,
                                          "cache_creation_input_tokens": 50},
         "modelUsage": {"claude-haiku": {"costUSD": 0.01}, "claude-big": {"costUSD": 0.24}}},
    ])
    assert text == (
        "[init] Claude Code 2.1.0, model claude-x, 2 tools\n"
        "(thinking) plan: write the file then check\n"
        "I will write it.\n"
        "-> Bash: ls -la wc\n"
        "   a\n   b\n   c\n   ... (2 more lines)\n"
        "-> Write: /w/x.py\n"
        "   ! denied\n"
        "-> TodoWrite: 2 items\n"
        "-> mcp__x__y: find\n"
        "[retry] attempt 2/10 in 1.5 s: overloaded (status 529)\n"
        "[limit] warning: close to the five_hour limit\n"
        "[result] success · 3 turns · $0.2500\n"
    )
    report = reader.report()
    assert report.model == "claude-big"  # modelUsage names the model that did the work
    assert report.usage == {"input_tokens": 30, "output_tokens": 6, "cache_read_tokens": 100, "cache_write_tokens": 50}
    assert reader.verdict(0).status == "COMPLETED"


def test_claude_turns_count_distinct_message_ids_while_streaming() -> None:
    reader = ClaudeReader(prices={"input": 1, "output": 1})
    read(reader, [claude_assistant("m1", {"type": "text", "text": "a"}),
                  claude_assistant("m1", {"type": "tool_use", "name": "Bash", "input": {"command": "x"}}),
                  claude_assistant("m2", {"type": "text", "text": "b"})])
    report = reader.report()
    assert report.turns == 2
    # Before the result, usage and an estimated cost come from the messages (one usage per message id).
    assert report.usage["input_tokens"] == 20 and report.cost_estimated
    assert exceeded(report, {"max_turns": 1}) == "budget max_turns exceeded: limit 1, reached 2"


def test_claude_stream_without_a_result_is_a_crash() -> None:
    reader = ClaudeReader()
    read(reader, [claude_assistant("m1", {"type": "text", "text": "working"})])
    verdict = reader.verdict(0)
    assert verdict == type(verdict)("FAILED", "the Agent's stream ended without a result (crashed?); "
                                              "the Agent exited with code 0")


@pytest.mark.parametrize(("text", "resets_at"), [
    ("Claude AI usage limit reached|1796000000", 1796000000),
    ("Claude AI usage limit reached|1796000000000", 1796000000),
    ("5-hour limit reached ∙ resets 11pm", at(2026, 11, 29, 23, 1)),  # the end of the minute named
    ("You've hit your session limit · resets 3:30pm (Europe/Berlin)", at(2026, 11, 30, 14, 31)),
    ("Claude AI usage limit reached", None),
])
def test_claude_limit_texts_in_an_error_result_are_usage_limits(text: str, resets_at: float | None) -> None:
    reader = ClaudeReader(now=lambda: NOW)
    # Without a zone the tool's local time is meant: these tests run the reader's clock in UTC.
    if "Berlin" not in text and "resets" in text:
        text = text + " (UTC)"
    read(reader, [claude_assistant("x", {"type": "text", "text": text}, model="<synthetic>"),
                  {"type": "result", "subtype": "success", "is_error": True, "result": text}])
    assert reader.limit() == UsageLimit(resets_at, text)
    assert reader.verdict(1).usage_limit == reader.limit()


def test_claude_429_result_after_a_rejected_rate_limit_event_keeps_its_reset() -> None:
    reader = ClaudeReader()
    read(reader, [{"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1796000000}},
                  {"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
                   "result": "API Error: Request rejected (429)"}])
    assert reader.limit().resets_at == 1796000000


def test_claude_model_writing_limit_words_is_not_a_usage_limit() -> None:
    reader = ClaudeReader()
    read(reader, [claude_assistant("m1", {"type": "text", "text": "usage limit reached|1796000000 · resets 3pm"}),
                  {"type": "result", "subtype": "success", "is_error": False, "result": "limit · resets 3pm"}])
    assert reader.limit() is None and reader.verdict(0).status == "COMPLETED"


def test_claude_rejected_event_with_overage_allowed_is_not_a_limit() -> None:
    reader = ClaudeReader()
    read(reader, [{"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "overageStatus": "allowed"}}])
    assert reader.limit() is None


def test_claude_other_error_subtypes_fail_with_their_errors() -> None:
    reader = ClaudeReader()
    read(reader, [{"type": "result", "subtype": "error_during_execution", "is_error": True, "errors": ["boom"]}])
    assert reader.verdict(0) == type(reader.verdict(0))("FAILED", "Claude Code ended with error_during_execution: boom")


def test_claude_final_message_is_cut_to_16_kib() -> None:
    reader = ClaudeReader()
    read(reader, [{"type": "result", "subtype": "success", "is_error": False, "result": "é" * 20000}])
    message = reader.report().final_message
    assert len(message.encode()) <= MAX_FINAL_MESSAGE_BYTES and message == "é" * (MAX_FINAL_MESSAGE_BYTES // 2)


# ---------------------------------------------------------------------------- codex, by event


def test_codex_renders_every_item_type() -> None:
    reader = CodexReader()
    text = read(reader, [
        {"type": "thread.started", "thread_id": "th"},
        {"type": "turn.started"},
        {"type": "item.completed", "item": {"id": "0", "type": "reasoning", "text": "think\nmore"}},
        {"type": "item.started", "item": {"id": "1", "type": "command_execution", "command": "ls", "status": "in_progress"}},
        {"type": "item.updated", "item": {"id": "1", "type": "command_execution", "command": "ls"}},
        {"type": "item.completed", "item": {"id": "1", "type": "command_execution", "command": "ls",
                                            "aggregated_output": "a\nb", "exit_code": 2, "status": "failed"}},
        {"type": "item.completed", "item": {"id": "2", "type": "file_change", "status": "failed",
                                            "changes": [{"path": "x.py", "kind": "update"}]}},
        {"type": "item.completed", "item": {"id": "3", "type": "mcp_tool_call", "server": "srv", "tool": "t",
                                            "error": {"message": "no"}}},
        {"type": "item.completed", "item": {"id": "4", "type": "web_search", "query": "python zoneinfo"}},
        {"type": "item.completed", "item": {"id": "5", "type": "todo_list",
                                            "items": [{"text": "one", "completed": True}, {"text": "two"}]}},
        {"type": "item.completed", "item": {"id": "6", "type": "error", "message": "warning!"}},
        {"type": "item.completed", "item": {"id": "7", "type": "agent_message", "text": "Done."}},
        {"type": "item.completed", "item": {"id": "8", "type": "future_item"}},
        {"type": "turn.completed", "usage": {"input_tokens": 1000, "cached_input_tokens": 400, "output_tokens": 50}},
    ])
    assert text == (
        "(thinking) think more\n"
        "-> $ ls\n   a\n   b\n   exit 2\n"
        "-> edit: update x.py\n   ! edit failed\n"
        '-> srv.t\n   ! {"message": "no"}\n'
        "-> web search: python zoneinfo\n"
        "   [x] one\n   [ ] two\n"
        "[error] warning!\n"
        "Done.\n"
    )
    report = reader.report()
    assert report.session_id == "th" and report.final_message == "Done."
    assert report.usage == {"input_tokens": 600, "output_tokens": 50, "cache_read_tokens": 400, "cache_write_tokens": 0}
    assert reader.verdict(0).status == "COMPLETED"


def test_codex_older_field_names_are_accepted() -> None:
    reader = CodexReader()
    text = read(reader, [
        {"type": "item.completed", "item": {"id": "0", "item_type": "assistant_message", "text": "old style"}},
        {"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1}},
    ])
    assert text == "old style\n" and reader.report().final_message == "old style"
    assert reader.verdict(0).status == "COMPLETED"


def test_codex_msg_wrapped_events_of_old_versions_are_read() -> None:
    reader = CodexReader()
    text = read(reader, [
        {"model": "o3", "sandbox": "workspace-write"},
        {"id": "0", "msg": {"type": "session_configured", "session_id": "old-1", "model": "o3"}},
        {"id": "0", "msg": {"type": "task_started"}},
        {"id": "0", "msg": {"type": "agent_reasoning", "text": "hm"}},
        {"id": "0", "msg": {"type": "exec_command_begin", "command": ["bash", "-lc", "ls"]}},
        {"id": "0", "msg": {"type": "exec_command_end", "stdout": "f", "exit_code": 0}},
        {"id": "0", "msg": {"type": "patch_apply_begin", "changes": {"a.py": {}}}},
        {"id": "0", "msg": {"type": "agent_message", "message": "fixed"}},
        {"id": "0", "msg": {"type": "token_count", "input_tokens": 10, "output_tokens": 3}},
        {"id": "0", "msg": {"type": "task_complete", "last_agent_message": "fixed"}},
    ])
    assert text == "(thinking) hm\n-> $ bash -lc ls\n   f\n-> edit: a.py\nfixed\n"
    report = reader.report()
    assert (report.session_id, report.model, report.final_message) == ("old-1", "o3", "fixed")
    assert report.usage["output_tokens"] == 3 and report.turns == 3
    assert reader.verdict(0).status == "COMPLETED"


@pytest.mark.parametrize(("message", "resets_at"), [
    ("You've hit your usage limit. Upgrade to Plus to continue using Codex, or try again at 11:15 PM.",
     at(2026, 11, 29, 23, 16)),  # the end of the minute the text names
    ("You've hit your usage limit. Try again in 2 hours 5 minutes.", NOW + 2 * 3600 + 300),
    ("You've hit your usage limit ... try again in 3 days", NOW + 3 * 86400),
])
def test_codex_usage_limit_variants(message: str, resets_at: float) -> None:
    reader = CodexReader(now=lambda: NOW)
    read(reader, [{"type": "turn.failed", "error": {"message": message + " (UTC)" if " at " in message else message}}])
    assert reader.limit() is not None and reader.limit().resets_at == resets_at


# ---------------------------------------------------------------------------- gemini, by event


def test_gemini_renders_each_event_and_counts_responses() -> None:
    reader = GeminiReader()
    text = read(reader, [
        {"type": "init", "session_id": "g1", "model": "gemini-x"},
        {"type": "message", "role": "user", "content": "the prompt"},
        {"type": "message", "role": "assistant", "content": "Let me ", "delta": True},
        {"type": "message", "role": "assistant", "content": "look.\nFirst", "delta": True},
        {"type": "tool_use", "tool_name": "read_file", "tool_id": "1", "parameters": {"absolute_path": "/w/a"}},
        {"type": "tool_result", "tool_id": "1", "status": "error", "error": {"type": "x", "message": "missing"}},
        {"type": "tool_use", "tool_name": "run_shell_command", "tool_id": "2", "parameters": {"command": "ls"}},
        {"type": "tool_result", "tool_id": "2", "status": "success", "output": "a\nb"},
        {"type": "error", "severity": "warning", "message": "Loop detected"},
        {"type": "message", "role": "assistant", "content": "Done.", "delta": True},
        {"type": "result", "status": "success",
         "stats": {"input_tokens": 300, "output_tokens": 30, "cached": 100, "input": 200,
                   "models": {"gemini-x": {"total_tokens": 10}, "gemini-y": {"total_tokens": 320}}}},
    ])
    assert text == ("[init] Gemini CLI, model gemini-x\nLet me look.\nFirst\n-> read_file: /w/a\n   ! missing\n"
                    "-> run_shell_command: ls\n   a\n   b\n[warning] Loop detected\nDone.\n[result] success\n")
    report = reader.report()
    assert (report.session_id, report.model, report.turns, report.final_message) == ("g1", "gemini-y", 3, "Done.")
    assert report.usage == {"input_tokens": 200, "output_tokens": 30, "cache_read_tokens": 100, "cache_write_tokens": 0}


@pytest.mark.parametrize(("code", "words"), [(41, "authentication failed"), (42, "invalid input"),
                                              (44, "sandbox error"), (52, "configuration error"),
                                              (53, "turn limit reached"), (130, "cancelled")])
def test_gemini_documented_exit_codes_are_named(code: int, words: str) -> None:
    reader = GeminiReader()
    read(reader, [{"type": "init", "session_id": "g"}])
    verdict = reader.verdict(code)
    assert verdict.status == "FAILED" and words in verdict.error and f"code {code}" in verdict.error


def test_gemini_success_result_with_a_failing_exit_code_fails() -> None:
    reader = GeminiReader()
    read(reader, [{"type": "result", "status": "success"}])
    assert reader.verdict(1).status == "FAILED"


def test_gemini_quota_error_event_with_a_retry_delay_is_a_limit_with_a_reset() -> None:
    reader = GeminiReader(now=lambda: NOW)
    read(reader, [{"type": "error", "severity": "error",
                   "message": "RESOURCE_EXHAUSTED: Quota exceeded. Please retry in 37.5s."}])
    assert reader.limit().resets_at == NOW + 37.5


# ---------------------------------------------------------------------------- aider, by line


def test_aider_reads_abbreviated_token_counts_cache_and_session_cost() -> None:
    reader = AiderReader()
    read(reader, [b"Main model: anthropic/claude-x with diff edit format, infinite output",
                  b"Tokens: 4.3k sent, 2.1k cache write, 1.5k cache hit, 300 received. Cost: $0.01 message, $0.01 session.",
                  b"Tokens: 1.2M sent, 12 received. Cost: $3.20 message, $3.21 session."])
    report = reader.report()
    assert report.model == "anthropic/claude-x" and report.turns == 2 and report.cost_usd == 3.21
    assert report.usage == {"input_tokens": 700 + 1_200_000, "output_tokens": 312, "cache_read_tokens": 1500,
                            "cache_write_tokens": 2100}


def test_aider_error_followed_by_a_successful_retry_completes() -> None:
    reader = AiderReader()
    read(reader, [b"litellm.RateLimitError: RateLimitError: OpenAIException - slow down",
                  b"Retrying in 0.2 seconds...", b"Tokens: 10 sent, 2 received."])
    assert reader.verdict(0).status == "COMPLETED"


def test_claude_takes_the_exact_reset_time_from_the_api_errors_params_without_a_rate_limit_event() -> None:
    # Seen live: no rate_limit_event, the text gives the reset only to the minute ("resets 10:38pm (UTC)").
    reader = ClaudeReader(now=lambda: 1_795_990_000.0)
    lines = [json.dumps(e) for e in (
        {"type": "system", "subtype": "init", "session_id": "s", "model": "m"},
        {"type": "assistant", "session_id": "s", "error": "rate_limit", "api_error_status": 429,
         "api_error": "usage_limit_reached",
         "api_error_params": {"rate_limit_info": {"status": "rejected", "resetsAt": 1_795_993_135}},
         "message": {"model": "<synthetic>", "content": [
             {"type": "text", "text": "You've hit your 5-hour limit · resets 10:38pm (UTC)"}]}},
        {"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
         "result": "You've hit your 5-hour limit · resets 10:38pm (UTC)"},
    )]
    for line in lines:
        reader.feed(line.encode())
    limit = reader.limit()
    assert limit is not None and limit.resets_at == 1_795_993_135
    assert reader.verdict(1).usage_limit == limit


def test_claude_usage_is_the_sessions_total_when_the_result_gives_only_the_last_turn_or_zeros() -> None:
    # error_max_budget_usd: `usage` holds the last turn (or zeros), modelUsage the whole session.
    lines = (STREAMS / "claude-max-budget.jsonl").read_bytes().splitlines()
    reader = ClaudeReader()
    for line in lines:
        reader.feed(line)
    assert reader.report().usage["input_tokens"] == 800_000
    assert reader.report().usage["output_tokens"] == 40_000
    zeroed = json.loads(lines[-1])
    zeroed["usage"] = {"input_tokens": 0, "output_tokens": 0}
    zeroed["modelUsage"] = {}
    again = ClaudeReader()
    for line in [*lines[:-1], json.dumps(zeroed).encode()]:
        again.feed(line)
    assert again.report().usage["input_tokens"] > 0  # the running total of the turns, not zeros
