"""The control plane's side of Agents: what an assignment says about the Agent, what a result reports
back (checked as hostile input), what the Run's record and summary.md keep, and a usage limit that
pauses the Agent instead of spending a retry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from taskrunner import agentwire, pauses
from taskrunner.config import parse_config
from taskrunner.engine import Engine
from taskrunner.errors import TaskFileError
from taskrunner.fleet import Fleet
from taskrunner.gitflow import summary
from taskrunner.hooks import Hooks
from taskrunner.keys import Keyring
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.protocol import Message
from taskrunner.records import Records
from taskrunner.sessions import WorkerSessions
from taskrunner.signing import RESULT_TYPE, SigningKey, sign
from taskrunner.state import RunState, TaskState
from taskrunner.taskfile import parse_task
from tests.conftest import git

CONFIG = """\
agents:
  shell: {preset: shell}
  claude:
    preset: claude
    backend: {provider: anthropic, model: claude-sonnet-4-5, context_window: 200000}
    env: [ANTHROPIC_API_KEY]
    max_turns: 20
    max_cost_usd: 3
    permission_mode: acceptEdits
    allowed_tools: [Read]
    extra_args: [--verbose]
    prompt_template: "{{ title }}"
  codex: {preset: codex, pause_scope: worker, model: gpt-5-codex, sandbox_mode: read-only}
workers:
  local: {transport: local, agents: [shell, claude, codex]}
prices:
  claude-sonnet-4-5: {input: 3, output: 15}
"""
T = 1_795_993_200.0  # 2026-11-29T23:00:00Z


def task_spec(front: str = "") -> Any:
    text = f"---\nagent: claude\n{front}---\n# Add a thing\nDo it.\n" if front else "# Add a thing\nDo it.\n"
    return parse_task("t", "tasks/t.md", text.encode())


# ---------------------------------------------------------------- what an assignment says


def test_the_manifest_carries_every_agent_key_and_the_price_of_its_model() -> None:
    config = parse_config(CONFIG, ".taskrun.yaml")
    agent = agentwire.agent_manifest(config.agents["claude"], "bwrap", config.prices)
    assert agent["preset"] == "claude" and agent["env"] == ["ANTHROPIC_API_KEY"] and agent["sandbox"] == "bwrap"
    assert agent["model"] == "claude-sonnet-4-5"  # the backend's, as no `model` is set
    assert agent["backend"] == {"provider": "anthropic", "model": "claude-sonnet-4-5", "context_window": 200000,
                                "base_url": None}
    assert agent["prices"] == {"input": 3.0, "output": 15.0, "cache_read": 3.0, "cache_write": 3.0}
    assert agent["permission_mode"] == "acceptEdits" and agent["allowed_tools"] == ["Read"]
    assert agent["extra_args"] == ["--verbose"] and agent["prompt_template"] == "{{ title }}"
    assert agent["pause_scope"] == "everywhere"
    # The manifest is signed as JSON: every value must be JSON.
    json.dumps(agent, allow_nan=False)
    codex = agentwire.agent_manifest(config.agents["codex"], "none", config.prices)
    assert codex["model"] == "gpt-5-codex" and codex["prices"] is None and codex["sandbox_mode"] == "read-only"


def test_the_tasks_front_matter_budget_wins_over_the_agents() -> None:
    agent = parse_config(CONFIG, ".taskrun.yaml").agents["claude"]
    assert agentwire.budget(task_spec(), agent) == {"max_turns": 20, "max_cost_usd": 3.0}
    spec = task_spec("max_turns: 4\nmax_cost_usd: 0.5\n")
    assert agentwire.budget(spec, agent) == {"max_turns": 4, "max_cost_usd": 0.5}


@pytest.mark.parametrize(("front", "key"), [("max_turns: 0\n", "max_turns"), ("max_turns: many\n", "max_turns"),
                                            ("max_cost_usd: -2\n", "max_cost_usd"),
                                            ("max_cost_usd: true\n", "max_cost_usd")])
def test_a_bad_budget_in_front_matter_makes_the_task_invalid_naming_the_key(front: str, key: str) -> None:
    with pytest.raises(TaskFileError) as caught:
        task_spec(front)
    assert caught.value.key == key


# ---------------------------------------------------------------- what a result reports


def test_a_well_formed_report_is_taken_as_is() -> None:
    report = agentwire.run_report({
        "provider": "anthropic", "model": "claude-opus-4-1", "cli_version": "2.1.332", "session_id": "s-1",
        "turns": 3, "cost_usd": 0.25, "cost_estimated": False, "usage": {"input_tokens": 10, "output_tokens": 5},
        "final_message": "Done: wrote hello.txt"})
    assert report == agentwire.Report("anthropic", "claude-opus-4-1", "2.1.332", "s-1", 3, 0.25, False,
                                         {"input_tokens": 10, "output_tokens": 5}, "Done: wrote hello.txt")


@pytest.mark.parametrize("report", [
    {"turns": "3", "cost_usd": "free", "usage": [1], "model": 5, "session_id": {"a": 1}, "final_message": 7},
    {"turns": -1, "cost_usd": float("inf"), "usage": {"x": True, "y": -3, "": 2}, "cost_estimated": "yes"},
    {"turns": True, "cost_usd": -0.5, "usage": "many", "provider": "   "},
])
def test_hostile_report_fields_count_as_not_reported(report: dict[str, Any]) -> None:
    parsed = agentwire.run_report(report)
    assert parsed is not None
    assert (parsed.turns, parsed.cost_usd, parsed.usage, parsed.model, parsed.session_id, parsed.final_message,
            parsed.provider, parsed.cost_estimated) == (None, None, None, None, None, None, None, False)


def test_report_texts_are_cut_and_control_characters_dropped() -> None:
    parsed = agentwire.run_report({"model": "m\x1b[31m" + "x" * 1000, "final_message": "é" * 20_000})
    assert parsed is not None and parsed.model is not None
    assert len(parsed.model) == agentwire.MAX_FIELD_CHARS and "\x1b" not in parsed.model
    assert parsed.final_message is not None
    assert len(parsed.final_message.encode()) <= agentwire.MAX_FINAL_MESSAGE_BYTES
    assert parsed.final_message.endswith("[… cut at 16 KiB]")


@pytest.mark.parametrize(("value", "expected"), [
    ({"resets_at": T, "message": "limit reached"}, {"resets_at": T, "message": "limit reached"}),
    ({"resets_at": "tomorrow", "message": 3}, {"resets_at": None, "message": ""}),
    ("limit", None), (None, None),
])
def test_a_usage_limit_is_checked(value: Any, expected: Any) -> None:
    assert agentwire.usage_limit(value) == expected


def test_the_reported_model_wins_in_backend_used() -> None:
    configured = {"provider": "anthropic", "model": "claude-sonnet-4-5", "context_window": 200000}
    report = agentwire.Report(model="claude-opus-4-1", cli_version="2.1.332")
    assert agentwire.backend_used(configured, report) == {
        "provider": "anthropic", "model": "claude-opus-4-1", "context_window": 200000, "cli_version": "2.1.332"}
    assert agentwire.backend_used(None, None) is None


def _events(data: bytes, digest: str | None = None) -> dict[str, Any]:
    return {"size": len(data), "sha256": digest or hashlib.sha256(data).hexdigest()}


def test_the_payload_is_the_pack_then_the_events() -> None:
    events = b'{"type":"system"}\n'
    assert agentwire.split_payload(b"PACK" + events, _events(events)) == (b"PACK", events, None)
    assert agentwire.split_payload(b"PACK", None) == (b"PACK", None, None)


@pytest.mark.parametrize("meta", [{"size": 10 ** 9, "sha256": "0" * 64}, {"size": -1, "sha256": "0" * 64},
                                  {"size": "4", "sha256": "0" * 64}, {"size": 4, "sha256": "xyz"}, "events"])
def test_a_malformed_events_description_leaves_the_events_out_with_a_notice(meta: Any) -> None:
    pack, events, notice = agentwire.split_payload(b"PACKEVTS", meta)
    # The Worker described its events wrongly: all of the payload is taken for the pack (whose digest
    # the change's own signed fields check).
    assert pack == b"PACKEVTS"
    assert events is None and notice is not None and "not recorded" in notice


# ---------------------------------------------------------------- through the session into the records


class _Worker:
    def __init__(self, key: SigningKey) -> None:
        self.name = "local"
        self.result_key = key.public


def _sessions(root: Path, finished: list[tuple[str, str | None]], notices: list[str]) -> WorkerSessions:
    hooks = Hooks()
    hooks.notice = notices.append  # type: ignore[method-assign]
    return WorkerSessions(
        fleet=None, records=Records(root), runs={}, hooks=hooks, clock=lambda: 1.0,  # type: ignore[arg-type]
        send=lambda worker, message: None,
        finish=lambda run, status, code, error, at=None: finished.append((status.value, error)),
        run_lost=lambda *a: None, save_run=lambda *a, **k: None)


def _result(key: SigningKey, run: RunState, payload: bytes, **fields: Any) -> Message:
    empty = hashlib.sha256(b"").hexdigest()
    body = {"run_id": run.run_id, "status": "COMPLETED", "exit_code": 0, "error": None, "started_at": 1.0,
            "finished_at": 2.0, "output_size": 0, "output_sha256": empty, "nonce": "n", "change": None, **fields}
    envelope = sign(RESULT_TYPE, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), [key])
    return Message("result", {"run_id": run.run_id, "output_size": 0, "envelope": envelope}, payload)


def _run(status: RunStatus = RunStatus.RUNNING) -> RunState:
    return RunState(run_id="r1", task_id="t", number=1, revision="0" * 64, attempt=1, worker="local",
                    agent="claude", status=status,
                    backend_used={"provider": "anthropic", "model": "claude-sonnet-4-5", "context_window": None})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    return tmp_path


def test_a_results_report_and_events_are_recorded_on_the_run(repo: Path) -> None:
    key, finished, notices = SigningKey.generate(), [], []  # type: ignore[var-annotated]
    sessions, run = _sessions(repo, finished, notices), _run()
    events = b'{"type":"result","result":"ok"}\n'
    report = {"provider": "anthropic", "model": "claude-opus-4-1", "cli_version": "2.1.332", "session_id": "s",
              "turns": 2, "cost_usd": 0.01, "cost_estimated": True, "usage": {"output_tokens": 9},
              "final_message": "All done."}
    sessions._on_result(_Worker(key), run, _result(key, run, events, report=report, usage_limit=None,  # type: ignore[arg-type]
                                                   events=_events(events)))
    assert finished == [("COMPLETED", None)] and notices == []
    assert (run.session_id, run.turns, run.cost_usd, run.cost_estimated, run.final_message) == (
        "s", 2, 0.01, True, "All done.")
    assert run.backend_used == {"provider": "anthropic", "model": "claude-opus-4-1", "context_window": None,
                                "cli_version": "2.1.332"}
    assert (repo / "runs/t/run-1/events.jsonl").read_bytes() == events
    assert run.events == "runs/t/run-1/events.jsonl" and run.record()["final_message"] == "All done."


def test_events_whose_digest_does_not_match_are_not_recorded_and_the_status_stands(repo: Path) -> None:
    key, finished, notices = SigningKey.generate(), [], []  # type: ignore[var-annotated]
    sessions, run = _sessions(repo, finished, notices), _run()
    sessions._on_result(_Worker(key), run, _result(key, run, b"tampered!", report=None,  # type: ignore[arg-type]
                                                   events=_events(b"original!")))
    assert finished == [("COMPLETED", None)]
    assert not (repo / "runs/t/run-1/events.jsonl").exists()
    assert notices == [("Run r1 of 't': its events.jsonl is not recorded: the bytes do not match the digest "
                        "the Worker signed")]


def test_a_failed_result_with_a_usage_limit_marks_the_run(repo: Path) -> None:
    key, finished, notices = SigningKey.generate(), [], []  # type: ignore[var-annotated]
    sessions, run = _sessions(repo, finished, notices), _run()
    limit = {"resets_at": T, "message": "5-hour limit reached"}
    sessions._on_result(_Worker(key), run, _result(  # type: ignore[arg-type]
        key, run, b"", status="FAILED", exit_code=1, error="usage limit, resets at 2026-11-29T23:00:00Z",
        usage_limit=limit))
    assert finished == [("FAILED", "usage limit, resets at 2026-11-29T23:00:00Z")]
    assert run.usage_limit == limit


def test_summary_shows_the_final_message_model_turns_and_cost() -> None:
    run = _run(RunStatus.COMPLETED)
    run.backend_used = {"provider": "anthropic", "model": "claude-opus-4-1", "cli_version": "2.1.332"}
    run.turns, run.cost_usd, run.cost_estimated = 4, 0.1234, True
    run.final_message = "I added `hello.txt`.\n\nNothing else\x1b[2J changed."
    text = summary.render(run, "Add a thing", b"raw output tail", None, ["runs/t/run-1/events.jsonl"])
    assert "- **Model:** anthropic / claude-opus-4-1 (CLI 2.1.332)" in text
    assert "- **Turns:** 4" in text and "- **Cost:** $0.1234 (estimated from tokens)" in text
    assert "> I added `hello.txt`.\n>\n> Nothing else\\x1b[2J changed." in text
    assert "raw output tail" not in text


# ---------------------------------------------------------------- a usage limit in the engine


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _engine(root: Path, clock: _Clock) -> Engine:
    config = parse_config(CONFIG + "scheduler: {retries: 0}\n", ".taskrun.yaml")
    keyring, _ = Keyring.ensure(root / ".git" / "taskrun", 0.0)
    fleet = Fleet(config, root / ".git" / "taskrun", lambda event: None, keyring)
    return Engine(root, config, fleet, commit=lambda item: None, clock=clock)


def _running(engine: Engine, agent: str = "claude") -> RunState:
    task_file = parse_task("t", "tasks/t.md", f"---\nagent: {agent}\n---\n# Add a thing\n".encode())
    task = TaskState("t", "tasks/t.md", 1, status=TaskStatus.RUNNING, spec=task_file, revision=task_file.revision)
    run = RunState(run_id="r1", task_id="t", number=1, revision=task_file.revision, attempt=1, worker="local",
                   agent=agent, status=RunStatus.RUNNING)
    task.runs.append(run)
    task.attempts = 1
    engine.tasks["t"] = task
    engine.runs[run.run_id] = run
    return run


def test_a_usage_limit_pauses_the_agent_spends_no_retry_and_the_task_runs_again_at_t(repo: Path) -> None:
    clock = _Clock(T - 600)
    engine = _engine(repo, clock)
    run = _running(engine)
    run.usage_limit = {"resets_at": T, "message": "limit reached"}
    engine._finish(run, RunStatus.FAILED, 1, "usage limit, resets at 2026-11-29T23:00:00Z")
    task = engine.tasks["t"]
    # retries: 0, yet the Task is PENDING again with its attempt given back.
    assert task.status is TaskStatus.PENDING and task.attempts == 0 and task.not_before == 0.0
    assert run.status is RunStatus.FAILED and run.error == "usage limit, resets at 2026-11-29T23:00:00Z"
    engine.schedule()
    assert task.waiting == "Agent 'claude' paused: usage limit until 2026-11-29T23:00:00Z"
    assert engine.next_wakeup == T
    # A restarted daemon keeps the pause.
    again = _engine(repo, clock)
    assert again.pauses.everywhere(clock.now) == {"claude": T}
    # At T the pause is over: the Task is no longer held by it (no Worker is online here).
    clock.now = T
    engine.schedule()
    assert task.waiting is not None and "paused" not in task.waiting
    assert len(pauses.load(repo / ".git" / "taskrun")) == 0


def test_a_usage_limit_without_a_reset_time_pauses_for_15_minutes(repo: Path) -> None:
    clock = _Clock(T)
    engine = _engine(repo, clock)
    run = _running(engine)
    run.usage_limit = {"resets_at": None, "message": ""}
    engine._finish(run, RunStatus.FAILED, 1, "usage limit, reset time unknown")
    assert engine.pauses.everywhere(T) == {"claude": T + 900}


def test_a_worker_scoped_agent_is_paused_on_that_worker_only(repo: Path) -> None:
    clock = _Clock(T - 60)
    engine = _engine(repo, clock)
    run = _running(engine, "codex")
    run.usage_limit = {"resets_at": T, "message": ""}
    engine._finish(run, RunStatus.FAILED, 1, "usage limit, resets at 2026-11-29T23:00:00Z")
    assert engine.pauses.everywhere(clock.now) == {}
    assert engine.pauses.on_worker("local", clock.now) == {"codex": T}


def test_an_ordinary_failure_still_spends_the_retry(repo: Path) -> None:
    engine = _engine(repo, _Clock(T))
    run = _running(engine)
    engine._finish(run, RunStatus.FAILED, 1, "exit 1")
    assert engine.tasks["t"].status is TaskStatus.FAILED and len(engine.pauses) == 0


# ---------------------------------------------------------------- `taskrun agents`


def test_agent_rows_say_where_each_agent_is_available_and_its_pauses() -> None:
    from taskrunner.availability import agent_rows

    config = parse_config(CONFIG, ".taskrun.yaml")
    workers = [
        {"name": "local", "online": True, "agents": ["shell", "claude", "codex"],
         "presets": {"shell": {"version": None, "path": None}, "claude": {"version": "2.1.332", "path": "/x"}}},
        {"name": "old", "online": False, "agents": ["claude"], "presets": None},
    ]
    table = pauses.Pauses([pauses.Pause("claude", None, T, T - 60, "limit")])
    rows = {row["name"]: row for row in agent_rows(config.agents, workers, table, T - 10)}
    assert rows["claude"]["workers"] == [
        {"worker": "local", "online": True, "status": "available", "version": "2.1.332"},
        {"worker": "old", "online": False, "status": "unknown", "version": None}]
    assert rows["codex"]["workers"][0]["status"] == "missing"
    assert rows["shell"]["workers"][0]["status"] == "available"
    assert rows["claude"]["pauses"][0]["until_iso"] == "2026-11-29T23:00:00Z"
    assert agent_rows(config.agents, workers, table, T)[1]["pauses"] == []


def test_taskrun_agents_without_a_daemon_lists_agents_and_saved_pauses(repo: Path) -> None:
    from tests.conftest import taskrun

    (repo / ".taskrun.yaml").write_text(CONFIG)
    pauses.save(repo / ".git" / "taskrun", pauses.Pauses([pauses.Pause("claude", None, 4_000_000_000.0, 1.0)]))
    done = taskrun(repo, "agents", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["daemon"] is False
    claude = next(row for row in data["agents"] if row["name"] == "claude")
    assert claude["pauses"][0]["until_iso"] == "2096-10-02T07:06:40Z"
    assert claude["workers"] == [{"worker": "local", "online": None, "status": "unknown", "version": None}]
    text = taskrun(repo, "agents")
    assert "until 2096-10-02T07:06:40Z" in text.stdout and "local (not seen yet)" in text.stdout


@pytest.mark.parametrize(("line", "number"), [
    ("codex-cli 0.171.0", "0.171.0"), ("2.1.332 (Claude Code)", "2.1.332"), ("0.61.0", "0.61.0"),
    ("aider 0.86.2", "0.86.2"), ("tool 1.2.3-beta.1", "1.2.3-beta.1"), ("weird", "weird"), ("", None), (None, None),
])
def test_a_version_line_gives_the_version_number_streams_report(line: object, number: str | None) -> None:
    assert agentwire.version_number(line) == number
