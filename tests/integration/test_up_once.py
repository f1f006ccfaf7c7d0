"""`taskrun up --once` on a fresh repository: statuses, records, logs and commits."""

from __future__ import annotations

import json
from pathlib import Path

from tests.agentprobes import Counter, marker, processes_named
from tests.conftest import git, wait_until, run_record, status_of, task_record, taskrun, write_task


def _commits(root: Path) -> list[str]:
    return git(root, "log", "--format=%B%x00").split("\x00")


def test_up_once_brings_every_task_to_its_final_status(repo: Path) -> None:
    write_task(repo, "base", "echo base-output")
    write_task(repo, "child", "echo child-output", front="depends_on: [base]\n")
    write_task(repo, "failing", "echo about to fail\nexit 2")
    write_task(repo, "after-failing", "echo never", front="depends_on: [failing]\n")
    (repo / "tasks" / "broken.md").write_text("---\npriority: urgent\n---\n# Broken\n")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 1, result.stdout + result.stderr
    assert status_of(repo, "base") == "COMPLETED"
    assert status_of(repo, "child") == "COMPLETED"
    assert status_of(repo, "failing") == "FAILED"
    assert status_of(repo, "after-failing") == "BLOCKED"
    assert status_of(repo, "broken") == "INVALID"
    base_run, child_run = run_record(repo, "base", 1), run_record(repo, "child", 1)
    assert base_run and child_run
    assert child_run["started_at"] >= base_run["finished_at"]
    assert (repo / "runs/base/run-1/output.log").read_text() == "base-output\n"
    failing = run_record(repo, "failing", 1)
    assert failing and failing["exit_code"] == 2 and "code 2" in failing["error"]


def test_up_once_exits_zero_when_every_task_completes(repo: Path) -> None:
    write_task(repo, "one", "true")
    write_task(repo, "two", "true", front="depends_on: [one]\n")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 0, result.stdout + result.stderr
    assert status_of(repo, "two") == "COMPLETED"


def test_invalid_task_record_names_the_file_key_and_reason(repo: Path) -> None:
    (repo / "tasks" / "bad-type.md").write_text("---\nretries: many\n---\n# Bad\n\n```sh\ntrue\n```\n")
    (repo / "tasks" / "unknown-key.md").write_text("---\ncolour: blue\n---\n# Unknown\n")
    (repo / "tasks" / "broken-yaml.md").write_text("---\nagent: [shell\n---\n# YAML\n")
    (repo / "tasks" / "empty.md").write_text("")
    (repo / "tasks" / "binary.md").write_bytes(b"\x00\x01\x02binary")
    (repo / "tasks" / "huge.md").write_text("# Huge\n" + "x" * 400_000)
    write_task(repo, "fine", "echo still-served")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 1
    assert status_of(repo, "fine") == "COMPLETED"
    errors = {t: (task_record(repo, t) or {}).get("error") or "" for t in
              ("bad-type", "unknown-key", "broken-yaml", "empty", "binary", "huge")}
    assert all(status_of(repo, t) == "INVALID" for t in errors)
    assert "tasks/bad-type.md" in errors["bad-type"] and "'retries'" in errors["bad-type"]
    assert "'colour'" in errors["unknown-key"]
    assert "line" in errors["broken-yaml"]
    assert "empty" in errors["empty"]
    assert "binary" in errors["binary"] or "UTF-8" in errors["binary"]
    assert "limit" in errors["huge"]


def test_dependency_cycle_makes_the_tasks_invalid(repo: Path) -> None:
    write_task(repo, "a", "true", front="depends_on: [b]\n")
    write_task(repo, "b", "true", front="depends_on: [a]\n")
    write_task(repo, "c", "true")

    taskrun(repo, "up", "--once")

    for task_id in ("a", "b"):
        record = task_record(repo, task_id)
        assert record and record["status"] == "INVALID"
        assert "cycle" in record["error"] and "depends_on" in record["error"]
    assert status_of(repo, "c") == "COMPLETED"


def test_finished_runs_are_committed_with_trailers_and_nothing_left_over(repo: Path) -> None:
    write_task(repo, "ok", "echo fine")
    write_task(repo, "bad", "exit 1")

    taskrun(repo, "up", "--once")

    assert git(repo, "status", "--porcelain", "runs") == ""
    messages = "\n".join(_commits(repo))
    for trailer in ("Task-Id: ok", "Task-Id: bad", "Worker: local", "Agent: shell",
                    "Status: COMPLETED", "Status: FAILED"):
        assert trailer in messages
    run_id = (run_record(repo, "ok", 1) or {})["run_id"]
    assert f"Run-Id: {run_id}" in messages
    tracked = git(repo, "ls-files", "runs/ok").split()
    assert {"runs/ok/status.json", "runs/ok/run-1/status.json", "runs/ok/run-1/output.log",
            "runs/ok/run-1/manifest.json"} <= set(tracked)


def test_runs_finishing_together_share_one_commit(repo: Path) -> None:
    for n in range(4):
        write_task(repo, f"quick-{n}", "true")
    before = len(git(repo, "rev-list", "HEAD").split())

    taskrun(repo, "up", "--once")

    after = len(git(repo, "rev-list", "HEAD").split())
    assert 1 <= after - before < 4


def test_users_staged_and_unstaged_work_is_left_exactly_as_it_was(repo: Path) -> None:
    (repo / "README.md").write_text("staged change\n")
    git(repo, "add", "README.md")
    (repo / "README.md").write_text("staged change\nplus an unstaged one\n")
    (repo / "notes.txt").write_text("untracked\n")
    staged, unstaged = git(repo, "diff", "--cached"), git(repo, "diff")
    write_task(repo, "work", "echo working")

    assert taskrun(repo, "up", "--once").returncode == 0

    assert git(repo, "diff", "--cached") == staged
    assert git(repo, "diff") == unstaged
    lines = sorted(git(repo, "status", "--porcelain").splitlines())
    # Only the user's own changes and the (untracked, user-written) task file remain.
    assert lines == ["?? notes.txt", "?? tasks/work.md", "MM README.md"]
    assert "runs/work/status.json" in git(repo, "ls-files")


def test_run_record_holds_the_documented_fields(repo: Path) -> None:
    write_task(repo, "fields", "echo x")
    taskrun(repo, "up", "--once")

    run = run_record(repo, "fields", 1)
    assert run is not None
    for key in ("run_id", "task_id", "revision", "attempt", "status", "worker", "agent", "backend_used",
                "created_at", "started_at", "finished_at", "exit_code", "error"):
        assert key in run
    manifest = json.loads((repo / "runs/fields/run-1/manifest.json").read_text())
    assert manifest["task_id"] == "fields" and manifest["files"][0]["path"] == "tasks/fields.md"
    task = task_record(repo, "fields")
    assert task and task["revision"] == run["revision"] and len(task["revision"]) == 64


def test_failed_run_is_retried_after_backoff(repo: Path, counter: Counter) -> None:
    config = repo / ".taskrun.yaml"
    config.write_text(config.read_text().replace("base: 5s", "base: 100ms"))
    # Confined Runs share no file: the counter tells the Agent which time it runs.
    write_task(repo, "flaky", f'{counter.read}\nif [ "$n" -gt 1 ]; then echo second; else exit 1; fi',
               front="retries: 1\n")

    assert taskrun(repo, "up", "--once").returncode == 0

    record = task_record(repo, "flaky")
    assert record and record["status"] == "COMPLETED" and len(record["runs"]) == 2
    first, second = run_record(repo, "flaky", 1), run_record(repo, "flaky", 2)
    assert first and second and first["status"] == "FAILED" and second["attempt"] == 2
    assert second["created_at"] >= first["finished_at"] + 0.05


def test_timeout_kills_the_whole_process_group(repo: Path) -> None:
    name = marker()  # the background child's $! is no host pid inside the Run's PID namespace
    write_task(repo, "slow", f"(exec -a {name} sleep 300) &\nsleep 300", front="timeout: 1s\n")

    taskrun(repo, "up", "--once")

    run = run_record(repo, "slow", 1)
    assert run and run["status"] == "FAILED" and "timed out" in run["error"]
    wait_until(lambda: not processes_named(name), 10, "the background process of the timed-out Run to end")


def test_context_files_reach_the_agent(repo: Path) -> None:
    (repo / "docs").mkdir()
    (repo / "docs" / "spec.txt").write_text("the spec\n")
    git(repo, "add", "docs/spec.txt")  # context files are sent only if git tracks them
    write_task(repo, "ctx", "cat docs/spec.txt", front="context: [docs/spec.txt]\n")

    taskrun(repo, "up", "--once")

    assert (repo / "runs/ctx/run-1/output.log").read_text() == "the spec\n"
