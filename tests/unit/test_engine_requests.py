"""`taskrun cancel` and `retry` as the engine answers them (engine.py), without a daemon or a Worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

from taskrunner.config import parse_config
from taskrunner.engine import Engine
from taskrunner.fleet import Fleet
from taskrunner.hooks import Hooks
from taskrunner.keys import Keyring
from taskrunner.model import TaskStatus


class _Notices(Hooks):
    def __init__(self) -> None:
        self.said: list[str] = []

    def notice(self, message: str) -> None:
        self.said.append(message)


def _engine(root: Path, hooks: Hooks | None = None) -> Engine:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    config = parse_config("workers: {local: {transport: local, sandbox: none}}\n", ".taskrun.yaml")
    keyring, _ = Keyring.ensure(root / ".git" / "taskrun", 0.0)
    fleet = Fleet(config, root / ".git" / "taskrun", lambda event: None, keyring)
    return Engine(root, config, fleet, commit=lambda item: None, hooks=hooks or Hooks(), clock=lambda: 1000.0)


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


def test_a_file_whose_name_is_no_task_id_is_said_once_with_the_name_to_give_it(tmp_path: Path) -> None:
    notices = _Notices()
    engine = _engine(tmp_path, notices)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "My Task.md").write_text("# Mine\n")
    for _ in range(3):  # a scan after each change: said the first time only
        engine.scan()
    assert notices.said == ["ignoring tasks/My Task.md: a Task file's name is its id, [a-z0-9][a-z0-9._/-]* "
                            "(lower case, no spaces), then .md; rename it, e.g. to tasks/my-task.md"]
    assert engine.tasks == {}
