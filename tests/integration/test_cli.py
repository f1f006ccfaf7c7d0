"""The `taskrun` commands as a user or CI calls them."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from taskrunner import __version__
from tests.conftest import Daemon, git, taskrun, write_task


def _task_file(tmp_path: Path, name: str, script: str) -> Path:
    path = tmp_path / name
    path.write_text(f"# {name}\n\n```sh\n{script}\n```\n")
    return path


def test_init_creates_the_layout_and_a_private_untracked_key(tmp_path: Path) -> None:
    root = tmp_path / "fresh"

    first = taskrun(root, "init")

    assert first.returncode == 0, first.stderr
    for name in (".taskrun.yaml", "tasks", "runs", "hooks/post-merge", "hooks/post-receive"):
        assert (root / name).exists(), name
    key = root / ".git/taskrun/keys/1.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    git(root, "add", "-A")
    assert not any(line.endswith(".pem") for line in git(root, "ls-files").splitlines())
    config_before = (root / ".taskrun.yaml").read_text()
    key_before = key.read_bytes()

    second = taskrun(root, "init")

    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert (root / ".taskrun.yaml").read_text() == config_before
    assert key.read_bytes() == key_before


def test_init_config_works_at_once_with_the_local_worker(repo: Path) -> None:
    write_task(repo, "first", "echo it works")
    assert taskrun(repo, "up", "--once").returncode == 0


def test_invalid_configuration_refuses_to_start_naming_file_and_key(repo: Path) -> None:
    (repo / ".taskrun.yaml").write_text("workers:\n  local: {transport: local, slots: zero}\n")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 2
    assert ".taskrun.yaml" in result.stderr and "workers.local.slots" in result.stderr


def test_up_outside_a_git_repository_says_what_to_do(tmp_path: Path) -> None:
    result = taskrun(tmp_path, "up", "--once")

    assert result.returncode == 2 and "taskrun init" in result.stderr


def test_submit_wait_exits_zero_when_all_complete(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    files = [_task_file(tmp_path, "ci-a.md", "echo a"), _task_file(tmp_path, "ci-b.md", "echo b")]

    result = taskrun(daemon.root, "submit", *map(str, files), "--wait", "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert {t["task_id"]: t["status"] for t in data["tasks"]} == {"ci-a": "COMPLETED", "ci-b": "COMPLETED"}


def test_submit_wait_exits_one_when_a_task_fails(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    files = [_task_file(tmp_path, "ci-ok.md", "true"), _task_file(tmp_path, "ci-bad.md", "exit 4")]

    result = taskrun(daemon.root, "submit", *map(str, files), "--wait")

    assert result.returncode == 1
    assert "ci-bad FAILED" in result.stdout


def test_submit_wait_exits_three_on_timeout(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    slow = _task_file(tmp_path, "ci-slow.md", "sleep 300")

    result = taskrun(daemon.root, "submit", str(slow), "--wait", "--timeout", "1", "--json")

    assert result.returncode == 3
    assert json.loads(result.stdout)["timed_out"] is True


def test_submit_wait_without_a_daemon_says_so(repo: Path, tmp_path: Path) -> None:
    result = taskrun(repo, "submit", str(_task_file(tmp_path, "x.md", "true")), "--wait")

    assert result.returncode == 2 and "taskrun up" in result.stderr


def test_submit_refuses_a_file_name_that_is_not_a_task_id(repo: Path, tmp_path: Path) -> None:
    result = taskrun(repo, "submit", str(_task_file(tmp_path, "Bad Name.md", "true")))

    assert result.returncode == 2 and not list((repo / "tasks").glob("*.md"))


def test_status_and_logs_read_the_records(repo: Path) -> None:
    write_task(repo, "shown", "echo visible")
    taskrun(repo, "up", "--once")

    listing = json.loads(taskrun(repo, "status", "--json").stdout)
    one = json.loads(taskrun(repo, "status", "shown", "--json").stdout)
    logs = taskrun(repo, "logs", "shown")
    human = taskrun(repo, "status")

    assert [t["task_id"] for t in listing["tasks"]] == ["shown"]
    assert one["task"]["status"] == "COMPLETED" and one["runs"][0]["exit_code"] == 0
    assert logs.stdout == "visible\n"
    assert "shown" in human.stdout and "COMPLETED" in human.stdout


def test_status_of_an_unknown_task_is_a_usage_error(repo: Path) -> None:
    result = taskrun(repo, "status", "ghost")
    assert result.returncode == 2 and "ghost" in result.stderr


def test_cancel_without_a_daemon_says_so_plainly(repo: Path) -> None:
    result = taskrun(repo, "cancel", "anything")
    assert result.returncode == 2 and "no taskrun daemon is running" in result.stderr


def test_workers_without_a_daemon_lists_the_configured_workers(repo: Path) -> None:
    data = json.loads(taskrun(repo, "workers", "--json").stdout)
    assert data["daemon"] is False and [w["name"] for w in data["workers"]] == ["local"]


def test_workers_into_a_pipe_shows_every_column_whole_with_the_version(daemon: Daemon) -> None:
    config = daemon.root / ".taskrun.yaml"
    labels = "    labels: {zone: eu-west-rather-long-zone-name, rack: r42-with-a-long-name-too}\n"
    config.write_text(config.read_text().replace("    agents: [shell]\n", "    agents: [shell]\n" + labels, 1))
    before = taskrun(daemon.root, "workers")
    daemon.start()

    after = taskrun(daemon.root, "workers")

    for shown, version in ((before, "-"), (after, __version__)):
        assert shown.returncode == 0, shown.stderr
        assert "…" not in shown.stdout, shown.stdout
        header, row = shown.stdout.splitlines()[:2]
        assert header.split()[:5] == ["WORKER", "TRANSPORT", "REACHABLE", "TRUSTED", "VERSION"], shown.stdout
        assert row.split()[4] == version, shown.stdout
        assert "rack=r42-with-a-long-name-too,zone=eu-west-rather-long-zone-name" in row or \
            "zone=eu-west-rather-long-zone-name,rack=r42-with-a-long-name-too" in row, shown.stdout
    assert after.stdout.splitlines()[1].split()[2] == "yes"


def test_demo_runs_the_tour_on_a_fresh_machine() -> None:
    result = taskrun(Path("/"), "demo", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    for status in ("COMPLETED", "FAILED", "BLOCKED", "INVALID"):
        assert status in result.stdout
    assert "taskrun: record" in result.stdout
    # The whole loop: pushed to a bare origin, the hook told the daemon, the Agent's change is on
    # origin's result branch, and the records are on origin's main.
    assert "post-receive hook told the daemon" in result.stdout
    base = Path(re.search(r"^In (\S+): origin.git", result.stdout, re.M).group(1))  # type: ignore[union-attr]
    origin = base / "origin.git"
    change = git(origin, "diff", "taskrun/greeting~1", "taskrun/greeting", "--", "README.md")
    assert "+Hello from an Agent, in a checkout of" in change
    assert "Task-Id: greeting" in git(origin, "log", "-1", "--format=%B", "taskrun/greeting")
    on_main = git(origin, "ls-tree", "-r", "--name-only", "main", "runs/greeting")
    assert "runs/greeting/status.json" in on_main and "runs/greeting/run-1/summary.md" in on_main
    # Into a pipe the console is as wide as a table needs; a rule stays a line's width.
    assert max(len(line) for line in result.stdout.splitlines()) < 500


def test_a_plain_taskrun_up_says_when_it_stops(daemon: Daemon) -> None:
    daemon.start()
    assert daemon.stop() == 0
    assert f"taskrun daemon in {daemon.root} stopped (exit 0)" in daemon.log.read_text()


def test_logs_of_an_invalid_task_say_why_it_has_no_runs_and_what_to_do(repo: Path) -> None:
    (repo / "tasks" / "typo.md").write_text("---\nagnet: shell\n---\n# typo\n\n```sh\necho hi\n```\n")
    taskrun(repo, "up", "--once")

    result = taskrun(repo, "logs", "typo")

    assert result.returncode == 2 and "'typo' is INVALID and has no Runs" in result.stderr, result.stderr
    assert "agnet" in result.stderr and "fix its file" in result.stderr


def test_status_with_a_daemon_running_and_no_task_does_not_say_to_start_one(daemon: Daemon) -> None:
    daemon.start()
    result = taskrun(daemon.root, "status")
    assert "No Tasks yet: add a file to tasks/." in result.stdout and "start `taskrun up`" not in result.stdout
