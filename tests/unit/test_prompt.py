"""The prompt template: the default's content, the variables, errors naming template and line, the sandbox."""

from __future__ import annotations

from typing import Any

import pytest

from taskrunner.agents import prompt
from taskrunner.agents.prompt import PromptError, render


def _values(**changed: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "task_id": "db/schema", "title": "Add the schema", "body": "Create `schema.sql`.\n", "run_id": "r-1",
        "run_number": 2, "attempt": 1, "worker": "w1", "agent": "claude", "preset": "claude",
        "branch": "taskrun/db/schema", "base_commit": "a" * 40, "task_dir": ".task/db/schema/run-2",
        "task_file": ".task/db/schema/run-2/task.md", "metadata_file": ".task/db/schema/run-2/metadata.yaml",
        "source_file": "tasks/db/schema.md", "context": [".task/db/schema/run-2/context/docs/db.md"],
        "skipped": ["docs/link.md: docs/link.md is a symbolic link"], "index_file": "CLAUDE.md",
        "budget": {"max_turns": 5, "max_cost_usd": 0.5}, "timeout": 1800.0,
    }
    values.update(changed)
    return values


def test_the_default_template_says_where_the_requirement_and_context_are_and_that_the_agent_must_not_push() -> None:
    text = render(None, _values())
    assert text.startswith("# Task db/schema: Add the schema\n")
    assert "`.task/db/schema/run-2/task.md`" in text
    assert "- `.task/db/schema/run-2/context/docs/db.md`" in text
    assert "docs/link.md is a symbolic link" in text
    assert "commits your changes to `taskrun/db/schema` for review" in text
    assert "Do not commit, push or create branches yourself" in text
    assert "at most 5 turns" in text and "at most $0.50" in text and "at most 30.0 minutes" in text
    assert text.endswith("## Requirement\n\nCreate `schema.sql`.\n")


def test_the_default_template_leaves_out_what_a_run_does_not_have() -> None:
    text = render(None, _values(context=[], skipped=[], budget={"max_turns": None, "max_cost_usd": None},
                                timeout=None))
    assert "context files" not in text and "Not provided" not in text and "Limits" not in text
    assert "\n\n\n" not in text


def test_a_configured_template_is_rendered_with_the_variables_and_no_html_escaping() -> None:
    template = "{{ title }} <{{ agent }}> {{ context|join(', ') }} {{ budget.max_turns }} {{ body|trim }}"
    assert render(template, _values(body="a < b & c\n")) == \
        "Add the schema <claude> .task/db/schema/run-2/context/docs/db.md 5 a < b & c"


def test_a_syntax_error_names_the_template_and_the_line() -> None:
    with pytest.raises(PromptError, match=r"^agents\.claude\.prompt_template, line 3: "):
        render("one\ntwo\n{% if %}\n", _values(), name="agents.claude.prompt_template")
    with pytest.raises(PromptError, match=r"^agents\.x\.prompt_template, line 2: "):
        prompt.check("ok\n{{ unclosed\n", name="agents.x.prompt_template")


def test_an_undefined_name_is_an_error_naming_the_line_not_an_empty_string() -> None:
    with pytest.raises(PromptError, match=r"prompt_template, line 2: 'titel' is undefined"):
        render("# {{ title }}\n{{ titel }}\n", _values())
    with pytest.raises(PromptError, match=r"line 1: .*has no attribute 'nope'"):
        render("{{ budget.nope }}", _values())


@pytest.mark.parametrize("hostile", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ title.format.__self__ }}",
])
def test_a_hostile_template_is_refused_by_the_sandbox(hostile: str) -> None:
    with pytest.raises(PromptError, match=r"prompt_template, line 1: "):
        render(hostile, _values())


def test_a_template_cannot_load_files() -> None:
    for source in ("{% include '/etc/passwd' %}", "{% extends 'base.md' %}", "{% import 'm' as m %}"):
        with pytest.raises(PromptError, match="prompt_template"):
            render(source, _values())


def test_a_template_cannot_make_a_huge_prompt() -> None:
    with pytest.raises(PromptError, match="refused by the sandbox"):
        render("{{ 'x' * 100000000 }}", _values())
    with pytest.raises(PromptError, match="range"):
        render("{% for i in range(100000000) %}{% endfor %}", _values())
    with pytest.raises(PromptError, match="too large"):
        render("{{ 9 ** 99999999 }}", _values())
    with pytest.raises(PromptError, match=f"over {prompt.MAX_PROMPT_CHARS} characters"):
        render("{% for i in range(3000) %}{{ 'y' * 1000 }}{% endfor %}", _values())
