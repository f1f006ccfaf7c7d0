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
import traceback
from typing import Any, Iterator, Mapping

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
    """SandboxedEnvironment whose `*` and `**` cannot make a value larger than the prompt may be."""

    intercepted_binops = frozenset(["*", "**"])

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
        return super().call_binop(context, operator_name, left, right)


def _range(*args: int) -> range:
    made = range(*args)
    if len(made) > MAX_RANGE:
        raise SecurityError(f"range() of {len(made)} items, over the limit of {MAX_RANGE}")
    return made


def _environment() -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True,
                   keep_trailing_newline=True)
    env.globals["range"] = _range
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
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError,
            RecursionError, MemoryError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, SecurityError):
            reason = f"refused by the sandbox: {reason}"
        line = _template_line(exc)
        where = f"{shown}, line {line}" if line is not None else shown
        raise PromptError(f"{where}: {reason}") from None


def check(template: str, name: str = TEMPLATE_NAME) -> None:
    """PromptError when `template` is not valid jinja2 syntax (nothing is rendered): for loading configuration."""
    try:
        _environment().parse(template)
    except TemplateSyntaxError as exc:
        raise PromptError(f"{name}, line {exc.lineno}: {exc.message or 'syntax error'}") from None


def _generate(compiled: Any, values: Mapping[str, Any]) -> Iterator[str]:
    yield from compiled.generate(**dict(values))


def _template_line(exc: BaseException) -> int | None:
    """The template's line where `exc` was raised: jinja2 rewrites its frames to `<template>` lines."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == _FRAME:
            found = frame.lineno
    return found


__all__ = ["DEFAULT_TEMPLATE", "MAX_PROMPT_CHARS", "PromptError", "check", "render"]
