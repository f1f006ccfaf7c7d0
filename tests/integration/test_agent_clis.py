"""The real Claude Code and Gemini CLIs against the scripted model API (no taskrun yet).

Only the model is stood in (tests/modelapi): the CLIs really write files, run
commands, count turns, retry and report errors the way they do for users. Each
scenario is the one whose stream is kept in tests/fixtures/streams/<name>.jsonl
(tests/modelapi/clis.py recaptures them); the live run must still produce the
captured shape, so the fixtures the readers are tested on stay true to the CLIs.

The CLIs missing is a failure that says how to install them, never a skip.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.modelapi import Fail, ModelAPI, Say, Tool
from tests.modelapi.clis import FIXTURES, HELLO, CliRun, run_scenario

pytestmark = [pytest.mark.agentcli, pytest.mark.slow]


def shape(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """The (type, subtype) sequence of a stream; an assistant message adds its block types."""
    out: list[tuple[str, str | None]] = []
    for event in events:
        kind = event.get("type")
        if kind == "assistant":
            blocks = ",".join(b.get("type", "?") for b in event["message"].get("content", []))
            out.append((kind, blocks))
        elif kind == "message":
            out.append((kind, event.get("role")))
        else:
            out.append((kind, event.get("subtype") or event.get("status")))
    return out


def captured(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture
def api() -> Any:
    with ModelAPI() as server:
        yield server
        assert server.errors == []
        assert server.unmatched == [], [(r.method, r.path) for r in server.unmatched]


def scenario(name: str, api: ModelAPI, tmp_path: Path) -> tuple[CliRun, list[dict[str, Any]]]:
    """Run scenario `name`; its stdout must be JSON lines with the captured fixture's shape."""
    run = run_scenario(name, api, tmp_path, timeout=45)
    events = run.events()
    assert shape(events) == shape(captured(name)), run.stdout + run.stderr
    return run, events


def only(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e.get("type") == kind]
    assert len(found) == 1, found
    return found[0]


# -- the scripted API itself ---------------------------------------------------------------------

def test_modelapi_side_requests_consume_no_step_and_the_last_step_repeats(api: ModelAPI) -> None:
    import urllib.request

    api.script(Tool("shell", {"command": "ls"}), Say("one"))

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(api.url + path, json.dumps(body).encode(),
                                         {"content-type": "application/json",
                                          "anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())

    main = {"model": "m", "messages": [], "tools": [{"name": "Bash"}], "max_tokens": 10}
    side = {"model": "m", "messages": [], "max_tokens": 1}
    assert post("/v1/messages/count_tokens", side) == {"input_tokens": 100}
    assert post("/v1/messages", side)["content"][0]["text"] == "ok"
    assert post("/v1/messages", main)["content"][0]["name"] == "Bash"
    assert post("/v1/messages", main)["content"][0]["text"] == "one"
    assert post("/v1/messages", main)["content"][0]["text"] == "one"
    assert len(api.main_requests) == 3
    assert [r.side for r in api.requests] == [True, True, False, False, False]


def test_modelapi_fail_is_an_http_error_with_its_headers(api: ModelAPI) -> None:
    import urllib.error
    import urllib.request

    api.script(Fail(429, {"error": {"type": "rate_limit_error"}}, {"retry-after": "7"}))
    body = json.dumps({"model": "m", "messages": [], "tools": [{"name": "Bash"}]}).encode()
    request = urllib.request.Request(api.url + "/v1/messages", body,
                                     {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=10)
    assert failed.value.code == 429
    assert failed.value.headers["retry-after"] == "7"
    assert json.loads(failed.value.read()) == {"error": {"type": "rate_limit_error"}}
    failed.value.close()


# -- Claude Code ---------------------------------------------------------------------------------

def test_claude_writes_the_file_and_reports_a_successful_result(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("claude-write", api, tmp_path)
    assert run.returncode == 0, run.stderr
    assert (run.workspace / "hello.txt").read_text() == HELLO
    init = events[0]
    assert (init["type"], init["subtype"]) == ("system", "init")
    assert init["claude_code_version"] == "2.1.332" and init["session_id"]
    tool_use = events[1]["message"]["content"][0]
    assert (tool_use["name"], tool_use["input"]["file_path"]) == ("Write", str(run.workspace / "hello.txt"))
    assert events[2]["message"]["content"][0]["type"] == "tool_result"
    result = only(events, "result")
    assert (result["subtype"], result["is_error"], result["result"]) == ("success", False, "Created hello.txt.")
    assert result["num_turns"] == 2 and result["total_cost_usd"] > 0
    assert len(api.main_requests) == 2


def test_claude_overruns_its_max_turns_and_ends_error_max_turns(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("claude-max-turns", api, tmp_path)
    assert run.returncode == 1
    result = only(events, "result")
    assert (result["subtype"], result["is_error"], result["terminal_reason"]) == (
        "error_max_turns", True, "max_turns")
    assert "result" not in result
    assert result["errors"] == ["Reached maximum number of turns (2)"]
    assert result["num_turns"] == 3  # one more than the limit: the figure a budget must watch


def test_claude_subscription_usage_limit_reports_the_reset_time(api: ModelAPI, tmp_path: Path) -> None:
    before = int(time.time())
    run, events = scenario("claude-usage-limit", api, tmp_path)
    assert run.returncode == 1
    info = only(events, "rate_limit_event")["rate_limit_info"]
    assert info["status"] == "rejected" and info["rateLimitType"] == "five_hour"
    assert before + 3600 <= info["resetsAt"] <= int(time.time()) + 3600
    result = only(events, "result")
    assert (result["subtype"], result["is_error"], result["api_error_status"]) == ("success", True, 429)
    assert "limit · resets" in result["result"]
    assert len(api.main_requests) == 1  # a usage limit is not retried


def test_claude_api_key_rate_limit_is_an_api_error_429(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("claude-rate-limit-apikey", api, tmp_path)
    assert run.returncode == 1
    assert not [e for e in events if e.get("type") == "rate_limit_event"]
    result = only(events, "result")
    assert (result["subtype"], result["is_error"], result["api_error_status"]) == ("success", True, 429)
    assert result["result"].startswith("API Error: Request rejected (429)")


def test_claude_server_error_is_retried_then_ends_an_api_error(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("claude-server-error", api, tmp_path)
    assert run.returncode == 1
    retry = [e for e in events if e.get("subtype") == "api_retry"]
    assert [(r["attempt"], r["error_status"]) for r in retry] == [(1, 500)]
    result = only(events, "result")
    assert (result["is_error"], result["terminal_reason"], result["api_error_status"]) == (True, "api_error", 500)
    assert result["result"].startswith("API Error: 500")
    assert len(api.main_requests) == 2


def test_claude_stream_cut_mid_answer_ends_an_api_error(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("claude-cut", api, tmp_path)
    assert run.returncode == 1
    result = only(events, "result")
    assert (result["is_error"], result["terminal_reason"]) == (True, "api_error")
    assert "Connection to the API was lost" in result["result"]
    assert not (run.workspace / "hello.txt").exists()


def test_claude_reports_the_cost_of_large_usage(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("claude-expensive", api, tmp_path)
    assert run.returncode == 0
    result = only(events, "result")
    assert result["usage"]["input_tokens"] == 1_200_000
    assert result["total_cost_usd"] > 5
    per_turn = [e["message"]["usage"]["input_tokens"] for e in events if e.get("type") == "assistant"]
    assert per_turn == [400_000, 400_000, 400_000]  # what a Worker can add up mid-run


def test_claude_max_budget_usd_stops_with_error_max_budget_usd(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("claude-max-budget", api, tmp_path)
    assert run.returncode == 1
    result = only(events, "result")
    assert (result["subtype"], result["terminal_reason"]) == ("error_max_budget_usd", "budget_exhausted")
    assert result["total_cost_usd"] > 3


# -- Gemini CLI ----------------------------------------------------------------------------------

def test_gemini_writes_the_file_and_reports_success(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("gemini-write", api, tmp_path)
    assert run.returncode == 0, run.stderr
    assert (run.workspace / "hello.txt").read_text() == HELLO
    init = events[0]
    assert (init["type"], init["model"]) == ("init", "gemini-2.5-pro") and init["session_id"]
    tool = only(events, "tool_use")
    assert (tool["tool_name"], tool["parameters"]["content"]) == ("write_file", HELLO)
    assert only(events, "tool_result")["status"] == "success"
    result = only(events, "result")
    assert result["status"] == "success"
    assert result["stats"]["tool_calls"] == 1 and result["stats"]["input_tokens"] == 200
    said = [e["content"] for e in events if e["type"] == "message" and e["role"] == "assistant"]
    assert said == ["Created hello.txt."]


def test_gemini_daily_quota_is_a_terminal_quota_error(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("gemini-usage-limit", api, tmp_path)
    assert run.returncode == 429 % 256  # it exits with the HTTP status, truncated to a byte
    result = only(events, "result")
    assert result["status"] == "error"
    assert "exhausted your daily quota" in result["error"]["message"]
    assert "TerminalQuotaError" in run.stderr
    assert len(api.main_requests) == 1  # not retried


def test_gemini_bare_429_is_retried_then_reported(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("gemini-rate-limit", api, tmp_path)
    assert run.returncode == 173
    assert "Resource has been exhausted" in only(events, "result")["error"]["message"]
    assert len(api.main_requests) == 2  # general.maxAttempts 2


def test_gemini_server_error_exits_with_the_status(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("gemini-server-error", api, tmp_path)
    assert run.returncode == 500 % 256
    assert '"code":500' in only(events, "result")["error"]["message"]


def test_gemini_stream_cut_keeps_the_partial_text_and_fails(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("gemini-cut", api, tmp_path)
    assert run.returncode == 1
    assert [e["content"] for e in events if e.get("role") == "assistant"] == ["I will now wri"]
    assert only(events, "result")["error"]["message"] == "[API Error: terminated]"


def test_gemini_turn_limit_exits_53(api: ModelAPI, tmp_path: Path) -> None:
    run, events = scenario("gemini-turn-limit", api, tmp_path)
    assert run.returncode == 53
    assert len([e for e in events if e.get("type") == "tool_use"]) == 2
    assert only(events, "result")["error"]["type"] == "FatalTurnLimitedError"


def test_captured_fixtures_hold_no_credential() -> None:
    from tests.modelapi.clis import FAKE_ANTHROPIC_KEY, FAKE_GEMINI_KEY, FAKE_OAUTH_TOKEN

    for path in sorted(FIXTURES.glob("claude-*")) + sorted(FIXTURES.glob("gemini-*")):
        text = path.read_text()
        for secret in (FAKE_ANTHROPIC_KEY, FAKE_GEMINI_KEY, FAKE_OAUTH_TOKEN):
            assert secret not in text, path
