"""Agent presets: how a Task becomes an argv on the Worker.

The control plane knows nothing of an Agent's internals; it sends the Agent's
preset and settings with the bundle, and the Worker calls `prepare`, which
writes what the Agent reads (script, prompt) into the Run's directory and
returns the argv. Argv lists only: Task content never becomes a shell string.

Presets:
    shell    the Task body's fenced sh/bash blocks as one script, `bash -euo pipefail`
    command  `command: [argv...]` with {prompt_file}, {task_file}, {workspace} replaced
    claude   Claude Code, non-interactive: `claude -p <prompt>`
    codex    Codex CLI: `codex exec <prompt>`
    aider    Aider: `aider --yes-always --message-file <prompt file>`
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from taskrunner.errors import TaskFileError, WorkerError
from taskrunner.taskfile import parse_task, shell_script

PRESETS = ("shell", "command", "claude", "codex", "aider")
#: The shell preset runs its script as `bash -euo pipefail SCRIPT`.
SHELL_ARGV = ("bash", "-euo", "pipefail")
#: What `prepare` writes into the Run's directory for the Agent to read: the
#: shell preset's script, every other preset's prompt (mode 0600).
SCRIPT_FILE = "script.sh"
PROMPT_FILE = "prompt.md"
INPUT_FILES = (SCRIPT_FILE, PROMPT_FILE)


class AgentError(WorkerError):
    """Raised when an Agent cannot be prepared for a Task."""


def prepare(agent: Mapping[str, Any], run_dir: Path, workspace: Path, task_id: str, task_file: str) -> list[str]:
    preset = agent.get("preset")
    data = (workspace / task_file).read_bytes()
    try:
        spec = parse_task(task_id, task_file, data)
    except TaskFileError as exc:
        raise AgentError(str(exc)) from exc
    if preset == "shell":
        script = shell_script(spec.body)
        if script is None:
            raise AgentError(f"{task_file}: the shell Agent found no ```sh or ```bash block in the Task")
        path = run_dir / SCRIPT_FILE
        _write_private(path, script)
        return [*SHELL_ARGV, str(path)]
    prompt = _prompt(spec.body, spec.context)
    prompt_file = run_dir / PROMPT_FILE
    _write_private(prompt_file, prompt)
    if preset == "command":
        values = {"prompt_file": str(prompt_file), "task_file": task_file, "workspace": str(workspace)}
        return [_fill(arg, values) for arg in agent.get("command", ())]
    if preset == "claude":
        return ["claude", "-p", prompt]
    if preset == "codex":
        return ["codex", "exec", prompt]
    if preset == "aider":
        return ["aider", "--yes-always", "--message-file", str(prompt_file)]
    raise AgentError(f"unknown Agent preset {preset!r} (known: {', '.join(PRESETS)})")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _prompt(body: str, context: tuple[str, ...]) -> str:
    if not context:
        return body
    listing = "\n".join(f"- {path}" for path in context)
    return f"{body.rstrip()}\n\nContext files in the working directory:\n{listing}\n"


def _fill(arg: str, values: Mapping[str, str]) -> str:
    # str.replace, not str.format: braces in user arguments must stay literal.
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg
