"""The watcher: file events under tasks/, debounced, judged by what the path holds."""

from __future__ import annotations

import os
import queue
from pathlib import Path

from taskrunner.watcher import FileEvent, Watcher


def _events(posted: queue.Queue[FileEvent], until: str, path: str) -> list[str]:
    seen: list[str] = []
    while True:
        event = posted.get(timeout=10)
        if event.path == path:
            seen.append(event.kind)
            if event.kind == until:
                return seen


def test_a_task_file_git_replaces_is_changed_not_removed_and_a_deleted_one_is_removed(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    posted: queue.Queue[FileEvent] = queue.Queue()
    watcher = Watcher(tmp_path, posted.put)
    watcher.start()
    try:
        task = tmp_path / "tasks" / "a.md"
        task.write_text("# one\n")
        assert _events(posted, "changed", "tasks/a.md")[-1] == "changed"
        # As git updates a file in a sync or checkout: unlink, then write it anew.
        os.unlink(task)
        task.write_text("# two\n")
        assert "removed" not in _events(posted, "changed", "tasks/a.md")
        os.unlink(task)
        assert _events(posted, "removed", "tasks/a.md")[-1] == "removed"
    finally:
        watcher.stop()
