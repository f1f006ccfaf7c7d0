"""`taskrun cancel` and `retry` as the engine answers them (engine.py), without a daemon or a Worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

from taskrunner.config import parse_config
from taskrunner.engine import Engine
from taskrunner.fleet import Fleet
from taskrunner.keys import Keyring
from taskrunner.model import TaskStatus


def _engine(root: Path) -> Engine:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    config = parse_config("workers: {local: {transport: local, sandbox: none}}\n", ".taskrun.yaml")
    keyring, _ = Keyring.ensure(root / ".git" / "taskrun", 0.0)
    fleet = Fleet(config, root / ".git" / "taskrun", lambda event: None, keyring)
    return Engine(root, config, fleet, commit=lambda item: None, clock=lambda: 1000.0)


def test_a_task_cancelled_while_invalid_is_not_retried_into_waiting_for_no_agent(tmp_path: Path) -> None:
    """Cancelled while INVALID, a Task has no file that can run: `retry` says to fix the file instead of
    putting it PENDING for an Agent named '' forever; once the file is fixed it runs again by itself."""
    engine = _engine(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "bad.md").write_text("---\npriority: urgent\n---\n# Bad\n\n```sh\ntrue\n```\n")
    engine.task_file_changed("tasks/bad.md")
    task = engine.tasks["bad"]
    assert task.status is TaskStatus.INVALID
    assert engine.cancel("bad")["ok"] and task.status is TaskStatus.CANCELLED
    reply = engine.retry("bad")
    assert reply == {"ok": False, "error": "'bad' has no valid Task file to run: fix tasks/bad.md, and it runs "
                                           "again by itself"}
    assert task.status is TaskStatus.CANCELLED
    (tmp_path / "tasks" / "bad.md").write_text("# Bad, fixed\n\n```sh\ntrue\n```\n")
    engine.task_file_changed("tasks/bad.md")
    assert task.status is TaskStatus.PENDING and task.spec is not None and task.spec.title == "Bad, fixed"
