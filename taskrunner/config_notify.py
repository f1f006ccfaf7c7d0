"""`notify` of .taskrun.yaml -> NotifyTarget (part of config.py's parser).

`notify` is a list; each entry names the events it wants (`on`), optional
filters (`tasks`, a glob on the Task id; `agents`) and one target: either a
`command` (an argv, never a shell string; `env` names the daemon's environment
variables it may see besides COMMAND_ENV) or a `url` that is POSTed to, with
an optional `template` for the body, `secret_env` for an HMAC signature,
`timeout` and `retries`. Every error is a ConfigError naming `notify[<n>].<key>`.

The secret itself is never in the file: `secret_env` names the daemon's
environment variable that holds it, read when a notification is sent.
A `template` is checked here: its syntax, and one trial rendering with a
sample event (`SAMPLE_EVENT`) within RENDER_SECONDS and MAX_BODY_CHARS
(`render_body`, the same bound as at each delivery), so a misspelt field or a
template that never ends is refused at load time, not when a notification fails.

YAML 1.1 (PyYAML) reads an unquoted `on` key as the boolean true; that key is
taken as `on` (the only key of an entry that can be written so).
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from taskrunner.errors import ConfigError
from taskrunner.taskfile import describe

#: The events an entry's `on` may name.
NOTIFY_EVENTS = ("completed", "failed", "blocked", "usage_limited", "worker_offline", "worker_untrusted")
#: The events about one Task (`tasks` filters these only).
TASK_EVENTS = ("completed", "failed", "blocked")
NOTIFY_KEYS = ("on", "tasks", "agents", "command", "env", "url", "template", "secret_env", "timeout", "retries")
#: The daemon's environment variables a `command` sees (those set), besides its entry's `env` and TASKRUN_EVENT:
#: never the rest, which holds the webhook secret, the forge token and the Agents' API keys.
COMMAND_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
#: Seconds one delivery (one POST, one command) may take when `timeout` is not given.
DEFAULT_TIMEOUT = 10.0
#: The longest `timeout` taken: the one delivery thread must not wait on one target for long.
MAX_TIMEOUT = 300.0
#: Tries after the first when `retries` is not given, and the most that may be given.
DEFAULT_RETRIES = 3
MAX_RETRIES = 10
#: The longest body template, in characters.
MAX_TEMPLATE_CHARS = 64 * 1024
#: The longest a template may take to render, in seconds (at load, and at each delivery within its `timeout`).
RENDER_SECONDS = 2.0
#: The longest body a template may render, in characters.
MAX_BODY_CHARS = 256 * 1024
#: Every field an event may carry; a template sees all of them (None where one does not apply).
EVENT_FIELDS = ("kind", "time", "task_id", "title", "run_id", "status", "agent", "worker", "error", "reason",
                "until")
#: What a template is tried with at load time.
SAMPLE_EVENT: Mapping[str, Any] = {
    "kind": "failed", "time": "2026-01-01T00:00:00Z", "task_id": "release-1", "title": "Cut the release",
    "run_id": "r-1a2b3c", "status": "FAILED", "agent": "claude", "worker": "local", "error": "exit code 1",
    "reason": "a sample reason", "until": 1767225600.0,
}
_URL_RE = re.compile(r"^https?://[^\s/?#@]+(/[^\s]*)?$")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class NotifyTarget:
    """One `notify` entry: which events, where to, how patiently.

    Exactly one of `command` (argv; the event JSON on stdin; `env` the names of the daemon's
    environment variables it sees besides COMMAND_ENV) and `url` (POST) is set.
    `timeout` is seconds per try (a wall-clock deadline); `retries` the tries after the first.
    """

    index: int  # n of notify[n]: how messages name it
    on: tuple[str, ...]
    tasks: str | None = None  # fnmatch glob on the Task id
    agents: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()  # with `command`: more environment variable names it sees
    url: str | None = None
    template: str | None = None  # jinja2 source of the POST body; None: the event JSON
    secret_env: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    @property
    def name(self) -> str:
        """How notices name the entry: `notify[n]` and where it goes, without a URL's path or query
        (a chat webhook's path often is its secret)."""
        if self.command is not None:
            return f"notify[{self.index}] (command {self.command[0]})"
        host = (self.url or "").split("://", 1)[-1].split("/", 1)[0]
        return f"notify[{self.index}] ({(self.url or '').split('://', 1)[0]}://{host})"


class _Parsing(Protocol):
    """What config._Parser provides (see config.py)."""

    def fail(self, key: str | None, reason: str) -> ConfigError: ...
    def section(self, value: object, key: str | None, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, Any]: ...
    def integer(self, key: str, value: object, minimum: int, maximum: int | None = None) -> int: ...
    def duration(self, key: str, value: object, default: float) -> float: ...
    def argv(self, key: str, value: object) -> tuple[str, ...]: ...
    def string_list(self, key: str, value: object, what: str, pattern: re.Pattern[str]) -> tuple[str, ...]: ...


def parse_notify(parser: _Parsing, value: object) -> tuple[NotifyTarget, ...]:
    """`notify` (a list of entries, or null) -> its targets; ConfigError naming `notify[<n>].<key>`."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise parser.fail("notify", f"expected a list of entries (each with `on` and a `command` or `url`), "
                                    f"got {describe(value)}")
    return tuple(_entry(parser, index, entry) for index, entry in enumerate(value))


def _entry(parser: _Parsing, index: int, value: object) -> NotifyTarget:
    key = f"notify[{index}]"
    if isinstance(value, dict) and True in value:  # `on:` unquoted is YAML 1.1's true
        if "on" in value:
            raise parser.fail(f"{key}.on", "given twice")
        value = {("on" if name is True else name): item for name, item in value.items()}
    spec = parser.section(value, key, NOTIFY_KEYS, required=("on",))
    on = parser.string_list(f"{key}.on", spec["on"], "event names", re.compile("|".join(NOTIFY_EVENTS)))
    if not on:
        raise parser.fail(f"{key}.on", f"expected at least one of {', '.join(NOTIFY_EVENTS)}")
    command, url = spec.get("command"), spec.get("url")
    if (command is None) == (url is None):
        raise parser.fail(key, "expected exactly one of `command` (an argv) and `url` (POSTed to)")
    tasks = spec.get("tasks")
    if tasks is not None and (not isinstance(tasks, str) or not tasks.strip()):
        raise parser.fail(f"{key}.tasks", f"expected a glob on the Task id such as 'release-*', got {describe(tasks)}")
    timeout = parser.duration(f"{key}.timeout", spec.get("timeout"), DEFAULT_TIMEOUT)
    if timeout > MAX_TIMEOUT:
        raise parser.fail(f"{key}.timeout", f"expected at most {MAX_TIMEOUT:.0f}s, got {describe(spec['timeout'])}")
    for name in ("template", "secret_env"):
        if command is not None and spec.get(name) is not None:
            raise parser.fail(f"{key}.{name}", "only with `url`: a command gets the event JSON on stdin")
    if url is not None and spec.get("env") is not None:
        raise parser.fail(f"{key}.env", "only with `command`: a POST carries no environment")
    secret_env = spec.get("secret_env")
    if secret_env is not None and (not isinstance(secret_env, str) or not _ENV_NAME_RE.fullmatch(secret_env)):
        raise parser.fail(f"{key}.secret_env", "expected an environment variable name such as "
                                               f"TASKRUN_NOTIFY_SECRET, got {describe(secret_env)}")
    template = spec.get("template")
    if template is not None:
        _check_template(parser, f"{key}.template", template)
    return NotifyTarget(
        index=index, on=on, tasks=tasks,
        agents=parser.string_list(f"{key}.agents", spec.get("agents"), "Agent names", _NAME_RE),
        command=None if command is None else parser.argv(f"{key}.command", command),
        env=parser.string_list(f"{key}.env", spec.get("env"), "environment variable names", _ENV_NAME_RE),
        url=None if url is None else _url(parser, f"{key}.url", url),
        template=template, secret_env=secret_env, timeout=timeout,
        retries=parser.integer(f"{key}.retries", spec.get("retries", DEFAULT_RETRIES), 0, MAX_RETRIES),
    )


def _url(parser: _Parsing, key: str, value: object) -> str:
    problem = _url_problem(value) if isinstance(value, str) and _URL_RE.fullmatch(value) else None
    if problem or not isinstance(value, str) or not _URL_RE.fullmatch(value):
        shown = describe(value.split("://", 1)[0] + "://..." if isinstance(value, str) and "://" in value else value)
        raise parser.fail(key, f"expected an http(s) URL such as https://chat.example/hook (no user:password@), "
                               f"got {shown}{f': {problem}' if problem else ''}")
    return value


def _url_problem(url: str) -> str | None:
    """What urllib would fail at when sending to `url` (checked here so it fails at load, not at delivery):
    a port not from 1 to 65535, an IPv6 literal that does not parse, a host that is not a name of ASCII
    labels (letters, digits, _ and inner -; an international name in its xn-- form); None when usable."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": an unbalanced bracket
        return "its IPv6 address does not parse"
    try:
        port = parts.port
    except ValueError:
        port = 0
    netloc = parts.netloc.rpartition(":")[0] if parts.netloc.rsplit("]", 1)[-1].count(":") else parts.netloc
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        return "its port is not a number from 1 to 65535"
    if not netloc:
        return "it names no host"
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(netloc[1:-1] if netloc.endswith("]") else "")
        except ValueError:
            return "its IPv6 address does not parse"
        return None
    if len(netloc) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in netloc.split(".")):
        return "its host is not a name of letters, digits, '-' and '_' (an international name in its xn-- form)"
    return None


def _check_template(parser: _Parsing, key: str, value: object) -> None:
    """Syntax, size, and one rendering with SAMPLE_EVENT: a misspelt `event.taks_id`, or three nested
    `range(10000)` loops, fail here."""
    from taskrunner.agents.prompt import PromptError

    if not isinstance(value, str) or not value.strip():
        raise parser.fail(key, f"expected a template (text), got {describe(value)}")
    if len(value) > MAX_TEMPLATE_CHARS:
        raise parser.fail(key, f"expected at most {MAX_TEMPLATE_CHARS} characters, got {len(value)}")
    try:
        render_body(value, SAMPLE_EVENT, name="template")
    except PromptError as exc:
        raise parser.fail(key, f"{exc}; a template sees `event` with {', '.join(EVENT_FIELDS)}") from None


def render_body(template: str, event: Mapping[str, Any], name: str, seconds: float = RENDER_SECONDS) -> str:
    """`template` (jinja2 source) rendered with `event` as `event`, in prompt.py's sandbox.

    Bounded like prompt.trial_render: the clock is read at each range() and each piece of output, and
    past `seconds` the rendering stops; the body is at most MAX_BODY_CHARS characters. PromptError
    "NAME, line L: reason" (a syntax error, an undefined name, a sandbox refusal), "NAME: rendering
    took over S s" or "NAME: the body is over N characters".
    """
    # jinja2 enters through prompt.py only, bounded as prompt templates are.
    from taskrunner.agents import prompt

    prompt.check(template, name)  # a syntax error, named with its line
    late = lambda: prompt.PromptError(f"{name}: rendering took over {seconds:g} s")  # noqa: E731
    try:
        return prompt.bounded_render(template, {"event": dict(event)}, time.monotonic() + seconds, late,
                                     MAX_BODY_CHARS, f"{name}: the body is over {MAX_BODY_CHARS} characters")
    except prompt.RENDER_ERRORS as exc:
        raise prompt.PromptError(prompt.failure_text(name, exc)) from None
