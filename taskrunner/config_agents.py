"""`agents.<name>` and `prices` of .taskrun.yaml -> AgentSpec, Prices (part of config.py's parser).

`AgentParsing` is mixed into config.py's `_Parser`: it uses its `fail`,
`section`, `string`, `integer`, `argv` and `string_list`, so every error
names the file, the dotted key and the reason. Keys that only one tool
understands (`permission_mode` for Claude Code, `approval_mode` for Gemini
CLI, `sandbox_mode` for Codex, ...) are refused on other presets with a
message naming the preset that takes them (`PRESET_KEYS`).

`prompt_template_file` is a path in the repository, read here at load time
beneath the repository root without following links (safefs), so a link
cannot make the configuration read the daemon's keys. It is read through
`Beneath.read_capped`, as .taskrun.yaml itself is (config.py): a file over its limit
costs an fstat, never a read of the whole file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from taskrunner.errors import ConfigError, UnsafePath
from taskrunner.model import AgentSpec, ModelBackend, Prices
from taskrunner.safefs import REFUSAL, Beneath
from taskrunner.taskfile import describe
from taskrunner.textsafe import over_limit

AGENT_PRESETS = ("shell", "command", "claude", "codex", "gemini", "aider")
#: The presets that run an AI coding CLI whose event stream the Worker reads.
TOOL_PRESETS = ("claude", "codex", "gemini", "aider")
#: The placeholder a `command` Agent's argv may carry; replaced by the prompt file's path.
PROMPT_PLACEHOLDER = "{prompt_file}"
#: `agents.<name>.pause_scope`: where a usage limit pauses the Agent.
PAUSE_SCOPES = ("everywhere", "worker")
#: `agents.<name>.approval_mode` (Gemini CLI --approval-mode).
APPROVAL_MODES = ("default", "auto_edit", "yolo")
#: `agents.<name>.sandbox_mode` (Codex --sandbox).
SANDBOX_MODES = ("read-only", "workspace-write", "danger-full-access")
#: The largest prompt template file read, in bytes.
MAX_TEMPLATE_BYTES = 64 * 1024

AGENT_KEYS = ("preset", "command", "backend", "env", "path", "model", "max_turns", "max_cost_usd",
              "max_budget_usd", "permission_mode", "allowed_tools", "disallowed_tools", "append_system_prompt",
              "approval_mode", "sandbox_mode", "extra_args", "prompt_template", "prompt_template_file",
              "pause_scope")
BACKEND_KEYS = ("provider", "model", "context_window", "base_url")
#: `backend.provider` when the configuration gives none: the provider each preset's tool talks to.
DEFAULT_PROVIDERS: Mapping[str, str] = {"claude": "anthropic", "codex": "openai", "gemini": "google"}
PRICE_KEYS = ("input", "output", "cache_read", "cache_write")
_NOT_SHELL = ("command", *TOOL_PRESETS)
#: Which presets take each key that not every preset does.
PRESET_KEYS: Mapping[str, tuple[str, ...]] = {
    "path": TOOL_PRESETS, "model": TOOL_PRESETS, "max_turns": TOOL_PRESETS, "max_cost_usd": TOOL_PRESETS,
    "pause_scope": TOOL_PRESETS, "extra_args": TOOL_PRESETS,
    "max_budget_usd": ("claude",), "permission_mode": ("claude",), "allowed_tools": ("claude",),
    "disallowed_tools": ("claude",), "append_system_prompt": ("claude",),
    "approval_mode": ("gemini",), "sandbox_mode": ("codex",),
    "prompt_template": _NOT_SHELL, "prompt_template_file": _NOT_SHELL,
}
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# Claude Code's modes are words (acceptEdits, bypassPermissions, default, dontAsk, plan): new ones pass.
_MODE_RE = re.compile(r"^[A-Za-z][A-Za-z_-]*$")
_URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")


class AgentParsing:
    """Validators for agents and prices; mixed into config._Parser (which provides the helpers)."""

    file: str
    root: Path | None

    # Provided by config._Parser.
    def fail(self, key: str | None, reason: str) -> ConfigError: ...  # pragma: no cover
    def section(self, value: object, key: str | None, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, Any]: ...  # pragma: no cover
    def string(self, key: str, value: object) -> str: ...  # pragma: no cover
    def integer(self, key: str, value: object, minimum: int, maximum: int | None = None) -> int: ...  # pragma: no cover
    def argv(self, key: str, value: object) -> tuple[str, ...]: ...  # pragma: no cover
    def string_list(self, key: str, value: object, what: str,
                    pattern: re.Pattern[str]) -> tuple[str, ...]: ...  # pragma: no cover
    def named(self, key: str, value: object) -> dict[str, object]: ...  # pragma: no cover

    def agent(self, name: str, value: object) -> AgentSpec:
        key = f"agents.{name}"
        spec = self.section(value, key, AGENT_KEYS, required=("preset",))
        preset = spec["preset"]
        if preset not in AGENT_PRESETS:
            raise self.fail(f"{key}.preset", f"expected one of {', '.join(AGENT_PRESETS)}, got {describe(preset)}")
        spec = {k: v for k, v in spec.items() if v is not None}
        for option, presets in PRESET_KEYS.items():
            if option in spec and preset not in presets:
                which = f"preset {presets[0]}" if len(presets) == 1 else f"presets {', '.join(presets)}"
                raise self.fail(f"{key}.{option}", f"only for {which}; this Agent is preset {preset}")
        command: tuple[str, ...] = ()
        if spec.get("command") is not None:
            if preset == "shell":
                raise self.fail(f"{key}.command", "the shell preset runs the Task's code blocks and takes no command")
            command = self.argv(f"{key}.command", spec["command"])
        elif preset == "command":
            raise self.fail(
                f"{key}.command",
                f"required for preset 'command': a list of arguments, e.g. [my-agent, --prompt, '{PROMPT_PLACEHOLDER}']",
            )
        if "prompt_template" in spec and "prompt_template_file" in spec:
            raise self.fail(f"{key}.prompt_template_file", "give prompt_template or prompt_template_file, not both")
        backend = None
        if spec.get("backend") is not None:
            backend = self.backend(f"{key}.backend", spec["backend"], preset,
                                   self._text(f"{key}.model", spec.get("model")))
        env = self.string_list(f"{key}.env", spec.get("env"), "environment variable names", _ENV_NAME_RE)
        return AgentSpec(
            name=name, preset=preset, command=command, backend=backend, env=env,
            path=self._program_path(f"{key}.path", spec.get("path")),
            model=self._text(f"{key}.model", spec.get("model")),
            max_turns=None if "max_turns" not in spec else self.integer(f"{key}.max_turns", spec["max_turns"], 1),
            max_cost_usd=self.dollars(f"{key}.max_cost_usd", spec.get("max_cost_usd")),
            max_budget_usd=self.dollars(f"{key}.max_budget_usd", spec.get("max_budget_usd")),
            permission_mode=self._choice(f"{key}.permission_mode", spec.get("permission_mode"), None),
            allowed_tools=self._tools(f"{key}.allowed_tools", spec.get("allowed_tools")),
            disallowed_tools=self._tools(f"{key}.disallowed_tools", spec.get("disallowed_tools")),
            append_system_prompt=self._text(f"{key}.append_system_prompt", spec.get("append_system_prompt"),
                                            multiline=True),
            approval_mode=self._choice(f"{key}.approval_mode", spec.get("approval_mode"), APPROVAL_MODES),
            sandbox_mode=self._choice(f"{key}.sandbox_mode", spec.get("sandbox_mode"), SANDBOX_MODES),
            extra_args=() if "extra_args" not in spec else self._extra_args(f"{key}.extra_args", spec["extra_args"]),
            prompt_template=self._template(key, spec),
            pause_scope=self._choice(f"{key}.pause_scope", spec.get("pause_scope"), PAUSE_SCOPES) or "everywhere",
        )

    def backend(self, key: str, value: object, preset: str = "command", model: str | None = None) -> ModelBackend:
        """`backend: {provider, model, context_window, base_url}`, every key optional.

        `provider` defaults to the preset's (DEFAULT_PROVIDERS; None for aider, shell and command),
        `model` to the Agent's `model` (None: the tool's default model). Unknown keys and wrong
        types are refused, naming the dotted key.
        """
        spec = {k: v for k, v in self.section(value, key, BACKEND_KEYS).items() if v is not None}
        window = spec.get("context_window")
        base_url = spec.get("base_url")
        if base_url is not None and (not isinstance(base_url, str) or not _URL_RE.fullmatch(base_url)):
            raise self.fail(f"{key}.base_url", f"expected an http(s) URL such as https://api.anthropic.com, "
                                               f"got {describe(base_url)}")
        return ModelBackend(
            provider=self.string(f"{key}.provider", spec["provider"]) if "provider" in spec
            else DEFAULT_PROVIDERS.get(preset),
            model=self.string(f"{key}.model", spec["model"]) if "model" in spec else model,
            context_window=None if window is None else self.integer(f"{key}.context_window", window, minimum=1),
            base_url=base_url,
        )

    def prices(self, value: object) -> dict[str, Prices]:
        """`prices: {MODEL: {input, output, cache_read, cache_write}}`, USD per million tokens.

        `cache_read` and `cache_write` default to the input price.
        """
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail("prices", f"expected a mapping of model names to prices, got {describe(value)}")
        table: dict[str, Prices] = {}
        for model, entry in value.items():
            if not isinstance(model, str) or not model.strip() or any(c.isspace() for c in model):
                raise self.fail(f"prices.{model}", f"expected a model name, got {describe(model)}")
            key = f"prices.{model}"
            spec = self.section(entry, key, PRICE_KEYS, required=("input", "output"))
            costs = {name: self.price(f"{key}.{name}", spec[name]) for name in PRICE_KEYS if spec.get(name) is not None}
            table[model] = Prices(input=costs["input"], output=costs["output"],
                                  cache_read=costs.get("cache_read", costs["input"]),
                                  cache_write=costs.get("cache_write", costs["input"]))
        return table

    # ------------------------------------------------------------------ values

    def dollars(self, key: str, value: object) -> float | None:
        """A budget in USD: a number above 0."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise self.fail(key, f"expected an amount in USD above 0, such as 2.50, got {describe(value)}")
        return float(value)

    def price(self, key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise self.fail(key, f"expected USD per million tokens (a number >= 0), got {describe(value)}")
        return float(value)

    def _program_path(self, key: str, value: object) -> str | None:
        """An Agent's `path`: absolute, or the program would be looked up from the Run's checkout, which
        the repository controls."""
        path = self._text(key, value)
        if path is not None and not path.startswith("/"):
            raise self.fail(key, f"expected an absolute path to the CLI on the Worker, got {path!r} (a relative "
                                 "one would be found in the Run's checkout, which the repository controls)")
        return path

    def _text(self, key: str, value: object, multiline: bool = False) -> str | None:
        if value is None:
            return None
        text = self.string(key, value)
        if "\0" in text or (not multiline and "\n" in text):
            raise self.fail(key, f"expected a single line of text, got {describe(value)}")
        return text

    def _choice(self, key: str, value: object, choices: tuple[str, ...] | None) -> str | None:
        if value is None:
            return None
        if choices is None:
            if not isinstance(value, str) or not _MODE_RE.fullmatch(value):
                raise self.fail(key, f"expected a mode name such as acceptEdits, got {describe(value)}")
            return value
        if value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {describe(value)}")
        return str(value)

    def _tools(self, key: str, value: object) -> tuple[str, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.fail(key, f"expected a list of tool names such as [Read, 'Bash(git:*)'], got {describe(value)}")
        tools: list[str] = []
        for item in items:
            if not isinstance(item, str) or not item.strip() or any(c in item for c in "\n\0"):
                raise self.fail(key, f"expected tool names such as Read or 'Bash(git:*)', got {describe(item)}")
            if item not in tools:
                tools.append(item)
        return tuple(tools)

    def _extra_args(self, key: str, value: object) -> tuple[str, ...]:
        if value == []:
            return ()
        return self.argv(key, value)

    def _template(self, key: str, spec: Mapping[str, Any]) -> str | None:
        if "prompt_template" in spec:
            source = self._text(f"{key}.prompt_template", spec["prompt_template"], multiline=True)
            where = f"{key}.prompt_template"
        elif "prompt_template_file" in spec:
            where = f"{key}.prompt_template_file"
            source = self._template_file(where, spec["prompt_template_file"])
        else:
            return None
        _check_template(self, where, source or "")
        _trial_render(self, where, source or "", spec.get("prompt_template_file"))
        return source

    def _template_file(self, key: str, value: object) -> str:
        rel = self.string(key, value)
        parts = rel.split("/")
        if rel.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in rel:
            raise self.fail(key, f"expected a path relative to the repository root, got {describe(value)}")
        root = self.root if self.root is not None else Path(self.file).parent
        tree = Beneath(root)
        try:
            data, size = tree.read_capped(rel, MAX_TEMPLATE_BYTES)
        except UnsafePath as exc:
            raise self.fail(key, f"cannot read {rel}: it is {exc.what}; {exc.reason or REFUSAL}") from None
        except OSError as exc:
            raise self.fail(key, f"cannot read {rel}: {exc.strerror or exc}") from None
        finally:
            tree.close()
        if data is None:
            raise self.fail(key, f"{rel} is {over_limit(size, MAX_TEMPLATE_BYTES, 'prompt template files')}; "
                                 "shorten the template")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(key, f"{rel} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def _check_template(parser: AgentParsing, key: str, source: str) -> None:
    """Refuse a template jinja2 cannot parse, at load time rather than at each Run."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    try:
        SandboxedEnvironment().parse(source)
    except TemplateSyntaxError as exc:
        raise parser.fail(key, f"not a valid jinja2 template: {exc.message} (line {exc.lineno})") from None
    except RecursionError:  # jinja2's parser recurses per nesting level: `{{ ((((...` thousands deep
        raise parser.fail(key, "not a valid jinja2 template: nested too deeply") from None


def _trial_render(parser: AgentParsing, key: str, source: str, file: object) -> None:
    """Refuse a template that cannot render with sample values of its variables (a misspelt name):
    the error names the key, the line (in the template file, when it is one) and the variables."""
    from taskrunner.agents.prompt import PromptError, trial_render

    name = file if isinstance(file, str) else key
    try:
        trial_render(source, name)
    except PromptError as exc:
        reason = str(exc)
        if name == key:
            reason = reason.removeprefix(f"{key}, ").removeprefix(f"{key}: ")
        raise parser.fail(key, f"the template does not render: {reason}") from None
