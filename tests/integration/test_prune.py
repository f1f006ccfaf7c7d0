"""`taskrun prune` and `records.prune_after` (issue 14, item 6): finished Tasks leave the work tree in one
commit, with or without a daemon, and never run again. Real daemon, real git."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Daemon, git, taskrun, wait_status, wait_until, write_task
from tests.integration.test_records_git import head_files


def committed(root: Path, *task_ids: str) -> bool:
    files = head_files(root)
    return all(f"runs/{t}/run-1/status.json" in files and f"tasks/{t}.md" in files for t in task_ids)


def prune(root: Path, *args: str) -> dict[str, object]:
    result = taskrun(root, "prune", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def run_once(root: Path, *task_ids: str) -> None:
    """The Tasks' files committed by the user, then `up --once` runs them and commits their records."""
    git(root, "add", "tasks")
    git(root, "commit", "--quiet", "-m", "user: tasks")
    result = taskrun(root, "up", "--once", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert committed(root, *task_ids)


def status_ids(root: Path) -> set[str]:
    result = taskrun(root, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {t["task_id"] for t in json.loads(result.stdout)["tasks"]}


def test_prune_without_a_daemon_commits_the_removal_and_leaves_the_users_changes(repo: Path) -> None:
    for task_id in ("old", "edited", "kept"):
        write_task(repo, task_id, f"echo {task_id}")
    run_once(repo, "old", "edited", "kept")
    (repo / "README.md").write_text("the user's unsaved work\n")
    (repo / "tasks/edited.md").write_text("# edited, not committed\n")
    before = git(repo, "rev-parse", "HEAD").strip()

    dry = prune(repo, "--older-than", "1ms", "--dry-run", "old", "edited")
    assert [p["task"] for p in dry["pruned"]] == ["old"] and dry["bytes"] > 0 and dry["dry_run"]
    assert git(repo, "rev-parse", "HEAD").strip() == before and (repo / "runs/old/status.json").exists()

    done = prune(repo, "--older-than", "1ms", "old", "edited")
    assert done["daemon"] is False and [p["task"] for p in done["pruned"]] == ["old"]
    assert "edited" in {s["task"] for s in done["skipped"]}
    assert git(repo, "log", "-1", "--format=%s").strip() == "taskrun: prune 1 finished Task (older than 1ms)"
    assert git(repo, "rev-parse", "HEAD^").strip() == before
    files = head_files(repo)
    assert "tasks/old.md" not in files and not any(f.startswith("runs/old/") for f in files)
    assert committed(repo, "edited", "kept")
    assert not (repo / "runs/old").exists() and not (repo / "tasks/old.md").exists()
    assert (repo / "README.md").read_text() == "the user's unsaved work\n"
    assert (repo / "tasks/edited.md").read_text() == "# edited, not committed\n"
    assert git(repo, "show", f"{done['commit']}^:runs/old/status.json")  # history keeps it

    text = taskrun(repo, "prune", "--older-than", "1ms", "kept")
    assert text.returncode == 0 and "git log -- runs/<id>" in text.stdout
    assert "kept" not in status_ids(repo)


@pytest.mark.slow
def test_prune_with_a_daemon_forgets_the_task_which_never_comes_back(daemon: Daemon, repo: Path) -> None:
    daemon.start()
    write_task(repo, "done", "echo done")
    wait_status(repo, "done", "COMPLETED")
    # The record commit lands a moment after the status (a batch): a commit of ours racing it could fail
    # with "cannot lock ref 'HEAD'" (docs/records.md: run it again), so it is made once the records are in.
    wait_until(lambda: "runs/done/run-1/status.json" in head_files(repo), 60, "the record commit")
    git(repo, "add", "tasks/done.md")
    git(repo, "commit", "--quiet", "-m", "user: the Task file")
    wait_until(lambda: committed(repo, "done"), 20, "the records to be committed")

    done = prune(repo, "--older-than", "1ms")
    assert done["daemon"] is True and [p["task"] for p in done["pruned"]] == ["done"] and done["commit"]
    assert git(repo, "rev-parse", "HEAD").strip() == done["commit"]
    assert "done" not in status_ids(repo)
    assert not any(f.startswith(("runs/done/", "tasks/done.md")) for f in head_files(repo))
    # Another Task runs and is committed: the daemon has long handled the deletions by then.
    write_task(repo, "later", "echo later")
    wait_status(repo, "later", "COMPLETED")
    wait_until(lambda: "runs/later/run-1/status.json" in head_files(repo), 20, "later's records")
    assert not (repo / "runs/done").exists() and "done" not in status_ids(repo)
    assert not any(f.startswith("runs/done/") for f in head_files(repo))
    assert "done" not in {t["task_id"] for t in json.loads(taskrun(repo, "status", "--json").stdout)["tasks"]}

    head = git(repo, "rev-parse", "HEAD").strip()
    again = prune(repo, "--older-than", "1ms", "done")
    assert again["pruned"] == [] and again["commit"] is None
    assert git(repo, "rev-parse", "HEAD").strip() == head
    # A restart reads runs/ again: the pruned Task is not brought back, nor run.
    daemon.stop()
    daemon.start()
    assert "done" not in status_ids(repo) and not (repo / "runs/done").exists()
    # Its file written again is a new Task, run as any new file is.
    write_task(repo, "done", "echo back")
    assert wait_status(repo, "done", "COMPLETED")["runs"][0]["run"] == 1


@pytest.mark.slow
def test_running_and_pending_tasks_are_never_pruned(daemon: Daemon, repo: Path) -> None:
    daemon.start()
    write_task(repo, "busy", "echo started\nsleep 300")
    write_task(repo, "waits", "echo waits", front="depends_on: [busy]\n")
    wait_status(repo, "busy", "RUNNING")
    wait_until(lambda: (taskrun(repo, "logs", "busy").stdout or "").startswith("started"), 20, "busy's output")
    result = prune(repo, "--older-than", "1ms")
    assert result["pruned"] == []
    named = prune(repo, "--older-than", "1ms", "busy", "waits")
    assert {s["task"]: s["reason"] for s in named["skipped"]} == {"busy": "not finished (RUNNING)",
                                                                  "waits": "not finished (PENDING)"}
    assert {"busy", "waits"} <= status_ids(repo)
    assert (repo / "runs/busy/run-1/status.json").exists() and (repo / "tasks/waits.md").exists()
    assert taskrun(repo, "cancel", "busy").returncode == 0


def test_a_bad_older_than_gets_a_clear_message(repo: Path) -> None:
    result = taskrun(repo, "prune", "--older-than", "a while")
    assert result.returncode == 2
    assert "--older-than: expected a duration like 30s, 5m or 1h, got 'a while'" in result.stderr
    result = taskrun(repo, "prune")
    assert result.returncode == 2 and "--older-than DURATION is required (or set records.prune_after)" in result.stderr


@pytest.mark.slow
def test_records_prune_after_prunes_by_itself(daemon: Daemon, repo: Path) -> None:
    config = repo / ".taskrun.yaml"
    text = config.read_text()
    assert "  keep_full_logs: 30d\n" in text
    config.write_text(text.replace("  keep_full_logs: 30d\n", "  keep_full_logs: 30d\n  prune_after: 1s\n"))
    write_task(repo, "auto", "echo auto")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "user: prune after 1s, and a Task")
    daemon.start()
    wait_until(lambda: git(repo, "log", "--format=%s", "-1", "--", "runs/auto").strip().startswith(
        "taskrun: prune 1 finished Task"), 60, "the daemon to prune 'auto' by itself")
    assert not any(f.startswith(("runs/auto/", "tasks/auto.md")) for f in head_files(repo))
    assert "auto" not in status_ids(repo)
    assert "+auto" in git(repo, "log", "-p", "--format=", "--", "runs/auto/run-1/output.log")  # history keeps it


def test_prune_without_a_daemon_pushes_with_git_push(repo: Path, tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "--bare", "--quiet", str(origin))
    git(repo, "remote", "add", "origin", str(origin))
    write_task(repo, "gone", "echo gone")
    run_once(repo, "gone")
    branch = git(repo, "branch", "--show-current").strip()
    git(repo, "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}")
    config = repo / ".taskrun.yaml"
    assert "  push: false\n" in config.read_text()
    config.write_text(config.read_text().replace("  push: false\n", "  push: true\n"))
    done = prune(repo, "--older-than", "1ms")
    assert [p["task"] for p in done["pruned"]] == ["gone"]
    assert git(origin, "rev-parse", branch).strip() == done["commit"]


def _interrupted(repo: Path) -> Path:
    """The work tree as a prune of 'a' killed half way leaves it: its journal written, its Task file and
    part of its records gone, nothing committed."""
    from taskrunner import gitops, prune, prune_journal

    for task_id in ("a", "b"):
        write_task(repo, task_id, f"echo {task_id}")
    run_once(repo, "a", "b")
    paths = git(repo, "ls-files", "tasks/a.md", "runs/a").split()
    removal = prune.Removal("a", "COMPLETED", 1.0, "tasks/a.md", None, paths)
    journal = prune_journal.begin(gitops.state_dir(repo), prune.Request(60.0), [removal])
    (repo / "tasks/a.md").unlink()
    (repo / "runs/a/run-1/output.log").unlink()
    return journal


def _finished(repo: Path, journal: Path) -> bool:
    return (not journal.exists() and not (repo / "runs/a").exists()
            and git(repo, "log", "-1", "--format=%s").strip() == "taskrun: prune 1 finished Task (older than 1m)")


@pytest.mark.slow
def test_a_prune_a_kill_interrupted_is_finished_by_the_next_daemon(daemon: Daemon, repo: Path) -> None:
    journal = _interrupted(repo)
    daemon.start()
    wait_until(lambda: _finished(repo, journal), 20, "the interrupted prune to be finished and committed")
    assert not any(f.startswith(("runs/a/", "tasks/a.md")) for f in head_files(repo)) and committed(repo, "b")
    assert "a" not in status_ids(repo) and git(repo, "status", "--porcelain", "--", "runs", "tasks") == ""
    assert "finishing a prune an earlier daemon began" in daemon.output()


def test_a_prune_a_kill_interrupted_is_finished_by_the_next_prune(repo: Path) -> None:
    journal = _interrupted(repo)
    prune(repo, "--older-than", "1ms", "--dry-run")
    assert journal.exists() and not (repo / "tasks/a.md").exists()  # a dry run changes nothing
    done = prune(repo, "--older-than", "30d")
    assert done["pruned"] == [] and _finished(repo, journal)
    assert not any(f.startswith(("runs/a/", "tasks/a.md")) for f in head_files(repo)) and committed(repo, "b")
    assert git(repo, "status", "--porcelain", "--", "runs", "tasks") == ""


@pytest.mark.slow
def test_a_prune_that_waited_is_logged_as_the_users_prune_once_committed(daemon: Daemon, repo: Path) -> None:
    write_task(repo, "done", "echo done")
    run_once(repo, "done")
    daemon.start()
    (repo / ".git" / "rebase-merge").mkdir()  # a rebase in progress: the prune's commit waits for it
    waited = prune(repo, "--older-than", "1ms")
    assert [p["task"] for p in waited["pruned"]] == ["done"] and waited["waiting"]
    (repo / ".git" / "rebase-merge").rmdir()
    wait_until(lambda: "taskrun prune: pruned 1 finished Task(s)" in daemon.output(), 60, "the prune's commit")
    assert "records.prune_after" not in daemon.output()  # off here: it never named this prune
