"""runs/ on disk: the Task and Run records the daemon writes.

    runs/<task-id>/status.json          the Task's record (schema: README "Records")
    runs/<task-id>/run-<n>/status.json  one Run's record
    runs/<task-id>/run-<n>/output.log   the Agent's output, appended as it arrives
    runs/<task-id>/run-<n>/manifest.json  what was sent to the Worker

JSON records are replaced atomically (temp file, rename), without fsync: a
reader or a killed daemon never sees half a record, and a record a power loss
truncated is skipped with a notice on restart, its Task taken up again from
its file. output.log is only ever appended, at the
offset the Worker says the bytes belong to, so a resumed stream can neither
repeat nor skip a byte.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from taskrunner.atomic import read_json, write_json
from taskrunner.defaults import RUNS_DIR
from taskrunner.errors import RecordError

RUN_DIR_RE = re.compile(r"^run-(\d+)$")


class Records:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = root / RUNS_DIR

    # -- paths -------------------------------------------------------------

    def task_file(self, task_id: str) -> Path:
        return self.runs / task_id / "status.json"

    def run_dir(self, task_id: str, number: int) -> Path:
        return self.runs / task_id / f"run-{number}"

    def output(self, task_id: str, number: int) -> Path:
        return self.run_dir(task_id, number) / "output.log"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def run_paths(self, task_id: str, number: int) -> list[str]:
        """The files of one Run that belong in a commit, the Task's record included.

        Listed whether or not they exist yet (the engine writes records behind):
        a path with no file is simply left out of the commit.
        """
        run_dir = self.run_dir(task_id, number)
        names = ("status.json", "output.log", "manifest.json", "summary.md")
        return [self.relative(self.task_file(task_id))] + [self.relative(run_dir / name) for name in names]

    # -- reading -----------------------------------------------------------

    def load_task(self, task_id: str) -> dict[str, Any] | None:
        return self._load(self.task_file(task_id))

    def load_run(self, task_id: str, number: int) -> dict[str, Any] | None:
        return self._load(self.run_dir(task_id, number) / "status.json")

    def task_ids(self) -> Iterator[str]:
        """Every Task with a record, in no particular order."""
        if not self.runs.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.runs):
            # Run directories hold Run records, not Tasks: do not descend.
            dirnames[:] = [d for d in dirnames if not RUN_DIR_RE.match(d)]
            if "status.json" in filenames and Path(dirpath) != self.runs:
                yield Path(dirpath).relative_to(self.runs).as_posix()

    def output_size(self, task_id: str, number: int) -> int:
        try:
            return self.output(task_id, number).stat().st_size
        except FileNotFoundError:
            return 0

    # -- writing -----------------------------------------------------------

    def save_task(self, record: dict[str, Any]) -> None:
        self._save(self.task_file(record["task_id"]), record)

    def save_run(self, record: dict[str, Any]) -> None:
        self._save(self.run_dir(record["task_id"], record["run"]) / "status.json", record)

    def save_manifest(self, task_id: str, number: int, manifest: dict[str, Any]) -> None:
        self._save(self.run_dir(task_id, number) / "manifest.json", manifest)

    def append_output(self, task_id: str, number: int, offset: int, data: bytes) -> int:
        """Append the part of `data` (which starts at `offset`) not yet recorded.

        Returns the recorded size afterwards; a gap (offset beyond the end) is
        not written, and the caller asks the Worker to resume from the end.
        """
        path = self.output(task_id, number)
        size = self.output_size(task_id, number)
        if offset > size or offset + len(data) <= size:
            return size
        with open(path, "ab") as handle:
            handle.write(data[size - offset:])
        return offset + len(data)

    def _save(self, path: Path, record: dict[str, Any]) -> None:
        try:
            write_json(path, record, durable=False)
        except OSError as exc:
            raise RecordError(f"cannot write {self.relative(path)}: {exc}") from exc

    def _load(self, path: Path) -> dict[str, Any] | None:
        try:
            data = read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"cannot read {self.relative(path)}: {exc}") from exc
        if not isinstance(data, dict):
            raise RecordError(f"{self.relative(path)} is not a JSON object")
        return data
