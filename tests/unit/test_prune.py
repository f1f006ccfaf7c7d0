"""Pruning finished Tasks (taskrunner/prune.py): the pure choice, and the work tree and git on a real repository."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from taskrunner import prune, prune_journal
from taskrunner.config import load_config
from taskrunner.errors import ConfigError
from taskrunner.gitops import Git
from taskrunner.prune import Facts, PruneError, Request

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


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """Tasks a, a/sub and b with committed records, a file of the user's, and a full log of a."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.name", "U")
    git(root, "config", "user.email", "u@example.com")
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


def head_files(root: Path) -> set[str]:
    return set(git(root, "ls-tree", "-r", "--name-only", "HEAD").splitlines())


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
