"""tasks/*.md -> TaskSpec: ids, ignored names, parsing and its errors, shell scripts, cycles, durations."""

from __future__ import annotations

import hashlib

import pytest

from taskrunner.duration import format_duration, parse_duration
from taskrunner.errors import TaskFileError
from taskrunner.model import Priority, TaskSpec
from taskrunner.taskfile import (
    TASK_KEYS,
    dependency_cycles,
    is_ignored_name,
    parse_task,
    shell_script,
    task_id_for,
)

PATH = "tasks/login.md"


def task(text: str, task_id: str = "login", **kwargs: int) -> TaskSpec:
    return parse_task(task_id, PATH, text.encode(), **kwargs)


def error(text: str | bytes, task_id: str = "login", **kwargs: int) -> TaskFileError:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(TaskFileError) as caught:
        parse_task(task_id, PATH, data, **kwargs)
    assert caught.value.file == PATH
    assert str(caught.value).startswith(PATH)
    return caught.value


def front(matter: str, body: str = "# Do it\n") -> str:
    return f"---\n{matter}\n---\n{body}"


# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        ("tasks/a.md", "a"),
        ("tasks/a/b.md", "a/b"),
        ("tasks/db-schema_v2.1.md", "db-schema_v2.1"),
        ("tasks/a.txt", None),
        ("tasks/a.md~", None),
        ("other/a.md", None),
        ("a.md", None),
        ("tasks/.md", None),
        ("tasks/Upper.md", None),
        ("tasks/-dash.md", None),
        ("tasks/a b.md", None),
        ("tasks/.#a.md", None),
        ("tasks/a/.hidden.md", None),
        ("tasks/a/../b.md", None),
        ("tasks/a//b.md", None),
        ("tasks/a/.md", None),
    ],
)
def test_task_id_is_the_path_under_tasks_without_md(relpath: str, expected: str | None) -> None:
    assert task_id_for(relpath) == expected


@pytest.mark.parametrize(
    "name",
    [".a.md.swp", ".a.md.swx", "a.md~", "a.md.tmp", "a.md.part", "#a.md#", "4913", ".#a.md", ".hidden", "a.swo"],
)
def test_editor_and_temporary_files_are_ignored(name: str) -> None:
    assert is_ignored_name(name)
    assert is_ignored_name(f"tasks/sub/{name}")


@pytest.mark.parametrize("name", ["a.md", "4913.md", "#a.md", "a#", "notes"])
def test_ordinary_names_are_not_ignored(name: str) -> None:
    assert not is_ignored_name(name)


# ----------------------------------------------------------------------------- happy paths


def test_file_without_front_matter_uses_defaults_and_heading_as_title() -> None:
    text = "# Add login rate limiting\n\nLimit attempts.\n"
    spec = task(text)
    assert spec.id == "login"
    assert spec.path == PATH
    assert spec.title == "Add login rate limiting"
    assert spec.body == text
    assert spec.revision == hashlib.sha256(text.encode()).hexdigest()
    assert (spec.agent, spec.priority, spec.depends_on, spec.labels) == (None, Priority.NORMAL, (), {})
    assert (spec.group, spec.timeout, spec.retries, spec.context) == (None, None, None, ())


def test_design_example_task_parses_every_key() -> None:
    text = front(
        "agent: claude\n"
        "priority: high\n"
        "depends_on: [db-schema]\n"
        'labels: {gpu: "true"}\n'
        "group: backend\n"
        "timeout: 30m\n"
        "retries: 2\n"
        "context: [docs/auth.md]",
        "# Add login rate limiting\n...the requirement...\n",
    )
    spec = task(text)
    assert spec.agent == "claude"
    assert spec.priority is Priority.HIGH
    assert spec.depends_on == ("db-schema",)
    assert spec.labels == {"gpu": "true"}
    assert spec.group == "backend"
    assert spec.timeout == 1800.0
    assert spec.retries == 2
    assert spec.context == ("docs/auth.md",)
    assert spec.title == "Add login rate limiting"
    assert spec.body == "# Add login rate limiting\n...the requirement...\n"


def test_title_falls_back_to_the_task_id() -> None:
    assert task("just do it\n").title == "login"


def test_title_skips_comments_inside_code_blocks_and_strips_closing_hashes() -> None:
    body = "```sh\n# not a title\necho hi\n```\n\n## Real title ##\n"
    assert task(body).title == "Real title"


def test_title_ignores_hash_without_space_and_empty_headings() -> None:
    assert task("#hashtag\n#\n# C#\n").title == "C#"


def test_revision_changes_with_any_byte() -> None:
    assert task("# a\n").revision != task("# a\n\n").revision


def test_single_strings_are_accepted_for_list_keys() -> None:
    spec = task(front("depends_on: db-schema\ncontext: docs/auth.md"))
    assert spec.depends_on == ("db-schema",)
    assert spec.context == ("docs/auth.md",)


def test_label_values_become_strings() -> None:
    spec = task(front("labels: {gpu: true, arm: false, cores: 8, os: linux}"))
    assert spec.labels == {"gpu": "true", "arm": "false", "cores": "8", "os": "linux"}


def test_null_values_mean_not_set() -> None:
    spec = task(front("agent:\ntimeout:\nretries:"))
    assert (spec.agent, spec.timeout, spec.retries) == (None, None, None)


def test_empty_front_matter_is_no_front_matter() -> None:
    assert task("---\n---\n# T\n").title == "T"


def test_front_matter_may_close_with_dots_and_crlf_line_endings() -> None:
    assert task("---\nretries: 1\n...\n# T\n").retries == 1
    assert task("---\r\nretries: 1\r\n---\r\n# T\r\n").retries == 1


def test_priority_is_case_insensitive() -> None:
    assert task(front("priority: CRITICAL")).priority is Priority.CRITICAL


def test_duplicate_dependencies_and_context_are_collapsed() -> None:
    spec = task(front("depends_on: [a, b, a]\ncontext: [docs/x.md, ./docs/x.md]"))
    assert spec.depends_on == ("a", "b")
    assert spec.context == ("docs/x.md",)


def test_byte_order_mark_is_tolerated() -> None:
    assert parse_task("login", PATH, b"\xef\xbb\xbf---\nretries: 1\n---\n# T\n").retries == 1


# ----------------------------------------------------------------------------- file-level errors


def test_file_over_the_size_limit_is_refused_before_parsing() -> None:
    err = error("# " + "x" * 100, max_size=50)
    assert err.reason == "file is over the limit of 50 bytes"  # what was read is no size of the file's


@pytest.mark.parametrize("text", ["", "  \n\t\n"])
def test_empty_file_is_refused(text: str) -> None:
    assert "empty" in error(text).reason


def test_binary_file_with_nul_byte_is_refused() -> None:
    assert "NUL" in error(b"# T\n\x00\x01").reason


def test_file_that_is_not_utf8_is_refused() -> None:
    assert "UTF-8" in error(b"# caf\xe9\n").reason


def test_missing_closing_front_matter_line_is_refused() -> None:
    assert "no closing '---'" in error("---\nagent: shell\n# T\n").reason


def test_broken_yaml_names_line_and_column_in_the_file() -> None:
    err = error("---\nagent: shell\npriority: [high\n---\n# T\n")
    assert "invalid YAML at line" in err.reason
    assert "column" in err.reason


def test_yaml_error_line_counts_from_the_top_of_the_file() -> None:
    # The bad token `: :` is on file line 3 (line 1 is the opening ---).
    err = error("---\nagent: shell\nbad: : x\n---\n# T\n")
    assert "line 3, column" in err.reason


def test_control_character_in_front_matter_names_its_line_in_the_file() -> None:
    assert "invalid YAML at line 3, column 4: character #x0007" in error(front("a: 1\nb: \x07")).reason


def test_duplicate_front_matter_key_is_refused() -> None:
    err = error(front("retries: 1\nretries: 2"))
    assert "duplicate key 'retries'" in err.reason
    assert "line 3" in err.reason


@pytest.mark.parametrize("matter", ["- a\n- b", "just a string", "42"])
def test_front_matter_that_is_not_a_mapping_is_refused(matter: str) -> None:
    assert "front matter must be a mapping" in error(front(matter)).reason


def test_empty_body_is_refused() -> None:
    assert error(front("agent: shell", "\n  \n")).reason == "the requirement (markdown body) is empty"


def test_unknown_key_names_the_key_and_allowed_keys() -> None:
    err = error(front("agnet: claude"))
    assert err.key == "agnet"
    assert "unknown key" in err.reason
    assert "allowed keys are " + ", ".join(TASK_KEYS) in err.reason
    assert str(err).startswith(f"{PATH}: key 'agnet': unknown key")


def test_several_unknown_keys_are_all_named() -> None:
    err = error(front("foo: 1\nbar: 2"))
    assert "'foo'" in err.reason and "'bar'" in err.reason


# ----------------------------------------------------------------------------- key errors


@pytest.mark.parametrize(
    ("matter", "key", "fragment"),
    [
        ("agent: 3", "agent", "expected an agent name"),
        ("agent: 'has space'", "agent", "expected an agent name"),
        ("agent: [a]", "agent", "got a list"),
        ("priority: urgent", "priority", "expected one of low, normal, high, critical, got 'urgent'"),
        ("priority: 2", "priority", "expected one of low, normal, high, critical, got the number 2"),
        ("depends_on: [Bad_ID]", "depends_on", "expected task ids"),
        ("depends_on: [1]", "depends_on", "expected task ids"),
        ("depends_on: [tasks/db.md]", "depends_on", "expected task ids"),
        ("depends_on: [a/../b]", "depends_on", "expected task ids"),
        ("depends_on: {a: b}", "depends_on", "expected a list of task ids, got a mapping"),
        ("depends_on: [login]", "depends_on", "cannot depend on itself"),
        ("labels: [gpu]", "labels", "expected a mapping of label names"),
        ("labels: {'bad name': x}", "labels", "is not a name"),
        ("labels: {gpu: [1]}", "labels", "label 'gpu': expected a string, integer or boolean, got a list"),
        ("labels: {gpu: }", "labels", "got nothing"),
        ("labels: {cuda: 12.10}", "labels", "quote it"),
        ("group: 'a b'", "group", "expected a group name"),
        ("group: true", "group", "expected a group name"),
        ("timeout: soon", "timeout", "expected a duration like 30s, 5m or 1h, got 'soon'"),
        ("timeout: 0", "timeout", "greater than zero"),
        ("timeout: -5", "timeout", "greater than zero"),
        ("timeout: true", "timeout", "expected a duration"),
        ("retries: -1", "retries", "expected a whole number >= 0, got the number -1"),
        ("retries: true", "retries", "got the boolean true"),
        ("retries: 1.5", "retries", "expected a whole number"),
        ("retries: '2'", "retries", "expected a whole number"),
        ("context: [/etc/passwd]", "context", "relative to the repository root"),
        ("context: ['~/x']", "context", "relative to the repository root"),
        ("context: ['C:\\x']", "context", "relative to the repository root"),
        ("context: [../secret]", "context", "contains '..'"),
        ("context: [docs/../../x]", "context", "contains '..'"),
        ("context: [3]", "context", "expected paths relative"),
        ("context: ['']", "context", "expected paths relative"),
        ("context: ['.']", "context", "expected a file or directory"),
        ("context: {a: 1}", "context", "expected a list of repository paths"),
    ],
)
def test_wrong_value_names_the_key_and_what_was_expected(matter: str, key: str, fragment: str) -> None:
    err = error(front(matter))
    assert err.key == key
    assert fragment in err.reason
    assert str(err) == f"{PATH}: key '{key}': {err.reason}"


# ----------------------------------------------------------------------------- shell_script


def test_shell_script_concatenates_sh_bash_and_shell_blocks_in_order() -> None:
    body = (
        "# T\n```sh\necho one\n```\ntext\n```python\nprint(2)\n```\n"
        "```bash\necho two\n```\n```shell\necho three\n```\n"
    )
    assert shell_script(body) == "echo one\necho two\necho three\n"


def test_shell_script_is_none_without_shell_blocks() -> None:
    assert shell_script("# T\n```python\nprint(1)\n```\n    indented code\n") is None
    assert shell_script("# T\n```\nno info string\n```\n") is None


def test_console_blocks_are_not_run() -> None:
    assert shell_script("```console\n$ rm -rf /\n```\n") is None


def test_shell_script_supports_tilde_and_longer_fences() -> None:
    body = "~~~bash\necho tilde\n~~~\n````sh\n```\nstill inside\n````\n"
    assert shell_script(body) == "echo tilde\n```\nstill inside\n"


def test_closing_fence_must_be_same_character_and_at_least_as_long() -> None:
    body = "~~~~sh\n~~~\n```\necho in\n~~~~~\necho out\n"
    assert shell_script(body) == "~~~\n```\necho in\n"


def test_closing_fence_may_not_carry_an_info_string() -> None:
    assert shell_script("```sh\necho a\n```bash\necho b\n```\n") == "echo a\n```bash\necho b\n"


def test_indented_fence_strips_that_much_indentation_from_content() -> None:
    body = "   ```sh\n   echo a\n     echo b\n  echo c\n   ```\n"
    assert shell_script(body) == "echo a\n  echo b\necho c\n"


def test_fence_indented_four_spaces_is_not_a_fence() -> None:
    assert shell_script("    ```sh\n    echo no\n    ```\n") is None


def test_info_string_language_is_its_first_word() -> None:
    assert shell_script('```bash title="setup"\necho a\n```\n') == "echo a\n"
    assert shell_script("```BASH\necho a\n```\n") == "echo a\n"


def test_backtick_fence_with_backtick_in_info_is_not_a_fence() -> None:
    assert shell_script("```sh `x`\necho a\n```\n") is None


def test_unclosed_fence_runs_to_the_end_of_the_body() -> None:
    assert shell_script("```sh\necho a\necho b") == "echo a\necho b\n"


def test_crlf_bodies_give_a_script_without_carriage_returns() -> None:
    assert shell_script("```sh\r\necho a\r\n```\r\n") == "echo a\n"


# ----------------------------------------------------------------------------- dependency_cycles


def test_no_cycles_in_a_dag() -> None:
    assert dependency_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_two_task_cycle_is_reported_once_closed_and_starting_at_smallest_id() -> None:
    assert dependency_cycles({"b": ["a"], "a": ["b"]}) == [("a", "b", "a")]


def test_self_dependency_is_a_cycle() -> None:
    assert dependency_cycles({"a": ["a"]}) == [("a", "a")]


def test_unknown_ids_are_ignored() -> None:
    assert dependency_cycles({"a": ["missing"], "b": ["a", "ghost"]}) == []


def test_separate_cycles_are_each_reported() -> None:
    deps = {"a": ["b"], "b": ["c"], "c": ["a"], "x": ["y"], "y": ["x"], "z": ["a"]}
    assert dependency_cycles(deps) == [("a", "b", "c", "a"), ("x", "y", "x")]


def test_every_task_on_a_cycle_appears_in_some_reported_cycle() -> None:
    # Two cycles sharing `a`: a->b->a and a->c->d->a.
    deps = {"a": ["b", "c"], "b": ["a"], "c": ["d"], "d": ["a"]}
    cycles = dependency_cycles(deps)
    assert cycles == [("a", "b", "a"), ("a", "c", "d", "a")]
    assert {node for cycle in cycles for node in cycle} == {"a", "b", "c", "d"}


def test_long_chain_cycle_needs_no_recursion() -> None:
    n = 20_000
    deps = {f"t{i}": [f"t{(i + 1) % n}"] for i in range(n)}
    (cycle,) = dependency_cycles(deps)
    assert len(cycle) == n + 1
    assert cycle[0] == cycle[-1] == "t0"


# ----------------------------------------------------------------------------- duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("2.5", 2.5),
        ("45s", 45.0),
        ("30m", 1800.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("2d", 172800.0),
        ("500ms", 0.5),
        ("1m500ms", 60.5),
    ],
)
def test_durations_are_read_as_seconds(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["abc", "", "5x", "h", "1h30", "-5s", "5 s s", None, [1], True, float("inf")])
def test_malformed_durations_are_refused_with_an_example(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration like 30s, 5m or 1h"):
        parse_duration(value)


@pytest.mark.parametrize("value", [0, -1, "0s", "0"])
def test_zero_and_negative_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        parse_duration(value)


def test_duration_message_quotes_the_input() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration("abc")
    assert str(caught.value) == "expected a duration like 30s, 5m or 1h, got 'abc'"


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (300, "5m"), (5400, "1h30m"), (0.5, "500ms"), (86400, "1d")])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("data", "line"), [
    (b"# x\n\n```sh\necho part one\n", 3),
    (b"---\npriority: high\n---\n# x\n\n```bash\necho hi\n```\n\n```shell\nrm -rf", 10),
    (b"# x\n\n~~~sh\necho hi\n```\n", 3),  # a backtick fence does not close a tilde one
])
def test_a_shell_block_nothing_closes_is_invalid_as_a_file_still_being_written(data: bytes, line: int) -> None:
    """`cat > tasks/x.md`, typed slowly, was read between lines: an open ```sh block ran what was there."""
    with pytest.raises(TaskFileError, match=rf"the shell block opened on line {line} has no closing fence"):
        parse_task("x", "tasks/x.md", data)


def test_an_unclosed_block_of_another_language_is_part_of_the_requirement() -> None:
    spec = parse_task("x", "tasks/x.md", b"# x\n\n```python\nprint(1)\n")
    assert spec.body.endswith("print(1)\n")
