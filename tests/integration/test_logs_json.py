"""`taskrun up --log-format json`: a real daemon whose stdout is JSON lines, with no secret in them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import git, taskrun, wait_status, wait_until, write_task

TOKEN = "ghp_" + "Tk4" * 12
FIELDS = {"time", "level", "event", "message"}


def start(repo: Path, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(repo), "up", "--log-format", "json",
                                 *args], stdout=stdout, stderr=stderr)
    return proc, out, err


def json_lines(path: Path) -> list[dict[str, Any]]:
    got = []
    for line in path.read_text().splitlines():
        item = json.loads(line)  # every line of stdout is one JSON object
        assert isinstance(item, dict) and FIELDS <= set(item), line
        got.append(item)
    return got


@pytest.mark.slow
def test_every_stdout_line_is_json_and_a_failing_task_says_so(repo: Path, tmp_path: Path) -> None:
    write_task(repo, "fine", "echo fine")
    write_task(repo, "broken", f"echo 'pushing with token={TOKEN}'\necho {TOKEN} >&2\nexit 3")
    git(repo, "add", "tasks")
    git(repo, "commit", "--quiet", "-m", "tasks")
    proc, out, err = start(repo, tmp_path, "--output")
    try:
        wait_status(repo, "fine", "COMPLETED", timeout=60)
        wait_status(repo, "broken", "FAILED", timeout=60)

        def logged_failure() -> bool:
            return any(i["event"] == "task_status" and i.get("status") == "FAILED" for i in json_lines(out))

        wait_until(logged_failure, 30, "the failure in the log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = json_lines(out)
    assert lines[0]["event"] == "daemon_started" and lines[-1]["event"] == "daemon_stopped"
    failed = [i for i in lines if i["event"] == "task_status" and i.get("status") == "FAILED"]
    assert len(failed) == 1
    assert failed[0]["level"] == "ERROR" and failed[0]["task_id"] == "broken"
    assert failed[0]["worker"] == "local" and failed[0]["run_id"] and failed[0]["agent"]
    done = [i for i in lines if i["event"] == "task_status" and i.get("status") == "COMPLETED"]
    assert [(i["task_id"], i["level"]) for i in done] == [("fine", "INFO")]
    assert any(i["event"] == "committed" for i in lines)
    output = [i["message"] for i in lines if i["event"] == "run_output" and i["task_id"] == "broken"]
    assert "pushing with token=[redacted]" in output
    assert TOKEN not in out.read_text() and TOKEN not in err.read_text()
    assert TOKEN in taskrun(repo, "logs", "broken").stdout  # the record itself is the Agent's output, as printed


@pytest.mark.slow
def test_log_level_warning_leaves_out_what_went_well(repo: Path, tmp_path: Path) -> None:
    write_task(repo, "fine", "echo fine")
    write_task(repo, "broken", "exit 4")
    git(repo, "add", "tasks")
    git(repo, "commit", "--quiet", "-m", "tasks")
    proc, out, _ = start(repo, tmp_path, "--once", "--log-level", "warning")
    assert proc.wait(timeout=120) == 1
    lines = json_lines(out)
    assert lines and all(i["level"] in ("WARNING", "ERROR") for i in lines)
    assert any(i["event"] == "task_status" and i["task_id"] == "broken" for i in lines)
