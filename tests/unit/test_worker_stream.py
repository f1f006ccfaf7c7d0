"""The Worker reading an Agent's event stream: output.log rendered, budgets and usage limits enforced, events shipped.

A stand-in `claude` (a script on the Worker's PATH, in tmp_path) prints
Claude Code stream-json lines for the scenario its Task names; the Worker
runs it through the `claude` preset and its real stream reader, confined as
any Agent, over a WorkerServer session (tests/unit/test_worker_serve.py's
harness). Stand-ins cover what a real CLI cannot be made to print on demand:
usage limits, malformed and huge lines, a crash mid-stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from taskrunner import agents
from taskrunner.protocol import Message
from taskrunner.worker import streaming
from taskrunner.agents.stream import MAX_LINE_BYTES
from taskrunner.worker.streaming import LineCutter, Pump, StreamMask
from tests.signed import ControlPlane
from tests.unit import test_worker_serve as harness
from tests.unit.test_worker_serve import Session, assign, go_flag, group_gone, only, outcome, output_of, poll_until

# The session harness's fixtures, used here as they are there.
home, cp, sessions, reap_orphans_here = harness.home, harness.cp, harness.sessions, harness.reap_orphans_here

SECRET = "sk-test-5ecret-value-0123456789"
RESETS_AT = 1795993200  # 2026-11-29T23:00:00Z
VERSION = "9.9.9 (Claude Code)"

STANDIN = r'''#!/usr/bin/env python3
import json, os, pathlib, re, subprocess, sys, time

if sys.argv[1:] == ["--version"]:
    print("%(version)s")
    sys.exit(0)
prompt = sys.stdin.buffer.read()
pathlib.Path(os.environ["HOME"], "stdin-copy").write_bytes(prompt)
text = prompt.decode("utf-8", "replace")
for found in pathlib.Path(".task").rglob("*.md") if pathlib.Path(".task").is_dir() else ():
    text += found.read_text("utf-8", "replace")
scenario = re.search(r"SCENARIO: (\w+)", text).group(1)
key = os.environ.get("TASKRUN_TEST_KEY", "")


def emit(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def raw(data):
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def say(n, *content):
    emit({"type": "assistant", "session_id": "sess-1", "parent_tool_use_id": None,
          "message": {"id": "msg_%%d" %% n, "type": "message", "role": "assistant", "model": "claude-test-model",
                      "content": list(content), "stop_reason": None,
                      "usage": {"input_tokens": 10, "output_tokens": 5}}})


def text_block(t):
    return {"type": "text", "text": t}


def tool_result(content):
    emit({"type": "user", "session_id": "sess-1", "parent_tool_use_id": None,
          "message": {"role": "user", "content": [{"tool_use_id": "toolu_1", "type": "tool_result",
                                                    "content": content, "is_error": False}]}})


def result(text="All done: the final message.", cost=0.01, turns=2, **over):
    event = {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 10, "num_turns": turns,
             "result": text, "session_id": "sess-1", "total_cost_usd": cost,
             "usage": {"input_tokens": 20, "output_tokens": 10}, "modelUsage": {}, "permission_denials": []}
    event.update(over)
    emit(event)


emit({"type": "system", "subtype": "init", "session_id": "sess-1", "model": "claude-test-model",
      "claude_code_version": "9.9.9", "tools": ["Bash"], "cwd": os.getcwd(), "permissionMode": "acceptEdits"})
if scenario == "ok":
    say(1, text_block("Working on it; the key is " + key + "."),
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls -la"}})
    tool_result("listing: " + key)
    say(2, text_block("Finished the work."))
    result()
elif scenario == "garbled":
    raw(b"this line is not json at all\n")
    raw(b'{"type": "assistant", "message": {"id": "msg_1", "content": [\n')
    raw(b"\xff\xfe binary \x00 garbage\n")
    say(1, text_block("still going"))
    result()
elif scenario == "turns":
    subprocess.Popen(["sleep", "300"])  # a straggler in the Run's group
    for n in range(1, 1000):
        say(n, text_block("turn %%d" %% n))
        tool_result("ok")
        time.sleep(0.05)  # a turn every 50 ms, on and on: the Worker stops it at its budget
    result()
elif scenario == "cost":
    say(1, text_block("spent a lot"))
    result(cost=0.62, turns=1)
    time.sleep(300)  # overran: only the Worker's budget ends it
elif scenario == "limit":
    say(1, text_block("about to hit the limit"))
    emit({"type": "rate_limit_event", "session_id": "sess-1",
          "rate_limit_info": {"status": "rejected", "resetsAt": %(resets_at)d, "rateLimitType": "five_hour"}})
    time.sleep(300)
elif scenario == "crash":
    say(1, text_block("partial work before the crash"))
    sys.exit(0)
elif scenario == "huge":
    for _ in range(3):
        raw(b"x" * (1024 * 1024))
    sys.exit(0)
elif scenario == "replay":
    say(1, text_block("first words"))
    while not os.path.exists("go"):
        time.sleep(0.02)
    say(2, text_block("second words"))
    result()
''' % {"version": VERSION, "resets_at": RESETS_AT}


@pytest.fixture()
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in `claude` first on the Worker's PATH, and the secret the Agent is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "claude"
    program.write_text(STANDIN)
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TASKRUN_TEST_KEY", SECRET)
    return program


def claude_task(scenario: str) -> bytes:
    return f"---\n---\n# Stream test\n\nDo the thing.\n\nSCENARIO: {scenario}\n".encode()


def claude_agent(**over: Any) -> dict[str, Any]:
    return {"name": "claude", "preset": "claude", "command": [], "env": ["TASKRUN_TEST_KEY"], **over}


def run_claude(session: Session, cp: ControlPlane, run_id: str, scenario: str, **kwargs: Any) -> list[Message]:
    """Assign a Run of the stand-in for `scenario`; every record up to its result."""
    agent = kwargs.pop("agent", claude_agent())
    assign(session, cp, run_id, None, task=claude_task(scenario), agent=agent, **kwargs)
    return session.until("result", run_id)


def shipped_events(record: Message, result: dict[str, Any]) -> bytes:
    """The events at the end of a `result` record's payload, checked against the signed size and digest."""
    events = result["events"]
    assert isinstance(events, dict)
    data = record.payload[len(record.payload) - events["size"]:]
    assert len(data) == events["size"]
    assert hashlib.sha256(data).hexdigest() == events["sha256"]
    return data


# ---------------------------------------------------------------- a Run read through its stream


def test_a_streaming_agent_gets_a_readable_log_its_report_and_its_events_with_the_secret_masked(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, standin: Path) -> None:
    session = sessions()
    ready = session.authenticate(cp)
    assert ready["agents"]["claude"] == {"version": VERSION, "path": str(standin)}
    messages = run_claude(session, cp, "run-ok", "ok")
    result = outcome(session, messages[-1])
    assert result["status"] == "COMPLETED", result["error"]
    log = output_of(messages, "run-ok")
    assert b"Finished the work." in log and b"ls -la" in log
    assert b'"type"' not in log, "output.log holds raw JSON"
    assert SECRET.encode() not in log and b"*" * len(SECRET) in log
    report = result["report"]
    assert report["session_id"] == "sess-1"
    assert report["final_message"] == "All done: the final message."
    assert result["usage_limit"] is None
    events = shipped_events(messages[-1], result)
    assert SECRET.encode() not in events and b"*" * len(SECRET) in events
    assert [json.loads(line)["type"] for line in events.splitlines()][0] == "system"
    assert (home / "runs" / "run-ok" / "output.log").read_bytes().replace(SECRET.encode(), b"*" * len(SECRET)) == log


def test_the_prompt_reaches_the_agent_on_its_stdin(sessions: Callable[[], Session], cp: ControlPlane, home: Path,
                                                   standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    run_claude(session, cp, "run-stdin", "ok")
    got = (home / "runs" / "run-stdin" / "home" / "stdin-copy").read_bytes()
    prompts = [p for p in (home / "runs" / "run-stdin").rglob("prompt.md") if p.read_bytes() == got]
    assert got and prompts, "the Agent's stdin was not its prompt file"


def test_malformed_lines_are_kept_verbatim_in_the_log(sessions: Callable[[], Session], cp: ControlPlane,
                                                       standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    messages = run_claude(session, cp, "run-garbled", "garbled")
    log = output_of(messages, "run-garbled")
    assert b"this line is not json at all\n" in log
    assert b'{"type": "assistant", "message": {"id": "msg_1", "content": [\n' in log
    assert b"still going" in log
    assert outcome(session, messages[-1])["status"] == "COMPLETED"


def test_a_crash_mid_stream_without_a_result_fails_the_run_though_it_exited_0(
        sessions: Callable[[], Session], cp: ControlPlane, standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    messages = run_claude(session, cp, "run-crash", "crash")
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED" and result["exit_code"] == 0
    assert "result" in result["error"]
    assert b"partial work before the crash" in output_of(messages, "run-crash")


def test_a_huge_line_without_a_newline_reaches_the_log_cut_and_the_session_goes_on(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    messages = run_claude(session, cp, "run-huge", "huge")
    assert outcome(session, messages[-1])["status"] == "FAILED"
    assert (home / "runs" / "run-huge" / "events.jsonl").stat().st_size > 3 * MAX_LINE_BYTES
    assert (home / "runs" / "run-huge" / "output.log").stat().st_size <= MAX_LINE_BYTES + 4096
    assign(session, cp, "run-after", "echo still serving")
    assert output_of(session.until("result", "run-after"), "run-after") == b"still serving\n"


# ---------------------------------------------------------------- budgets and usage limits


def test_a_run_past_its_turn_budget_is_stopped_naming_the_budget_and_its_whole_group_is_killed(
        sessions: Callable[[], Session], cp: ControlPlane, standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    messages = run_claude(session, cp, "run-turns", "turns", budget={"max_turns": 2, "max_cost_usd": None})
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    reached = re.fullmatch(r"budget max_turns exceeded: limit 2, reached (\d+)", result["error"])
    assert reached and int(reached.group(1)) >= 3, result["error"]
    pid = only(messages, "started", "run-turns")[0]["pid"]
    poll_until(lambda: group_gone(pid), "the Run's process group to end")


def test_a_run_past_its_cost_budget_is_stopped_naming_the_limit_and_the_figure(
        sessions: Callable[[], Session], cp: ControlPlane, standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    messages = run_claude(session, cp, "run-cost", "cost", budget={"max_turns": None, "max_cost_usd": 0.5})
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert result["error"] == "budget max_cost_usd exceeded: limit $0.50, reached $0.62"


def test_a_usage_limit_stops_the_run_at_once_as_failed_with_its_reset_time_in_the_signed_result(
        sessions: Callable[[], Session], cp: ControlPlane, standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    started = time.monotonic()
    messages = run_claude(session, cp, "run-limit", "limit")
    assert time.monotonic() - started < 60, "the Run was not stopped on its usage limit"
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert result["error"].startswith("usage limit, resets at 2026-11-29T23:00:00Z")
    assert result["usage_limit"]["resets_at"] == RESETS_AT
    pid = only(messages, "started", "run-limit")[0]["pid"]
    poll_until(lambda: group_gone(pid), "the Run's process group to end")


# ---------------------------------------------------------------- sessions, failures


def test_a_new_session_replays_the_stream_and_writes_no_text_twice(
        sessions: Callable[[], Session], cp: ControlPlane, home: Path, standin: Path) -> None:
    first = sessions()
    first.authenticate(cp)
    assign(first, cp, "run-replay", None, task=claude_task("replay"), agent=claude_agent())
    seen: list[Message] = []
    poll_until(lambda: (seen.append(first.next()) or b"first words" in output_of(seen, "run-replay")),
               "the first words in the output")
    sent = len(output_of(seen, "run-replay"))
    first.close_input()

    second = sessions()
    ready = second.authenticate(cp)
    assert [r["state"] for r in ready["runs"]] == ["running"]
    second.send("resume", run_id="run-replay", offset=sent)
    go_flag(home, "run-replay").touch()
    messages = second.until("result", "run-replay")
    assert outcome(second, messages[-1])["status"] == "COMPLETED"
    log = output_of(seen, "run-replay") + output_of(messages, "run-replay", start=sent)
    assert log == (home / "runs" / "run-replay" / "output.log").read_bytes()
    assert log.count(b"first words") == 1 and log.count(b"second words") == 1


def test_a_reader_that_raises_fails_its_run_and_not_the_session(
        sessions: Callable[[], Session], cp: ControlPlane, standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding:
        keeps_events = True

        def feed(self, line: bytes) -> str:
            raise RuntimeError("reader bug")

        def limit(self) -> None:
            return None

    original = agents.prepare

    def prepare(*args: Any, **kwargs: Any) -> Any:
        prepared = original(*args, **kwargs)
        return dataclasses.replace(prepared, reader=Exploding()) if prepared.reader is not None else prepared

    monkeypatch.setattr(agents, "prepare", prepare)
    session = sessions()
    session.authenticate(cp)
    result = outcome(session, run_claude(session, cp, "run-bug", "ok")[-1])
    assert result["status"] == "FAILED"
    assert "reader bug" in result["error"]
    assign(session, cp, "run-after", "echo still serving")
    assert outcome(session, session.until("result", "run-after")[-1])["status"] == "COMPLETED"


def test_an_agent_whose_configured_program_is_missing_fails_saying_so(
        sessions: Callable[[], Session], cp: ControlPlane, tmp_path: Path, standin: Path) -> None:
    session = sessions()
    session.authenticate(cp)
    missing = tmp_path / "nowhere" / "claude"
    messages = run_claude(session, cp, "run-missing", "ok", agent=claude_agent(path=str(missing)))
    assert only(messages, "started") == []
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED"
    assert result["error"].startswith(f"the Agent's program {missing} is not an executable file on this Worker: fix "
                                      "agents.")


def test_a_run_without_a_stream_reader_signs_null_report_usage_limit_and_events(
        sessions: Callable[[], Session], cp: ControlPlane) -> None:
    session = sessions()
    session.authenticate(cp)
    assign(session, cp, "run-shell", "echo plain")
    messages = session.until("result", "run-shell")
    result = outcome(session, messages[-1])
    assert (result["report"], result["usage_limit"], result["events"]) == (None, None, None)
    assert messages[-1].payload == b""


# ---------------------------------------------------------------- the pure parts


def test_lines_are_cut_at_the_limit_and_nothing_more_is_held_whatever_the_chunks() -> None:
    cutter = LineCutter(max_line=8)
    lines = []
    for chunk in (b"ab", b"c\nxyz", b"0123456789" * 100, b"tail\nlast", b"\nend"):
        lines += cutter.split(chunk)
        assert len(cutter._partial) <= 8
    assert lines == [b"abc", b"xyz01234", b"last"]
    assert cutter.rest() == b"end"
    assert cutter.rest() is None


def test_a_stream_that_ends_inside_a_secret_has_that_beginning_masked_too() -> None:
    masker = StreamMask([b"sk-abcdef"])
    assert masker.feed(b"key=sk-abc") == b"key="
    assert masker.held == 6
    assert masker.end() == b"******"
    assert masker.end() == b""
    masker = StreamMask([b"sk-abcdef"])
    assert masker.feed(b"key=sk-abc") + masker.feed(b"x") + masker.end() == b"key=sk-abcx"
    assert StreamMask([b"sk-abcdef"]).feed(b"a sk-abcdef b") == b"a ********* b"


def test_a_line_cut_at_the_limit_inside_a_secret_reaches_the_reader_masked(tmp_path: Path) -> None:
    secret = b"sk-" + b"s" * 40
    (tmp_path / "events.jsonl").write_bytes(b"x" * 20 + secret + b" and more\nnext\n")
    echo = Echo()
    pump = Pump(tmp_path, echo, secrets=[secret])
    pump.cutter = LineCutter(max_line=30)
    pump.step()
    pump.ending()
    pump.outcome(0)
    assert echo.seen == [b"x" * 20 + b"*" * 10, b"next"]


class Echo:
    """A deterministic reader: each line back as text; a line "LIMIT" is a usage limit."""

    keeps_events = True

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def feed(self, line: bytes) -> str:
        self.seen.append(line)
        return line.decode("utf-8", "replace") + "\n"

    def limit(self) -> Any:
        return agents.stream.UsageLimit(resets_at=None, message="") if b"LIMIT" in self.seen else None

    def report(self) -> Any:
        raise AssertionError("no budget was given: the report is not asked for")

    def verdict(self, exit_code: int | None) -> Any:
        return SimpleNamespace(status="FAILED", error="usage limit", usage_limit=None)


def test_two_pumps_on_one_run_write_each_rendered_byte_once(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    first, second = Pump(tmp_path, Echo()), Pump(tmp_path, Echo())
    with open(events, "ab") as agent:
        agent.write(b"one\ntwo\nthr")
        agent.flush()
        assert first.step() is None
        agent.write(b"ee\nfour\n")
        agent.flush()
        second.step()  # a session that adopted the Run: replays from byte 0
        first.step()
        agent.write(b"LIMIT\nlast")
    assert first.step() == "usage limit, reset time unknown"
    assert first.step() is None, "a reason to stop is given once"
    second.step()
    for pump in (first, second):
        pump.ending()
        assert pump.caught_up()
        ended = pump.outcome(0)
        assert (ended.status, ended.error) == ("FAILED", "usage limit")
        assert ended.usage_limit is not None, "the limit the reader saw, when its verdict names none"
        pump.close()
    assert (tmp_path / "output.log").read_bytes() == b"one\ntwo\nthree\nfour\nLIMIT\nlast\n"


def test_the_events_shipped_are_masked_and_cut_at_a_line_end_under_the_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "READ_CHUNK_BYTES", 7)  # secrets across read boundaries too
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"a": "sk-abcdef"}\n{"b": 2}\n{"c": "partial')
    whole = streaming.shipped(tmp_path, [b"sk-abcdef"])
    data = streaming.shipped_bytes(tmp_path, whole, [b"sk-abcdef"])
    assert data == b'{"a": "*********"}\n{"b": 2}\n{"c": "partial'
    assert whole == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    monkeypatch.setattr(streaming, "MAX_EVENTS_BYTES", 30)
    capped = streaming.shipped(tmp_path, [b"sk-abcdef"])
    assert streaming.shipped_bytes(tmp_path, capped, [b"sk-abcdef"]) == b'{"a": "*********"}\n{"b": 2}\n'
    assert streaming.shipped_bytes(tmp_path, None, []) == b""
