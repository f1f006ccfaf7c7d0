"""Run the real Agent CLIs (claude, gemini) headless against a `ModelAPI`, and the scripted scenarios.

Each runner takes a fresh HOME and a workspace (a git checkout), feeds the
prompt on stdin and returns a `CliRun` (argv, exit code, stdout, stderr, wall
seconds). The environment is minimal and offline-safe: only the ModelAPI's
URL is reachable by what the CLIs are told (see /tmp-independent notes in the
docstrings of `claude_env` and `gemini_settings`).

`SCENARIOS` are the scripted runs whose stdout is kept under
tests/fixtures/streams/<cli>-<scenario>.jsonl (stderr, when any, beside it as
.stderr). Recapture them with

    python3 -m tests.modelapi.clis [SCENARIO ...]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tests.modelapi import Cut, Fail, ModelAPI, Say, Step, Tool, Usage
from tests.modelapi import anthropic, gemini

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "streams"

#: How to install each pinned CLI (the message when one is missing).
INSTALL = {
    "claude": "npm install -g @anthropic-ai/claude-code@2.1.332",
    "gemini": "npm install -g @google/gemini-cli@0.61.0",
}

#: A fake API key: recognisable, never valid anywhere.
FAKE_ANTHROPIC_KEY = "sk-test-modelapi-0000000000"
FAKE_OAUTH_TOKEN = "sk-ant-oat01-modelapi-0000000000"
FAKE_GEMINI_KEY = "modelapi-test-key-0000000000"

#: Claude Code variables for a quiet headless run: no telemetry, no autoupdate, no
#: error reporting, no nonessential traffic (without them it resolves api.anthropic.com
#: and sends `HEAD <base>/api/hello`).
CLAUDE_QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
}


def require(program: str) -> str:
    """The program's path on PATH; AssertionError saying how to install it when missing."""
    path = shutil.which(program)
    if path is None:
        raise AssertionError(f"{program} is not on PATH: install it with `{INSTALL[program]}`")
    return path


@dataclass
class CliRun:
    """One finished CLI run."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    workspace: Path
    home: Path

    def events(self) -> list[dict]:
        """stdout parsed as JSON lines (every line must parse)."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def _base_env(home: Path) -> dict[str, str]:
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "TMPDIR": str(tmp), "LANG": "C.UTF-8"}


def _run(argv: list[str], prompt: str, workspace: Path, home: Path, env: dict[str, str],
         timeout: float) -> CliRun:
    started = time.monotonic()
    done = subprocess.run(argv, input=prompt, capture_output=True, text=True, cwd=workspace,
                          env=env, timeout=timeout)
    return CliRun(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started,
                  workspace, home)


def claude_env(api: ModelAPI, home: Path, *, oauth: bool = False) -> dict[str, str]:
    """The environment for Claude Code against `api`: quiet, with a fake credential.

    oauth=True uses CLAUDE_CODE_OAUTH_TOKEN (a subscription login) instead of
    ANTHROPIC_API_KEY: only then does a 429 with unified rate-limit headers
    become a `rate_limit_event` and "You've hit your ... limit · resets ..." text.
    """
    env = _base_env(home) | CLAUDE_QUIET_ENV | {"ANTHROPIC_BASE_URL": api.url}
    if oauth:
        env["CLAUDE_CODE_OAUTH_TOKEN"] = FAKE_OAUTH_TOKEN
    else:
        env["ANTHROPIC_API_KEY"] = FAKE_ANTHROPIC_KEY
    return env


def run_claude(api: ModelAPI, workspace: Path, home: Path, prompt: str, args: Sequence[str] = (),
               *, oauth: bool = False, max_retries: int = 1, timeout: float = 60) -> CliRun:
    """`claude -p --output-format stream-json --verbose --permission-mode acceptEdits ARGS` < prompt."""
    argv = [require("claude"), "-p", "--output-format", "stream-json", "--verbose",
            "--permission-mode", "acceptEdits", *args]
    env = claude_env(api, home, oauth=oauth) | {"CLAUDE_CODE_MAX_RETRIES": str(max_retries)}
    return _run(argv, prompt, workspace, home, env, timeout)


def gemini_settings(*, max_attempts: int = 2, max_session_turns: int | None = None) -> dict:
    """~/.gemini/settings.json for a quiet headless run against GOOGLE_GEMINI_BASE_URL.

    - security.auth.selectedType gemini-api-key: with only the env, the auth type is
      "gateway", which this version's non-interactive check refuses ("Invalid auth
      method selected.", exit 41).
    - privacy.usageStatisticsEnabled false: else it resolves play.googleapis.com (Clearcut).
    - general.maxAttempts: the main model's attempts (default 10, with backoff: a bare 429
      takes minutes).
    - model.maxSessionTurns: the turn limit (exit 53, FatalTurnLimitedError).
    """
    settings: dict = {
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False},
        "general": {"disableAutoUpdate": True, "disableUpdateNag": True,
                    "maxAttempts": max_attempts},
    }
    if max_session_turns is not None:
        settings["model"] = {"maxSessionTurns": max_session_turns}
    return settings


def gemini_env(api: ModelAPI, home: Path) -> dict[str, str]:
    """The environment for Gemini CLI against `api` (GEMINI_CLI_NO_RELAUNCH: no child node)."""
    return _base_env(home) | {"GOOGLE_GEMINI_BASE_URL": api.url, "GEMINI_API_KEY": FAKE_GEMINI_KEY,
                              "GEMINI_CLI_NO_RELAUNCH": "true"}


def run_gemini(api: ModelAPI, workspace: Path, home: Path, prompt: str, args: Sequence[str] = (),
               *, settings: dict | None = None, approval_mode: str = "auto_edit",
               model: str = "gemini-2.5-pro", timeout: float = 60) -> CliRun:
    """`gemini -p "" --output-format stream-json --approval-mode M --skip-trust -m MODEL ARGS` < prompt.

    `-p ""` is headless mode; the prompt comes on stdin ("-p: appended to input on stdin").
    An explicit `-m` skips the "auto" model router (a flash-lite classifier call per turn).
    """
    (home / ".gemini").mkdir(parents=True, exist_ok=True)
    (home / ".gemini" / "settings.json").write_text(
        json.dumps(settings if settings is not None else gemini_settings()))
    argv = [require("gemini"), "-p", "", "--output-format", "stream-json", "--approval-mode",
            approval_mode, "--skip-trust", "-m", model, *args]
    return _run(argv, prompt, workspace, home, gemini_env(api, home), timeout)


def git_workspace(root: Path) -> Path:
    """A fresh git checkout with one commit."""
    root.mkdir(parents=True, exist_ok=True)
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "t@example.invalid"],
                 ["config", "user.name", "t"]):
        subprocess.run(["git", "-C", str(root), *args], check=True)
    (root / "README.md").write_text("# demo\n")
    subprocess.run(["git", "-C", str(root), "add", "."], check=True)
    subprocess.run(["git", "-C", str(root), "commit", "-qm", "init"], check=True)
    return root


WRITE_PROMPT = "Create hello.txt containing 'hello from the agent'."
HELLO = "hello from the agent\n"


def _reset_epoch() -> int:
    return int(time.time()) + 3600


@dataclass(frozen=True)
class Scenario:
    """A scripted run of one CLI: the steps, then how to run it."""

    cli: str
    steps: Callable[[], list[Step]]
    args: list[str] = field(default_factory=list)
    oauth: bool = False
    settings: Callable[[], dict] | None = None
    approval_mode: str = "auto_edit"


SCENARIOS: dict[str, Scenario] = {
    "claude-write": Scenario("claude", lambda: [
        Tool("write", {"path": "hello.txt", "content": HELLO}), Say("Created hello.txt.")]),
    "claude-max-turns": Scenario("claude", lambda: [Tool("shell", {"command": "echo again"})],
                                 ["--max-turns", "2"]),
    "claude-usage-limit": Scenario("claude", lambda: [Fail(
        429, anthropic.rate_limit_body(),
        anthropic.unified_limit_headers(_reset_epoch()))], oauth=True),
    "claude-rate-limit-apikey": Scenario("claude", lambda: [Fail(
        429, anthropic.rate_limit_body(),
        anthropic.unified_limit_headers(_reset_epoch()))]),
    "claude-server-error": Scenario("claude", lambda: [Fail(500, anthropic.overloaded_body())]),
    "claude-cut": Scenario("claude", lambda: [Cut("I will now wri")]),
    "claude-expensive": Scenario("claude", lambda: [
        Tool("shell", {"command": "echo step"}, usage=Usage(400_000, 20_000)),
        Tool("shell", {"command": "echo step"}, usage=Usage(400_000, 20_000)),
        Say("done", usage=Usage(400_000, 20_000))]),
    "claude-max-budget": Scenario("claude", lambda: [
        Tool("shell", {"command": "echo step"}, usage=Usage(400_000, 20_000))],
        ["--max-budget-usd", "3"]),
    "gemini-write": Scenario("gemini", lambda: [
        Tool("write", {"path": "hello.txt", "content": HELLO}), Say("Created hello.txt.")]),
    "gemini-usage-limit": Scenario("gemini", lambda: [Fail(
        429, gemini.resource_exhausted_body(
            "You have exhausted your daily quota on this model.", retry_delay_s=3600))]),
    "gemini-rate-limit": Scenario("gemini", lambda: [Fail(429, gemini.resource_exhausted_body())]),
    "gemini-server-error": Scenario("gemini", lambda: [Fail(500, gemini.internal_body())]),
    "gemini-cut": Scenario("gemini", lambda: [Cut("I will now wri")]),
    "gemini-turn-limit": Scenario("gemini", lambda: [Tool("shell", {"command": "echo again"})],
                                  settings=lambda: gemini_settings(max_session_turns=2),
                                  approval_mode="yolo"),
}


def run_scenario(name: str, api: ModelAPI, root: Path, timeout: float = 60) -> CliRun:
    """Run scenario `name` against `api` in a fresh workspace and HOME under `root`."""
    scenario = SCENARIOS[name]
    api.script(*scenario.steps())
    workspace = git_workspace(root / "workspace")
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    if scenario.cli == "claude":
        return run_claude(api, workspace, home, WRITE_PROMPT, scenario.args,
                          oauth=scenario.oauth, timeout=timeout)
    settings = scenario.settings() if scenario.settings else None
    return run_gemini(api, workspace, home, WRITE_PROMPT, scenario.args, settings=settings,
                      approval_mode=scenario.approval_mode, timeout=timeout)


def capture(names: list[str]) -> None:
    """Run each scenario and write its stdout (and stderr) under FIXTURES."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in names:
        with ModelAPI() as api, tempfile.TemporaryDirectory() as tmp:
            run = run_scenario(name, api, Path(tmp))
        (FIXTURES / f"{name}.jsonl").write_text(run.stdout)
        stderr = FIXTURES / f"{name}.stderr"
        if run.stderr.strip():
            stderr.write_text(run.stderr)
        elif stderr.exists():
            stderr.unlink()
        print(f"{name}: exit {run.returncode}, {run.seconds:.1f}s, "
              f"{len(run.stdout.splitlines())} lines, {len(api.main_requests)} model requests")


if __name__ == "__main__":
    capture(sys.argv[1:] or list(SCENARIOS))
