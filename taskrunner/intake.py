"""From a file under tasks/ to a TaskSpec, checked against the configuration."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from taskrunner.config import Config
from taskrunner.defaults import MAX_TASK_FILE_BYTES
from taskrunner.errors import TaskFileError
from taskrunner.model import TaskSpec
from taskrunner.records import RUN_DIR_RE
from taskrunner.taskfile import parse_task


@dataclass(frozen=True)
class Intake:
    """One reading of a Task file: a valid spec, or the error that makes it INVALID."""

    task_id: str
    path: str
    revision: str
    spec: TaskSpec | None
    error: str | None


def read_task(root: Path, task_id: str, path: str, config: Config) -> Intake:
    """Read and validate tasks/<id>.md; FileNotFoundError means it is gone."""
    with open(root / path, "rb") as handle:
        data = handle.read(MAX_TASK_FILE_BYTES + 1)
        if len(data) > MAX_TASK_FILE_BYTES:
            # Hash what we read plus the size: enough to tell revisions apart
            # without pulling an oversized file into memory.
            data += str(handle.seek(0, 2)).encode()
    revision = hashlib.sha256(data).hexdigest()
    try:
        spec = parse_task(task_id, path, data)
        _check_against(spec, config)
    except TaskFileError as exc:
        return Intake(task_id, path, revision, None, str(exc))
    return Intake(task_id, path, spec.revision, spec, None)


def agent_of(spec: TaskSpec, config: Config) -> str:
    return spec.agent or config.default_agent


def _check_against(spec: TaskSpec, config: Config) -> None:
    for part in spec.id.split("/"):
        if RUN_DIR_RE.match(part):
            raise TaskFileError(spec.path, f"the Task id part '{part}' is reserved for Run directories; rename the file")
    agent = agent_of(spec, config)
    if agent not in config.agents:
        configured = ", ".join(sorted(config.agents)) or "none"
        raise TaskFileError(spec.path, f"unknown Agent '{agent}' (configured: {configured})", key="agent")
