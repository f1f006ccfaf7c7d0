"""Only taskrun's exact section of the context index leaves the change; outside text reaches the
result commit's message and summary.md inert."""

from __future__ import annotations

import subprocess
from pathlib import Path

from taskrunner.agents.workspace import (
    BEGIN,
    END,
    Expected,
    section,
    section_edited,
    strip_section,
    with_section,
)
from taskrunner.gitflow import change, summary
from taskrunner.state import RunState, RunStatus
from tests.conftest import git
from tests.unit.test_transfer import _names, _with_task_dir, source  # noqa: F401 - `source` is a fixture

REL = ".task/db/schema/run-2"
COPIES = (f"{REL}/context/docs/db.md", f"{REL}/context/docs/api.md")
MINE = Expected("db/schema", 2, "claude")
SECTION = section("claude", "db/schema", 2, f"{REL}/task.md", COPIES).encode()
BASE = b"# Rules\n"


# ---------------------------------------------------------------- which block is taskrun's


def test_the_section_with_its_context_lines_is_removed_for_the_run_it_names() -> None:
    assert strip_section(with_section(BASE, SECTION), BASE, MINE) == BASE


def test_a_section_naming_another_run_or_task_is_not_taken_for_this_runs() -> None:
    for other in (section("claude", "db/schema", 1, ".task/db/schema/run-1/task.md", ()),
                  section("claude", "db/other", 2, ".task/db/other/run-2/task.md", ()),
                  section("codex", "db/schema", 2, f"{REL}/task.md", ())):
        text = with_section(BASE, other.encode())
        assert strip_section(text, BASE, MINE) == text, other


def test_a_context_line_outside_the_runs_copies_makes_the_block_not_taskruns() -> None:
    forged = SECTION.replace(f"@{COPIES[1]}\n".encode(), b"@/etc/passwd\n")
    text = with_section(BASE, forged)
    assert strip_section(text, BASE, MINE) == text


def test_a_section_the_base_already_held_stays_and_only_the_new_copy_goes() -> None:
    base = with_section(BASE, SECTION)  # the repository committed an index file holding such a section
    assert strip_section(with_section(base, SECTION), base, MINE) == base


def test_the_section_moved_by_the_agent_to_the_top_is_still_removed() -> None:
    moved = SECTION + b"\n# Rules\nMore.\n"
    assert strip_section(moved, BASE, MINE) == b"\n# Rules\nMore.\n"


def test_a_section_the_agent_edited_inside_is_left_whole_and_said_to_be_edited() -> None:
    edited = with_section(BASE, SECTION.replace(f"@{COPIES[0]}\n".encode(), b"@notes.md\n"))
    assert strip_section(edited, BASE, MINE) == edited
    assert section_edited(edited, BASE, MINE)
    assert not section_edited(with_section(BASE, SECTION), BASE, MINE)
    own = BASE + BEGIN.encode() + b"\nThe repository's own.\n" + END.encode() + b"\n"
    assert not section_edited(own + b"More.\n", own, MINE)


# ---------------------------------------------------------------- the whole change


def test_an_edit_inside_the_section_stays_in_the_change_and_the_message_says_so(
        tmp_path: Path, source: tuple[Path, str]) -> None:  # noqa: F811 - the fixture
    run_dir, checkout, manifest = _with_task_dir(tmp_path, source, own_index="# Our rules\n")
    text = (checkout / "CLAUDE.md").read_text()
    (checkout / "CLAUDE.md").write_text(text.replace("## taskrun: Task t, run 3\n", "## taskrun: Task t, run 3\nmine\n"))
    found = change.collect(run_dir, checkout, manifest, [], "w1")
    assert found is not None
    root = source[0]
    assert _names(root, found, run_dir) == ["M\tCLAUDE.md"]
    assert "mine\n" in git(root, "show", f"{found['commit']}:CLAUDE.md")
    body = git(root, "log", "-1", "--format=%B", found["commit"])
    assert "The Agent edited inside taskrun's section of CLAUDE.md" in body
    trailers = subprocess.run(["git", "interpret-trailers", "--parse"], input=body, capture_output=True,
                              text=True, check=True).stdout
    assert trailers.splitlines()[0] == "Task-Id: t"


def test_a_repositorys_own_marker_block_in_the_base_comes_back_untouched(
        tmp_path: Path, source: tuple[Path, str]) -> None:  # noqa: F811 - the fixture
    own = f"# Our rules\n{BEGIN}\nour block\n{END}\n"
    run_dir, checkout, manifest = _with_task_dir(tmp_path, source, own_index=own)
    text = (checkout / "CLAUDE.md").read_text()
    (checkout / "CLAUDE.md").write_text(text.replace("# Our rules\n", "# Our rules, edited\n"))
    found = change.collect(run_dir, checkout, manifest, [], "w1")
    assert found is not None
    assert _names(source[0], found, run_dir) == ["M\tCLAUDE.md"]
    assert git(source[0], "show", f"{found['commit']}:CLAUDE.md") == own.replace("rules\n", "rules, edited\n")


# ---------------------------------------------------------------- commit message


def test_every_value_in_the_commit_message_is_one_inert_line() -> None:
    manifest = {"task_id": "t", "run_id": "r\nSigned-off-by: x", "agent": {"name": "a\x1b[2J\u202e"},
                "git": {"title": "\rT\x0bitle\x85Co-authored-by: m"}}
    text = change.message(manifest, "w\x07", ["note\nReviewed-by: m"])
    assert text == ("T itle Co-authored-by: m\n\nnote Reviewed-by: m\n\nTask-Id: t\nRun-Id: r Signed-off-by: x\n"
                    "Worker: w\\x07\nAgent: a\\x1b[2J\\u202e\n")


def test_a_title_of_nothing_but_space_falls_back_to_the_task_id() -> None:
    assert change.message({"task_id": "t", "git": {"title": " \n "}}, "w").startswith("t\n\nTask-Id: t\n")


# ---------------------------------------------------------------- summary.md


def test_every_outside_text_in_the_summary_is_inert() -> None:
    run = RunState(run_id="r1", task_id="t", number=1, revision="0" * 40, attempt=1, worker="w\x1b[31m",
                   agent="a\u202e", status=RunStatus.COMPLETED)
    run.result_commit, run.result_note = "c" * 40, "not moved\x1b]0;x\x07"
    run.final_message = "line one\n\x1b[2Jline two\r\n"
    page = summary.render(run, "T\x1b[2J\nitle", b"out\x1b[2J\rX\n", " a\x1b.txt | 1 +\n", ["runs/t\x07/x"])
    assert not any(ch in page for ch in "\x1b\x07\r\u202e")
    assert "# T\\x1b[2J itle\n" in page
    assert "> line one\n> \\x1b[2Jline two\n" in page
    assert "- **Worker:** w\\x1b[31m" in page and "runs/t\\x07/x" in page
