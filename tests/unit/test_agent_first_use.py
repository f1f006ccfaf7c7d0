"""What a first setup of an Agent meets: backend defaults, prompt templates tried at load, rounded costs,
and `taskrun agents` for an Agent with a configured path or one no Worker offers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskrunner import pauses
from taskrunner.agents import workspace
from taskrunner.agents.prompt import BARE_VALUES, DEFAULT_TEMPLATE, SAMPLE_VALUES, PromptError, trial_render
from taskrunner.agentwire import run_report
from taskrunner.availability import agent_rows
from taskrunner.config import load_config, parse_config
from taskrunner.errors import ConfigError
from taskrunner.taskfile import parse_task
from tests.conftest import taskrun

FILE = ".taskrun.yaml"


def _agents(text: str) -> str:
    return f"agents:\n  shell: {{preset: shell}}\n{text}"


# ---------------------------------------------------------------- backend: every key optional


@pytest.mark.parametrize(("preset", "provider"), [("claude", "anthropic"), ("codex", "openai"),
                                                  ("gemini", "google"), ("aider", None)])
def test_a_backend_with_only_a_base_url_takes_the_presets_provider_and_the_tools_model(
        preset: str, provider: str | None) -> None:
    config = parse_config(_agents(f"  a: {{preset: {preset}, backend: {{base_url: 'http://127.0.0.1:9'}}}}\n"), FILE)

    backend = config.agents["a"].backend
    assert backend is not None
    assert (backend.provider, backend.model, backend.base_url) == (provider, None, "http://127.0.0.1:9")
    assert backend.as_manifest()["provider"] == provider


def test_a_backend_without_a_model_takes_the_agents_model_and_given_keys_win() -> None:
    config = parse_config(_agents("  a: {preset: claude, model: claude-opus-4-1, backend: {context_window: 9}}\n"
                                  "  b: {preset: codex, model: x, backend: {provider: acme, model: m}}\n"), FILE)

    assert (config.agents["a"].backend.provider, config.agents["a"].backend.model) == ("anthropic", "claude-opus-4-1")
    assert (config.agents["b"].backend.provider, config.agents["b"].backend.model) == ("acme", "m")


@pytest.mark.parametrize(("backend", "key", "fragment"), [
    ("{base_url: 'http://h:1', region: eu}", "agents.a.backend.region", "unknown key"),
    ("{provider: 7}", "agents.a.backend.provider", "expected a non-empty string"),
    ("{model: [m]}", "agents.a.backend.model", "expected a non-empty string"),
    ("{base_url: 'h:1'}", "agents.a.backend.base_url", "expected an http(s) URL"),
    ("openai", "agents.a.backend", "expected a mapping"),
])
def test_a_backend_still_refuses_unknown_keys_and_bad_types(backend: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_agents(f"  a: {{preset: codex, backend: {backend}}}\n"), FILE)

    assert caught.value.key == key and fragment in caught.value.reason


# ---------------------------------------------------------------- prompt templates tried at load


def test_a_misspelt_variable_is_refused_at_load_naming_the_file_key_line_and_the_variables() -> None:
    text = _agents("  a:\n    preset: claude\n    prompt_template: |\n      Work on {{ task_id }}.\n"
                   "      {{ titel }}\n")

    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)

    message = str(caught.value)
    assert message.startswith(".taskrun.yaml: key 'agents.a.prompt_template': ")
    assert "line 2: 'titel' is undefined" in message
    assert "a template sees task_id, title, body" in message and "budget, timeout" in message


def test_a_misspelt_variable_in_a_branch_a_run_without_context_takes_is_refused_too() -> None:
    with pytest.raises(PromptError, match=r"line 2: 'contxt' is undefined"):
        trial_render("{% if not context %}\n{{ contxt }}{% endif %}", "t")
    with pytest.raises(PromptError, match=r"line 1: 'nope' is undefined"):
        trial_render("{% if index_file %}{{ nope }}{% endif %}", "t")


def test_a_template_file_error_names_the_file_and_its_line(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "task.j2").write_text("Hello\n\n{{ budget.turns }}\n")
    (tmp_path / FILE).write_text(_agents("  a: {preset: claude, prompt_template_file: prompts/task.j2}\n"))

    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)

    assert caught.value.key == "agents.a.prompt_template_file"
    assert "prompts/task.j2, line 3:" in caught.value.reason and "'turns'" in caught.value.reason


def test_templates_using_every_variable_and_guarding_optional_ones_load() -> None:
    template = " ".join(f"{{{{ {name} }}}}" for name in SAMPLE_VALUES)
    template += "{% if budget.max_cost_usd %}{{ budget.max_cost_usd * 2 }}{% endif %}"

    trial_render(template, "t")
    trial_render(DEFAULT_TEMPLATE, "t")
    parse_config(_agents("  a: {preset: claude, prompt_template: '{{ title }} {{ budget.max_turns }}'}\n"), FILE)


def test_a_template_that_spins_is_stopped_at_load() -> None:
    with pytest.raises(PromptError, match="took over"):
        trial_render("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "t")


def test_the_sample_values_are_exactly_the_variables_a_run_gives(tmp_path: Path) -> None:
    spec = parse_task("t", "tasks/t.md", b"# T\n\nDo it.\n")
    values = workspace._values({"task_id": "t", "agent": {"name": "claude"}}, spec, "claude",
                               ".task/t/run-1", 1, (), (), None)

    assert set(values) == set(SAMPLE_VALUES) == set(BARE_VALUES)


# ---------------------------------------------------------------- cost_usd recorded without float noise


def test_a_reported_cost_is_rounded_to_six_decimals_and_stays_a_number() -> None:
    report = run_report({"cost_usd": 0.0012000000000000001})
    whole = run_report({"cost_usd": 2})

    assert report is not None and report.cost_usd == 0.0012
    assert json.dumps(report.cost_usd) == "0.0012"
    assert whole is not None and whole.cost_usd == 2.0 and isinstance(whole.cost_usd, float)


# ---------------------------------------------------------------- taskrun agents


CONFIG = """\
agents:
  shell: {preset: shell}
  gemini: {preset: gemini, path: /nonexistent/gemini}
  claude: {preset: claude}
  codex: {preset: codex}
workers:
  local: {transport: local, agents: [shell, gemini, codex]}
"""


def test_an_agent_with_a_path_is_configured_there_not_the_path_clis_version() -> None:
    config = parse_config(CONFIG, FILE)
    workers = [{"name": "local", "online": True, "agents": ["shell", "gemini", "codex"],
                "presets": {"gemini": {"version": "0.61.0", "path": "/usr/bin/gemini"}}}]

    rows = {row["name"]: row for row in agent_rows(config.agents, workers, pauses.Pauses([]), 0.0)}

    assert rows["gemini"]["workers"] == [{"worker": "local", "online": True, "status": "configured",
                                          "version": None}]
    assert rows["gemini"]["fix"] is None
    assert rows["claude"]["workers"] == []
    assert rows["claude"]["fix"] == "add 'claude' to workers.<name>.agents in .taskrun.yaml"
    assert rows["codex"]["fix"] == "install the codex CLI on a Worker's PATH or set agents.codex.path in .taskrun.yaml"


def test_taskrun_agents_shows_the_configured_path_and_the_fix(repo: Path) -> None:
    (repo / FILE).write_text(CONFIG)

    result = taskrun(repo, "agents")

    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "local: configured path /nonexistent/gemini (checked when a Run starts)" in text
    assert "0.61.0" not in text
    assert "claude: no Worker offers it: add 'claude' to workers.<name>.agents in .taskrun.yaml" in text
