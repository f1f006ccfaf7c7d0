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

    def task_removed(self, task: TaskState) -> None:
        """A Task left the daemon for good (pruned: pruner.py): whatever is kept per Task drops it."""

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

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        """An operational event for metrics, logs and notifications (never a secret in `fields`).

        kind and fields:
          "push"             {"ok": bool, "error": str | None}
          "rejected"         {"what": "bundle" | "result", "reason": a short fixed word, "worker": str}
          "usage_limited"    {"agent": str, "worker": str | None (None: everywhere), "until": epoch s}
          "worker_untrusted" {"worker": str, "reason": str}
        """


def emit(hooks: Hooks, name: str, *args: Any) -> None:
    try:
        getattr(hooks, name)(*args)
    except Exception:  # a hook must never take the daemon down
        log.exception("hook %s failed", name)


class HookSet(Hooks):
    """Several Hooks as one (the live view, the metrics, the notifier, the log): each event goes to each
    in order, and one that raises is logged (`emit`) while the others still get the event."""

    def __init__(self, *hooks: Hooks) -> None:
        self.hooks = list(hooks)

    def add(self, hook: Hooks) -> None:
        self.hooks.append(hook)

    def task_changed(self, task: TaskState) -> None:
        self._each("task_changed", task)

    def task_removed(self, task: TaskState) -> None:
        self._each("task_removed", task)

    def run_changed(self, run: RunState) -> None:
        self._each("run_changed", run)

    def run_output(self, run: RunState, data: bytes) -> None:
        self._each("run_output", run, data)

    def worker_changed(self, worker: dict[str, Any]) -> None:
        self._each("worker_changed", worker)

    def committed(self, commit: str, summary: str) -> None:
        self._each("committed", commit, summary)

    def notice(self, message: str) -> None:
        self._each("notice", message)

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        self._each("event", kind, fields)

    def _each(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            emit(hook, name, *args)
