"""Agent presets (agents/__init__.py and the per-tool modules): argv, env, stdin, Prepared.

The argv and env are those the CLI recipes found to work headless with the
pinned CLIs against the scripted model API (tests/integration drives them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from taskrunner import agents
from taskrunner.agents import aider, claude, codex, gemini
from taskrunner.agents.aider import AiderReader
from taskrunner.agents.claude import ClaudeReader
from taskrunner.agents.codex import CodexReader
from taskrunner.agents.gemini import GeminiReader
from taskrunner.agents.workspace import TaskDir
from taskrunner.model import TaskSpec

PROMPT = Path("/w/.task/t/run-1/prompt.md")
WS = Path("/w")


def test_names_other_modules_import_stay_importable() -> None:
    from taskrunner.agents import (  # noqa: F401
        INPUT_FILES, PRESETS, PROMPT_FILE, SCRIPT_FILE, SHELL_ARGV, AgentError, Prepared, prepare,
    )
    assert SHELL_ARGV == ("bash", "-euo", "pipefail")
    assert set(agents.READER_PRESETS) <= set(PRESETS) and {"shell", "command"} <= set(PRESETS)


@pytest.mark.parametrize(("preset", "program"), [("claude", "claude"), ("codex", "codex"), ("gemini", "gemini"),
                                                 ("aider", "aider"), ("shell", None), ("command", None)])
def test_cli_program_names_the_program_a_worker_looks_for(preset: str, program: str | None) -> None:
    assert agents.cli_program(preset) == program


# ---------------------------------------------------------------------------- claude


def test_claude_argv_is_headless_stream_json_with_the_prompt_on_stdin() -> None:
    argv, env, stdin = claude.command({"preset": "claude"}, {}, PROMPT, WS)
    assert argv == ["claude", "-p", "--output-format", "stream-json", "--verbose", "--permission-mode", "acceptEdits"]
    assert stdin == PROMPT and str(PROMPT) not in argv
    assert env == {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
                   "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}


def test_claude_argv_carries_every_configured_key() -> None:
    agent = {"preset": "claude", "path": "/opt/claude/bin/claude", "model": "claude-sonnet", "max_budget_usd": 2.5,
             "permission_mode": "plan", "allowed_tools": ["Read", "Bash(git *)"], "disallowed_tools": ["WebFetch"],
             "append_system_prompt": "Be brief.", "extra_args": ["--effort", "low"],
             "backend": {"provider": "anthropic", "model": "ignored", "base_url": "http://127.0.0.1:9"}}
    argv, env, _ = claude.command(agent, {"max_turns": 7, "max_cost_usd": 9}, PROMPT, WS)
    assert argv == ["/opt/claude/bin/claude", "-p", "--output-format", "stream-json", "--verbose",
                    "--permission-mode", "plan", "--model", "claude-sonnet", "--max-turns", "7",
                    "--max-budget-usd", "2.5", "--allowedTools", "Read", "Bash(git *)", "--disallowedTools",
                    "WebFetch", "--append-system-prompt", "Be brief.", "--effort", "low"]
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"


def test_claude_budget_cost_is_its_max_budget_when_the_agent_sets_none() -> None:
    argv, _, _ = claude.command({"preset": "claude", "backend": {"model": "claude-b"}}, {"max_cost_usd": 0.5},
                                PROMPT, WS)
    assert argv[-4:] == ["--model", "claude-b", "--max-budget-usd", "0.5"]


# ---------------------------------------------------------------------------- codex


def test_codex_argv_reads_the_prompt_from_stdin_in_a_workspace_write_sandbox() -> None:
    argv, env, stdin = codex.command({"preset": "codex"}, {}, PROMPT, WS)
    assert argv[:7] == ["codex", "exec", "--json", "--skip-git-repo-check", "--sandbox", "workspace-write", "-c"]
    assert argv[-1] == "-" and stdin == PROMPT and env == {}
    assert "analytics.enabled=false" in argv and 'history.persistence="none"' in argv


def test_codex_base_url_configures_a_responses_provider() -> None:
    agent = {"preset": "codex", "model": "gpt-5.5", "sandbox_mode": "read-only", "extra_args": ["--ephemeral"],
             "backend": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "env_key": "SCRIPTED_API_KEY"}}
    argv, _, _ = codex.command(agent, {}, PROMPT, WS)
    settings = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-c"]
    assert settings[:5] == ['model_provider="taskrun"', 'model_providers.taskrun.name="taskrun"',
                            'model_providers.taskrun.base_url="http://127.0.0.1:9/v1"',
                            'model_providers.taskrun.wire_api="responses"',
                            'model_providers.taskrun.env_key="SCRIPTED_API_KEY"']
    assert argv[5:8] == ["read-only", "-m", "gpt-5.5"] and argv[-2:] == ["--ephemeral", "-"]


# ---------------------------------------------------------------------------- gemini


def test_gemini_argv_is_headless_with_an_approval_mode_and_the_prompt_on_stdin() -> None:
    argv, env, stdin = gemini.command({"preset": "gemini"}, {}, PROMPT, WS)
    assert argv == ["gemini", "-p", "", "--output-format", "stream-json", "--approval-mode", "auto_edit", "--skip-trust"]
    assert stdin == PROMPT and env == {"GEMINI_CLI_NO_RELAUNCH": "true"}
    argv, env, _ = gemini.command({"preset": "gemini", "approval_mode": "yolo", "model": "gemini-2.5-pro",
                                   "backend": {"base_url": "http://127.0.0.1:9"}}, {}, PROMPT, WS)
    assert argv[6:] == ["yolo", "--skip-trust", "-m", "gemini-2.5-pro"]
    assert env["GOOGLE_GEMINI_BASE_URL"] == "http://127.0.0.1:9"


# ---------------------------------------------------------------------------- aider


def test_aider_argv_uses_the_message_file_and_keeps_its_files_out_of_the_checkout() -> None:
    run = Path("/w/.task/t/run-1")
    argv, env, stdin = aider.command({"preset": "aider", "model": "openai/gpt-4o",
                                      "backend": {"base_url": "http://127.0.0.1:9/v1"}}, {}, PROMPT, WS)
    assert argv[:4] == ["aider", "--message-file", str(PROMPT), "--yes-always"]
    for flag in ("--no-auto-commits", "--no-pretty", "--no-stream", "--no-check-update", "--no-analytics",
                 "--no-gitignore", "--no-show-model-warnings"):
        assert flag in argv
    assert argv[argv.index("--map-tokens") + 1] == "0"
    assert argv[argv.index("--chat-history-file") + 1] == str(run / "aider.chat.md")
    assert argv[-2:] == ["--model", "openai/gpt-4o"]
    assert stdin is None
    assert env == {"COLUMNS": "4000", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "OPENAI_API_BASE": "http://127.0.0.1:9/v1"}


# ---------------------------------------------------------------------------- prepare


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[Any]]:
    workspace, run_dir = tmp_path / "ws", tmp_path / "run"
    (workspace / "tasks").mkdir(parents=True)
    run_dir.mkdir()
    (workspace / "tasks" / "t.md").write_text("# Do it {prompt_file}\n\n```sh\necho hi\n```\n")
    calls: list[Any] = []

    def write_task_dir(ws: Path, manifest: Any, spec: TaskSpec, preset: str) -> TaskDir:
        calls.append((ws, manifest, spec, preset))
        path = ws / ".task" / spec.id / "run-1"
        path.mkdir(parents=True)
        (path / "prompt.md").write_text("the prompt")
        return TaskDir(path, path / "prompt.md", "the prompt")

    monkeypatch.setattr("taskrunner.agents.workspace.write_task_dir", write_task_dir)
    return workspace, run_dir, calls


def manifest(**extra: Any) -> dict[str, Any]:
    return {"task_id": "t", "task_file": "tasks/t.md", "run_id": "r-7", "run_number": 1, **extra}


def test_prepare_shell_writes_the_script_in_the_run_dir(checkout: tuple[Path, Path, list[Any]]) -> None:
    workspace, run_dir, calls = checkout
    prepared = agents.prepare({"preset": "shell"}, run_dir, workspace, manifest())
    assert prepared.argv == ["bash", "-euo", "pipefail", str(run_dir / "script.sh")]
    assert (run_dir / "script.sh").read_text() == "echo hi\n"
    assert (prepared.reader, prepared.stdin, prepared.env, prepared.inputs) == (None, None, {}, [])
    assert calls == []


def test_prepare_command_fills_placeholders_literally(checkout: tuple[Path, Path, list[Any]]) -> None:
    workspace, run_dir, calls = checkout
    agent = {"preset": "command",
             "command": ["my-agent", "--prompt", "{prompt_file}", "{task_file}", "{workspace}", "{run_id}", "{x}{}"]}
    prepared = agents.prepare(agent, run_dir, workspace, manifest())
    prompt = workspace / ".task" / "t" / "run-1" / "prompt.md"
    assert prepared.argv == ["my-agent", "--prompt", str(prompt), "tasks/t.md", str(workspace), "r-7", "{x}{}"]
    assert prepared.reader is None and prepared.stdin is None
    assert calls[0][3] == "command"


@pytest.mark.parametrize(("preset", "reader", "stdin"), [
    ("claude", ClaudeReader, True), ("codex", CodexReader, True), ("gemini", GeminiReader, True),
    ("aider", AiderReader, False),
])
def test_prepare_a_cli_preset_gives_argv_env_stdin_and_a_reader(checkout: tuple[Path, Path, list[Any]], preset: str,
                                                                reader: type, stdin: bool) -> None:
    workspace, run_dir, calls = checkout
    agent = {"preset": preset, "model": "m-1", "prices": {"input": 1, "output": 2}}
    prepared = agents.prepare(agent, run_dir, workspace, manifest(budget={"max_turns": 4, "max_cost_usd": None}))
    prompt = workspace / ".task" / "t" / "run-1" / "prompt.md"
    assert prepared.argv[0] == agents.cli_program(preset)
    assert isinstance(prepared.reader, reader)
    assert prepared.reader.budget == {"max_turns": 4, "max_cost_usd": None}
    assert prepared.reader.report().model == "m-1"
    assert prepared.stdin == (prompt if stdin else None)
    assert all(len(arg) < 1000 for arg in prepared.argv)
    assert calls[0][2].id == "t" and calls[0][3] == preset
    if preset == "claude":
        assert prepared.argv[prepared.argv.index("--max-turns") + 1] == "4"
    if preset == "aider":
        assert str(prompt) in prepared.argv and str(prompt.parent / "aider.chat.md") in prepared.argv


@pytest.mark.parametrize("preset", ["claude", "codex", "gemini", "aider"])
def test_a_tool_preset_gets_a_tmpdir_in_its_home(checkout: tuple[Path, Path, list[Any]], preset: str) -> None:
    # codex refuses its tools when its home lies under TMPDIR (/tmp on most Workers): a Run's own TMPDIR.
    workspace, run_dir, _ = checkout
    prepared = agents.prepare({"preset": preset}, run_dir, workspace, manifest())
    assert prepared.home_files[agents.TMP_DIR] == ""


def test_gemini_gets_headless_settings_with_the_turn_budget(checkout: tuple[Path, Path, list[Any]]) -> None:
    workspace, run_dir, _ = checkout
    prepared = agents.prepare({"preset": "gemini"}, run_dir, workspace, manifest(budget={"max_turns": 3}))
    settings = json.loads(prepared.home_files[".gemini/settings.json"])
    assert settings["security"]["auth"]["selectedType"] == "gemini-api-key"
    assert settings["privacy"]["usageStatisticsEnabled"] is False
    assert settings["model"]["maxSessionTurns"] == 3
    shutil.rmtree(workspace / ".task")
    unbudgeted = agents.prepare({"preset": "gemini"}, run_dir, workspace, manifest())
    assert "model" not in json.loads(unbudgeted.home_files[".gemini/settings.json"])


def test_prepare_uses_the_agents_path_as_argv0(checkout: tuple[Path, Path, list[Any]]) -> None:
    workspace, run_dir, _ = checkout
    prepared = agents.prepare({"preset": "codex", "path": "/opt/codex/codex"}, run_dir, workspace, manifest())
    assert prepared.argv[0] == "/opt/codex/codex"


def test_prepare_refuses_an_unknown_preset(checkout: tuple[Path, Path, list[Any]]) -> None:
    workspace, run_dir, _ = checkout
    with pytest.raises(agents.AgentError, match="unknown Agent preset 'gpt'"):
        agents.prepare({"preset": "gpt"}, run_dir, workspace, manifest())


def test_prepare_shell_without_a_script_block_fails(checkout: tuple[Path, Path, list[Any]]) -> None:
    workspace, run_dir, _ = checkout
    (workspace / "tasks" / "t.md").write_text("# Just words\n")
    with pytest.raises(agents.AgentError, match="no ```sh or ```bash block"):
        agents.prepare({"preset": "shell"}, run_dir, workspace, manifest())


def test_prepare_writes_the_real_task_dir_for_a_cli_preset(tmp_path: Path) -> None:
    workspace, run_dir = tmp_path / "ws", tmp_path / "run"
    (workspace / "tasks").mkdir(parents=True)
    run_dir.mkdir()
    (workspace / "tasks" / "t.md").write_text("# Fix the bug\n\nMake it work.\n")
    prepared = agents.prepare({"preset": "claude", "name": "claude"}, run_dir, workspace, manifest())
    assert prepared.stdin is not None and prepared.stdin.is_file()
    assert prepared.stdin.parent == workspace / ".task" / "t" / "run-1"
    assert "Make it work." in (prepared.stdin.parent / "task.md").read_text()


def test_reader_for_matches_presets_and_reads_the_manifest() -> None:
    agent = {"preset": "codex", "model": "gpt-5.5", "backend": {"provider": "acme", "model": "m"},
             "prices": {"input": 1, "output": 2}}
    reader = agents.reader_for(agent, {"budget": {"max_turns": 5}})
    assert isinstance(reader, CodexReader)
    assert (reader.report().provider, reader.report().model) == ("acme", "gpt-5.5")
    assert reader.budget == {"max_turns": 5} and reader.prices == {"input": 1, "output": 2}
    assert agents.reader_for({"preset": "shell"}, {}) is None
    assert agents.reader_for({"preset": "command"}, {}) is None
    assert agents.reader_for({"preset": "nope"}, {}) is None
