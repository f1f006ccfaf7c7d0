"""A repository whose Tasks run the real Agent CLIs through the real daemon, the model stood in.

    site = make_site(repo, tmp_path, "local")          # or "ssh": one real sshd Worker, the only one
    configure(repo, site, {"claude": claude_agent(api)})
    (site.home / "secrets.env") holds the fake credentials the Agents name in `env`
    daemon.start(); agent_task(repo, "hello", "claude", WRITE_REQUIREMENT)

The Agents' configuration is what a user writes in .taskrun.yaml (README "Agents"):
a preset, the credential's name in `env`, and a `backend` whose `base_url` points at
the scripted model API (tests/modelapi). Credentials live only in the Worker's
`secrets.env`, never in the daemon's environment, the repository or a bundle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskrunner import keys
from tests.conftest import git, taskrun, local_worker_home
from tests.modelapi import ModelAPI
from tests.sshd import SshdHost, start_sshd

#: Fake credentials: recognisable, never valid anywhere; a test greps everything for them.
ANTHROPIC_KEY = "sk-ant-api03-e2e-0000000000000000"
OAUTH_TOKEN = "sk-ant-oat01-e2e-1111111111111111"
OPENAI_KEY = "sk-e2e-openai-2222222222222222"
GEMINI_KEY = "e2e-gemini-key-3333333333333333"
SECRETS = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "CLAUDE_CODE_OAUTH_TOKEN": OAUTH_TOKEN,
           "OPENAI_API_KEY": OPENAI_KEY, "GEMINI_API_KEY": GEMINI_KEY}

CLAUDE_MODEL = "claude-sonnet-4-5"
#: A model Codex 0.171.0 knows from its bundled metadata (it then offers apply_patch).
CODEX_MODEL = "gpt-5.5"
GEMINI_MODEL = "gemini-2.5-pro"
#: litellm's "openai/" prefix routes Aider to OPENAI_API_BASE.
AIDER_MODEL = "openai/gpt-test"
AIDER = "/opt/aider/bin/aider"

#: The pinned CLI versions (.ci/run installs them).
VERSIONS = {"claude": "2.1.332", "codex": "0.171.0", "gemini": "0.61.0", "aider": "0.86.2"}
INSTALL = {"claude": "npm install -g @anthropic-ai/claude-code@2.1.332",
           "codex": "npm install -g @openai/codex@0.171.0",
           "gemini": "npm install -g @google/gemini-cli@0.61.0",
           "aider": "python3 -m venv /opt/aider && /opt/aider/bin/pip install aider-chat==0.86.2"}

HELLO = "hello from the agent\n"
WRITE_REQUIREMENT = "Create hello.txt containing 'hello from the agent'."
FINAL = "Created hello.txt."


def require_cli(preset: str) -> str:
    """The CLI's path; the test fails (never skips) saying how to install it."""
    found = AIDER if preset == "aider" and os.access(AIDER, os.X_OK) else shutil.which(preset)
    if found is None:
        pytest.fail(f"{preset} is not installed: {INSTALL[preset]}")
    return found


@dataclass
class Site:
    """The repository's only Worker: its name in .taskrun.yaml, its home, its sshd (None: the local one)."""

    name: str
    home: Path
    host: SshdHost | None = None

    def close(self) -> None:
        """Stop the sshd and any Agent left behind in this Worker's home."""
        if self.host is not None:
            self.host.stop()
        for pid_file in self.home.glob("runs/*/pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass


def make_site(repo: Path, tmp_path: Path, kind: str) -> Site:
    """"local": the embedded Worker; "ssh": a real sshd host (then the only Worker). Its secrets.env is written."""
    if kind == "local":
        site = Site("local", local_worker_home(repo))
        site.home.mkdir(parents=True, exist_ok=True)
    else:
        _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
        site = Site("w1", Path(), start_sshd(tmp_path / "host", public))
        site.home = site.host.home  # type: ignore[union-attr]
    secrets = site.home / "secrets.env"
    secrets.write_text("".join(f"{name}={value}\n" for name, value in SECRETS.items()))
    secrets.chmod(0o600)
    return site


def claude_agent(api: ModelAPI, **extra: Any) -> dict[str, Any]:
    """Claude Code against `api` with an API key (`env` may be overridden, e.g. to the OAuth token)."""
    require_cli("claude")
    return {"preset": "claude", "env": ["ANTHROPIC_API_KEY"],
            "backend": {"provider": "anthropic", "model": CLAUDE_MODEL, "base_url": api.url}, **extra}


def codex_agent(api: ModelAPI, **extra: Any) -> dict[str, Any]:
    """Codex against `api`'s Responses API (an OpenAI-style base URL ends in /v1)."""
    require_cli("codex")
    return {"preset": "codex", "env": ["OPENAI_API_KEY"],
            "backend": {"provider": "openai", "model": CODEX_MODEL, "base_url": f"{api.url}/v1"}, **extra}


def gemini_agent(api: ModelAPI, **extra: Any) -> dict[str, Any]:
    """Gemini CLI against `api` (GOOGLE_GEMINI_BASE_URL takes the bare origin)."""
    require_cli("gemini")
    return {"preset": "gemini", "env": ["GEMINI_API_KEY"],
            "backend": {"provider": "google", "model": GEMINI_MODEL, "base_url": api.url}, **extra}


def aider_agent(api: ModelAPI, **extra: Any) -> dict[str, Any]:
    """Aider (its own venv, not on PATH: a configured `path`) against `api`'s Chat Completions."""
    return {"preset": "aider", "path": require_cli("aider"), "env": ["OPENAI_API_KEY"],
            "backend": {"provider": "openai", "model": AIDER_MODEL, "base_url": f"{api.url}/v1"}, **extra}


_SHELL_AGENT = "  shell:\n    preset: shell\n"
_LOCAL_AGENTS = "    agents: [shell]\n"


def configure(repo: Path, site: Site, agents: dict[str, dict[str, Any]],
              prices: dict[str, dict[str, float]] | None = None) -> None:
    """Add `agents` to .taskrun.yaml, offer them on `site`, commit the configuration.

    The local Worker's `agents:` line is edited; an ssh site is added with
    `taskrun worker add --agents ...` (pinning its host key, enrolling it) and the
    local Worker removed, so every Run goes to the sshd host.
    """
    config = repo / ".taskrun.yaml"
    text = config.read_text()
    assert _SHELL_AGENT in text and _LOCAL_AGENTS in text, text
    added = "".join(f"  {name}: {json.dumps(spec)}\n" for name, spec in agents.items())
    text = text.replace(_SHELL_AGENT, _SHELL_AGENT + added, 1)
    offered = ["shell", *agents]
    if site.host is None:
        text = text.replace(_LOCAL_AGENTS, f"    agents: [{', '.join(offered)}]\n", 1)
    if prices:
        text += f"prices: {json.dumps(prices)}\n"
    config.write_text(text)
    if site.host is not None:
        host = site.host
        token = ("--token", host.token) if host.token else ()
        result = taskrun(repo, "worker", "add", site.name, "--host", "127.0.0.1", "--port", str(host.port),
                         "--fingerprint", host.fingerprint, "--slots", "2", "--agents", ",".join(offered), *token)
        assert result.returncode == 0, result.stdout + result.stderr
        assert taskrun(repo, "worker", "remove", "local").returncode == 0
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "Agents")


def agent_task(repo: Path, task_id: str, agent: str, requirement: str, front: str = "",
               title: str | None = None) -> Path:
    """Write tasks/<id>.md for `agent` (whole: temp name, then rename, as an editor does)."""
    path = repo / "tasks" / f"{task_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(f"---\nagent: {agent}\n{front}---\n# {title or task_id}\n\n{requirement}\n")
    os.replace(tmp, path)
    return path


def run_dir(repo: Path, task_id: str, number: int = 1) -> Path:
    return repo / "runs" / task_id / f"run-{number}"


def events(repo: Path, task_id: str, number: int = 1) -> list[dict[str, Any]]:
    """The Run's recorded events.jsonl, the lines that parse as JSON objects."""
    found = []
    for line in (run_dir(repo, task_id, number) / "events.jsonl").read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


def raw_json_lines(text: str) -> list[str]:
    """Lines of `text` that are whole JSON objects of an event stream (what a readable log must not be)."""
    return [line for line in text.splitlines() if re.fullmatch(r"\s*\{.*\"type\"\s*:.*\}\s*", line)]


def changed_files(repo: Path, record: dict[str, Any]) -> set[str]:
    """The paths the Run's result commit changed against its base."""
    return set(git(repo, "diff", "--name-only", record["base_commit"], record["result_commit"]).split())


def tree_files(repo: Path, commit: str) -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", commit).split())


def secret_leaks(repo: Path, daemon_output: str, values: list[str]) -> list[str]:
    """Where any of `values` shows up: the history of every ref, every file under runs/, the daemon's output."""
    found = []
    history = git(repo, "log", "-p", "--all", "--binary")
    for value in values:
        if value in history:
            found.append(f"git log -p --all holds {value[:12]}...")
        if value in daemon_output:
            found.append(f"the daemon's output holds {value[:12]}...")
        for path in (repo / "runs").rglob("*"):
            if path.is_file() and value.encode() in path.read_bytes():
                found.append(f"{path.relative_to(repo)} holds {value[:12]}...")
    return found
