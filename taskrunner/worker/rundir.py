"""One Run's directory on a Worker: what survives the session that started it.

    <home>/runs/<run_id>/
        assignment.json   what was asked: task, agent, deadline
        workspace/        the extracted bundle; the Agent's working directory
        output.log        the Agent's stdout and stderr, appended as it runs
        pid               the Agent's process group id
        exit_code         written by the wrapper when the Agent exits
        stop.json         why the Worker is stopping it (cancel, timeout)
        result.json       the final outcome, written once by the Worker

The Agent runs under a fixed bash wrapper (no Task content in it) that writes
`exit_code`, so a Worker session that was away while the Agent finished still
learns how it ended. The wrapper writes it with one printf (no `mv`, one
process less per Run): a reader may see it empty while it is being written,
so it is read only once the Agent's process group is gone.

Files here are written atomically but not fsynced: a power loss ends the
Agents too, and the control plane then finds the Run lost and retries it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskrunner.agents import SHELL_ARGV
from taskrunner.atomic import read_json, write_json
from taskrunner.errors import WorkerError

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: $1 is the run directory; the rest is the Agent's argv, run as given.
WRAPPER = 'd=$1; shift; "$@"; rc=$?; printf "%s\\n" "$rc" > "$d/exit_code"; exit "$rc"'
#: The shell preset (`bash -euo pipefail SCRIPT`) without a second bash to
#: start: the script runs in a subshell of the wrapper (a fork, no exec), with
#: the same options, no positional parameters, and its own EXIT traps.
SHELL_WRAPPER = 'd=$1; s=$2; shift 2; (set -euo pipefail; . "$s"); rc=$?; printf "%s\\n" "$rc" > "$d/exit_code"; exit "$rc"'


def wrapped(run_dir: Path, argv: list[str]) -> list[str]:
    """The command that runs `argv` and leaves its exit status in `run_dir`."""
    if len(argv) == 4 and tuple(argv[:3]) == SHELL_ARGV:
        return ["bash", "-c", SHELL_WRAPPER, "taskrun-agent", str(run_dir), argv[3]]
    return ["bash", "-c", WRAPPER, "taskrun-agent", str(run_dir), *argv]


@dataclass
class RunDir:
    path: Path

    @classmethod
    def at(cls, home: Path, run_id: str) -> RunDir:
        if not RUN_ID_RE.match(run_id):
            raise WorkerError(f"invalid run id {run_id!r}")
        return cls(home / "runs" / run_id)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def workspace(self) -> Path:
        return self.path / "workspace"

    @property
    def output(self) -> Path:
        return self.path / "output.log"

    def assignment(self) -> dict[str, Any]:
        return read_json(self.path / "assignment.json")

    def write_assignment(self, data: dict[str, Any]) -> None:
        write_json(self.path / "assignment.json", data, durable=False)

    def pid(self) -> int | None:
        try:
            return int((self.path / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_pid(self, pid: int) -> None:
        (self.path / "pid").write_text(str(pid))

    def exit_code(self) -> int | None:
        try:
            return int((self.path / "exit_code").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> dict[str, Any] | None:
        return _maybe(self.path / "stop.json")

    def write_stop(self, status: str, reason: str) -> None:
        write_json(self.path / "stop.json", {"status": status, "reason": reason}, durable=False)

    def result(self) -> dict[str, Any] | None:
        return _maybe(self.path / "result.json")

    def write_result(self, data: dict[str, Any]) -> None:
        write_json(self.path / "result.json", data, durable=False)

    def output_size(self) -> int:
        try:
            return self.output.stat().st_size
        except FileNotFoundError:
            return 0


def held_runs(home: Path) -> list[RunDir]:
    """Every Run this Worker still holds (not yet acknowledged by the control plane)."""
    runs = home / "runs"
    if not runs.is_dir():
        return []
    return sorted(
        (RunDir(p) for p in runs.iterdir() if (p / "assignment.json").is_file()),
        key=lambda r: r.path.stat().st_mtime,
    )


def group_alive(pgid: int) -> bool:
    """True while a process of the group runs; zombies do not count.

    A group of zombies answers killpg(0) but has ended: in containers whose
    PID 1 does not reap orphans, that is how a finished Agent looks.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _maybe(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except FileNotFoundError:
        return None
