"""Claude Code, headless: `claude -p --output-format stream-json --verbose`, and its stream reader.

Argv (the prompt on stdin, `-p` reads it to EOF):

    <path or claude> -p --output-format stream-json --verbose --permission-mode <mode>
        [--model M] [--max-turns N] [--max-budget-usd X] [--allowedTools T...]
        [--disallowedTools T...] [--append-system-prompt TEXT] [extra_args...]

`--permission-mode` defaults to `acceptEdits`: edits in the workspace are
accepted without a prompt, simple shell commands run, anything else is
refused in-band (the Run goes on). `bypassPermissions` is refused by
Claude Code when run as root.

The stream (one JSON object a line; Claude Code 2.1's `stream-json`):
`system/init` (session_id, model, claude_code_version, tools), `assistant`
(message.id, message.model, content blocks text / tool_use / thinking,
usage), `user` (tool_result blocks), `system/api_retry`, `rate_limit_event`
(rate_limit_info.status, resetsAt) and one final `result` (subtype,
is_error, api_error_status, num_turns, total_cost_usd, usage, modelUsage,
result, errors, terminal_reason).

Turns: distinct assistant message ids while streaming (Claude Code's
synthetic error messages not counted); the result's num_turns wins.
COMPLETED only when a result is subtype `success` with is_error false and
the exit code is 0 (an API error arrives as `success` with is_error true).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from taskrunner.agents.stream import (
    Budget, StreamReader, UsageLimit, Verdict, abbreviate, count, epoch_seconds, exit_text, one_line, parse_json,
    usage_of, usd, verbatim,
)

PROGRAM = "claude"
DEFAULT_PERMISSION_MODE = "acceptEdits"
#: Claude Code phones home, updates itself and reports errors unless told not to.
QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
}
#: The input key that names what a tool works on, by tool name; else the first string argument.
MAIN_ARGUMENT = {
    "Bash": "command", "Write": "file_path", "Edit": "file_path", "MultiEdit": "file_path",
    "Read": "file_path", "NotebookEdit": "notebook_path", "Glob": "pattern", "Grep": "pattern",
    "WebFetch": "url", "WebSearch": "query", "Task": "description", "Agent": "description",
}
#: Texts of a usage or session limit in a synthetic message or an error result.
LIMIT_TEXT = re.compile(r"limit[^\n]{0,40}[·∙•][^\n]{0,4}resets|limit reached\||usage limit reached|"
                        r"hit your [^\n]{0,40}limit|out of usage", re.IGNORECASE)


def command(agent: Mapping[str, Any], budget: Budget, prompt_file: Path,
            workspace: Path) -> tuple[list[str], dict[str, str], Path | None]:
    """(argv, env additions, stdin file) for Claude Code; see the module doc."""
    argv = [str(agent.get("path") or PROGRAM), "-p", "--output-format", "stream-json", "--verbose",
            "--permission-mode", str(agent.get("permission_mode") or DEFAULT_PERMISSION_MODE)]
    model = agent.get("model") or (agent.get("backend") or {}).get("model")
    if model:
        argv += ["--model", str(model)]
    max_turns = budget.get("max_turns")
    if max_turns is not None:
        argv += ["--max-turns", str(max_turns)]
    max_budget = agent.get("max_budget_usd")
    if max_budget is None:
        max_budget = budget.get("max_cost_usd")
    if max_budget is not None:
        argv += ["--max-budget-usd", str(max_budget)]
    for key, flag in (("allowed_tools", "--allowedTools"), ("disallowed_tools", "--disallowedTools")):
        tools = agent.get(key)
        if tools:
            argv += [flag, *[str(tool) for tool in tools]] if isinstance(tools, (list, tuple)) else [flag, str(tools)]
    if agent.get("append_system_prompt"):
        argv += ["--append-system-prompt", str(agent["append_system_prompt"])]
    argv += [str(arg) for arg in agent.get("extra_args") or ()]
    env = dict(QUIET_ENV)
    base_url = (agent.get("backend") or {}).get("base_url")
    if base_url:
        env["ANTHROPIC_BASE_URL"] = str(base_url)
    return argv, env, prompt_file


class ClaudeReader(StreamReader):
    """Claude Code's `stream-json` events -> output.log text, Report, usage limit, verdict."""

    default_provider = "anthropic"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._messages: dict[str, dict[str, int] | None] = {}
        self._total: dict[str, int] | None = None  # the sum of _messages' usage
        self._result: dict[str, Any] | None = None
        self._retry_resets: float | None = None
        self._placeholder = False   # the usage limit's message is rate_limit_event's summary

    def _line(self, text: str) -> str:
        event = parse_json(text)
        if event is None:
            return verbatim(text)
        kind = event.get("type")
        if kind == "system":
            return self._system(event)
        if kind == "assistant":
            return self._assistant(event)
        if kind == "user":
            return self._user(event)
        if kind == "rate_limit_event":
            return self._rate_limit(event)
        if kind == "result":
            return self._on_result(event)
        self.ignored += 1
        return ""

    def _system(self, event: dict[str, Any]) -> str:
        subtype = event.get("subtype")
        if subtype == "init":
            self._session(event)
            self._model(event.get("model"))
            if isinstance(event.get("claude_code_version"), str):
                self.state.cli_version = event["claude_code_version"]
            tools = event.get("tools")
            count_text = f", {len(tools)} tools" if isinstance(tools, list) else ""
            return f"[init] Claude Code {self.state.cli_version or '?'}, model {self.state.model or '?'}{count_text}\n"
        if subtype == "api_retry":
            status = event.get("error_status")
            delay = event.get("retry_delay_ms")
            when = f" in {delay / 1000:.1f} s" if isinstance(delay, (int, float)) else ""
            return (f"[retry] attempt {event.get('attempt', '?')}/{event.get('max_retries', '?')}{when}: "
                    f"{one_line(event.get('error') or 'error')}"
                    f"{f' (status {status})' if status is not None else ''}\n")
        self.ignored += 1
        return ""

    def _assistant(self, event: dict[str, Any]) -> str:
        self._session(event)
        message = event.get("message")
        if not isinstance(message, dict):
            return ""
        model = message.get("model")
        synthetic = model == "<synthetic>" or bool(event.get("error"))
        if synthetic:
            self._error_params(event)
        if not synthetic:
            self._model(model)
            ident = message.get("id")
            if isinstance(ident, str):
                # The same message arrives once per content block with the same usage: last one wins.
                self._count_usage(self._messages.get(ident), _usage(message.get("usage")))
                self._messages[ident] = _usage(message.get("usage"))
                self.state.turns = len(self._messages)
        out = []
        for block in message.get("content") or ():
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                if synthetic:
                    self._limit_text(block["text"], event.get("error") == "rate_limit")
                out.append(block["text"].rstrip("\n") + "\n" if block["text"].strip() else "")
            elif kind == "tool_use":
                out.append(f"-> {block.get('name', '?')}: {_main_argument(block.get('name'), block.get('input'))}\n")
            elif kind in ("thinking", "redacted_thinking"):
                thought = block.get("thinking")
                out.append(f"(thinking) {one_line(thought, 120)}\n" if isinstance(thought, str) and thought.strip()
                           else "(thinking)\n")
        return "".join(out)

    def _user(self, event: dict[str, Any]) -> str:
        message = event.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            return ""
        out = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "tool_result":
                continue
            body = block.get("content")
            if isinstance(body, list):
                body = "\n".join(part.get("text", "") for part in body
                                 if isinstance(part, dict) and isinstance(part.get("text"), str))
            out.append(abbreviate(body, "   ! " if block.get("is_error") else "   "))
        return "".join(out)

    def _rate_limit(self, event: dict[str, Any]) -> str:
        info = event.get("rate_limit_info")
        if not isinstance(info, dict):
            return ""
        status = info.get("status")
        resets = info.get("resetsAt")
        resets_at = epoch_seconds(resets, self.now())
        kind = info.get("rateLimitType") or "usage"
        if status == "rejected" and info.get("overageStatus") not in ("allowed", "allowed_warning"):
            self._retry_resets = resets_at
            self._hit_limit(f"{kind} limit reached", resets_at)
            self._placeholder = True
            return f"[limit] {kind} limit reached\n"
        if status == "allowed_warning":
            return f"[limit] warning: close to the {kind} limit\n"
        return ""

    def _on_result(self, event: dict[str, Any]) -> str:
        if self._result is not None:
            return self._another_result(event)
        self._result = event
        self._session(event)
        turns = count(event.get("num_turns"))
        if turns is not None:
            self.state.turns = turns
        cost = usd(event.get("total_cost_usd"))
        if cost is not None:
            self.state.cost_usd = cost
        # modelUsage is the session's total per model; the result's `usage` can be the last turn's only
        # (error_max_budget_usd) or zeros: the larger of them, else the running total of the messages.
        models = event.get("modelUsage")
        reported = [u for u in (_usage(event.get("usage")), _model_usage(models)) if u and sum(u.values()) > 0]
        if reported:
            self.state.usage = max(reported, key=lambda u: sum(u.values()))
        if isinstance(models, dict) and models:
            self._model(max(models, key=lambda name: _weight(models[name])))
        if isinstance(event.get("result"), str):
            self.state.final_message = event["result"]
        is_error = event.get("is_error") is True
        if is_error:
            texts = [event.get("result")] + list(event.get("errors") or [])
            for text in texts:
                if isinstance(text, str):
                    self._limit_text(text, False)
            self._error_params(event)
            if event.get("api_error_status") == 429 or event.get("api_error") == "usage_limit_reached":
                message = next((t for t in texts if isinstance(t, str) and t.strip()), "API error 429")
                self._hit_limit(message, self._retry_resets)
        parts = [f"[result] {event.get('subtype', '?')}"]
        if is_error:
            parts.append("error")
        if self.state.turns is not None:
            parts.append(f"{self.state.turns} turn{'' if self.state.turns == 1 else 's'}")
        if cost is not None:
            parts.append(f"${cost:.4f}")
        out = " · ".join(parts) + "\n"
        for error in event.get("errors") or ():
            out += f"   ! {one_line(error)}\n"
        return out

    def _verdict(self, exit_code: int | None) -> Verdict:
        result = self._result
        if result is None:
            return Verdict("FAILED", "the Agent's stream ended without a result (crashed?); " + exit_text(exit_code))
        subtype = result.get("subtype")
        errors = "; ".join(one_line(e) for e in result.get("errors") or () if isinstance(e, str))
        if subtype == "error_max_turns":
            limit = self.budget.get("max_turns")
            named = f"max_turns {limit}" if limit is not None else "its --max-turns"
            return Verdict("FAILED", f"turn limit reached: Claude Code stopped at {named} after "
                                     f"{self.state.turns} turns{f' ({errors})' if errors else ''}")
        if subtype == "error_max_budget_usd":
            return Verdict("FAILED", f"cost limit reached: Claude Code stopped at its --max-budget-usd"
                                     f"{f' ({errors})' if errors else ''}")
        if subtype != "success":
            return Verdict("FAILED", f"Claude Code ended with {one_line(subtype)}"
                                     f"{': ' + errors if errors else ''}")
        if result.get("is_error") is not False:
            status = result.get("api_error_status")
            text = one_line(result.get("result") or errors or "no message")
            return Verdict("FAILED", f"Claude Code reported an error{f' (API status {status})' if status else ''}: "
                                     f"{text}")
        if exit_code != 0:
            return Verdict("FAILED", exit_text(exit_code) + " after a successful result")
        return Verdict("COMPLETED")

    def _error_params(self, event: dict[str, Any]) -> None:
        """An API error's `api_error_params.rate_limit_info.resetsAt` (epoch seconds): the exact reset
        time, which the message text gives only to the minute (and a rate_limit_event may not precede)."""
        params = event.get("api_error_params")
        info = params.get("rate_limit_info") if isinstance(params, dict) else None
        resets = info.get("resetsAt") if isinstance(info, dict) else None
        if self._retry_resets is None:
            self._retry_resets = epoch_seconds(resets, self.now())

    def _limit_text(self, text: str, certain: bool) -> None:
        if certain or LIMIT_TEXT.search(text):
            if self._placeholder and self.usage_limit is not None:
                # The tool's own words beat the event's summary; the event's reset time stays.
                self.usage_limit = UsageLimit(self.usage_limit.resets_at, " ".join(text.split())[:1000])
                self._placeholder = False
            self._hit_limit(text, self._retry_resets)

    def _session(self, event: dict[str, Any]) -> None:
        if isinstance(event.get("session_id"), str) and self.state.session_id is None:
            self.state.session_id = event["session_id"]

    def _count_usage(self, before: dict[str, int] | None, after: dict[str, int] | None) -> None:
        """Keep the running total of the messages' usage (one update per event, whatever the stream's length)."""
        if after is None and before is None:
            return
        total = dict(self._total or {})
        for key, value in (before or {}).items():
            total[key] = total.get(key, 0) - value
        for key, value in (after or {}).items():
            total[key] = total.get(key, 0) + value
        self._total = total
        if self._result is None:
            self.state.usage = total


def _usage(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return usage_of(value.get("input_tokens"), value.get("output_tokens"),
                    value.get("cache_read_input_tokens"), value.get("cache_creation_input_tokens"))


def _model_usage(models: Any) -> dict[str, int] | None:
    """The sum over `modelUsage`'s models ({inputTokens, outputTokens, cacheReadInputTokens,
    cacheCreationInputTokens}), in the Report's keys; None when it holds none."""
    if not isinstance(models, dict):
        return None
    total: dict[str, int] | None = None
    for value in models.values():
        if isinstance(value, dict):
            usage = usage_of(value.get("inputTokens"), value.get("outputTokens"),
                             value.get("cacheReadInputTokens"), value.get("cacheCreationInputTokens"))
            if usage:
                total = {k: (total or {}).get(k, 0) + v for k, v in usage.items()}
    return total


def _weight(value: Any) -> float:
    if not isinstance(value, dict):
        return 0.0
    cost = usd(value.get("costUSD")) or 0.0
    tokens = sum(count(value.get(k)) or 0 for k in ("inputTokens", "outputTokens"))
    return cost * 1e9 + tokens


def _main_argument(name: Any, arguments: Any) -> str:
    if not isinstance(arguments, dict):
        return one_line(arguments) if arguments is not None else ""
    key = MAIN_ARGUMENT.get(name) if isinstance(name, str) else None
    if name == "TodoWrite" and isinstance(arguments.get("todos"), list):
        return f"{len(arguments['todos'])} items"
    if key and isinstance(arguments.get(key), str):
        return one_line(arguments[key])
    for value in arguments.values():
        if isinstance(value, str):
            return one_line(value)
    return one_line(arguments)
