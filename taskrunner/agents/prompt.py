"""The prompt an Agent receives: a jinja2 template rendered in a sandbox. Pure.

jinja2 enters taskrun here, and only here; its exceptions become PromptError.
The template is an Agent's `prompt_template` (jinja2 source, from
`.taskrun.yaml`), or DEFAULT_TEMPLATE when it has none. It is rendered with
jinja2's SandboxedEnvironment: autoescape off (the prompt is markdown, not
HTML), StrictUndefined (a misspelt name is an error, never an empty string),
no loader (`{% include %}`, `{% import %}` and `{% extends %}` find nothing),
no attribute starting with `_` (`''.__class__` is refused), ranges of at most
MAX_RANGE items and no `*` or `**` whose result is larger than MAX_PROMPT_CHARS.
The rendered prompt is at most MAX_PROMPT_CHARS characters. The sandbox keeps
a template from reaching Python's internals; it does not bound the CPU a
template of nested loops may spend, and the template is the configuration's,
which the control plane signs.

Variables a template sees (`values`, as agents/workspace.py gives them):

    task_id        str         the Task's id, e.g. "db/schema"
    title          str         the Task's title (its first heading, else its id)
    body           str         the Task file's markdown body (the requirement), without front matter
    run_id         str         the Run's id
    run_number     int         n of `.task/<task-id>/run-<n>/` and `runs/<task-id>/run-<n>/`
    attempt        int         the Run's attempt number
    worker         str         the Worker's name
    agent          str         the Agent's name (`agents: {NAME: ...}`)
    preset         str         its preset (claude, codex, gemini, aider, command, ...)
    branch         str         the result branch the change comes back on, e.g. "taskrun/db/schema"
    base_commit    str | None  the commit the checkout is at
    task_dir       str         ".task/<task-id>/run-<n>", relative to the checkout's root
    task_file      str         "<task_dir>/task.md": the Task file as it was given
    metadata_file  str         "<task_dir>/metadata.yaml"
    context        list[str]   the copies of the Task's context files, "<task_dir>/context/<path>"
    skipped        list[str]   one sentence per context file that was not copied, and why
    index_file     str | None  the context index the Agent reads (CLAUDE.md, AGENTS.md, GEMINI.md),
                               or None when the index is the prompt's prefix
    budget         dict        {"max_turns": int | None, "max_cost_usd": float | None}
    timeout        float|None  seconds the Run may take

Errors: PromptError names the template and the line (a syntax error, an
undefined name, a sandbox refusal, a prompt over the size limit).
"""

from __future__ import annotations

import operator
import re
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from taskrunner.errors import WorkerError

#: The longest prompt a template may render, in characters (1 MiB of ASCII).
MAX_PROMPT_CHARS = 1024 * 1024
#: The most items `range()` may give in a template.
MAX_RANGE = 10_000
#: How a template is named in errors when its caller gives no name.
TEMPLATE_NAME = "prompt_template"
#: jinja2 names the frames of a template compiled from a string so.
_FRAME = "<template>"

#: The template used when an Agent has no `prompt_template`.
DEFAULT_TEMPLATE = """\
# Task {{ task_id }}: {{ title }}

You are working in a git checkout of the repository, on the branch `{{ branch }}`.
The requirement is in `{{ task_file }}`; it is repeated below.
{% if context %}

The Task comes with these context files (copies of repository files):
{% for path in context %}
- `{{ path }}`
{% endfor %}
{% endif %}
{% if skipped %}

Not provided:
{% for note in skipped %}
- {{ note }}
{% endfor %}
{% endif %}

Carry out the requirement by changing the files of this checkout. When you
finish, taskrun commits your changes to `{{ branch }}` for review by people.
Do not commit, push or create branches yourself: taskrun commits, and nothing
is pushed by you. `{{ task_dir }}/` is taskrun's and is never part of your change.
{% if budget.max_turns or budget.max_cost_usd or timeout %}

Limits of this Run:{% if budget.max_turns %} at most {{ budget.max_turns }} turns;{% endif %}
{% if budget.max_cost_usd %} at most ${{ "%.2f"|format(budget.max_cost_usd) }};{% endif %}
{% if timeout %} at most {{ (timeout / 60)|round(1) }} minutes;{% endif %}
 taskrun stops the Run beyond them.
{% endif %}

## Requirement

{{ body | trim }}
"""


class PromptError(WorkerError):
    """Raised when a prompt template cannot be rendered: syntax, undefined name, sandbox refusal, size."""


class _Sandbox(SandboxedEnvironment):
    """SandboxedEnvironment in which no single expression can build a value larger than a prompt may be.

    The prompt's size is checked as it is rendered; what is checked here is each step that could
    allocate gigabytes at once: `*`, `**` and `%`, the str methods that pad, repeat or substitute
    (center, ljust, rjust, zfill, expandtabs, replace, join, format), the filters doing the same,
    and any call's result. Jinja's `lipsum` is not offered, and range() is bounded (MAX_RANGE).
    """

    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                    right * max(abs(left).bit_length(), 1) > 64 * 1024:
                raise SecurityError("the result of ** would be too large")
            return operator.pow(left, right)
        if operator_name == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and \
                        len(seq) * times > MAX_PROMPT_CHARS:
                    raise SecurityError(f"the result of * would be over {MAX_PROMPT_CHARS} items")
            return operator.mul(left, right)
        if operator_name == "%" and isinstance(left, str):
            _check_widths(left)
            return _bounded(operator.mod(left, right))
        return super().call_binop(context, operator_name, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            _check_str_call(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))


#: A width, precision or count in a template's format string or padding call longer than this many digits
#: would build more than a prompt may hold.
_MAX_DIGITS = len(str(MAX_PROMPT_CHARS))


def _check_widths(spec: str) -> None:
    """SecurityError when a %- or {}-format string asks for a field wider than a prompt may be."""
    for run in re.findall(r"\d+", spec):
        if len(run) >= _MAX_DIGITS and int(run) > MAX_PROMPT_CHARS:
            raise SecurityError(f"a field of {run} characters is over the prompt's {MAX_PROMPT_CHARS}")


def _check_str_call(text: str, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """SecurityError when str.`method`(*args) on `text` would build more than MAX_PROMPT_CHARS characters."""
    values = list(args) + list(kwargs.values())
    if method in ("center", "ljust", "rjust", "zfill"):
        size = values[0] if values and isinstance(values[0], int) else 0
    elif method == "expandtabs":
        size = len(text) + text.count("\t") * (values[0] if values and isinstance(values[0], int) else 8)
    elif method == "replace" and len(values) >= 2 and isinstance(values[0], str) and isinstance(values[1], str):
        hits = text.count(values[0]) if values[0] else len(text) + 1
        size = len(text) + hits * (len(values[1]) - len(values[0]))
    elif method == "join" and values:
        items = values[0] if isinstance(values[0], (list, tuple, str)) else []
        size = len(text) * max(len(items) - 1, 0) + sum(len(i) for i in items if isinstance(i, str))
    elif method in ("format", "format_map"):
        _check_widths(text)
        return
    else:
        return
    if size > MAX_PROMPT_CHARS:
        raise SecurityError(f"str.{method} would build {size} characters, over the prompt's {MAX_PROMPT_CHARS}")


def _bounded(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_PROMPT_CHARS:
        raise SecurityError(f"a value of {len(value)} items, over the prompt's {MAX_PROMPT_CHARS}")
    return value


def _checked_filter(name: str, builtin: Any) -> Any:
    """Jinja's filter `name`, with the same size rule as the str methods it stands for."""
    passed = getattr(builtin, "jinja_pass_arg", None)  # pass_eval_context and the like: a first argument

    def checked(*given: Any, **kwargs: Any) -> Any:
        value, args = (given[1], given[2:]) if passed is not None else (given[0], given[1:])
        if isinstance(value, str):
            _check_str_call(value, {"format": "format", "center": "center", "replace": "replace",
                                    "indent": "expandtabs"}.get(name, ""), args, kwargs)
            if name == "indent":
                width = args[0] if args and isinstance(args[0], int) else 4
                if width * (value.count("\n") + 1) + len(value) > MAX_PROMPT_CHARS:
                    raise SecurityError(f"indent would build over the prompt's {MAX_PROMPT_CHARS} characters")
        elif name == "join" and isinstance(value, (list, tuple)):
            joint = args[0] if args and isinstance(args[0], str) else ""
            _check_str_call(joint, "join", ([str(v) for v in value],), {})
        return _bounded(builtin(*given, **kwargs))
    if passed is not None:
        checked.jinja_pass_arg = passed  # type: ignore[attr-defined]
    return checked


def _range(*args: int) -> range:
    made = range(*args)
    if len(made) > MAX_RANGE:
        raise SecurityError(f"range() of {len(made)} items, over the limit of {MAX_RANGE}")
    return made


def _environment() -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True,
                   keep_trailing_newline=True)
    env.globals["range"] = _range
    env.globals.pop("lipsum", None)
    for name in ("format", "center", "replace", "indent", "join"):
        env.filters[name] = _checked_filter(name, env.filters[name])
    return env


def render(template: str | None, values: Mapping[str, Any], name: str = TEMPLATE_NAME) -> str:
    """The prompt: `template` (jinja2 source; None is DEFAULT_TEMPLATE) rendered with `values`.

    `name` says in errors which template failed (e.g. "agents.claude.prompt_template").
    PromptError "NAME, line L: reason" for a syntax error, an undefined name, a sandbox refusal, or
    a prompt over MAX_PROMPT_CHARS characters.
    """
    source = DEFAULT_TEMPLATE if template is None else template
    shown = "the default prompt template" if template is None else name
    try:
        compiled = _environment().from_string(source)
        out: list[str] = []
        size = 0
        for chunk in _generate(compiled, values):
            size += len(chunk)
            if size > MAX_PROMPT_CHARS:
                raise PromptError(f"{shown}: the prompt is over {MAX_PROMPT_CHARS} characters")
            out.append(chunk)
        return "".join(out)
    except TemplateSyntaxError as exc:
        raise PromptError(f"{shown}, line {exc.lineno}: {exc.message or 'syntax error'}") from None
    except RENDER_ERRORS as exc:
        raise PromptError(failure_text(shown, exc)) from None


#: What rendering a template can raise besides a syntax error: the template's fault, reported as such.
RENDER_ERRORS = (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError,
                  RecursionError, MemoryError)


def failure_text(name: str, exc: BaseException) -> str:
    """ "NAME, line L: reason" for an error raised while rendering the template `name`."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, SecurityError):
        reason = f"refused by the sandbox: {reason}"
    line = _template_line(exc)
    return f"{name}, line {line}: {reason}" if line is not None else f"{name}: {reason}"


def check(template: str, name: str = TEMPLATE_NAME) -> None:
    """PromptError when `template` is not valid jinja2 syntax (nothing is rendered): for loading configuration."""
    try:
        _environment().parse(template)
    except TemplateSyntaxError as exc:
        raise PromptError(f"{name}, line {exc.lineno}: {exc.message or 'syntax error'}") from None


#: The variables a template sees (agents/workspace.py gives them at a Run), with sample values: every
#: optional one set, so that a trial rendering takes the branches a Run with context files and budgets would.
SAMPLE_VALUES: Mapping[str, Any] = {
    "task_id": "db/schema", "title": "Add the schema", "body": "Create the tables.\n", "run_id": "r-1a2b3c",
    "run_number": 1, "attempt": 1, "worker": "local", "agent": "claude", "preset": "claude",
    "branch": "taskrun/db/schema", "base_commit": "0" * 40, "task_dir": ".task/db/schema/run-1",
    "task_file": ".task/db/schema/run-1/task.md", "metadata_file": ".task/db/schema/run-1/metadata.yaml",
    "source_file": "tasks/db/schema.md", "context": [".task/db/schema/run-1/context/docs/db.md"],
    "skipped": ["docs/big.bin: over the size limit"], "index_file": "CLAUDE.md",
    "budget": {"max_turns": 10, "max_cost_usd": 2.5}, "timeout": 1800.0,
}
#: The same with every optional variable empty, as a Run without context, index or budget sees them.
BARE_VALUES: Mapping[str, Any] = {
    **SAMPLE_VALUES, "base_commit": None, "context": [], "skipped": [], "index_file": None,
    "budget": {"max_turns": None, "max_cost_usd": None}, "timeout": None,
}
#: The longest a trial rendering may take, in seconds (checked at each range() and each output piece).
TRIAL_SECONDS = 2.0


def trial_render(template: str, name: str = TEMPLATE_NAME) -> None:
    """Render `template` (jinja2 source) once with SAMPLE_VALUES and once with BARE_VALUES.

    For loading configuration: a misspelt variable (`{{ titel }}`) is refused then, not when a Run
    fails. PromptError "NAME, line L: 'titel' is undefined; a template sees task_id, title, ..." for a
    syntax error, an undefined name (with either sample), or any other failure with SAMPLE_VALUES (a
    BARE_VALUES failure such as `None * 2` is left to the Run: the configuration may always set a budget),
    or a rendering over TRIAL_SECONDS.
    """
    from jinja2 import UndefinedError

    known = ", ".join(SAMPLE_VALUES)
    deadline = time.monotonic() + TRIAL_SECONDS
    late = lambda: SecurityError(f"rendering took over {TRIAL_SECONDS:g} s")  # noqa: E731
    for values, strict in ((SAMPLE_VALUES, True), (BARE_VALUES, False)):
        try:
            bounded_render(template, values, deadline, late, MAX_PROMPT_CHARS,
                           f"{name}: the prompt is over {MAX_PROMPT_CHARS} characters")
        except TemplateSyntaxError as exc:
            raise PromptError(f"{name}, line {exc.lineno}: {exc.message or 'syntax error'}") from None
        except UndefinedError as exc:
            line = _template_line(exc)
            where = f"{name}, line {line}" if line is not None else name
            raise PromptError(f"{where}: {exc}; a template sees {known}") from None
        except RENDER_ERRORS as exc:
            if not strict:
                continue
            raise PromptError(f"{failure_text(name, exc)} (rendered with sample values)") from None


def bounded_render(template: str, values: Mapping[str, Any], deadline: float,
                   late: Callable[[], Exception], max_chars: int, too_big: str) -> str:
    """`template` rendered in the sandbox with a bound on time and size: the clock (time.monotonic) is
    read at each range() and each piece of output, and past `deadline` the exception `late()` is raised;
    past `max_chars` characters of output, PromptError(too_big). Syntax and rendering errors
    (TemplateSyntaxError, RENDER_ERRORS) go to the caller, who names them.
    """
    def in_time() -> None:
        if time.monotonic() > deadline:
            raise late()

    def timed_range(*args: int) -> range:
        in_time()
        return _range(*args)

    def traced(frame: Any, event: str, arg: Any) -> Any:
        # A loop that neither calls range() nor writes anything ({% for a in s %}{% for b in s %}...)
        # is stopped here: the clock is read at every line the template's code runs.
        in_time()
        return traced

    env = _environment()
    env.globals["range"] = timed_range
    out: list[str] = []
    size = 0
    compiled = env.from_string(template)
    previous = sys.gettrace()
    sys.settrace(traced)
    try:
        for chunk in _generate(compiled, values):
            in_time()
            size += len(chunk)
            if size > max_chars:
                raise PromptError(too_big)
            out.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(out)


def _generate(compiled: Any, values: Mapping[str, Any]) -> Iterator[str]:
    yield from compiled.generate(**dict(values))


def _template_line(exc: BaseException) -> int | None:
    """The template's line where `exc` was raised: jinja2 rewrites its frames to `<template>` lines."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == _FRAME:
            found = frame.lineno
    return found


__all__ = ["DEFAULT_TEMPLATE", "MAX_PROMPT_CHARS", "PromptError", "SAMPLE_VALUES", "check", "render",
           "trial_render"]
