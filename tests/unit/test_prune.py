"""Pruning finished Tasks (taskrunner/prune.py): the pure choice, and the work tree and git on a real repository."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from taskrunner import prune, prune_journal
from taskrunner.config import load_config
from taskrunner.errors import ConfigError
from taskrunner.gitops import Git
from taskrunner.prune import Facts, PruneError, Request
from tests.conftest import git
from tests.integration.test_records_git import head_files
from tests.unit.test_gitops import make_repo, write

DAY = 86400.0
NOW = 1_000_000_000.0


def facts(task_id: str, status: str = "COMPLETED", age: float = 40 * DAY, final: bool = True,
          deps: tuple[str, ...] = ()) -> Facts:
    return Facts(task_id, f"tasks/{task_id}.md", status, NOW - age, final, None, False, deps)


def ids(chosen: list[Facts]) -> list[str]:
    return [f.id for f in chosen]


def test_only_finished_tasks_older_than_the_cut_off_are_chosen() -> None:
    tasks = [facts("old"), facts("new", age=DAY), facts("failed", "FAILED"), facts("invalid", "INVALID"),
             facts("cancelled", "CANCELLED"), facts("pending", "PENDING"), facts("running", "RUNNING", final=False),
             facts("blocked", "BLOCKED"), facts("retrying", "FAILED", final=False)]
    chosen, skipped = prune.select(tasks, Request(30 * DAY), NOW)
    assert ids(chosen) == ["cancelled", "failed", "invalid", "old"]
    assert skipped == []


def test_status_and_globs_narrow_the_choice_and_exact_ids_say_why_they_stay() -> None:
    tasks = [facts("ci/a"), facts("ci/b", "FAILED"), facts("docs/c"), facts("ci/new", age=1.0),
             facts("busy", "RUNNING", final=False)]
    chosen, _ = prune.select(tasks, Request(30 * DAY, frozenset({"COMPLETED"}), ("ci/*",)), NOW)
    assert ids(chosen) == ["ci/a"]
    chosen, skipped = prune.select(tasks, Request(30 * DAY, patterns=("ci/new", "busy")), NOW)
    assert chosen == []
    assert dict(skipped) == {"ci/new": "finished less than 30d ago", "busy": "not finished (RUNNING)"}



def test_an_exact_id_of_another_status_or_of_no_task_says_why_nothing_was_pruned() -> None:
    tasks = [facts("q1"), facts("q2", "FAILED")]
    chosen, skipped = prune.select(tasks, Request(30 * DAY, frozenset({"FAILED"}), ("q1", "nosuch", "--output=x")),
                                   NOW)
    assert chosen == []
    assert dict(skipped) == {"q1": "COMPLETED, not FAILED (--status)",
                             "nosuch": "no such Task (`taskrun logs ID` says whether it was pruned)",
                             "--output=x": "no such Task (`taskrun logs ID` says whether it was pruned)"}

def test_a_task_that_an_unfinished_task_depends_on_stays() -> None:
    tasks = [facts("base"), facts("next", "PENDING", deps=("base",)), facts("done-dep"),
             facts("after", deps=("done-dep",))]
    chosen, skipped = prune.select(tasks, Request(30 * DAY), NOW)
    assert ids(chosen) == ["after", "done-dep"]
    assert skipped == [("base", "'next', not finished, depends on it")]


def test_facts_of_records_know_an_unfinished_run() -> None:
    task = {"task_id": "a", "file": "tasks/a.md", "status": "COMPLETED", "revision": "r", "updated_at": 5.0,
            "runs": [{"run": 1, "status": "COMPLETED"}, {"run": 2, "status": "RUNNING"}]}
    assert not prune.facts_of_record(task, {"status": "RUNNING", "finished_at": None}).runs_final
    task["runs"][1]["status"] = "FAILED"
    done = prune.facts_of_record(task, {"status": "FAILED", "finished_at": 7.0})
    assert done.runs_final and done.finished_at == 7.0
    assert not prune.facts_of_record(task, None).runs_final  # the last Run's record unreadable
    settled = prune.facts_of_record({**task, "runs": []}, None)
    assert settled.runs_final and settled.finished_at == 5.0


@pytest.mark.parametrize("path, who", [("runs/a/status.json", "a"), ("runs/a/run-2/output.log", "a"),
                                       ("runs/a/b/status.json", "a/b"), ("runs/a/b/run-1/x/y", "a/b"),
                                       ("runs/.gitkeep", None), ("tasks/a.md", None)])
def test_the_owner_of_a_records_path(path: str, who: str | None) -> None:
    assert prune.owner(path) == who


@pytest.mark.parametrize("payload, message", [
    ({"older_than": "3x"}, "--older-than: expected a duration"),
    ({"older_than": "0s"}, "--older-than: expected a duration greater than zero"),
    ({}, "--older-than DURATION is required (or set records.prune_after)"),
    ({"older_than": "1d", "statuses": ["RUNNING"]}, "--status: expected one of COMPLETED"),
])
def test_a_malformed_request_is_refused_with_a_clear_message(payload: dict[str, object], message: str) -> None:
    with pytest.raises(PruneError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Request.from_payload(payload, None)


def test_the_default_cut_off_is_records_prune_after() -> None:
    assert Request.from_payload({}, 7 * DAY).older_than == 7 * DAY
    assert Request.from_payload({"older_than": "2h"}, 7 * DAY).older_than == 7200.0


def test_commit_message_names_the_count_and_the_cut_off() -> None:
    removals = [prune.Removal("a", "COMPLETED", 1.0, "tasks/a.md", None)]
    text = prune.commit_message(removals, Request(30 * DAY))
    assert text.splitlines()[0] == "taskrun: prune 1 finished Task (older than 30d)"
    assert "- a (COMPLETED)" in text and "git show <this commit>^:runs/<id>/status.json" in text


def test_records_prune_after_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / ".taskrun.yaml"
    config.write_text("records:\n  prune_after: 30d\n")
    assert load_config(tmp_path).records.prune_after == 30 * DAY
    config.write_text("records: {}\n")
    assert load_config(tmp_path).records.prune_after is None
    config.write_text("records:\n  prune_after: soon\n")
    with pytest.raises(ConfigError, match="records.prune_after.*expected a duration"):
        load_config(tmp_path)


# -- the work tree and git ---------------------------------------------------------------------


@pytest.fixture
def clone(tmp_path: Path, isolated_git: Path) -> Path:
    """Tasks a, a/sub and b with committed records, a file of the user's, and a full log of a."""
    root = make_repo(tmp_path / "repo")
    for task_id in ("a", "a/sub", "b"):
        write(root, f"tasks/{task_id}.md", f"# {task_id}\n")
        write(root, f"runs/{task_id}/status.json", "{}\n")
        write(root, f"runs/{task_id}/run-1/status.json", "{}\n")
        write(root, f"runs/{task_id}/run-1/output.log", "out\n")
    write(root, "notes.txt", "mine\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "setup")
    write(root, ".git/taskrun/logs/a/run-1.log", "the whole output\n")
    return root


def task(root: Path, task_id: str) -> Facts:
    revision = hashlib.sha256((root / f"tasks/{task_id}.md").read_bytes()).hexdigest()
    return Facts(task_id, f"tasks/{task_id}.md", "COMPLETED", 0.0, True, revision, False)


def test_a_prune_removes_the_task_file_its_records_and_full_logs_in_one_commit(clone: Path) -> None:
    repo = Git(clone)
    (clone / "notes.txt").write_text("mine, edited\n")  # the user's unstaged change
    write(clone, "staged.txt", "staged\n")
    git(clone, "add", "staged.txt")
    before = git(clone, "rev-parse", "HEAD").strip()
    removals, skipped = prune.inspect(repo, [task(clone, "a")], clone / ".git/taskrun")
    assert skipped == []
    assert removals[0].paths == ["runs/a/run-1/output.log", "runs/a/run-1/status.json", "runs/a/status.json",
                                 "tasks/a.md"]
    assert removals[0].bytes > 0 and removals[0].bytes % prune.BLOCK_BYTES == 0
    assert prune.remove(clone, clone / ".git/taskrun", removals) == []
    sha = prune.prune_commit(repo, removals, Request(DAY))
    assert git(clone, "rev-parse", "HEAD~1").strip() == before and sha == git(clone, "rev-parse", "HEAD").strip()
    files = head_files(clone)
    assert not {"tasks/a.md", "runs/a/status.json", "runs/a/run-1/status.json"} & files
    assert {"tasks/a/sub.md", "runs/a/sub/status.json", "runs/a/sub/run-1/output.log", "tasks/b.md"} <= files
    assert (clone / "runs/a/sub/run-1/output.log").exists() and not (clone / "runs/a/status.json").exists()
    assert not (clone / ".git/taskrun/logs/a").exists()
    assert (clone / "notes.txt").read_text() == "mine, edited\n"
    assert sorted(git(clone, "status", "--porcelain").splitlines()) == [" M notes.txt", "A  staged.txt"]
    assert git(clone, "show", f"{sha}^:runs/a/status.json") == "{}\n"


def test_a_task_file_changed_or_not_committed_and_uncommitted_records_are_left(clone: Path) -> None:
    repo = Git(clone)
    (clone / "tasks/a.md").write_text("# a, edited\n")
    write(clone, "runs/b/run-2/status.json", "{}\n")  # a Run whose records are not committed yet
    write(clone, "tasks/c.md", "# c\n")
    write(clone, "runs/c/status.json", "{}\n")
    git(clone, "add", "runs/c/status.json")
    c = task(clone, "c")
    removals, skipped = prune.inspect(repo, [task(clone, "b"), c], None)
    assert removals == []
    reasons = dict(skipped)
    assert "not all committed" in reasons["b"] and reasons["c"].startswith("tasks/c.md is not committed")
    a = Facts("a", "tasks/a.md", "COMPLETED", 0.0, True, "0" * 64, False)
    git(clone, "add", "tasks/a.md")  # staged, not committed
    assert "has changes not committed" in dict(prune.inspect(repo, [a], None)[1])["a"]
    git(clone, "commit", "-qm", "a new revision, never run")
    assert "changed since its last Run" in dict(prune.inspect(repo, [a], None)[1])["a"]


def test_links_in_runs_and_tasks_are_removed_never_followed(clone: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    os.symlink(outside / "keep.txt", clone / "runs/a/run-1/linked.log")
    os.symlink(outside, clone / "runs/a/run-1/linked-dir")
    (clone / "tasks/b.md").unlink()
    os.symlink(outside / "keep.txt", clone / "tasks/b.md")
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "links")
    repo = Git(clone)
    facts_b = Facts("b", "tasks/b.md", "INVALID", 0.0, True, None, False)
    removals, skipped = prune.inspect(repo, [task(clone, "a"), facts_b], None)
    assert skipped == [] and len(removals) == 2
    assert prune.remove(clone, clone / ".git/taskrun", removals) == []
    assert prune.prune_commit(repo, removals, Request(DAY))
    assert (outside / "keep.txt").read_text() == "keep\n"
    assert not os.path.lexists(clone / "tasks/b.md") and not os.path.lexists(clone / "runs/a/run-1")
    assert (clone / "runs/a/sub/status.json").exists()  # Task a/sub's records are its own
    assert not {"runs/a/run-1/linked.log", "runs/a/run-1/linked-dir", "tasks/b.md"} & head_files(clone)


def test_a_linked_task_directory_under_runs_is_not_entered(clone: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "status.json").write_text("not ours\n")
    os.rename(clone / "runs/b", tmp_path / "b-records")
    os.symlink(outside, clone / "runs/b")
    problems = prune.remove(clone, clone / ".git/taskrun",
                            [prune.Removal("b", "COMPLETED", 0.0, None, None, ["runs/b/status.json"])])
    assert problems and "runs/b" in problems[0]
    assert (outside / "status.json").read_text() == "not ours\n"


@pytest.mark.parametrize("entry", [
    {"id": "a", "file": "tasks/a.md", "paths": ["README.md"]},
    {"id": "a", "file": "tasks/a.md", "paths": ["runs/b/status.json"]},
    {"id": "a", "file": "tasks/a.md", "paths": ["runs/a/../../README.md"]},
    {"id": "a", "file": "/etc/passwd", "paths": []},
    {"id": "a", "file": "src/a.md", "paths": []},
    {"id": "../x", "file": None, "paths": []},
    {"id": "a", "file": "tasks/a.md", "paths": "runs/a/status.json"},
])
def test_a_prune_journal_naming_a_path_not_the_tasks_is_ignored_whole(tmp_path: Path, entry: dict[str, Any]) -> None:
    good = {"id": "ok", "status": "COMPLETED", "finished_at": 1.0, "file": "tasks/ok.md", "revision": None,
            "paths": ["tasks/ok.md", "runs/ok/status.json"]}
    (tmp_path / "prune-1.json").write_text(json.dumps(
        {"version": 1, "older_than": 60, "tasks": [good, {"status": "COMPLETED", "finished_at": 1.0,
                                                         "revision": None, **entry}]}))
    notices: list[str] = []
    assert prune_journal.pending(tmp_path, notices.append) == []
    assert len(notices) == 1 and "prune-1.json" in notices[0]


def test_a_prune_journal_round_trips(tmp_path: Path) -> None:
    removal = prune.Removal("ci/x", "FAILED", 5.0, "tasks/ci/x.md", "r", ["tasks/ci/x.md", "runs/ci/x/status.json"])
    path = prune_journal.begin(tmp_path, prune.Request(3600.0), [removal])
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ((found, request, removals),) = prune_journal.pending(tmp_path, lambda message: None)
    assert found == path and request.older_than == 3600.0 and removals == [removal]
    prune_journal.end(path)
    assert prune_journal.pending(tmp_path, lambda message: None) == []


@pytest.mark.parametrize("older", ["garbage", "-1d", "0", "0.0000001s", "99999999999999999999d", "1e99d"])
def test_a_cut_off_that_is_no_duration_or_out_of_range_is_refused_saying_so(older: str) -> None:
    with pytest.raises(prune.PruneError, match="--older-than"):
        prune.Request.from_payload({"older_than": older}, None)


# -- a Task no longer there: what the commands taking a Task id say (prune.gone) -----------------------


def test_gone_names_the_prune_commit_when_and_the_commands_to_see_the_task_again(clone: Path) -> None:
    repo = Git(clone)
    removals, _ = prune.inspect(repo, [task(clone, "a")], clone / ".git/taskrun")
    prune.remove(clone, clone / ".git/taskrun", removals)
    sha = prune.prune_commit(repo, removals, Request(DAY))
    assert sha
    found = prune.gone(clone, "a")
    assert found is not None and found.commit == sha and found.pruned
    assert abs(found.when - float(git(clone, "log", "-1", "--format=%ct", sha))) < 1
    text = found.text()
    assert text.startswith(f"'a' was pruned in commit {sha[:12]} on ")
    assert f"`git show {sha[:12]}^:runs/a/status.json`" in text and "`git log -- runs/a`" in text
    assert f"`git checkout {sha[:12]}^ -- runs/a tasks/a.md`" in text
    assert git(clone, "show", f"{sha[:12]}^:runs/a/status.json") == "{}\n"  # the command it gives works
    assert prune.gone(clone, "a/sub") is None and prune.gone(clone, "never") is None  # still there; never was


def test_gone_says_records_deleted_by_hand_were_not_pruned(clone: Path) -> None:
    git(clone, "rm", "-rq", "runs/b")
    git(clone, "commit", "-qm", "records of b, by hand")
    found = prune.gone(clone, "b")
    assert found is not None and not found.pruned
    assert found.text().startswith(f"'b' has no record: its records were deleted in commit {found.commit[:12]}")


@pytest.mark.parametrize("task_id", ["-x", "--output=x", "Upper", "../b", "z/run-1", "z/status.json", ".b", ""])
def test_gone_never_asks_git_about_an_id_that_is_no_task_id(clone: Path, task_id: str) -> None:
    # Each of these has a record that a commit deleted: git would name that commit if it were asked.
    if task_id:
        write(clone, f"runs/{task_id}/status.json", "{}\n")
        git(clone, "add", "--", f"runs/{task_id}/status.json")
        git(clone, "commit", "-qm", "a record")
        git(clone, "rm", "-q", "--", f"runs/{task_id}/status.json")
        git(clone, "commit", "-qm", "taskrun: prune 1 finished Task (older than 1d)")
    assert prune.gone(clone, task_id) is None


def test_the_dry_run_table_aligns_ids_of_any_length_and_escapes_what_it_shows() -> None:
    import io

    from rich.console import Console

    from taskrunner.cli.prune import _render

    stream = io.StringIO()
    pruned = [{"task": "a", "status": "COMPLETED", "finished_at": NOW, "bytes": 4096},
              {"task": "ci/a-much-longer-id", "status": "FAILED", "finished_at": None, "bytes": 3 * 1024 * 1024}]
    _render({"ok": True, "dry_run": True, "older_than": "30d", "commit": None, "pruned": pruned, "bytes": 3149824,
             "skipped": [{"task": "b", "reason": "tasks/b.md has \x1b[31mchanges\x1b[0m"},
                         {"task": "long/er", "reason": "[bold]not[/bold] finished"}], "waiting": None,
             "problems": []}, Console(file=stream, force_terminal=False, width=80))
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == ["TASK", "STATUS", "FINISHED", "SIZE"]
    rows = lines[:3]
    assert len({row.index(word) for row, word in zip(rows, ("STATUS", "COMPLETED", "FAILED"))}) == 1
    assert len({row.index(word) for row, word in zip(rows, ("SIZE", "4.0 KiB", "3.0 MiB"))}) == 1
    assert lines[3].split()[:2] == ["LEFT", "WHY"]
    assert lines[4].index("tasks/b.md") == lines[5].index("[bold]not") == lines[3].index("WHY")
    assert "\x1b" not in stream.getvalue() and "\\x1b[31mchanges" in lines[4]
    assert lines[-1] == "would prune 2 finished Tasks (older than 30d), freeing 3.0 MiB in the work tree"
