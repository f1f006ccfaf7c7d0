"""Aider, headless: `aider --message-file F --yes-always ...`, and its output reader.

Argv (stdin is /dev/null; the prompt is the message file):

    <path or aider> --message-file <prompt.md> --yes-always --no-auto-commits --no-pretty --no-stream
        --no-check-update --no-show-release-notes --no-analytics --no-gitignore
        --no-show-model-warnings --no-fancy-input --no-detect-urls --map-tokens 0
        --chat-history-file <run dir>/aider.chat.md --input-history-file <run dir>/aider.input.txt
        [--model M] [extra_args...]

The history files go to the Run's directory, outside the checkout, and
`--map-tokens 0` keeps the repo-map cache out of it: neither becomes part
of the returned change. Env: OPENAI_API_BASE from `backend.base_url`,
COLUMNS=4000 (aider wraps its messages at 80 columns when not on a
terminal), LITELLM_LOCAL_MODEL_COST_MAP=True (no price-table download).

Aider has no event stream: its text is the log (events.jsonl is not kept).
Read: "Aider vX" (the CLI version), "Model: M with ..." / "Main model: M
with ..." (the model), and each "Tokens: 1.2k sent, 300 received. Cost:
$0.01 message, $0.02 session." line (one turn; the session cost is the
cost). Aider exits 0 when the model call failed: a litellm error
("litellm.RateLimitError: ...") or "The API provider ..." line not followed
by a later "Tokens:" line fails the Run; a rate limit left standing is a
usage limit (reset time unknown).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from taskrunner.agents.stream import Budget, StreamReader, UsageLimit, Verdict, exit_text, one_line, usage_of

PROGRAM = "aider"
CHAT_HISTORY_FILE = "aider.chat.md"
INPUT_HISTORY_FILE = "aider.input.txt"
HEADLESS_FLAGS = ("--yes-always", "--no-auto-commits", "--no-pretty", "--no-stream", "--no-check-update",
                  "--no-show-release-notes", "--no-analytics", "--no-gitignore", "--no-show-model-warnings",
                  "--no-fancy-input", "--no-detect-urls", "--map-tokens", "0")
QUIET_ENV = {"COLUMNS": "4000", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

_VERSION = re.compile(r"^Aider v(\S+)")
_MODEL = re.compile(r"^(?:Main model|Model):\s+(\S+)")
_TOKENS = re.compile(r"^Tokens:\s+(.*)$")
_FIGURE = re.compile(r"([\d.,]+)\s*([kKmM]?)\s+(sent|received|cache write|cache hit)")
_SESSION_COST = re.compile(r"\$\s*([\d.,]+)\s+session")
_ERROR = re.compile(r"^(litellm\.\w+(?:Error|Exception)\b.*|The API provider\b.*)$")
_RATE_LIMIT = ("litellm.ratelimiterror", "rate limited you")


def command(agent: Mapping[str, Any], budget: Budget, prompt_file: Path,
            workspace: Path) -> tuple[list[str], dict[str, str], Path | None]:
    """(argv, env additions, stdin file: None) for aider; see the module doc. Its history files go beside
    the prompt file, in the Task's directory: in the checkout, never part of the change."""
    backend = agent.get("backend") or {}
    history = prompt_file.parent
    argv = [str(agent.get("path") or PROGRAM), "--message-file", str(prompt_file), *HEADLESS_FLAGS,
            "--chat-history-file", str(history / CHAT_HISTORY_FILE),
            "--input-history-file", str(history / INPUT_HISTORY_FILE)]
    model = agent.get("model") or backend.get("model")
    if model:
        argv += ["--model", str(model)]
    argv += [str(arg) for arg in agent.get("extra_args") or ()]
    env = dict(QUIET_ENV)
    if backend.get("base_url"):
        env["OPENAI_API_BASE"] = str(backend["base_url"])
    return argv, env, None


class AiderReader(StreamReader):
    """Aider's plain text -> the same text, Report (model, tokens, cost), verdict."""

    keeps_events = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._error: str | None = None
        self._rate_limited = False
        self.state.turns = 0

    def _line(self, text: str) -> str:
        line = text.strip()
        match = _VERSION.match(line)
        if match and self.state.cli_version is None:
            self.state.cli_version = match.group(1)
        match = _MODEL.match(line)
        if match:
            self._model(match.group(1))
        match = _TOKENS.match(line)
        if match:
            self._tokens(match.group(1))
        match = _ERROR.match(line)
        if match:
            lowered = line.lower()
            if line.startswith("litellm.") or self._error is None:
                self._error = one_line(line, 300)
                self._rate_limited = any(marker in lowered for marker in _RATE_LIMIT)
        # The log is aider's own text, every line as it came (blank lines kept).
        return text + "\n"

    def _tokens(self, figures: str) -> None:
        self.state.turns = (self.state.turns or 0) + 1
        self._error, self._rate_limited = None, False
        found: dict[str, int] = {}
        for number, scale, kind in _FIGURE.findall(figures):
            try:
                value = float(number.replace(",", "")) * {"": 1, "k": 1e3, "m": 1e6}[scale.lower()]
            except ValueError:
                continue
            found[kind] = int(round(value))
        if found:
            sent = found.get("sent", 0)
            read, written = found.get("cache hit", 0), found.get("cache write", 0)
            turn = usage_of(max(sent - read - written, 0), found.get("received", 0), read, written)
            usage = self.state.usage or {}
            self.state.usage = {key: usage.get(key, 0) + value for key, value in (turn or {}).items()}
        match = _SESSION_COST.search(figures)
        if match:
            try:
                self.state.cost_usd = float(match.group(1).replace(",", ""))
            except ValueError:
                pass

    def _verdict(self, exit_code: int | None) -> Verdict:
        if self._error is not None:
            if self._rate_limited:
                limit = UsageLimit(None, self._error)
                return Verdict("FAILED", limit.error(), limit)
            return Verdict("FAILED", f"aider's model call failed: {self._error}")
        if exit_code != 0:
            return Verdict("FAILED", exit_text(exit_code))
        return Verdict("COMPLETED")
