"""The configuration as hostile input (property tests): every key of a valid .taskrun.yaml given a
value of the wrong type, text mutated anywhere, and YAML alias bombs. parse_config gives a Config or
a ConfigError naming the file, the dotted key and the reason; never another exception, never a hang,
and a "billion laughs" is refused before anything is expanded."""

from __future__ import annotations

import copy
import time
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from taskrunner.config import Config, parse_config
from taskrunner.errors import ConfigError
from tests.unit.test_property_values import assert_clear_reason, budget, mutate_bytes, nasty_values, swap_types

FILE = ".taskrun.yaml"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
#: A configuration that gives every key a valid value (security's files are paths, not read here).
VALID: dict[str, Any] = {
    "default_agent": "claude",
    "agents": {
        "shell": {"preset": "shell", "env": ["HOME_DIR"]},
        "cmd": {"preset": "command", "command": ["my-agent", "--prompt", "{prompt_file}"]},
        "claude": {"preset": "claude", "path": "/opt/claude", "model": "m", "max_turns": 5, "max_cost_usd": 2.5,
                   "max_budget_usd": 3, "permission_mode": "acceptEdits", "allowed_tools": ["Read"],
                   "disallowed_tools": ["Bash"], "append_system_prompt": "Be brief.", "extra_args": ["--verbose"],
                   "prompt_template": "{{ title }}", "pause_scope": "worker", "env": ["ANTHROPIC_API_KEY"],
                   "backend": {"provider": "anthropic", "model": "m", "context_window": 200000,
                               "base_url": "https://api.anthropic.com"}},
        "gemini": {"preset": "gemini", "approval_mode": "yolo"},
        "codex": {"preset": "codex", "sandbox_mode": "read-only"},
    },
    "workers": {
        "local": {"transport": "local", "slots": 2, "agents": ["shell", "claude"], "labels": {"gpu": "yes"},
                  "home": "/tmp/w", "sandbox": "none"},
        "build": {"transport": "ssh", "host": "10.0.0.2", "port": 2222, "user": "ci", "identity": "~/.ssh/id",
                  "host_key": HOST_KEY, "agents": "claude"},
    },
    "scheduler": {"retries": 2, "backoff": {"base": "5s", "max": "5m"}, "timeout": "1h",
                  "groups": {"g": {"parallel": 2}}, "worker_grace": "2m", "worker_offline_after": "30s"},
    "git": {"commit": True, "push": False, "remote": "origin", "result_branch_prefix": "taskrun/",
            "author": "Bot <bot@example.com>", "max_result_bytes": 1000, "poll": "5m",
            "pull_requests": {"forge": "github", "api_url": "https://api.github.com", "repository": "o/r",
                              "token_env": "GH_TOKEN", "draft": False}},
    "webhook": {"listen": "127.0.0.1:8787", "secret_env": "HOOK_SECRET", "max_body_bytes": 4096},
    "security": {"allowed_signers": "signers", "revocation_file": "revoked"},
    "prices": {"m": {"input": 3, "output": 15, "cache_read": 0.3, "cache_write": 3.75}},
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path of a nested mapping, mappings' own paths included."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield prefix + (key,)
            yield from _paths(inner, prefix + (key,))


PATHS = sorted(_paths(VALID), key=str)


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    config = copy.deepcopy(VALID)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def _value_at(path: tuple[Any, ...]) -> Any:
    node: Any = VALID
    for key in path:
        node = node[key]
    return node


def _parsed_or_refused(text: str) -> Config | ConfigError:
    try:
        return parse_config(text, FILE)
    except ConfigError as exc:
        assert exc.file == FILE and str(exc).startswith(FILE)
        assert_clear_reason(exc.reason)
        return exc


def test_the_valid_configuration_the_mutations_start_from_parses() -> None:
    config = parse_config(yaml.safe_dump(VALID), FILE)
    assert set(config.agents) == {"shell", "cmd", "claude", "gemini", "codex"} and config.webhook is not None


@given(st.sampled_from(PATHS).flatmap(lambda path: st.tuples(st.just(path), swap_types(_value_at(path)))))
@budget(100)
def test_every_key_with_a_value_of_another_type_is_refused_naming_that_key(case: tuple[tuple[Any, ...], Any]) -> None:
    path, value = case
    result = _parsed_or_refused(yaml.safe_dump(_with(path, value), allow_unicode=True))
    if isinstance(result, ConfigError):
        dotted = ".".join(map(str, path))
        # The key named is the one changed, something under it, or the one that depends on it
        # (default_agent, a Worker's agents) naming what it lacks.
        assert result.key is not None, result
        assert (result.key.startswith(dotted) or dotted.startswith(result.key)
                or result.key in ("default_agent", "workers.local.agents", "workers.build.agents", "workers")), result


@given(mutate_bytes(yaml.safe_dump(VALID).encode()))
@budget(120)
def test_mutated_configuration_text_gives_a_config_or_a_config_error(data: bytes) -> None:
    _parsed_or_refused(data.decode("utf-8", errors="replace"))


@given(nasty_values(12))
@budget(100)
def test_any_document_gives_a_config_or_a_config_error(document: Any) -> None:
    _parsed_or_refused(yaml.safe_dump(document, allow_unicode=True))


# ---------------------------------------------------------------- alias bombs


def _laughs(levels: int, width: int = 9) -> str:
    """A flow sequence of anchors, each level `width` aliases of the one before: width**levels leaves."""
    parts = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        parts.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("path", [p for p in PATHS if not isinstance(_value_at(p), dict)] + [("agents",), ("x",)],
                         ids=lambda path: ".".join(map(str, path)))
def test_a_billion_laughs_at_any_key_is_refused_quickly(path: tuple[Any, ...]) -> None:
    text = yaml.safe_dump(_with(path, "BOMB")).replace("BOMB", _laughs(10), 1)
    assert "BOMB" not in text
    started = time.process_time()
    result = _parsed_or_refused(text)
    assert isinstance(result, ConfigError)
    assert time.process_time() - started < 1.0


def test_a_billion_laughs_names_the_aliases_as_the_reason() -> None:
    result = _parsed_or_refused(f"agents: {{x: {{preset: claude, extra_args: {_laughs(10)}}}}}\n")
    assert isinstance(result, ConfigError) and "alias" in result.reason, result


def test_a_few_aliases_still_work() -> None:
    config = parse_config("agents:\n  a: &agent {preset: claude}\n  b: *agent\n"
                          "workers: {local: {transport: local, agents: [a, b]}}\ndefault_agent: a\n", FILE)
    assert config.agents["b"].preset == "claude"


@pytest.mark.parametrize("text", [
    'webhook: {listen: "h:²", secret_env: S}',                       # a digit int() refuses
    'webhook: {listen: "h:' + "9" * 5000 + '", secret_env: S}',      # past int()'s digit limit
    "agents: {x: {preset: claude, prompt_template: \"" + "{{(" * 2000 + "\"}}",  # jinja2 recursion
    'security: {allowed_signers: "~no-such-user-here/x"}',          # a home pathlib cannot find
    'security: {allowed_signers: "a\\0b"}',
    "workers: {w: {transport: local, slots: 0x" + "f" * 5000 + "}}",  # hex converts at any length
    "scheduler: {retries: " + "1" * 5000 + "}",
    "scheduler: {timeout: 2001-13-40}",
    "x: &a [*a]",
    "[" * 1500 + "]" * 1500,
], ids=lambda text: text[:30])
def test_values_that_once_crashed_the_parser_are_a_config_error(text: str) -> None:
    assert isinstance(_parsed_or_refused(text), ConfigError)
