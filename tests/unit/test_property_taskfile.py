"""Task files as hostile input (property tests): whatever bytes a tasks/*.md holds, parsing it and
reading it through intake either gives a TaskSpec or a TaskFileError naming the file, the key where
there is one, and the reason; never another exception, never a hang."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from taskrunner.config import parse_config
from taskrunner.errors import TaskFileError
from taskrunner.intake import RepoFiles, read_task
from taskrunner.model import TaskSpec
from taskrunner.taskfile import TASK_KEYS, parse_task
from tests.unit.test_property_values import (assert_clear_reason, budget, mutate_bytes, nasty_text, nasty_values,
                                             swap_types)

PATH = "tasks/t.md"
VALID = (b"---\nagent: shell\npriority: high\ndepends_on: [a, b/c]\nlabels: {gpu: 'yes'}\ngroup: g\n"
         b"timeout: 1h30m\nretries: 2\ncontext: [src/x.py]\nmax_turns: 3\nmax_cost_usd: 1.5\n---\n"
         b"# Add a thing\n\n```sh\necho hi\n```\n")
VALID_FIELDS: dict[str, Any] = yaml.safe_load(VALID.split(b"---\n")[1])


def _parsed_or_refused(data: bytes) -> TaskSpec | TaskFileError:
    try:
        return parse_task("t", PATH, data)
    except TaskFileError as exc:
        assert exc.file == PATH and str(exc).startswith(PATH)
        assert exc.key is None or exc.key in TASK_KEYS or "unknown key" in exc.reason
        assert_clear_reason(exc.reason)
        return exc


def _front(fields: dict[Any, Any], body: str = "# T\n\nDo it.\n") -> bytes:
    return b"---\n" + yaml.safe_dump(fields, allow_unicode=True).encode() + b"---\n" + body.encode()


def test_the_valid_file_the_mutations_start_from_parses() -> None:
    spec = parse_task("t", PATH, VALID)
    assert spec.timeout == 5400.0 and spec.max_cost_usd == 1.5 and spec.depends_on == ("a", "b/c")


@given(st.binary(max_size=600))
@budget(300)
def test_arbitrary_bytes_give_a_spec_or_a_task_file_error(data: bytes) -> None:
    _parsed_or_refused(data)


@given(mutate_bytes(VALID))
@budget(300)
def test_a_mutated_valid_file_gives_a_spec_or_a_task_file_error(data: bytes) -> None:
    _parsed_or_refused(data)


@given(st.sampled_from(TASK_KEYS).flatmap(lambda key: st.tuples(st.just(key), swap_types(VALID_FIELDS[key]))))
@budget(100)
def test_every_front_matter_key_with_a_hostile_value_is_refused_naming_the_key(case: tuple[str, Any]) -> None:
    key, value = case
    result = _parsed_or_refused(_front({**VALID_FIELDS, key: value}))
    if isinstance(result, TaskFileError):
        # Another key may be what is wrong only if the value made the YAML itself unreadable.
        assert result.key == key or result.key is None, result


@given(st.dictionaries(st.one_of(st.sampled_from(TASK_KEYS), nasty_text), nasty_values(8), max_size=6),
       nasty_text)
@budget(80)
def test_front_matter_of_any_keys_and_values_gives_a_spec_or_a_task_file_error(fields: dict[str, Any],
                                                                               body: str) -> None:
    _parsed_or_refused(_front(fields, body or "x"))


@pytest.mark.parametrize("value", [
    "1" * 5000,                       # more digits than int() converts
    "0x" + "f" * 5000,
    "2001-13-40",                     # a date YAML reads as one, datetime refuses
    "2001-02-30",
    "2001-12-14 25:00:00",
    "2001-12-14t21:59:43.10-99:99",   # a time zone out of range
    "!!binary '%%%'",
    "!!python/object:os.system x",
    "&a [*a]",                        # a list holding itself
    "[" * 1500 + "]" * 1500,          # nested past the parser's recursion
    "'" + "x" * 300_000 + "'",        # past the file size limit
], ids=lambda value: value[:24])
def test_values_pyyaml_cannot_construct_are_a_task_file_error(value: str) -> None:
    result = _parsed_or_refused(f"---\nretries: {value}\n---\n# T\n".encode())
    assert isinstance(result, TaskFileError)


def test_nul_bytes_anywhere_are_refused_as_binary() -> None:
    result = _parsed_or_refused(VALID[:20] + b"\x00" + VALID[20:])
    assert isinstance(result, TaskFileError) and "NUL" in result.reason


# ---------------------------------------------------------------- through intake


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    (root / "tasks").mkdir()
    (root / "src").mkdir()
    (root / "src" / "x.py").write_text("x = 1\n")
    return root


@given(st.one_of(mutate_bytes(VALID), st.binary(max_size=300)))
@budget(150)
def test_intake_of_any_task_file_gives_a_spec_or_an_invalid_intake_with_the_reason(tree: Path, data: bytes) -> None:
    (tree / PATH).write_bytes(data)
    config = parse_config("", ".taskrun.yaml")
    files = RepoFiles(tree)
    try:
        intake = read_task(files, "t", PATH, config)
    finally:
        files.tree.close()
    assert (intake.spec is None) != (intake.error is None)
    if intake.error is not None:
        assert intake.error.startswith(PATH + ":")
        assert_clear_reason(intake.error.removeprefix(PATH + ":"))
