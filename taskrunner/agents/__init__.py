"""Agent presets: how a Task becomes a command on the Worker, and how its output is read.

The control plane knows nothing of an Agent's internals; it sends the
Agent's preset and settings in the signed manifest, and the Worker calls
`prepare`, which writes what the Agent reads and returns a `Prepared`: the
argv (a list: Task content never becomes a shell string, the prompt never a
long argv element), environment additions, the file fed on stdin, and the
reader of the Agent's output stream.

Presets (one module each for the tools):
    shell    the Task body's fenced sh/bash blocks as one script in the Run's
             directory, `bash -euo pipefail SCRIPT`; no reader
    command  `command: [argv...]` with {prompt_file}, {task_file}, {workspace}
             and {run_id} replaced (str.replace); no reader
    claude   Claude Code, `claude -p --output-format stream-json --verbose` (claude.py)
    codex    Codex CLI, `codex exec --json ... -` (codex.py)
    gemini   Gemini CLI, `gemini -p "" --output-format stream-json` (gemini.py)
    aider    Aider, `aider --message-file F --yes-always ...` (aider.py)

For every preset but shell, the Task's directory `.task/<task-id>/run-<n>/`
in the checkout holds the prompt (workspace.py, prompt.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from taskrunner.agents import aider, claude, codex, gemini
from taskrunner.agents.stream import StreamReader
from taskrunner.errors import TaskFileError, WorkerError
from taskrunner.taskfile import parse_task, shell_script

#: Every preset, in the order `taskrun agents` lists them.
PRESETS = ("shell", "command", "claude", "codex", "gemini", "aider")
#: The presets driven through their own CLI and read by a StreamReader.
READER_PRESETS = ("claude", "codex", "gemini", "aider")
#: The shell preset runs its script as `bash -euo pipefail SCRIPT`.
SHELL_ARGV = ("bash", "-euo", "pipefail")
#: What `prepare` may write into the Run's directory for the Agent to read: the
#: shell preset's script (mode 0600). PROMPT_FILE is kept for Runs of older Workers.
SCRIPT_FILE = "script.sh"
PROMPT_FILE = "prompt.md"
INPUT_FILES = (SCRIPT_FILE, PROMPT_FILE)
#: In a tool preset's HOME: the directory the Worker makes its TMPDIR.
TMP_DIR = "tmp/"

_MODULES: Mapping[str, ModuleType] = {"claude": claude, "codex": codex, "gemini": gemini, "aider": aider}
_READERS: Mapping[str, type[StreamReader]] = {
    "claude": claude.ClaudeReader, "codex": codex.CodexReader,
    "gemini": gemini.GeminiReader, "aider": aider.AiderReader,
}


class AgentError(WorkerError):
    """Raised when an Agent cannot be prepared for a Task."""


@dataclass
class Prepared:
    """What the Worker starts for a Run.

    argv    the command, argv[0] a program name or path
    env     additions to the Agent's environment (non-secret: base URLs, quiet flags)
    stdin   the file fed on stdin (the prompt), or None for /dev/null
    reader  the StreamReader of its output, or None (shell, command: stdout is output.log)
    inputs  extra files outside the workspace the sandbox must bind read-only
    home_files  files the Worker writes into the Agent's fresh HOME before it starts (path relative
            to HOME -> text; "dir/" a directory): a tool's settings. Every tool preset gets TMP_DIR,
            which the Worker makes the Agent's TMPDIR (codex refuses its tools when its home lies
            under TMPDIR, and gemini leaves error reports there: a Run's own, inside its HOME)
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: Path | None = None
    reader: StreamReader | None = None
    inputs: list[Path] = field(default_factory=list)
    home_files: dict[str, str] = field(default_factory=dict)


def prepare(agent: Mapping[str, Any], run_dir: Path, workspace: Path, manifest: Mapping[str, Any]) -> Prepared:
    """Write what the Agent reads and return how to start it.

    `agent`: the manifest's `agent` mapping (preset, command, path, model, ...;
    see the presets' modules). `run_dir`: the Run's directory on the Worker.
    `workspace`: the checkout the Agent works in. `manifest`: the verified
    bundle manifest (task_id, task_file, run_id, run_number, budget, ...).
    AgentError when the Task cannot be read or the preset is unknown;
    TaskDirError / PromptError (WorkerError) from writing the Task's directory.
    """
    preset = agent.get("preset")
    if preset not in PRESETS:
        raise AgentError(f"unknown Agent preset {preset!r} (known: {', '.join(PRESETS)})")
    task_id, task_file = str(manifest["task_id"]), str(manifest["task_file"])
    try:
        spec = parse_task(task_id, task_file, (workspace / task_file).read_bytes())
    except TaskFileError as exc:
        raise AgentError(str(exc)) from exc
    if preset == "shell":
        script = shell_script(spec.body)
        if script is None:
            raise AgentError(f"{task_file}: the shell Agent found no ```sh or ```bash block in the Task")
        path = run_dir / SCRIPT_FILE
        _write_private(path, script)
        return Prepared([*SHELL_ARGV, str(path)])
    from taskrunner.agents.workspace import write_task_dir

    task_dir = write_task_dir(workspace, manifest, spec, str(preset))
    if preset == "command":
        values = {"prompt_file": str(task_dir.prompt_file), "task_file": task_file,
                  "workspace": str(workspace), "run_id": str(manifest.get("run_id") or "")}
        return Prepared([_fill(str(arg), values) for arg in agent.get("command") or ()])
    budget = _budget(manifest)
    argv, env, stdin = _MODULES[preset].command(agent, budget, task_dir.prompt_file, workspace)
    home_files = {TMP_DIR: "", **(gemini.home_files(budget) if preset == "gemini" else {})}
    return Prepared(argv, env, stdin, reader_for(agent, manifest), home_files=home_files)


def reader_for(agent: Mapping[str, Any], manifest: Mapping[str, Any]) -> StreamReader | None:
    """A fresh reader for the Agent's preset (None for shell and command).

    Reads `agent.backend` (provider, model: the Report's defaults; an
    Agent's `model` stands in for the backend's), `agent.prices` (USD per
    million tokens, for an estimate) and the manifest's `budget`.
    """
    cls = _READERS.get(agent.get("preset")) if isinstance(agent, Mapping) else None
    if cls is None:
        return None
    backend = dict(agent.get("backend") or {}) if isinstance(agent.get("backend"), Mapping) else {}
    if agent.get("model") and isinstance(agent.get("model"), str):
        backend["model"] = agent["model"]
    prices = agent.get("prices") if isinstance(agent.get("prices"), Mapping) else None
    return cls(backend=backend, prices=prices, budget=_budget(manifest))


def cli_program(preset: str) -> str | None:
    """The program a Worker looks for on its PATH to offer `preset` (None: shell, command)."""
    module = _MODULES.get(preset)
    return module.PROGRAM if module is not None else None


def _budget(manifest: Mapping[str, Any]) -> dict[str, Any]:
    budget = manifest.get("budget") if isinstance(manifest, Mapping) else None
    return dict(budget) if isinstance(budget, Mapping) else {}


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _fill(arg: str, values: Mapping[str, str]) -> str:
    # str.replace, not str.format: braces in user arguments must stay literal.
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg
