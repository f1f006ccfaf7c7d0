"""Gemini CLI, headless: `gemini -p "" --output-format stream-json`, and its stream reader.

Argv (the prompt on stdin; `-p ""` selects headless mode and appends nothing):

    <path or gemini> -p "" --output-format stream-json --approval-mode <approval_mode or auto_edit>
        --skip-trust [-m MODEL] [extra_args...]

`auto_edit` lets it write files in the workspace but offers no shell tool;
`yolo` adds the shell. `--skip-trust` trusts the workspace for the session
(else the approval mode falls back to `default`, read-only). Env:
GOOGLE_GEMINI_BASE_URL from `backend.base_url`, GEMINI_CLI_NO_RELAUNCH=true.
Headless authentication needs `security.auth.selectedType` in
`~/.gemini/settings.json` (e.g. "gemini-api-key" with GEMINI_API_KEY).

The stream (Gemini CLI 0.x `stream-json`): `init` (session_id, model),
`message` (role user|assistant, content, delta: chunks to concatenate),
`tool_use` (tool_name, tool_id, parameters), `tool_result` (tool_id, status,
output, error), `error` (severity, message) and `result` (status success|error,
error {type, message}, stats {input_tokens, output_tokens, cached, input,
tool_calls, models}). No cost: it is estimated from the tokens.

Turns (gemini reports none): one per model response, counted at the first
assistant message or tool call after the prompt or after tool results.
COMPLETED when the result's status is success and the exit code is 0. The
documented exit codes are named in the error (EXIT_CODES); an API error
exits with its HTTP status modulo 256 (429 -> 173). Quota errors
(RESOURCE_EXHAUSTED, 429, "quota") are a usage limit, reset time as stated
or unknown.
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Mapping

from taskrunner.agents.stream import (
    Budget, StreamReader, Verdict, abbreviate, count, exit_text, one_line, parse_json, reset_time, usage_of,
    verbatim,
)

PROGRAM = "gemini"
DEFAULT_APPROVAL_MODE = "auto_edit"
QUIET_ENV = {"GEMINI_CLI_NO_RELAUNCH": "true"}
#: Gemini CLI's documented exit codes (packages/core/src/utils/errors.ts, FatalError subclasses).
EXIT_CODES = {
    41: "authentication failed (FatalAuthenticationError)",
    42: "invalid input (FatalInputError)",
    44: "sandbox error (FatalSandboxError)",
    52: "configuration error (FatalConfigError)",
    53: "turn limit reached (FatalTurnLimitedError)",
    54: "tool execution failed (FatalToolExecutionError)",
    55: "untrusted workspace (FatalUntrustedWorkspaceError)",
    130: "cancelled (FatalCancellationError)",
    173: "the API answered 429 (exit code = HTTP status mod 256)",
    244: "the API answered 500 (exit code = HTTP status mod 256)",
}
#: Texts of a quota or usage limit in an error message.
QUOTA_MARKERS = ("resource_exhausted", "resource has been exhausted", "quota", "status 429", "code\":429",
                 "usage limit")
MAIN_ARGUMENT = ("command", "file_path", "absolute_path", "path", "dir_path", "pattern", "url", "query")


def command(agent: Mapping[str, Any], budget: Budget, prompt_file: Path,
            workspace: Path) -> tuple[list[str], dict[str, str], Path | None]:
    """(argv, env additions, stdin file) for Gemini CLI; see the module doc."""
    backend = agent.get("backend") or {}
    argv = [str(agent.get("path") or PROGRAM), "-p", "", "--output-format", "stream-json",
            "--approval-mode", str(agent.get("approval_mode") or DEFAULT_APPROVAL_MODE), "--skip-trust"]
    model = agent.get("model") or backend.get("model")
    if model:
        argv += ["-m", str(model)]
    argv += [str(arg) for arg in agent.get("extra_args") or ()]
    env = dict(QUIET_ENV)
    if backend.get("base_url"):
        env["GOOGLE_GEMINI_BASE_URL"] = str(backend["base_url"])
    return argv, env, prompt_file


#: ~/.gemini/settings.json keys for a headless Run: API-key authentication (without it Gemini CLI
#: exits 41, "Invalid auth method selected"), no usage statistics or telemetry (they call Google's
#: hosts), no update checks, and few attempts per model call (its default, 10 with backoff, keeps
#: a Run that hit a quota waiting for minutes).
SETTINGS: dict[str, Any] = {
    "security": {"auth": {"selectedType": "gemini-api-key"}},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "general": {"disableAutoUpdate": True, "disableUpdateNag": True, "maxAttempts": 3},
}


def home_files(budget: Budget) -> dict[str, str]:
    """The Agent's ~/.gemini/settings.json: SETTINGS, and the budget's max_turns as Gemini CLI's own
    turn limit (`model.maxSessionTurns`, which has no command-line flag; exit 53 when reached)."""
    settings: dict[str, Any] = json.loads(json.dumps(SETTINGS))
    turns = count(budget.get("max_turns"))
    if turns:
        settings["model"] = {"maxSessionTurns": turns}
    return {".gemini/settings.json": json.dumps(settings, indent=2) + "\n"}


class GeminiReader(StreamReader):
    """Gemini CLI `stream-json` events -> output.log text, Report, usage limit, verdict."""

    default_provider = "google"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = ""           # assistant text not yet ending in a newline
        self._reply: list[str] = []  # the current response's text
        self._responding = False
        self._result: dict[str, Any] | None = None
        self._tools: dict[str, str] = {}
        self.state.turns = 0

    def _line(self, text: str) -> str:
        event = parse_json(text)
        if event is None:
            return self._flush() + verbatim(text)
        kind = event.get("type")
        if kind == "message":
            return self._message(event)
        out = self._flush()
        if kind == "init":
            if isinstance(event.get("session_id"), str):
                self.state.session_id = event["session_id"]
            self._model(event.get("model"))
            return out + f"[init] Gemini CLI, model {self.state.model or '?'}\n"
        if kind == "tool_use":
            self._respond()
            name = one_line(event.get("tool_name") or "?")
            if isinstance(event.get("tool_id"), str):
                self._tools[event["tool_id"]] = name
            return out + f"-> {name}: {_main_argument(event.get('parameters'))}\n"
        if kind == "tool_result":
            self._responding = False
            error = event.get("error")
            if event.get("status") == "error":
                message = error.get("message") if isinstance(error, dict) else error
                return out + f"   ! {one_line(message or 'error')}\n"
            return out + abbreviate(event.get("output"))
        if kind == "error":
            message = one_line(event.get("message") or "error", 500)
            self._check_limit(message)
            return out + f"[{one_line(event.get('severity') or 'error')}] {message}\n"
        if kind == "result":
            return out + self._on_result(event)
        self.ignored += 1
        return out

    def _message(self, event: dict[str, Any]) -> str:
        content = event.get("content")
        if event.get("role") != "assistant" or not isinstance(content, str):
            return ""
        self._respond()
        self._reply.append(content)
        self.state.final_message = "".join(self._reply)
        if event.get("delta") is not True:
            content += "\n"
        text = self._pending + content
        head, sep, self._pending = text.rpartition("\n")
        return head + sep if head.strip() or sep else ""

    def _flush(self) -> str:
        text, self._pending = self._pending, ""
        return text + "\n" if text.strip() else ""

    def _respond(self) -> None:
        if not self._responding:
            self._responding = True
            self.state.turns = (self.state.turns or 0) + 1
            self._reply = []

    def _on_result(self, event: dict[str, Any]) -> str:
        if self._result is not None:
            return self._another_result(event)
        self._result = event
        stats = event.get("stats")
        if isinstance(stats, dict):
            cached = count(stats.get("cached")) or 0
            fresh = count(stats.get("input"))
            if fresh is None and count(stats.get("input_tokens")) is not None:
                fresh = max(count(stats.get("input_tokens")) - cached, 0)
            usage = usage_of(fresh, stats.get("output_tokens"), cached, None)
            if usage is not None and any(usage.values()):
                self.state.usage = usage
            models = stats.get("models")
            if isinstance(models, dict) and models:
                self._model(max(models, key=lambda m: count((models[m] or {}).get("total_tokens")
                                                           if isinstance(models[m], dict) else 0) or 0))
        error = event.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        if isinstance(message, str):
            self._check_limit(message, kind)
        out = f"[result] {one_line(event.get('status') or '?')}"
        if isinstance(message, str):
            out += f": {one_line(message)}"
        return out + "\n"

    def _check_limit(self, text: str, kind: Any = None) -> None:
        lowered = f"{text} {kind if isinstance(kind, str) else ''}".lower()
        if any(marker in lowered for marker in QUOTA_MARKERS):
            # The first line is the API's words; what follows is the CLI's advice.
            first = next((line for line in text.splitlines() if line.strip()), text)
            self._hit_limit(first, reset_time(text, self.now()))

    def _verdict(self, exit_code: int | None) -> Verdict:
        named = EXIT_CODES.get(exit_code) if exit_code is not None else None
        result = self._result
        if result is None:
            reason = f"{exit_text(exit_code)}{f': {named}' if named else ''}"
            return Verdict("FAILED", "the Agent's stream ended without a result (crashed?); " + reason)
        error = result.get("error")
        message = one_line(error.get("message")) if isinstance(error, dict) and error.get("message") else None
        if result.get("status") != "success":
            detail = message or one_line(result.get("status") or "error")
            if exit_code == 53 or (isinstance(error, dict) and error.get("type") == "FatalTurnLimitedError"):
                limit = count(self.budget.get("max_turns"))
                return Verdict("FAILED", f"turn limit reached: Gemini CLI stopped at max_turns"
                                         f"{f' {limit}' if limit else ''} (raise max_turns in the Task's front "
                                         "matter or the Agent's configuration)")
            return Verdict("FAILED", f"Gemini CLI reported an error{f' ({exit_text(exit_code)}: {named})' if named else ''}"
                                     f": {detail}")
        if exit_code != 0:
            return Verdict("FAILED", f"{exit_text(exit_code)}{f': {named}' if named else ''}")
        return Verdict("COMPLETED")


def _main_argument(parameters: Any) -> str:
    if not isinstance(parameters, dict):
        return one_line(parameters) if parameters is not None else ""
    for key in MAIN_ARGUMENT:
        if isinstance(parameters.get(key), str):
            return one_line(parameters[key])
    for value in parameters.values():
        if isinstance(value, str):
            return one_line(value)
    return one_line(parameters)
