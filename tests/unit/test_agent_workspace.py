"""The Task's directory in the checkout (.task/<id>/run-<n>/), the context index files and the prompt prefix."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from taskrunner.agents import workspace
from taskrunner.agents.prompt import PromptError
from taskrunner.agents.workspace import BEGIN, END, TaskDirError, strip_section, with_section, write_task_dir
from taskrunner.model import TaskSpec
from taskrunner.taskfile import parse_task

TASK = b"---\nagent: claude\ncontext: [docs/db.md]\n---\n# Add the schema\n\nCreate `schema.sql`.\n"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    (root / "tasks" / "db").mkdir(parents=True)
    (root / "tasks" / "db" / "schema.md").write_bytes(TASK)
    (root / "docs").mkdir()
    (root / "docs" / "db.md").write_text("# The database\n")
    return root


def _spec(context: tuple[str, ...] = ("docs/db.md",)) -> TaskSpec:
    return replace(parse_task("db/schema", "tasks/db/schema.md", TASK), context=context)


def _manifest(preset: str = "claude", **changed: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "task_id": "db/schema", "run_id": "run-9", "run_number": 2, "attempt": 1, "worker": "w1",
        "title": "Add the schema", "base_commit": "b" * 40, "timeout": 600,
        "budget": {"max_turns": 4, "max_cost_usd": 1.5}, "agent": {"name": f"my-{preset}", "preset": preset},
        "git": {"branch": "taskrun/db/schema"},
    }
    manifest.update(changed)
    return manifest


def test_the_task_directory_holds_the_task_file_context_copies_prompt_and_metadata(checkout: Path) -> None:
    made = write_task_dir(checkout, _manifest(), _spec(), "claude")
    root = checkout / ".task" / "db" / "schema" / "run-2"
    assert made.path == root and made.rel == ".task/db/schema/run-2" and made.prompt_file == root / "prompt.md"
    assert (root / "task.md").read_bytes() == TASK
    assert (root / "context" / "docs" / "db.md").read_text() == "# The database\n"
    assert made.context == (".task/db/schema/run-2/context/docs/db.md",) and made.skipped == ()
    assert (root / "prompt.md").read_text() == made.prompt
    assert "`.task/db/schema/run-2/task.md`" in made.prompt and "Create `schema.sql`." in made.prompt
    meta = yaml.safe_load((root / "metadata.yaml").read_text())
    assert meta["task_id"] == "db/schema" and meta["title"] == "Add the schema" and meta["run_id"] == "run-9"
    assert meta["run_number"] == 2 and meta["attempt"] == 1 and meta["worker"] == "w1"
    assert meta["agent"] == {"name": "my-claude", "preset": "claude"} and meta["base_commit"] == "b" * 40
    assert meta["budget"] == {"max_turns": 4, "max_cost_usd": 1.5} and meta["timeout"] == 600.0
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), path


def test_the_run_number_falls_back_to_the_attempt() -> None:
    assert workspace.run_number({"attempt": 3}) == 3
    assert workspace.run_number({"run_number": 5, "attempt": 3}) == 5
    assert workspace.run_number({"run_number": True}) == 1


def test_claude_gets_a_claude_md_it_imports_the_files_from_created_when_the_repository_has_none(
        checkout: Path) -> None:
    made = write_task_dir(checkout, _manifest(), _spec(), "claude")
    text = (checkout / "CLAUDE.md").read_text()
    assert made.index_file == "CLAUDE.md"
    assert text.startswith(BEGIN + "\n") and text.endswith(END + "\n")
    lines = text.splitlines()
    assert "@.task/db/schema/run-2/task.md" in lines
    assert "@.task/db/schema/run-2/context/docs/db.md" in lines
    assert stat.S_IMODE(os.lstat(checkout / "CLAUDE.md").st_mode) == 0o644
    assert not made.prompt.startswith("The requirement and context files")


@pytest.mark.parametrize("preset, name", [("codex", "AGENTS.md"), ("gemini", "GEMINI.md")])
def test_an_existing_index_file_keeps_its_content_and_gets_the_section_appended(
        checkout: Path, preset: str, name: str) -> None:
    own = "# Repository rules\n\nRun `make test`.\n"
    (checkout / name).write_text(own)
    os.chmod(checkout / name, 0o755)
    made = write_task_dir(checkout, _manifest(preset), _spec(), preset)
    text = (checkout / name).read_text()
    assert made.index_file == name
    assert text.startswith(own + "\n" + BEGIN + "\n") and text.endswith(END + "\n")
    assert "- .task/db/schema/run-2/task.md (the requirement)" in text.splitlines()
    assert "- .task/db/schema/run-2/context/docs/db.md" in text.splitlines()
    assert "@.task" not in text  # import lines are Claude Code's
    assert stat.S_IMODE(os.lstat(checkout / name).st_mode) == 0o755  # git would see a mode change


def test_an_index_file_that_is_a_link_is_not_touched_and_the_index_becomes_the_prompt_prefix(
        tmp_path: Path, checkout: Path) -> None:
    outside = tmp_path / "outside.md"
    outside.write_text("not the checkout's\n")
    os.symlink(outside, checkout / "CLAUDE.md")
    made = write_task_dir(checkout, _manifest(), _spec(), "claude")
    assert outside.read_text() == "not the checkout's\n" and os.path.islink(checkout / "CLAUDE.md")
    assert made.index_file is None
    assert made.prompt.startswith("The requirement and context files of this Task:\n\n@.task/db/schema/run-2/task.md\n")


def test_presets_without_an_index_file_get_the_index_as_the_prompt_prefix(checkout: Path) -> None:
    made = write_task_dir(checkout, _manifest("aider"), _spec(), "aider")
    assert made.index_file is None
    assert made.prompt.startswith("The requirement and context files of this Task:\n\n"
                                  "- .task/db/schema/run-2/task.md (the requirement)\n"
                                  "- .task/db/schema/run-2/context/docs/db.md\n\n# Task db/schema")
    assert not any((checkout / name).exists() for name in ("CLAUDE.md", "AGENTS.md", "GEMINI.md"))


def test_a_context_path_that_is_a_link_or_leaves_the_checkout_is_skipped_with_a_note(
        tmp_path: Path, checkout: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the Worker's secret\n")
    os.symlink(secret, checkout / "docs" / "link.md")
    os.symlink(tmp_path, checkout / "up")
    (tmp_path / "outside.md").write_text("outside\n")
    spec = _spec(("docs/db.md", "docs/link.md", "../outside.md", "up/outside.md", "docs/missing.md"))
    made = write_task_dir(checkout, _manifest(), spec, "claude")
    copies = checkout / ".task" / "db" / "schema" / "run-2" / "context"
    assert sorted(str(p.relative_to(copies)) for p in copies.rglob("*") if p.is_file()) == ["docs/db.md"]
    assert made.context == (".task/db/schema/run-2/context/docs/db.md",)
    assert [note.split(":")[0] for note in made.skipped] == \
        ["docs/link.md", "../outside.md", "up/outside.md", "docs/missing.md"]
    assert "symbolic link" in made.skipped[0] and "not a plain path" in made.skipped[1]
    assert "symbolic link" in made.skipped[2] and "not in the checkout" in made.skipped[3]
    for note in made.skipped:
        assert note in made.prompt
    assert "the Worker's secret" not in made.prompt


def test_a_task_directory_whose_way_is_a_link_is_refused_and_nothing_is_written_through_it(
        tmp_path: Path, checkout: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, checkout / ".task")
    with pytest.raises(TaskDirError, match=r"\.task.*symbolic link"):
        write_task_dir(checkout, _manifest(), _spec(), "claude")
    assert list(elsewhere.iterdir()) == []


def test_the_configured_prompt_template_is_used_and_its_error_names_the_agent(checkout: Path) -> None:
    agent = {"name": "reviewer", "preset": "claude",
             "prompt_template": "Read {{ task_file }} then {{ context|join(' ') }}; run {{ run_number }}.\n"}
    made = write_task_dir(checkout, _manifest(agent=agent), _spec(), "claude")
    assert made.prompt == ("Read .task/db/schema/run-2/task.md then .task/db/schema/run-2/context/docs/db.md; "
                           "run 2.\n")
    broken = {**agent, "prompt_template": "ok\n{{ nope }}"}
    with pytest.raises(PromptError, match=r"agents\.reviewer\.prompt_template, line 2: 'nope' is undefined"):
        write_task_dir(checkout, _manifest(agent=broken, run_number=3), _spec(), "claude")


# -- taking the section out again (gitflow/change.py) ------------------------------------------


def _block(preset: str = "claude") -> bytes:
    return workspace.section(preset, "t", 1, ".task/t/run-1/task.md", ()).encode()


@pytest.mark.parametrize("base", [b"# Rules\n", b"# Rules", b""])
def test_the_section_appended_to_a_file_comes_out_as_the_file_was(base: bytes) -> None:
    assert strip_section(with_section(base, _block()), base) == base


def test_a_file_that_was_only_the_section_comes_out_as_no_file() -> None:
    assert strip_section(_block(), None) is None


def test_an_agents_edits_around_the_section_are_kept_without_the_section() -> None:
    base = b"# Rules\n"
    edited = with_section(b"# Rules, edited\n", _block()) + b"More rules.\n"
    assert strip_section(edited, base) == b"# Rules, edited\nMore rules.\n"
    assert strip_section(_block() + b"The Agent's notes\n", None) == b"The Agent's notes\n"
    assert strip_section(with_section(base, _block()) + b"\n", base) == base + b"\n"


def test_a_file_without_the_section_is_left_as_it_is() -> None:
    assert strip_section(b"# Rules\n" + BEGIN.encode() + b"\nno end\n", b"# Rules\n") == \
        b"# Rules\n" + BEGIN.encode() + b"\nno end\n"
