"""Codex CLI, headless: `codex exec --json`, and its stream reader.

Argv (the prompt on stdin: `-` as the prompt argument reads it to EOF):

    <path or codex> exec --json --skip-git-repo-check --sandbox <sandbox_mode or workspace-write>
        [-m MODEL] [-c model_provider=... -c model_providers.<id>.* when backend.base_url is set]
        -c analytics.enabled=false -c feedback.enabled=false -c history.persistence="none"
        [extra_args...] -

With `backend.base_url` a provider `taskrun` is configured with `-c`
(wire_api "responses", base_url as given: it must include `/v1`), and its
API key is read from the variable `backend.env_key` (default
OPENAI_API_KEY; list it in the Agent's `env`).

The stream (`codex exec --json`, Codex 0.4x and later): `thread.started`
(thread_id), `turn.started`, `turn.completed` (usage: input_tokens,
cached_input_tokens, cache_write_input_tokens, output_tokens; summed over
the turn's requests and the only token report), `turn.failed` (error.message),
`item.started/updated/completed` with an item of type agent_message,
reasoning, command_execution, file_change, mcp_tool_call, web_search,
todo_list or error, and a top-level `error` (retries: "Reconnecting...").
Older names are accepted: `item_type` for `type`, `assistant_message` for
agent_message, and the `{"id", "msg": {...}}` events of Codex before 0.30
(agent_message, agent_reasoning, exec_command_begin/end, patch_apply_begin,
token_count, task_complete, error).

Turns (codex reports none): one per model response. A response opens with
its first agent_message, reasoning or tool item (command_execution,
file_change, mcp_tool_call, web_search) and closes when a tool item
completes (its output goes back to the model); a response that calls
several tools one after the other counts once per tool.
COMPLETED when a turn completed, none failed, and the exit code is 0.
A usage limit: "usage limit ... try again at <time>" in `turn.failed` or `error`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from taskrunner.agents.stream import (
    Budget, StreamReader, Verdict, abbreviate, count, exit_text, one_line, parse_json, usage_of, verbatim,
)

PROGRAM = "codex"
DEFAULT_SANDBOX = "workspace-write"
PROVIDER_ID = "taskrun"
#: Codex's own analytics, feedback upload and history file, off for a headless Run.
QUIET_CONFIG = ('analytics.enabled=false', 'feedback.enabled=false', 'history.persistence="none"')
TOOL_ITEMS = ("command_execution", "file_change", "mcp_tool_call", "web_search")


def command(agent: Mapping[str, Any], budget: Budget, prompt_file: Path,
            workspace: Path) -> tuple[list[str], dict[str, str], Path | None]:
    """(argv, env additions, stdin file) for Codex; see the module doc."""
    backend = agent.get("backend") or {}
    argv = [str(agent.get("path") or PROGRAM), "exec", "--json", "--skip-git-repo-check",
            "--sandbox", str(agent.get("sandbox_mode") or DEFAULT_SANDBOX)]
    model = agent.get("model") or backend.get("model")
    if model:
        argv += ["-m", str(model)]
    if backend.get("base_url"):
        key = f"model_providers.{PROVIDER_ID}"
        for setting, value in (("model_provider", PROVIDER_ID), (f"{key}.name", PROVIDER_ID),
                               (f"{key}.base_url", str(backend["base_url"])), (f"{key}.wire_api", "responses"),
                               (f"{key}.env_key", str(backend.get("env_key") or "OPENAI_API_KEY"))):
            argv += ["-c", f"{setting}={_toml(value)}"]
    for setting in QUIET_CONFIG:
        argv += ["-c", setting]
    argv += [str(arg) for arg in agent.get("extra_args") or ()]
    argv.append("-")
    return argv, {}, prompt_file


def _toml(value: str) -> str:
    # A TOML basic string; JSON's escapes are a subset TOML accepts.
    return json.dumps(value)


class CodexReader(StreamReader):
    """`codex exec --json` events -> output.log text, Report, usage limit, verdict."""

    default_provider = "openai"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started: set[str] = set()
        self._completed = False
        self._failed: str | None = None
        self._errors: list[str] = []
        self._open = False   # a model response is being reported (no tool result went back yet)
        self.state.turns = 0

    def _line(self, text: str) -> str:
        event = parse_json(text)
        if event is None:
            return verbatim(text)
        if isinstance(event.get("msg"), dict):
            return self._legacy(event["msg"])
        kind = event.get("type")
        if kind == "thread.started":
            if isinstance(event.get("thread_id"), str):
                self.state.session_id = event["thread_id"]
            return ""
        if kind == "turn.started":
            return ""
        if kind == "turn.completed":
            self._completed = True
            self._usage(event.get("usage"))
            return ""
        if kind == "turn.failed":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            self._failed = one_line(message if isinstance(message, str) and message else "turn failed", 500)
            self._check_limit(self._failed)
            return f"[failed] {self._failed}\n"
        if kind == "error":
            return self._error(event.get("message"))
        if isinstance(kind, str) and kind.startswith("item."):
            item = event.get("item")
            if isinstance(item, dict):
                return self._item(kind[5:], item)
            return ""
        self.ignored += 1
        return ""

    def _item(self, phase: str, item: dict[str, Any]) -> str:
        kind = item.get("type") or item.get("item_type")
        ident = item.get("id")
        if phase == "started":
            if isinstance(ident, str):
                self._started.add(ident)
            if kind in TOOL_ITEMS:
                self._respond()
            if kind == "command_execution":
                return f"-> $ {one_line(item.get('command'))}\n"
            if kind == "file_change":
                return f"-> edit: {_paths(item)}\n"
            if kind == "mcp_tool_call":
                return f"-> {one_line(item.get('server'))}.{one_line(item.get('tool'))}\n"
            return ""
        if phase != "completed":
            return ""
        shown = isinstance(ident, str) and ident in self._started
        if kind in ("agent_message", "assistant_message", "reasoning") or kind in TOOL_ITEMS:
            self._respond()
        if kind in TOOL_ITEMS:
            # Its output goes back to the model: what follows is the next response.
            self._open = False
        if kind in ("agent_message", "assistant_message"):
            text = item.get("text")
            if isinstance(text, str):
                self.state.final_message = text
                return verbatim(text.rstrip("\n"))
            return ""
        if kind == "reasoning":
            return f"(thinking) {one_line(item.get('text'), 120)}\n" if item.get("text") else ""
        if kind == "command_execution":
            head = "" if shown else f"-> $ {one_line(item.get('command'))}\n"
            code = item.get("exit_code")
            tail = f"   exit {code}\n" if isinstance(code, int) and code != 0 else ""
            return head + abbreviate(item.get("aggregated_output")) + tail
        if kind == "file_change":
            head = "" if shown else f"-> edit: {_paths(item)}\n"
            status = item.get("status")
            return head + (f"   ! edit {one_line(status)}\n" if status not in (None, "completed") else "")
        if kind == "mcp_tool_call":
            head = "" if shown else f"-> {one_line(item.get('server'))}.{one_line(item.get('tool'))}\n"
            error = item.get("error")
            return head + (f"   ! {one_line(error)}\n" if error else "")
        if kind == "web_search":
            return f"-> web search: {one_line(item.get('query'))}\n"
        if kind == "todo_list":
            entries = [e for e in item.get("items") or () if isinstance(e, dict)]
            return "".join(f"   [{'x' if e.get('completed') else ' '}] {one_line(e.get('text'))}\n" for e in entries)
        if kind == "error":
            return self._error(item.get("message"))
        self.ignored += 1
        return ""

    def _respond(self) -> None:
        if not self._open:
            self._open = True
            self.state.turns = (self.state.turns or 0) + 1

    def _error(self, message: Any) -> str:
        text = one_line(message if isinstance(message, str) and message else "error", 500)
        self._errors.append(text)
        self._check_limit(text)
        return f"[error] {text}\n"

    def _legacy(self, msg: dict[str, Any]) -> str:
        kind = msg.get("type")
        if kind == "session_configured":
            if isinstance(msg.get("session_id"), str):
                self.state.session_id = msg["session_id"]
            self._model(msg.get("model"))
            return ""
        if kind == "agent_message":
            return self._item("completed", {"type": "agent_message", "text": msg.get("message")})
        if kind == "agent_reasoning":
            return self._item("completed", {"type": "reasoning", "text": msg.get("text")})
        if kind == "exec_command_begin":
            command = msg.get("command")
            command = " ".join(str(part) for part in command) if isinstance(command, list) else command
            self._respond()
            return f"-> $ {one_line(command)}\n"
        if kind == "exec_command_end":
            self._open = False
            output = msg.get("aggregated_output") or msg.get("stdout") or msg.get("stderr")
            code = msg.get("exit_code")
            return abbreviate(output) + (f"   exit {code}\n" if isinstance(code, int) and code != 0 else "")
        if kind == "patch_apply_begin":
            changes = msg.get("changes")
            self._respond()
            self._open = False
            return f"-> edit: {', '.join(map(str, changes)) if isinstance(changes, dict) else '?'}\n"
        if kind == "token_count":
            info = msg.get("info")
            totals = info.get("total_token_usage") if isinstance(info, dict) else msg
            self._usage(totals)
            return ""
        if kind == "task_complete":
            self._completed = True
            if isinstance(msg.get("last_agent_message"), str):
                self.state.final_message = msg["last_agent_message"]
            return ""
        if kind in ("error", "stream_error"):
            text = self._error(msg.get("message"))
            if kind == "error":
                self._failed = self._errors[-1]
            return text
        self.ignored += 1
        return ""

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        total, cached = count(usage.get("input_tokens")), count(usage.get("cached_input_tokens")) or 0
        written = count(usage.get("cache_write_input_tokens")) or 0
        fresh = max(total - cached - written, 0) if total is not None else None
        figures = usage_of(fresh, usage.get("output_tokens"), cached, written)
        if figures is not None:
            self.state.usage = figures

    def _check_limit(self, text: str) -> None:
        if "usage limit" in text.lower():
            self._hit_limit(text)

    def _verdict(self, exit_code: int | None) -> Verdict:
        if self._failed is not None:
            return Verdict("FAILED", f"Codex turn failed: {self._failed}")
        if not self._completed:
            return Verdict("FAILED", "the Agent's stream ended without a result (crashed?); " + exit_text(exit_code))
        if exit_code != 0:
            return Verdict("FAILED", exit_text(exit_code))
        return Verdict("COMPLETED")


def _paths(item: dict[str, Any]) -> str:
    changes = item.get("changes")
    if not isinstance(changes, list):
        return "?"
    parts = [f"{c.get('kind', '?')} {c.get('path', '?')}" for c in changes if isinstance(c, dict)]
    return one_line(", ".join(parts)) or "?"
