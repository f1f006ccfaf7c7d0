"""The real daemon and CLI where a first setup of Agents trips: a Task read before the configuration naming
its Agent, a Run that failed before any output, and where the local Worker's home is."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import (
    Daemon,
    local_worker_home,
    run_record,
    task_record,
    taskrun,
    wait_status,
    wait_until,
    write_task,
)

CONFIG = """\
default_agent: shell
agents:
  shell: {{preset: shell}}
{agents}workers:
  local: {{transport: local, slots: 2, agents: [{offered}]}}
"""


def _configure(root: Path, agents: str = "", offered: str = "shell") -> None:
    path = root / ".taskrun.yaml"
    tmp = root / ".taskrun.yaml.tmp"
    tmp.write_text(CONFIG.format(agents=agents, offered=offered))
    os.replace(tmp, path)


def test_a_task_naming_an_agent_the_configuration_gains_later_runs_after_the_reload(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "early", "echo ran", front="agent: builder\n")
    invalid = wait_status(daemon.root, "early", "INVALID")
    assert "unknown Agent 'builder'" in invalid["error"]

    _configure(daemon.root, "  builder: {preset: shell}\n", "shell, builder")

    wait_status(daemon.root, "early", "COMPLETED")
    assert (daemon.root / "runs" / "early" / "run-1" / "output.log").read_text() == "ran\n"
    assert (run_record(daemon.root, "early", 1) or {})["agent"] == "builder"


def test_a_task_still_invalid_after_a_reload_says_the_new_reason(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "still", "true", front="agent: nobody\n")
    wait_status(daemon.root, "still", "INVALID")

    _configure(daemon.root, "  other: {preset: shell}\n", "shell, other")

    record = wait_until(lambda: (r := task_record(daemon.root, "still")) and "other" in (r.get("error") or "") and r,
                        30, "the error to name the Agents the new configuration has")
    assert record["status"] == "INVALID" and "unknown Agent 'nobody' (configured: other, shell)" in record["error"]


def test_logs_of_a_run_that_failed_before_any_output_say_so_and_exit_0(daemon: Daemon) -> None:
    # Loads (the trial rendering sets a budget), fails at the Run (this Run has none): no output at all.
    _configure(daemon.root, "  templ:\n    preset: command\n    command: [cat, '{prompt_file}']\n"
                            "    prompt_template: '{{ budget.max_cost_usd * 2 }}'\n", "shell, templ")
    daemon.start()
    (daemon.root / "tasks" / "tmpl.md").write_text("---\nagent: templ\nretries: 0\n---\n# Templ\n\nDo it.\n")
    record = wait_status(daemon.root, "tmpl", "FAILED")
    run = run_record(daemon.root, "tmpl", 1) or {}
    assert run["status"] == "FAILED" and run["error"]
    assert not (daemon.root / "runs" / "tmpl" / "run-1" / "output.log").exists()

    logs = taskrun(daemon.root, "logs", "tmpl", "--run", "1")
    status = taskrun(daemon.root, "status", "tmpl")
    latest = taskrun(daemon.root, "logs", "tmpl")

    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == ""
    assert logs.stderr.strip() == f"Run 1 of 'tmpl' has no output (FAILED: {run['error']})"
    assert latest.returncode == 0 and "has no output (FAILED" in latest.stderr
    assert "taskrun logs tmpl" not in status.stdout
    assert "Run 1 of 'tmpl' has no output (FAILED:" in " ".join(status.stdout.split())
    assert record["status"] == "FAILED"
    missing = taskrun(daemon.root, "logs", "tmpl", "--run", "7")
    assert missing.returncode == 2 and "'tmpl' has no Run 7; its Runs: 1" in missing.stderr


def test_submit_wait_json_gives_no_output_path_for_a_run_without_output(daemon: Daemon) -> None:
    _configure(daemon.root, "  templ:\n    preset: command\n    command: [cat, '{prompt_file}']\n"
                            "    prompt_template: '{{ budget.max_cost_usd * 2 }}'\n", "shell, templ")
    daemon.start()
    task = daemon.root / "ci.md"
    task.write_text("---\nagent: templ\nretries: 0\n---\n# CI\n\nDo it.\n")

    result = taskrun(daemon.root, "submit", str(task), "--wait", "--json", "--timeout", "60")

    (entry,) = json.loads(result.stdout)["tasks"]
    assert entry["status"] == "FAILED" and entry["run"]["status"] == "FAILED"
    assert entry["run"]["output"] is None


def test_workers_json_gives_the_local_workers_home(repo: Path) -> None:
    result = taskrun(repo, "workers", "--json")

    assert result.returncode == 0, result.stderr
    (local,) = json.loads(result.stdout)["workers"]
    assert local["home"] == str(local_worker_home(repo))


def test_workers_json_from_the_daemon_gives_the_local_workers_home(daemon: Daemon) -> None:
    daemon.start()

    (local,) = json.loads(taskrun(daemon.root, "workers", "--json").stdout)["workers"]

    assert local["home"] == str(local_worker_home(daemon.root))
    assert (Path(local["home"]) / "serve.log").exists()
