"""What `taskrun prune` prints (--json on every path, the --dry-run table), what the commands taking a Task
id say of a pruned Task, and the daemon's metrics after a prune (issue 14, item 6). Real CLI, daemon, git."""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import pytest

from taskrunner.gitops import state_dir
from tests.conftest import Daemon, git, taskrun, wait_status, wait_until, write_task
from tests.integration.test_metrics_prometheus import enable_metrics, free_port
from tests.integration.test_prune import prune, run_once
from tests.unit.test_metrics import scrape


def refused_as_json(root: Path, *args: str) -> dict[str, object]:
    """`taskrun prune --json ARGS` that fails: exit 2, one JSON document on stdout and nothing else."""
    result = taskrun(root, "prune", "--json", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and isinstance(document["error"], str) and document["error"]
    assert result.stderr == ""
    return document  # type: ignore[no-any-return]


def no_commits(root: Path) -> None:
    config = root / ".taskrun.yaml"
    text = config.read_text()
    assert "\n  commit: true\n" in text
    config.write_text(text.replace("\n  commit: true\n", "\n  commit: false\n"))


@pytest.mark.slow
def test_prune_json_prints_one_json_document_on_every_path_without_a_daemon(repo: Path, tmp_path: Path) -> None:
    nothing = prune(repo, "--older-than", "1ms")
    assert nothing["ok"] is True and nothing["pruned"] == [] and nothing["daemon"] is False
    assert "--older-than: expected a duration" in str(refused_as_json(repo, "--older-than", "a while")["error"])
    assert "required" in str(refused_as_json(repo)["error"])
    assert "unrecognized arguments: --bogus" in str(refused_as_json(repo, "--older-than", "1d", "--bogus")["error"])
    assert "unrecognized arguments" in str(refused_as_json(repo, "--j", "--bogus")["error"])  # as argparse takes it
    elsewhere = tmp_path / "not-a-repository"
    elsewhere.mkdir()
    assert "not inside a git repository" in str(refused_as_json(elsewhere, "--older-than", "1d")["error"])

    no_commits(repo)
    off = refused_as_json(repo, "--older-than", "1ms")
    assert off["daemon"] is False and str(off["error"]).startswith("git.commit is off")
    assert prune(repo, "--older-than", "1ms", "--dry-run")["dry_run"] is True  # a dry run commits nothing

    lock = os.open(state_dir(repo) / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a daemon starting up holds it
        (repo / ".taskrun.yaml").write_text((repo / ".taskrun.yaml").read_text().replace(
            "\n  commit: false\n", "\n  commit: true\n"))
        busy = refused_as_json(repo, "--older-than", "1ms")
        assert "a taskrun daemon is starting or running" in str(busy["error"])
    finally:
        os.close(lock)
    text = taskrun(repo, "prune", "--older-than", "a while")  # without --json: text on stderr, as before
    assert text.returncode == 2 and text.stdout == "" and "taskrun: --older-than" in text.stderr


@pytest.mark.slow
def test_commands_taking_a_task_id_say_that_a_task_was_pruned_when_and_how_to_see_it(repo: Path) -> None:
    for task_id in ("a", "ci/a-much-longer-id"):
        write_task(repo, task_id, f"echo {task_id}")
    run_once(repo, "a", "ci/a-much-longer-id")

    table = taskrun(repo, "prune", "--older-than", "1ms", "--dry-run")
    assert table.returncode == 0, table.stderr
    header, first, second = table.stdout.splitlines()[:3]
    assert header.split() == ["TASK", "STATUS", "FINISHED", "SIZE"]
    assert first.startswith("a ") and second.startswith("ci/a-much-longer-id ")
    assert header.index("STATUS") == first.index("COMPLETED") == second.index("COMPLETED")

    done = prune(repo, "--older-than", "1ms", "a")
    short = str(done["commit"])[:12]
    for command in (["logs", "a"], ["logs", "a", "--run", "1"], ["logs", "a", "--json"], ["status", "a"],
                    ["history", "a"], ["wait", "a", "--timeout", "5"]):
        result = taskrun(repo, *command)
        assert result.returncode == 2 and result.stdout == "", (command, result.stdout)
        said = result.stderr.replace("\n", " ")
        assert re.search(rf"'a' was pruned in commit {short} on \d{{4}}-\d\d-\d\d \d\d:\d\d", said), (command, said)
        assert f"git show {short}^:runs/a/status.json" in said and "git log -- runs/a" in said, said
        assert f"git checkout {short}^ -- runs/a tasks/a.md" in said, said
    assert git(repo, "show", f"{short}^:runs/a/status.json")  # what it says works
    assert "no Task 'never' has a record" in taskrun(repo, "logs", "never").stderr
    assert taskrun(repo, "logs", "ci/a-much-longer-id").returncode == 0  # not pruned: its output, as before
    odd = taskrun(repo, "logs", "--", "--format=%H")  # no Task id: git is not asked, the id not taken as an option
    assert odd.returncode == 2 and "no Task '--format=%H' has a record" in odd.stderr


@pytest.mark.slow
def test_with_a_daemon_a_pruned_task_leaves_the_metrics_and_cancel_and_retry_say_it_was_pruned(
        daemon: Daemon, repo: Path) -> None:
    port = free_port()
    enable_metrics(repo, port)
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "user: metrics on")
    daemon.start()
    for task_id in ("gone", "kept"):
        write_task(repo, task_id, f"echo {task_id}")
    for task_id in ("gone", "kept"):
        wait_status(repo, task_id, "COMPLETED")
    git(repo, "add", "tasks")
    git(repo, "commit", "--quiet", "-m", "user: the Task files")

    def completed() -> float:
        return scrape(port).get(("taskrun_tasks", (("status", "COMPLETED"),)), -1.0)

    wait_until(lambda: completed() == 2, 20, "both Tasks counted COMPLETED")
    done = wait_until(lambda: (d := prune(repo, "--older-than", "1ms", "gone"))["pruned"] and d, 30,
                      "'gone' to be pruned (its records committed first)")
    assert done["daemon"] is True and done["commit"]
    wait_until(lambda: completed() == 1, 20, "the pruned Task to leave taskrun_tasks")
    assert sum(v for (name, _), v in scrape(port).items() if name == "taskrun_tasks") == 1
    for command in ("retry", "cancel"):
        result = taskrun(repo, command, "gone")
        assert result.returncode == 2 and f"'gone' was pruned in commit {str(done['commit'])[:12]}" in result.stderr
    assert "no Task 'never'" in taskrun(repo, "retry", "never").stderr


@pytest.mark.slow
def test_with_a_daemon_a_refused_prune_is_json_too(daemon: Daemon, repo: Path) -> None:
    no_commits(repo)
    daemon.start()
    refused = refused_as_json(repo, "--older-than", "1ms")
    assert refused["daemon"] is True and str(refused["error"]).startswith("git.commit is off")
    dry = prune(repo, "--older-than", "1ms", "--dry-run")
    assert dry["daemon"] is True and dry["pruned"] == []
