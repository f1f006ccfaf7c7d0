"""Agents end to end: the real Claude Code, Codex, Gemini CLI and Aider, run by the real daemon on the local
Worker and on a real sshd Worker, only the model stood in (tests/modelapi). Issue 12, "Done when": a Task
with `agent: claude` gives a readable log, the change on taskrun/<id>, summary.md with the Agent's final
message, the reported model, cost and turns in the record; a turn-limit stop is a FAILED Run naming the
limit; a usage limit pauses the Agent and the Task runs again after the reset; the credential appears
nowhere. The same for codex, gemini and aider as far as their reports go.

A CLI missing is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskrunner.pauses import iso
from tests.conftest import (
    Daemon,
    git,
    run_record,
    task_record,
    taskrun,
    wait_status,
    wait_until,
)
from tests.integration.agentenv import (
    ANTHROPIC_KEY,
    CODEX_MODEL,
    FINAL,
    GEMINI_KEY,
    HELLO,
    OAUTH_TOKEN,
    OPENAI_KEY,
    VERSIONS,
    WRITE_REQUIREMENT,
    Site,
    agent_task,
    aider_agent,
    changed_files,
    claude_agent,
    codex_agent,
    configure,
    events,
    gemini_agent,
    make_site,
    raw_json_lines,
    run_dir,
    secret_leaks,
    tree_files,
)
from tests.modelapi import Fail, ModelAPI, Say, Tool, Usage, anthropic

pytestmark = [pytest.mark.agentcli, pytest.mark.slow]

#: How long one Agent Run may take through the daemon (a CLI starts in 1.5-5 s; aider imports for ~15 s).
RUN_SECONDS = 120.0


@pytest.fixture
def api() -> Iterator[ModelAPI]:
    with ModelAPI() as server:
        yield server
        assert server.errors == []


@pytest.fixture
def site(request: pytest.FixtureRequest, repo: Path, tmp_path: Path) -> Iterator[Site]:
    """The Worker the Tasks run on: the local one unless the test is parametrized with "ssh"."""
    made = make_site(repo, tmp_path, getattr(request, "param", "local"))
    yield made
    made.close()


def write_script() -> list[Any]:
    """The model writes hello.txt with the tool, then says it is done."""
    return [Tool("write", {"path": "hello.txt", "content": HELLO}), Say(FINAL)]


def finished(repo: Path, task_id: str, number: int = 1, timeout: float = RUN_SECONDS) -> dict[str, Any]:
    """The run record once Run `number` is COMPLETED or FAILED."""
    return wait_until(lambda: (r := run_record(repo, task_id, number)) and r["status"] in ("COMPLETED", "FAILED")
                      and r, timeout, f"run {number} of '{task_id}' to finish")


def output(repo: Path, task_id: str, number: int = 1) -> str:
    return (run_dir(repo, task_id, number) / "output.log").read_text(errors="replace")


def assert_change_is_only_hello(repo: Path, task_id: str, record: dict[str, Any], index_file: str | None) -> None:
    """taskrun/<id> holds hello.txt and nothing of taskrun's own (.task/, the context index it created)."""
    commit = record["result_commit"]
    assert commit and record["result_branch"] == f"taskrun/{task_id}", record
    assert git(repo, "rev-parse", f"refs/heads/taskrun/{task_id}").strip() == commit
    assert git(repo, "show", f"{commit}:hello.txt") == HELLO
    assert changed_files(repo, record) == {"hello.txt"}
    files = tree_files(repo, commit)
    assert not any(name.startswith(".task/") for name in files), files
    if index_file is not None:
        assert index_file not in files, files


# -- 1. Claude Code writes a file ------------------------------------------------------------------

@pytest.mark.parametrize("site", ["local", pytest.param("ssh", marks=pytest.mark.sshd)], indirect=True)
def test_claude_task_gives_a_readable_log_the_change_and_what_the_tool_reported(
        daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"claude": claude_agent(api)})
    api.script(*write_script())
    daemon.start()
    agent_task(repo, "hello", "claude", WRITE_REQUIREMENT, title="Say hello")

    wait_status(repo, "hello", "COMPLETED", "FAILED", timeout=RUN_SECONDS)
    record = finished(repo, "hello")
    assert record["status"] == "COMPLETED", (record, output(repo, "hello"))
    assert record["worker"] == site.name and record["agent"] == "claude"
    listed = json.loads(taskrun(repo, "agents", "--json").stdout)
    offered = next(a for a in listed["agents"] if a["name"] == "claude")["workers"]
    assert [(w["worker"], w["status"]) for w in offered] == [(site.name, "available")], offered
    assert VERSIONS["claude"] in offered[0]["version"]

    # The model was asked with the Worker's credential, which came from its secrets.env.
    assert api.main_requests and api.main_requests[0].headers.get("x-api-key") == ANTHROPIC_KEY

    # events.jsonl is the raw stream; output.log is readable text made from it.
    stream = events(repo, "hello")
    init = next(e for e in stream if e.get("type") == "system" and e.get("subtype") == "init")
    assert any(e.get("type") == "result" for e in stream)
    log = output(repo, "hello")
    assert FINAL in log
    assert re.search(r"Write\b.*hello\.txt", log), log
    assert raw_json_lines(log) == [], log

    # Claude Code read the CLAUDE.md taskrun wrote for it, and that file is not part of the change.
    assert re.search(r"Contents of \S*CLAUDE\.md", json.dumps(api.main_requests[0].body)), "no CLAUDE.md was read"
    assert_change_is_only_hello(repo, "hello", record, "CLAUDE.md")

    # What the tool reported is on the record, and the final message is in summary.md.
    assert record["backend_used"]["model"] == init["model"]
    assert record["backend_used"]["provider"] == "anthropic"
    assert record["backend_used"]["cli_version"] == VERSIONS["claude"]
    assert record["session_id"] == init["session_id"]
    assert record["turns"] == 2
    assert isinstance(record["cost_usd"], float) and record["cost_usd"] > 0 and record["cost_estimated"] is False
    assert record["usage"]["input_tokens"] > 0 and record["usage"]["output_tokens"] > 0
    assert record["final_message"] == FINAL
    assert FINAL in (run_dir(repo, "hello") / "summary.md").read_text()

    # The key is nowhere: not in any history, not under runs/, not in the daemon's output.
    wait_until(lambda: "runs/hello/run-1/events.jsonl" in git(repo, "ls-tree", "-r", "--name-only", "HEAD", "runs"),
               what="the Run's records (events.jsonl with them) to be committed")
    assert secret_leaks(repo, daemon.output(), [ANTHROPIC_KEY]) == []


# -- 2. Claude Code's own turn limit ---------------------------------------------------------------

def test_claude_turn_limit_fails_the_run_naming_the_limit(daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"claude": claude_agent(api, max_turns=2)})
    api.script(Tool("shell", {"command": "echo again"}))
    daemon.start()
    agent_task(repo, "loop", "claude", "Keep checking with echo.")

    record = finished(repo, "loop")

    assert record["status"] == "FAILED", record
    assert re.search(r"max_turns|maximum number of turns|turn limit", record["error"] or ""), record["error"]
    assert "2" in record["error"]
    assert len(api.main_requests) <= 3, "the Agent was not stopped at its turn limit"
    assert wait_status(repo, "loop", "FAILED")


# -- 3. A usage limit pauses the Agent; the Task runs again after the reset --------------------------

def test_claude_usage_limit_pauses_the_agent_and_the_task_runs_again_after_the_reset(
        daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"claude": claude_agent(api, env=["CLAUDE_CODE_OAUTH_TOKEN"])})
    resets_at = int(time.time()) + 5
    api.script(Fail(429, anthropic.rate_limit_body(), anthropic.unified_limit_headers(resets_at)),
               *write_script())
    daemon.start()
    agent_task(repo, "limited", "claude", WRITE_REQUIREMENT)

    first = finished(repo, "limited")
    assert first["status"] == "FAILED", first
    assert (first["error"] or "").startswith("usage limit, resets at "), first["error"]
    assert first["usage_limit"] and first["usage_limit"]["resets_at"], first

    # No retry spent (retries: 0): the Task waits, PENDING, with the pause as its reason.
    def pending_or_again() -> dict[str, Any] | None:
        if run_record(repo, "limited", 2) is not None:
            return {"status": "again"}
        task = task_record(repo, "limited")
        return task if task and task["status"] in ("PENDING", "FAILED") else None

    task = wait_until(pending_or_again, 30, "the Task to wait for the reset")
    if task["status"] != "again":
        status = taskrun(repo, "status")
        assert task["status"] == "PENDING", task
        assert "Agent 'claude' paused: usage limit until" in (task["waiting"] or ""), task
        assert "Agent 'claude' paused: usage limit until" in status.stdout, status.stdout
        listed = json.loads(taskrun(repo, "agents", "--json").stdout)
        claude = next(a for a in listed["agents"] if a["name"] == "claude")
        assert claude["pauses"] and claude["pauses"][0]["until"] >= resets_at

    # The reset time is the one the API gave (to the second), not a guess from the text.
    assert first["error"].startswith(f"usage limit, resets at {iso(resets_at)}"), first["error"]
    assert first["usage_limit"]["resets_at"] == resets_at

    # At the reset it runs again on its own, and completes.
    second = finished(repo, "limited", 2, timeout=RUN_SECONDS + 60)
    assert second["status"] == "COMPLETED", (second, output(repo, "limited", 2))
    assert second["started_at"] >= resets_at
    assert wait_status(repo, "limited", "COMPLETED")
    assert_change_is_only_hello(repo, "limited", second, "CLAUDE.md")
    assert api.main_requests[0].headers.get("authorization") == f"Bearer {OAUTH_TOKEN}"
    assert secret_leaks(repo, daemon.output(), [OAUTH_TOKEN]) == []


# -- 4. Codex: a write, and an overrun stopped by taskrun's own budget ------------------------------

@pytest.mark.parametrize("site", ["local", pytest.param("ssh", marks=pytest.mark.sshd)], indirect=True)
def test_codex_task_gives_a_readable_log_the_change_and_an_estimated_cost(
        daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"codex": codex_agent(api)}, prices={CODEX_MODEL: {"input": 1.25, "output": 10.0}})
    api.script(*write_script())
    daemon.start()
    agent_task(repo, "hello", "codex", WRITE_REQUIREMENT)

    record = finished(repo, "hello")

    assert record["status"] == "COMPLETED", (record, output(repo, "hello"))
    assert api.main_requests[0].headers.get("authorization") == f"Bearer {OPENAI_KEY}"
    stream = events(repo, "hello")
    thread = next(e for e in stream if e.get("type") == "thread.started")
    log = output(repo, "hello")
    assert FINAL in log and "hello.txt" in log
    assert raw_json_lines(log) == [], log
    assert_change_is_only_hello(repo, "hello", record, "AGENTS.md")
    assert record["backend_used"]["model"] == CODEX_MODEL
    assert record["backend_used"]["cli_version"] == VERSIONS["codex"]
    assert record["session_id"] == thread["thread_id"]
    assert record["turns"] and record["turns"] >= 1
    assert record["usage"]["input_tokens"] > 0
    assert record["cost_estimated"] is True and record["cost_usd"] > 0
    assert record["final_message"] == FINAL
    assert FINAL in (run_dir(repo, "hello") / "summary.md").read_text()
    assert secret_leaks(repo, daemon.output(), [OPENAI_KEY]) == []


def test_codex_overrunning_max_turns_is_stopped_by_the_budget(daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"codex": codex_agent(api)})
    api.script(Tool("shell", {"command": "echo again >> runs.txt"}, text="Once more."))
    daemon.start()
    agent_task(repo, "overrun", "codex", "Append to runs.txt until told to stop.", front="max_turns: 2\n")

    record = finished(repo, "overrun", timeout=60)

    assert record["status"] == "FAILED", record
    assert "budget max_turns exceeded: limit 2, reached 3" in (record["error"] or ""), record["error"]
    # Stopped there: the model was not asked much further.
    asked = len(api.main_requests)
    assert asked <= 5, asked
    assert wait_status(repo, "overrun", "FAILED")


# -- 5. Gemini CLI and Aider write a file -----------------------------------------------------------

def test_gemini_task_completes_with_the_change_on_its_branch(daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"gemini": gemini_agent(api)})
    api.script(*write_script())
    daemon.start()
    agent_task(repo, "hello", "gemini", WRITE_REQUIREMENT)

    record = finished(repo, "hello")

    assert record["status"] == "COMPLETED", (record, output(repo, "hello"))
    assert api.main_requests[0].headers.get("x-goog-api-key") == GEMINI_KEY
    log = output(repo, "hello")
    assert FINAL in log and re.search(r"write_file\b.*hello\.txt", log), log
    assert raw_json_lines(log) == [], log
    assert_change_is_only_hello(repo, "hello", record, "GEMINI.md")
    assert record["backend_used"]["cli_version"] == VERSIONS["gemini"]
    assert record["usage"]["input_tokens"] > 0
    assert record["cost_usd"] is None or record["cost_estimated"] is True  # Gemini reports no cost
    assert secret_leaks(repo, daemon.output(), [GEMINI_KEY]) == []


def test_aider_task_completes_with_the_change_on_its_branch(daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"aider": aider_agent(api)})
    api.script(Tool("write", {"path": "hello.txt", "content": HELLO}, text="Creating it.", usage=Usage(1000, 50)))
    daemon.start()
    agent_task(repo, "hello", "aider", WRITE_REQUIREMENT)

    record = finished(repo, "hello")

    assert record["status"] == "COMPLETED", (record, output(repo, "hello"))
    assert api.main_requests[0].headers.get("authorization") == f"Bearer {OPENAI_KEY}"
    log = output(repo, "hello")
    assert "Tokens:" in log and "hello.txt" in log, log
    commit = record["result_commit"]
    assert commit and git(repo, "show", f"{commit}:hello.txt") == HELLO
    changed = changed_files(repo, record)
    assert changed == {"hello.txt"}, changed  # no .task/, no .aider* history or cache
    assert record["backend_used"]["cli_version"] == VERSIONS["aider"]
    assert record["usage"]["input_tokens"] > 0
    assert secret_leaks(repo, daemon.output(), [OPENAI_KEY]) == []


# -- 6. A cost budget --------------------------------------------------------------------------------

def test_claude_over_its_cost_budget_fails_naming_max_cost_usd(daemon: Daemon, site: Site, api: ModelAPI) -> None:
    repo = daemon.root
    configure(repo, site, {"claude": claude_agent(api)})
    api.script(Tool("shell", {"command": "echo step"}, usage=Usage(400_000, 20_000)),
               Tool("shell", {"command": "echo step"}, usage=Usage(400_000, 20_000)),
               Say("done", usage=Usage(400_000, 20_000)))
    daemon.start()
    agent_task(repo, "costly", "claude", "Think hard, at length.", front="max_cost_usd: 0.5\n")

    record = finished(repo, "costly")

    assert record["status"] == "FAILED", record
    assert "max_cost_usd" in (record["error"] or ""), record["error"]
    assert "0.5" in record["error"]
    assert record["cost_usd"] is not None and record["cost_usd"] > 0.5
    assert len(api.main_requests) < 3, "the Run was not stopped before the script ended"
