"""A prune under way, written down before its first file goes, so a SIGKILL cannot leave it half done.

    <state dir>/prune-<time_ns>.json   {"version": 1, "older_than": <seconds>,
                                         "tasks": [{"id", "status", "finished_at", "file", "revision",
                                                    "paths": [tracked paths its commit deletes]}]}

`begin` writes one (0600, atomically) before `prune.remove` touches the work
tree; `end` deletes it once the prune's commit is made (or there was nothing
to commit). A daemon or `taskrun prune` that finds one at its start (`pending`)
removes what is left of those Tasks and makes the commit, before anything
reads runs/: otherwise a restart would see a Task file gone beside records
half removed, and take the Task for a deleted one. An entry whose id or paths
are not a Task's (a path outside tasks/ and runs/<id>/, `..`, an absolute
path) makes the whole file ignored, with a notice; the removal itself goes
through safefs.Beneath and never follows a link either way.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from taskrunner.atomic import read_file, write_bytes
from taskrunner.defaults import RUNS_DIR
from taskrunner.prune import Removal, Request
from taskrunner.taskfile import task_id_for, task_id_problem

_PREFIX, _SUFFIX = "prune-", ".json"


def begin(state_dir: Path, request: Request, removals: list[Removal]) -> Path:
    """Write down the prune about to remove `removals`; the journal's path, for `end`."""
    path = state_dir / f"{_PREFIX}{time.time_ns()}{_SUFFIX}"
    tasks = [{"id": r.id, "status": r.status, "finished_at": r.finished_at, "file": r.file,
              "revision": r.revision, "paths": r.paths} for r in removals]
    write_bytes(path, json.dumps({"version": 1, "older_than": request.older_than, "tasks": tasks}).encode(),
                mode=0o600)
    return path


def end(path: Path) -> None:
    """The prune's commit is made: forget it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pending(state_dir: Path, notice: Callable[[str], None]) -> list[tuple[Path, Request, list[Removal]]]:
    """The prunes an interrupted daemon or CLI began, oldest first: (journal, request, removals)."""
    try:
        names = sorted(n for n in os.listdir(state_dir) if n.startswith(_PREFIX) and n.endswith(_SUFFIX))
    except OSError:
        return []
    found = []
    for name in names:
        path = state_dir / name
        try:
            found.append((path, *_parse(json.loads(read_file(path)))))  # no link, FIFO or giant
        except (OSError, ValueError, TypeError, KeyError) as exc:
            notice(f"ignoring {path}: not a prune this daemon began ({exc}); remove it")
    return found


def _parse(data: Any) -> tuple[Request, list[Removal]]:
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ValueError("unknown version")
    removals = []
    for task in data["tasks"]:
        task_id, file, paths = task["id"], task["file"], task["paths"]
        if not isinstance(task_id, str) or task_id_for(f"tasks/{task_id}.md") != task_id or task_id_problem(task_id):
            raise ValueError(f"not a Task id: {task_id!r}")
        if not isinstance(paths, list) or not all(_owned(p, task_id, file) for p in paths) \
                or not (file is None or _owned(file, task_id, file)):
            raise ValueError(f"a path that is not {task_id}'s")
        removals.append(Removal(task_id, str(task["status"]), task["finished_at"], file, task["revision"],
                                list(paths)))
    return Request(float(data["older_than"])), removals


def _owned(path: Any, task_id: str, file: Any) -> bool:
    """Whether `path` is one a prune of `task_id` may delete: its Task file under tasks/, or under runs/<id>/."""
    if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/") or "\0" in path:
        return False
    return (path == file and path.startswith("tasks/")) or path.startswith(f"{RUNS_DIR}/{task_id}/")
