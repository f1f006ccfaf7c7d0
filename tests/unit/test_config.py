""".taskrun.yaml -> Config: defaults, DESIGN.md's example, the init template, and every refusal."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from taskrunner.config import (
    AGENT_PRESETS,
    Config,
    GitConfig,
    SchedulerConfig,
    default_config,
    load_config,
    parse_config,
)
from taskrunner.config_template import INIT_TEMPLATE
from taskrunner.defaults import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    GRACE_SECONDS,
    LOCAL_SLOTS,
    OFFLINE_AFTER_SECONDS,
    RETRIES,
    TIMEOUT,
)
from taskrunner.errors import ConfigError
from taskrunner.model import AgentSpec, ModelBackend, WorkerSpec

FILE = ".taskrun.yaml"
# A well-formed ed25519 key blob: string "ssh-ed25519" then a 32-byte key.
ED25519 = "ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + bytes(range(32))).decode()
SSH = f'{{transport: ssh, host: 10.0.0.5, host_key: "{ED25519}"}}'

DESIGN_EXAMPLE = f"""\
default_agent: shell
agents:
  shell:  {{preset: shell}}
  claude: {{preset: claude, backend: {{provider: anthropic, model: claude-sonnet-4-5}}, env: [ANTHROPIC_API_KEY]}}
workers:
  local:   {{transport: local, slots: 2, agents: [shell]}}
  build-1: {{transport: ssh, host: 10.0.0.5, user: taskrun, identity: ~/.ssh/taskrun_ed25519,
            host_key: "{ED25519}", slots: 4, labels: {{gpu: "true"}}, agents: [shell, claude]}}
scheduler: {{retries: 2, backoff: {{base: 5s, max: 5m}}, timeout: 1h, groups: {{backend: {{parallel: 1}}}}}}
git: {{commit: true, push: false, remote: origin, result_branch_prefix: taskrun/}}
"""


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, FILE)
    assert caught.value.file == FILE
    return caught.value


# ----------------------------------------------------------------------------- happy paths


def test_default_config_is_the_shell_agent_on_the_local_worker() -> None:
    config = default_config()
    assert config.default_agent == "shell"
    assert config.agents == {"shell": AgentSpec(name="shell", preset="shell")}
    assert config.workers == {
        "local": WorkerSpec(name="local", transport="local", slots=LOCAL_SLOTS, agents=("shell",))
    }
    assert config.scheduler == SchedulerConfig(RETRIES, BACKOFF_BASE, BACKOFF_MAX, TIMEOUT, {})
    assert config.git == GitConfig(commit=True, push=False, remote="origin", result_branch_prefix="taskrun/")
    assert config.source == "<embedded default>"


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "---\n"])
def test_empty_file_gives_the_embedded_default_values(text: str) -> None:
    config = parse_config(text, FILE)
    assert config.source == FILE
    assert _without_source(config) == _without_source(default_config())


def test_design_example_config_parses() -> None:
    config = parse_config(DESIGN_EXAMPLE, FILE)
    assert config.default_agent == "shell"
    assert list(config.agents) == ["shell", "claude"]
    assert config.agents["claude"] == AgentSpec(
        name="claude",
        preset="claude",
        backend=ModelBackend(provider="anthropic", model="claude-sonnet-4-5"),
        env=("ANTHROPIC_API_KEY",),
    )
    assert config.workers["local"] == WorkerSpec(name="local", transport="local", slots=2, agents=("shell",))
    assert config.workers["build-1"] == WorkerSpec(
        name="build-1",
        transport="ssh",
        slots=4,
        agents=("shell", "claude"),
        labels={"gpu": "true"},
        host="10.0.0.5",
        port=22,
        user="taskrun",
        identity="~/.ssh/taskrun_ed25519",
        host_key=ED25519,
    )
    assert config.scheduler == SchedulerConfig(
        retries=2, backoff_base=5.0, backoff_max=300.0, timeout=3600.0, groups={"backend": 1}
    )
    assert config.git == GitConfig()


def test_init_template_parses_to_the_embedded_default() -> None:
    config = parse_config(INIT_TEMPLATE, FILE)
    assert _without_source(config) == _without_source(default_config())


def test_init_template_mentions_a_commented_claude_example() -> None:
    assert "# claude:" in INIT_TEMPLATE
    assert "#   preset: claude" in INIT_TEMPLATE


def test_omitted_agents_mean_the_implicit_shell_agent() -> None:
    config = parse_config("workers: {w: {transport: local}}", FILE)
    assert list(config.agents) == ["shell"]
    assert config.workers["w"].agents == ("shell",)
    assert config.workers["w"].slots == 1


def test_omitted_workers_mean_the_embedded_local_worker_offering_every_agent() -> None:
    config = parse_config("agents: {shell: {preset: shell}, aider: {preset: aider}}", FILE)
    assert config.workers == {
        "local": WorkerSpec(name="local", transport="local", slots=LOCAL_SLOTS, agents=("shell", "aider"))
    }


def test_worker_agents_default_to_the_default_agent() -> None:
    text = "default_agent: c\nagents: {c: {preset: codex}}\nworkers: {w: {transport: local}}"
    assert parse_config(text, FILE).workers["w"].agents == ("c",)


def test_command_agent_takes_an_argv_with_the_prompt_placeholder() -> None:
    text = "agents: {shell: {preset: shell}, mine: {preset: command, command: [my-agent, --prompt, '{prompt_file}']}}"
    assert parse_config(text, FILE).agents["mine"].command == ("my-agent", "--prompt", "{prompt_file}")


def test_backend_context_window_is_read() -> None:
    text = "agents: {shell: {preset: shell}, c: {preset: claude, backend: {provider: a, model: m, context_window: 200000}}}"
    assert parse_config(text, FILE).agents["c"].backend == ModelBackend("a", "m", 200000)


@pytest.mark.parametrize("preset", AGENT_PRESETS)
def test_every_preset_is_accepted(preset: str) -> None:
    command = ", command: [x]" if preset == "command" else ""
    text = f"agents: {{shell: {{preset: shell}}, a: {{preset: {preset}{command}}}}}"
    assert parse_config(text, FILE).agents["a"].preset == preset


def test_ssh_worker_reads_port_user_identity_known_hosts_and_home() -> None:
    text = (
        "workers: {w: {transport: ssh, host: example.org, port: 2222, user: u, identity: ~/.ssh/id,"
        " known_hosts: ~/.ssh/known_hosts, home: /srv/taskrun}}"
    )
    worker = parse_config(text, FILE).workers["w"]
    assert (worker.host, worker.port, worker.user, worker.identity) == ("example.org", 2222, "u", "~/.ssh/id")
    assert (worker.known_hosts, worker.host_key, worker.home) == ("~/.ssh/known_hosts", None, "/srv/taskrun")


def test_host_key_comment_is_dropped() -> None:
    text = f'workers: {{w: {{transport: ssh, host: h, host_key: "{ED25519} root@box"}}}}'
    assert parse_config(text, FILE).workers["w"].host_key == ED25519


def test_worker_labels_are_coerced_like_task_labels() -> None:
    text = "workers: {w: {transport: local, labels: {gpu: true, cores: 8}}}"
    assert parse_config(text, FILE).workers["w"].labels == {"gpu": "true", "cores": "8"}


def test_null_sections_and_values_mean_defaults() -> None:
    config = parse_config("scheduler:\n  timeout:\ngit:\n  push:\n", FILE)
    assert config.scheduler.timeout == TIMEOUT
    assert config.git.push is False


def test_load_config_without_a_file_is_the_embedded_default(tmp_path: Path) -> None:
    assert load_config(tmp_path) == default_config()


def test_load_config_reads_the_file_and_records_its_source(tmp_path: Path) -> None:
    (tmp_path / ".taskrun.yaml").write_text("scheduler: {retries: 3}\n")
    config = load_config(tmp_path)
    assert config.scheduler.retries == 3
    assert config.source == str(tmp_path / ".taskrun.yaml")


def test_load_config_refuses_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / ".taskrun.yaml").mkdir()
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path)


def test_load_config_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / ".taskrun.yaml").write_bytes(b"git: {remote: caf\xe9}\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(tmp_path)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / ".taskrun.yaml").write_text("git: {push: maybe}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.file == str(tmp_path / ".taskrun.yaml")
    assert str(caught.value).startswith(f"{tmp_path / '.taskrun.yaml'}: key 'git.push': ")


# ----------------------------------------------------------------------------- syntax and shape


def test_yaml_syntax_error_gives_line_and_column() -> None:
    err = error("git:\n  push: [true\n")
    assert err.key is None
    assert "invalid YAML at line 3, column 1" in err.reason


def test_duplicate_key_is_refused_with_its_line() -> None:
    err = error("git: {}\nscheduler: {}\ngit: {}\n")
    assert "duplicate key 'git'" in err.reason
    assert "line 3" in err.reason


def test_control_character_is_refused_with_line_and_column() -> None:
    assert error("git: {}\nx: a\x07b\n").reason == "invalid YAML at line 2, column 5: character #x0007 is not allowed"


def test_deeply_nested_yaml_is_refused_not_a_crash() -> None:
    assert error("[" * 100_000).reason == "invalid YAML: nested too deeply"


def test_unhashable_key_is_refused() -> None:
    assert "found unhashable key" in error("? [a]\n: b\n").reason


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    err = error(text)
    assert err.key is None
    assert "expected a mapping with keys default_agent, agents, workers, scheduler, git, webhook, security" in err.reason


def test_unknown_key_names_the_key_and_allowed_keys() -> None:
    err = error("shcheduler: {}\n")
    assert err.key == "shcheduler"
    assert err.reason == "unknown key; allowed keys are default_agent, agents, workers, scheduler, git, webhook, security, prices, records, notify, metrics"
    assert str(err) == f"{FILE}: key 'shcheduler': {err.reason}"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("agents: {shell: {preset: shell, cmd: [x]}}", "agents.shell.cmd"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, backend: {provider: a, model: m, size: 1}}}",
         "agents.c.backend.size"),
        ("workers: {w: {transport: local, cpu: 4}}", "workers.w.cpu"),
        ("scheduler: {retry: 1}", "scheduler.retry"),
        ("scheduler: {backoff: {min: 1s}}", "scheduler.backoff.min"),
        ("scheduler: {groups: {g: {parallel: 1, burst: 2}}}", "scheduler.groups.g.burst"),
        ("git: {sign: true}", "git.sign"),
    ],
)
def test_unknown_keys_are_refused_at_every_level(text: str, key: str) -> None:
    err = error(text)
    assert err.key == key
    assert "unknown key; allowed keys are" in err.reason


# ----------------------------------------------------------------------------- agents


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("agents: [shell]", "agents", "expected a mapping of names to settings, got a list"),
        ("agents: {'bad name': {preset: shell}}", "agents.bad name", "expected a name"),
        ("agents: {shell: }", "agents.shell", "expected a mapping with keys preset"),
        ("agents: {shell: {env: [A]}}", "agents.shell.preset", "required, but missing"),
        ("agents: {shell: {preset: gpt}}", "agents.shell.preset",
         "expected one of shell, command, claude, codex, gemini, aider, got 'gpt'"),
        ("agents: {shell: {preset: shell}, x: {preset: command}}", "agents.x.command", "required for preset 'command'"),
        ("agents: {shell: {preset: shell}, x: {preset: command, command: 'my-agent --go'}}", "agents.x.command",
         "expected a list of arguments (argv), not a shell string"),
        ("agents: {shell: {preset: shell}, x: {preset: command, command: []}}", "agents.x.command",
         "expected a non-empty list"),
        ("agents: {shell: {preset: shell}, x: {preset: command, command: [sleep, 5]}}", "agents.x.command",
         "argument 2: expected a non-empty string (quote it), got the number 5"),
        ("agents: {shell: {preset: shell, command: [bash]}}", "agents.shell.command", "takes no command"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, backend: anthropic}}", "agents.c.backend",
         "expected a mapping with keys provider, model, context_window"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, backend: {model: [m]}}}", "agents.c.backend.model",
         "expected a non-empty string"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, backend: {base_url: 'http://h:1', url: x}}}",
         "agents.c.backend.url", "unknown key"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, backend: {provider: 1, model: m}}}",
         "agents.c.backend.provider", "expected a non-empty string"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, backend: {provider: p, model: m, context_window: 0}}}",
         "agents.c.backend.context_window", "expected a whole number >= 1, got 0"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, backend: {provider: p, model: m, context_window: 1k}}}",
         "agents.c.backend.context_window", "expected a whole number"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, env: [api_key]}}", "agents.c.env",
         "expected environment variable names"),
        ("agents: {shell: {preset: shell}, c: {preset: claude, env: {A: b}}}", "agents.c.env",
         "expected a list of environment variable names"),
    ],
)
def test_agent_errors_name_the_dotted_key(text: str, key: str, fragment: str) -> None:
    err = error(text)
    assert err.key == key
    assert fragment in err.reason


def test_default_agent_must_be_configured() -> None:
    err = error("default_agent: claude\n")
    assert err.key == "default_agent"
    assert err.reason == "'claude' is not a configured agent; configured agents: shell"


def test_implicit_default_agent_must_exist_when_agents_are_given() -> None:
    err = error("agents: {c: {preset: claude}}\n")
    assert err.key == "default_agent"
    assert "not set, so it is 'shell'" in err.reason
    assert "c" in err.reason


def test_default_agent_must_be_a_name() -> None:
    assert "expected an agent name" in error("default_agent: [shell]\n").reason


# ----------------------------------------------------------------------------- workers


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("workers: {}", "workers", "expected at least one worker"),
        ("workers: [local]", "workers", "expected a mapping of names to settings"),
        ("workers: {w: {slots: 2}}", "workers.w.transport", "required"),
        ("workers: {w: {transport: docker}}", "workers.w.transport", "expected one of local, ssh, got 'docker'"),
        ("workers: {w: {transport: local, slots: 0}}", "workers.w.slots", "expected a whole number >= 1, got 0"),
        ("workers: {w: {transport: local, slots: true}}", "workers.w.slots", "got the boolean true"),
        ("workers: {w: {transport: local, slots: '2'}}", "workers.w.slots", "expected a whole number"),
        ("workers: {w: {transport: local, agents: [claude]}}", "workers.w.agents",
         "'claude' is not a configured agent; configured agents: shell"),
        ("workers: {w: {transport: local, agents: []}}", "workers.w.agents", "at least one agent"),
        ("workers: {w: {transport: local, agents: [1]}}", "workers.w.agents", "expected agent names"),
        ("workers: {w: {transport: local, labels: {gpu: [1]}}}", "workers.w.labels", "label 'gpu'"),
        ("workers: {w: {transport: local, labels: {v: 1.5}}}", "workers.w.labels", "quote it"),
        ("workers: {w: {transport: local, host: h}}", "workers.w.host", "only for transport: ssh"),
        ("workers: {w: {transport: local, port: 22}}", "workers.w.port", "only for transport: ssh"),
        ("workers: {w: {transport: local, host_key: x}}", "workers.w.host_key", "only for transport: ssh"),
        ("workers: {w: {transport: local, home: 3}}", "workers.w.home", "expected a non-empty string"),
        (f"workers: {{w: {{transport: ssh, host_key: '{ED25519}'}}}}", "workers.w.host", "required for transport: ssh"),
        ("workers: {w: {transport: ssh, host: '-oProxyCommand=x', known_hosts: k}}", "workers.w.host",
         "expected a host name"),
        ("workers: {w: {transport: ssh, host: h}}", "workers.w.host_key",
         "pin the host key: run `taskrun worker add`"),
        ("workers: {w: {transport: ssh, host: h, known_hosts: k, port: 0}}", "workers.w.port",
         "expected a whole number from 1 to 65535, got 0"),
        ("workers: {w: {transport: ssh, host: h, known_hosts: k, port: 70000}}", "workers.w.port",
         "from 1 to 65535"),
        ("workers: {w: {transport: ssh, host: h, known_hosts: k, port: '22'}}", "workers.w.port",
         "expected a whole number"),
        ("workers: {w: {transport: ssh, host: h, known_hosts: k, user: [u]}}", "workers.w.user", "non-empty string"),
        ("workers: {w: {transport: ssh, host: h, known_hosts: k, identity: 1}}", "workers.w.identity",
         "non-empty string"),
        ("workers: {w: {transport: ssh, host: h, known_hosts: ''}}", "workers.w.known_hosts", "non-empty string"),
        ("workers: {w: {transport: ssh, host: h, host_key: 'AAAAC3Nza'}}", "workers.w.host_key",
         "expected 'TYPE BASE64-KEY'"),
        ("workers: {w: {transport: ssh, host: h, host_key: 'ssh-ed25519 AAAA...'}}", "workers.w.host_key",
         "not valid base64"),
        ("workers: {w: {transport: ssh, host: h, host_key: 'ssh-rsa AAAAC3NzaC1lZDI1NTE5'}}", "workers.w.host_key",
         "does not hold a 'ssh-rsa' key"),
        ("workers: {w: {transport: ssh, host: h, host_key: 1}}", "workers.w.host_key", "got the number 1"),
    ],
)
def test_worker_errors_name_the_dotted_key(text: str, key: str, fragment: str) -> None:
    err = error(text)
    assert err.key == key
    assert fragment in err.reason


# ----------------------------------------------------------------------------- scheduler and git


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("scheduler: [1]", "scheduler", "expected a mapping with keys retries, backoff, timeout, groups"),
        ("scheduler: {retries: -1}", "scheduler.retries", "expected a whole number >= 0, got -1"),
        ("scheduler: {retries: false}", "scheduler.retries", "got the boolean false"),
        ("scheduler: {timeout: forever}", "scheduler.timeout", "expected a duration like 30s, 5m or 1h"),
        ("scheduler: {timeout: 0s}", "scheduler.timeout", "greater than zero"),
        ("scheduler: {backoff: 5s}", "scheduler.backoff", "expected a mapping with keys base, max"),
        ("scheduler: {backoff: {base: soon}}", "scheduler.backoff.base", "expected a duration"),
        ("scheduler: {backoff: {max: -1}}", "scheduler.backoff.max", "greater than zero"),
        ("scheduler: {backoff: {base: 10m, max: 1m}}", "scheduler.backoff.max",
         "expected at least base (10m), got 1m"),
        ("scheduler: {backoff: {base: 10m}}", "scheduler.backoff.max", "expected at least base (10m), got 5m"),
        ("scheduler: {groups: [a]}", "scheduler.groups", "expected a mapping of names"),
        ("scheduler: {groups: {backend: 1}}", "scheduler.groups.backend", "expected a mapping with keys parallel"),
        ("scheduler: {groups: {backend: {}}}", "scheduler.groups.backend.parallel", "required"),
        ("scheduler: {groups: {backend: {parallel: 0}}}", "scheduler.groups.backend.parallel",
         "expected a whole number >= 1, got 0"),
        ("scheduler: {groups: {'a b': {parallel: 1}}}", "scheduler.groups.a b", "expected a name"),
        ("scheduler: {worker_grace: soon}", "scheduler.worker_grace", "expected a duration like 30s, 5m or 1h"),
        ("scheduler: {worker_grace: 0s}", "scheduler.worker_grace", "greater than zero"),
        ("scheduler: {worker_grace: true}", "scheduler.worker_grace", "expected a duration"),
        ("scheduler: {worker_offline_after: 1s}", "scheduler.worker_offline_after",
         "expected at least 4s (two of the Worker's heartbeats, sent every 2s), got 1s"),
        ("scheduler: {worker_offline_after: -5}", "scheduler.worker_offline_after", "greater than zero"),
        ("scheduler: {worker_offline_after: [6s]}", "scheduler.worker_offline_after", "expected a duration"),
        ("scheduler: {worker_timeout: 5s}", "scheduler.worker_timeout",
         "unknown key; allowed keys are retries, backoff, timeout, groups, worker_grace, worker_offline_after"),
        ("git: true", "git", "expected a mapping with keys commit, push, remote, result_branch_prefix"),
        ("git: {commit: 'yes please'}", "git.commit", "expected true or false, got 'yes please'"),
        ("git: {push: 1}", "git.push", "expected true or false, got the number 1"),
        ("git: {remote: ''}", "git.remote", "expected a remote name or URL"),
        ("git: {remote: '--upload-pack=x'}", "git.remote", "expected a remote name or URL"),
        ("git: {remote: 3}", "git.remote", "expected a remote name or URL"),
        ("git: {result_branch_prefix: ''}", "git.result_branch_prefix", "expected a branch name prefix"),
        ("git: {result_branch_prefix: 'a b/'}", "git.result_branch_prefix", "expected a branch name prefix"),
        ("git: {result_branch_prefix: '-x/'}", "git.result_branch_prefix", "expected a branch name prefix"),
        ("git: {result_branch_prefix: 'a/../b'}", "git.result_branch_prefix", "expected a branch name prefix"),
    ],
)
def test_scheduler_and_git_errors_name_the_dotted_key(text: str, key: str, fragment: str) -> None:
    err = error(text)
    assert err.key == key
    assert fragment in err.reason


def test_scheduler_and_git_values_are_read() -> None:
    config = parse_config(
        "scheduler: {retries: 1, backoff: {base: 1s, max: 1s}, timeout: 90, groups: {a: {parallel: 3}}}\n"
        "git: {commit: false, push: yes, remote: upstream, result_branch_prefix: bots/taskrun-}\n",
        FILE,
    )
    assert config.scheduler == SchedulerConfig(1, 1.0, 1.0, 90.0, {"a": 3})
    # YAML 1.1 reads `yes` as a boolean; that is PyYAML's doing and accepted.
    assert config.git == GitConfig(commit=False, push=True, remote="upstream", result_branch_prefix="bots/taskrun-")


def test_worker_grace_and_offline_after_default_to_the_named_constants() -> None:
    scheduler = parse_config("scheduler: {retries: 1}\n", FILE).scheduler
    assert (scheduler.worker_grace, scheduler.worker_offline_after) == (GRACE_SECONDS, OFFLINE_AFTER_SECONDS)
    assert (GRACE_SECONDS, OFFLINE_AFTER_SECONDS) == (60.0, 6.0)


@pytest.mark.parametrize(
    ("text", "grace", "offline_after"),
    [
        ("scheduler: {worker_grace: 2s}", 2.0, OFFLINE_AFTER_SECONDS),
        ("scheduler: {worker_grace: 500ms, worker_offline_after: 4s}", 0.5, 4.0),
        ("scheduler: {worker_grace: 1h30m, worker_offline_after: 90}", 5400.0, 90.0),
        ("scheduler: {worker_grace: , worker_offline_after: }", GRACE_SECONDS, OFFLINE_AFTER_SECONDS),
    ],
)
def test_worker_grace_and_offline_after_are_read(text: str, grace: float, offline_after: float) -> None:
    scheduler = parse_config(text + "\n", FILE).scheduler
    assert (scheduler.worker_grace, scheduler.worker_offline_after) == (grace, offline_after)


def test_worker_grace_error_names_the_file_key_and_reason(tmp_path: Path) -> None:
    (tmp_path / ".taskrun.yaml").write_text("scheduler:\n  worker_grace: a while\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / '.taskrun.yaml'}: key 'scheduler.worker_grace': "
        "expected a duration like 30s, 5m or 1h, got 'a while'"
    )


def _without_source(config: Config) -> tuple[object, ...]:
    return (config.default_agent, config.agents, config.workers, config.scheduler, config.git)


# ----------------------------------------------------------------------------- Agents of AI coding CLIs


CLAUDE_FULL = """\
agents:
  shell: {preset: shell}
  claude:
    preset: claude
    path: /opt/claude/bin/claude
    model: claude-opus-4-1
    backend: {provider: anthropic, model: claude-sonnet-4-5, context_window: 200000, base_url: "http://127.0.0.1:9/v1"}
    env: [ANTHROPIC_API_KEY]
    max_turns: 12
    max_cost_usd: 1.5
    max_budget_usd: 2
    permission_mode: acceptEdits
    allowed_tools: [Read, "Bash(git diff:*)", Read]
    disallowed_tools: WebFetch
    append_system_prompt: "Be brief."
    extra_args: [--debug]
    prompt_template: "Do {{ title }}"
    pause_scope: worker
prices:
  claude-opus-4-1: {input: 15, output: 75, cache_read: 1.5}
"""


def test_a_claude_agent_takes_every_claude_key() -> None:
    config = parse_config(CLAUDE_FULL, FILE)
    agent = config.agents["claude"]
    assert (agent.path, agent.model, agent.max_turns, agent.max_cost_usd, agent.max_budget_usd) == (
        "/opt/claude/bin/claude", "claude-opus-4-1", 12, 1.5, 2.0)
    assert agent.permission_mode == "acceptEdits"
    assert agent.allowed_tools == ("Read", "Bash(git diff:*)") and agent.disallowed_tools == ("WebFetch",)
    assert agent.append_system_prompt == "Be brief." and agent.extra_args == ("--debug",)
    assert agent.prompt_template == "Do {{ title }}" and agent.pause_scope == "worker"
    assert agent.backend == ModelBackend("anthropic", "claude-sonnet-4-5", 200000, "http://127.0.0.1:9/v1")
    prices = config.prices["claude-opus-4-1"]
    # Cache writes default to the input price when not given.
    assert (prices.input, prices.output, prices.cache_read, prices.cache_write) == (15.0, 75.0, 1.5, 15.0)


def test_an_agent_without_new_keys_has_their_defaults() -> None:
    agent = parse_config("agents: {shell: {preset: shell}, c: {preset: codex}}", FILE).agents["c"]
    assert agent.pause_scope == "everywhere" and agent.path is None and agent.extra_args == ()
    assert agent.max_turns is None and agent.prompt_template is None


@pytest.mark.parametrize(
    ("preset", "key", "value", "takers"),
    [
        ("codex", "permission_mode", "plan", "preset claude"),
        ("gemini", "allowed_tools", "[Read]", "preset claude"),
        ("aider", "append_system_prompt", "x", "preset claude"),
        ("claude", "approval_mode", "yolo", "preset gemini"),
        ("gemini", "sandbox_mode", "read-only", "preset codex"),
        ("codex", "max_budget_usd", "1", "preset claude"),
        ("shell", "max_turns", "3", "presets claude, codex, gemini, aider"),
        ("command", "path", "/bin/x", "presets claude, codex, gemini, aider"),
        ("shell", "prompt_template", "x", "presets command, claude, codex, gemini, aider"),
    ],
)
def test_a_key_for_another_preset_is_refused_naming_the_preset_that_takes_it(
        preset: str, key: str, value: str, takers: str) -> None:
    command = ", command: [x]" if preset == "command" else ""
    err = error(f"agents: {{shell: {{preset: shell}}, a: {{preset: {preset}{command}, {key}: {value}}}}}")
    assert err.key == f"agents.a.{key}"
    assert err.reason == f"only for {takers}; this Agent is preset {preset}"


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("{preset: claude, max_turns: 0}", "agents.a.max_turns", "expected a whole number >= 1, got 0"),
        ("{preset: claude, max_turns: true}", "agents.a.max_turns", "expected a whole number"),
        ("{preset: claude, max_cost_usd: -1}", "agents.a.max_cost_usd", "expected an amount in USD above 0"),
        ("{preset: claude, max_cost_usd: '3'}", "agents.a.max_cost_usd", "expected an amount in USD above 0"),
        ("{preset: gemini, approval_mode: always}", "agents.a.approval_mode",
         "expected one of default, auto_edit, yolo, got 'always'"),
        ("{preset: codex, sandbox_mode: open}", "agents.a.sandbox_mode",
         "expected one of read-only, workspace-write, danger-full-access"),
        ("{preset: claude, pause_scope: here}", "agents.a.pause_scope", "expected one of everywhere, worker"),
        ("{preset: claude, permission_mode: 'a b'}", "agents.a.permission_mode", "expected a mode name"),
        ("{preset: claude, extra_args: '--x --y'}", "agents.a.extra_args", "not a shell string"),
        ("{preset: claude, allowed_tools: {a: 1}}", "agents.a.allowed_tools", "expected a list of tool names"),
        ("{preset: claude, path: ''}", "agents.a.path", "expected a non-empty string"),
        ('{preset: claude, model: "a\\nb"}', "agents.a.model", "expected a single line of text"),
        ("{preset: claude, backend: {provider: p, model: m, base_url: 'ftp://x'}}", "agents.a.backend.base_url",
         "expected an http(s) URL"),
        ("{preset: claude, prompt_template: '{% if %}'}", "agents.a.prompt_template", "not a valid jinja2 template"),
        ("{preset: claude, prompt_template: x, prompt_template_file: y}", "agents.a.prompt_template_file",
         "not both"),
        ("{preset: claude, prompt_template_file: ../x.j2}", "agents.a.prompt_template_file",
         "expected a path relative to the repository root"),
    ],
)
def test_agent_key_errors_name_the_file_the_key_and_the_reason(body: str, key: str, fragment: str) -> None:
    err = error(f"agents: {{shell: {{preset: shell}}, a: {body}}}")
    assert err.key == key
    assert fragment in err.reason


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("prices: [1]", "prices", "expected a mapping of model names to prices"),
        ("prices: {m: {input: 1}}", "prices.m.output", "required, but missing"),
        ("prices: {m: {input: -1, output: 1}}", "prices.m.input", "USD per million tokens"),
        ("prices: {m: {input: 1, output: 1, cached: 1}}", "prices.m.cached", "unknown key"),
    ],
)
def test_price_errors_name_the_key(text: str, key: str, fragment: str) -> None:
    err = error(text)
    assert err.key == key and fragment in err.reason


def test_a_prompt_template_file_is_read_from_the_repository_at_load(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "task.j2").write_text("Work on {{ title }}\n")
    (tmp_path / ".taskrun.yaml").write_text(
        "agents: {shell: {preset: shell}, c: {preset: claude, prompt_template_file: prompts/task.j2}}\n")
    assert load_config(tmp_path).agents["c"].prompt_template == "Work on {{ title }}\n"


def test_a_prompt_template_file_that_is_a_link_is_refused(tmp_path: Path) -> None:
    secret = tmp_path.parent / f"{tmp_path.name}-secret"
    secret.write_text("not for Agents")
    (tmp_path / "t.j2").symlink_to(secret)
    (tmp_path / ".taskrun.yaml").write_text(
        "agents: {shell: {preset: shell}, c: {preset: claude, prompt_template_file: t.j2}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.key == "agents.c.prompt_template_file"
    assert "cannot read t.j2" in caught.value.reason and "follows no links" in caught.value.reason


def test_a_missing_prompt_template_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / ".taskrun.yaml").write_text(
        "agents: {shell: {preset: shell}, c: {preset: claude, prompt_template_file: none.j2}}\n")
    with pytest.raises(ConfigError, match="cannot read none.j2"):
        load_config(tmp_path)


def test_the_init_templates_commented_claude_example_is_valid_configuration() -> None:
    lines = INIT_TEMPLATE.splitlines()
    start = lines.index("  # claude:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #") or line.startswith("  #   #"):
            break
        block.append(line.replace("  # ", "  ", 1))
    prices = [line.replace("# ", "", 1) for line in lines if line.startswith(("# prices:", "#   claude-sonnet"))]
    text = INIT_TEMPLATE.replace("  shell:\n    preset: shell\n", "  shell:\n    preset: shell\n" + "\n".join(block)
                                 + "\n") + "\n".join(prices) + "\n"
    config = parse_config(text, FILE)
    agent = config.agents["claude"]
    assert agent.max_turns == 30 and agent.permission_mode == "acceptEdits"
    assert config.prices["claude-sonnet-4-5"].output == 15.0
