"""Event hooks: how the engine tells the outside world what happened.

Every method is a no-op by default; the CLI's live view, a notifier or a
metrics exporter override what they need. A hook that raises is logged and
ignored: side effects never stop the daemon.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskrunner.state import RunState, TaskState

log = logging.getLogger("taskrun")


class Hooks:
    def task_changed(self, task: TaskState) -> None:
        """A Task's status, revision or waiting reason changed."""

    def run_changed(self, run: RunState) -> None:
        """A Run changed status."""

    def run_output(self, run: RunState, data: bytes) -> None:
        """New output of a Run was recorded."""

    def worker_changed(self, worker: dict[str, Any]) -> None:
        """A Worker came online, went offline or changed its load."""

    def committed(self, commit: str, summary: str) -> None:
        """Records were committed to git."""

    def notice(self, message: str) -> None:
        """Something a person should know that is not a status (a refused config, a git error)."""


def emit(hooks: Hooks, name: str, *args: Any) -> None:
    try:
        getattr(hooks, name)(*args)
    except Exception:  # a hook must never take the daemon down
        log.exception("hook %s failed", name)
