"""Hostile repository content and configuration against the Task's directory, the context index and the prompt.

A person who can push to the repository controls CLAUDE.md, AGENTS.md,
`.task/` and the context files; one who can edit the configuration controls
the prompt template and the Agent's `path`. Nothing they write may make the
Worker read or write outside the checkout, hang it, clobber the repository's
own content in the change, or reach Python's internals from a template.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from taskrunner.agents import prompt as prompts
from taskrunner.agents.prompt import PromptError
from taskrunner.agents.workspace import (
    BEGIN,
    END,
    TaskDirError,
    section,
    strip_section,
    with_section,
    write_task_dir,
)
from taskrunner.config import parse_config
from taskrunner.errors import ConfigError
from taskrunner.gitflow import change
from taskrunner.model import TaskSpec
from taskrunner.taskfile import parse_task

TASK = b"---\nagent: claude\n---\n# Add the schema\n\nCreate `schema.sql`.\n"
REL = ".task/db/schema/run-2"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    (root / "tasks" / "db").mkdir(parents=True)
    (root / "tasks" / "db" / "schema.md").write_bytes(TASK)
    (root / "docs").mkdir()
    (root / "docs" / "db.md").write_text("# The database\n")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside.md"
    target.write_text("OUTSIDE-CONTENT\n")
    return target


def _spec(context: tuple[str, ...] = ()) -> TaskSpec:
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


def _within(seconds: float, work: Any) -> Any:
    """`work()` on a thread; fails the test when it has not returned in `seconds` (a hang)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the Worker hung on the repository's content"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------- the index file


def test_a_claude_md_linked_to_etc_passwd_is_neither_read_nor_written(checkout: Path) -> None:
    os.symlink("/etc/passwd", checkout / "CLAUDE.md")
    before = Path("/etc/passwd").read_bytes()
    made = write_task_dir(checkout, _manifest(), _spec(), "claude")
    assert made.index_file is None and os.path.islink(checkout / "CLAUDE.md")
    assert Path("/etc/passwd").read_bytes() == before
    assert "root:" not in made.prompt and "@.task/db/schema/run-2/task.md" in made.prompt


@pytest.mark.parametrize("preset,name", [("claude", "CLAUDE.md"), ("codex", "AGENTS.md"), ("gemini", "GEMINI.md")])
def test_an_index_file_linked_outside_the_checkout_is_left_alone(checkout: Path, outside: Path, preset: str,
                                                                   name: str) -> None:
    os.symlink(outside, checkout / name)
    made = write_task_dir(checkout, _manifest(preset), _spec(), preset)
    assert made.index_file is None
    assert outside.read_text() == "OUTSIDE-CONTENT\n"


def test_an_index_file_hard_linked_to_a_file_outside_is_not_written_through(checkout: Path, outside: Path) -> None:
    os.link(outside, checkout / "CLAUDE.md")
    write_task_dir(checkout, _manifest(), _spec(), "claude")
    assert outside.read_text() == "OUTSIDE-CONTENT\n"


def test_a_directory_named_claude_md_gives_the_prompt_prefix(checkout: Path) -> None:
    (checkout / "CLAUDE.md").mkdir()
    (checkout / "CLAUDE.md" / "inner").write_text("x")
    made = write_task_dir(checkout, _manifest(), _spec(), "claude")
    assert made.index_file is None and made.prompt.startswith("The requirement and context files")
    assert sorted(p.name for p in (checkout / "CLAUDE.md").iterdir()) == ["inner"]


def test_a_fifo_named_agents_md_does_not_hang_the_worker(checkout: Path) -> None:
    os.mkfifo(checkout / "AGENTS.md")
    made = _within(20, lambda: write_task_dir(checkout, _manifest("codex"), _spec(), "codex"))
    assert made.index_file is None


# ---------------------------------------------------------------- .task committed by the repository


def test_a_committed_task_link_to_a_directory_outside_is_refused(checkout: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, checkout / ".task")
    with pytest.raises(TaskDirError):
        write_task_dir(checkout, _manifest(), _spec(), "claude")
    assert list(elsewhere.iterdir()) == []


def test_a_committed_task_file_in_the_way_is_refused(checkout: Path) -> None:
    (checkout / ".task").write_text("not a directory\n")
    with pytest.raises(TaskDirError):
        write_task_dir(checkout, _manifest(), _spec(), "claude")


def test_committed_links_inside_the_runs_own_directory_are_not_written_through(checkout: Path,
                                                                              outside: Path) -> None:
    run = checkout / REL
    run.mkdir(parents=True)
    for name in ("task.md", "prompt.md", "metadata.yaml"):
        os.symlink(outside, run / name)
    os.symlink(outside.parent, run / "context")
    try:
        write_task_dir(checkout, _manifest(), _spec(("docs/db.md",)), "claude")
    except TaskDirError:
        pass  # refusing the Run is safe too
    assert outside.read_text() == "OUTSIDE-CONTENT\n"
    assert not (outside.parent / "docs").exists()
    assert not (run / "prompt.md").is_symlink() or os.readlink(run / "prompt.md") == str(outside)


def test_a_committed_task_directory_of_another_run_is_not_excluded_from_the_change() -> None:
    # Only this Run's directory is taskrun's; the rest of .task/ is the repository's.
    assert change._excluded(_manifest())[-1] == REL


def test_a_task_id_that_climbs_out_cannot_name_the_excluded_directory() -> None:
    assert all(".." not in path for path in change._excluded(_manifest(task_id="../../etc")))


# ---------------------------------------------------------------- context paths


@pytest.mark.parametrize("path", ["../outside.md", "/etc/passwd", "docs/../../outside.md", "docs/db.md\nINJECTED",
                                  "link.md", "linkdir/x.md", "docs\x1b[2J.md", ""])
def test_a_hostile_context_path_is_skipped_and_nothing_outside_is_copied(checkout: Path, outside: Path,
                                                                        path: str) -> None:
    os.symlink(outside, checkout / "link.md")
    os.symlink(outside.parent, checkout / "linkdir")
    made = write_task_dir(checkout, _manifest(), _spec((path,)), "claude")
    assert made.context == () and len(made.skipped) == 1
    copies = checkout / REL / "context"
    assert not copies.exists() or all("OUTSIDE" not in p.read_text() for p in copies.rglob("*") if p.is_file())
    assert "\nINJECTED" not in made.prompt and "\x1b" not in made.prompt
    assert "root:" not in made.prompt


# ---------------------------------------------------------------- the section's markers


SECTION = section("claude", "db/schema", 2, f"{REL}/task.md", ()).encode()
REPO_OWN = (b"# Repository rules\n\n" + BEGIN.encode() + b"\nThe repository's own block, about taskrun.\n"
            + END.encode() + b"\n")


def test_a_repositorys_own_marker_block_survives_when_the_agent_only_left_the_section() -> None:
    assert strip_section(with_section(REPO_OWN, SECTION), REPO_OWN) == REPO_OWN


def test_a_repositorys_own_marker_block_is_kept_when_the_agent_edits_the_file_and_drops_the_section() -> None:
    edited = REPO_OWN.replace(b"# Repository rules", b"# Repository rules, edited by the Agent")
    kept = strip_section(edited, REPO_OWN)
    assert kept == edited, "the repository's own block was cut out of the change"


def test_a_marker_block_the_agent_appends_does_not_keep_taskruns_section_in_the_change() -> None:
    after = with_section(b"# Rules\n", SECTION) + b"\n" + BEGIN.encode() + b"\nagent's\n" + END.encode() + b"\n"
    kept = strip_section(after, b"# Rules\n")
    assert kept is not None and f"@{REL}/task.md".encode() not in kept


# ---------------------------------------------------------------- commit messages


def test_a_title_with_escapes_and_newlines_makes_one_inert_line_and_forges_no_trailer() -> None:
    manifest = _manifest(git={"title": "Fix \x1b]8;;http://x\x07it\x1b[2J\nSigned-off-by: Mallory <m@x>",
                              "branch": "taskrun/db/schema"})
    text = change.message(manifest, "w1")
    assert "\x1b" not in text and "\x07" not in text
    assert "\nSigned-off-by" not in text


# ---------------------------------------------------------------- the prompt template


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ lipsum.__globals__['os'] }}",
    "{{ self._TemplateReference__context }}", "{{ ''|attr('__class__') }}", "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}", "{{ range.__self__ }}", "{% include '/etc/passwd' %}",
    "{% import '/etc/passwd' as x %}", "{{ 'x' * 10000000 }}", "{{ 9 ** 9999999 }}", "{{ range(10 ** 9) | list }}",
    "{{ '{0.__class__}'.format('') }}", "{{ '{0.__class__}'.format_map(['']) }}",
])
def test_a_prompt_template_cannot_reach_python_internals_or_the_files(template: str) -> None:
    with pytest.raises(PromptError):
        prompts.render(template, {"title": "t"})


SIZE_PROBE = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
    from taskrunner.agents import prompt
    try:
        prompt.render(sys.argv[1], {})
    except prompt.PromptError as exc:
        print(exc)
""")


@pytest.mark.parametrize("template", ["{{ 'x'.center(3000000000) }}", "{{ '%3000000000d' | format(1) }}",
                                      "{{ ('x' * 1000000) | replace('x', 'x' * 1000) }}",
                                      "{{ lipsum(3000000) }}"])
def test_a_prompt_template_is_refused_for_its_size_before_it_is_built(template: str) -> None:
    # In a process of its own, with a memory ceiling: the template must be refused by the sandbox's
    # size rule, not by running out of memory (a Worker with more memory would build the value).
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    ceiling = 1024 ** 3 if limit == resource.RLIM_INFINITY else min(limit, 1024 ** 3)
    try:
        done = subprocess.run([sys.executable, "-c", SIZE_PROBE, template, str(ceiling)], capture_output=True,
                              text=True, timeout=30, check=False, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        pytest.fail(f"rendering {template} ran for over 30 s: no bound on what it builds")
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    # lipsum is not offered at all: "'lipsum' is undefined" is as good a refusal.
    assert "MemoryError" not in said and ("over" in said or "sandbox" in said or "undefined" in said), said


# ---------------------------------------------------------------- the Agent's path


def test_a_relative_agent_path_is_refused_by_the_configuration() -> None:
    # argv[0] with a '/' but not absolute resolves against the Agent's working directory: the checkout,
    # whose files the repository controls.
    text = "agents:\n  claude:\n    preset: claude\n    path: bin/claude\n"
    with pytest.raises(ConfigError):
        parse_config(text, ".taskrun.yaml")
