"""One Run's directory on a Worker: what survives the session that started it.

    <home>/runs/<run_id>/     0700, its files 0600: the Agent's output is nobody else's
        assignment.json   what was asked: task, agent, deadline
        workspace/        the extracted bundle; the Agent's working directory
        home/             the Agent's HOME, its own for this Run
        script.sh, prompt.md   what agents.prepare wrote for the Agent (read-only to it)
        output.log        the Agent's stdout and stderr, appended as it runs
        pid               the Agent's process group id
        exit_status       a confined Agent's end, written by bwrap outside the sandbox
        exit_code         an unconfined Agent's end, written by the wrapper
        stop.json         why the Worker is stopping it (cancel, timeout)
        result.json       the final outcome, written once by the Worker

A confined Agent (sandbox.py) sees only workspace/, home/ and its input
files of all this. bwrap, which started it, writes `exit_status` from
outside the sandbox (`--json-status-fd`: a line with the child's pid, then
`{"exit-code": N}` when it ends), so the Agent cannot forge it. An
unconfined Agent runs under a fixed bash wrapper (no Task content in it) that
writes `exit_code` with one printf (no `mv`, one process less per Run).
Either way a Worker session that was away while the Agent finished still
learns how it ended; a reader may see a file half written, so it is read only
once the process that writes it (the group leader) is gone.

Files here are written atomically but not fsynced: a power loss ends the
Agents too, and the control plane then finds the Run lost and retries it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskrunner.agents import INPUT_FILES, SHELL_ARGV
from taskrunner.atomic import read_json, write_json
from taskrunner.errors import WorkerError

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Files the Worker writes here: for its owner only.
FILE_MODE = 0o600

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

    @property
    def agent_home(self) -> Path:
        return self.path / "home"

    @property
    def exit_status_path(self) -> Path:
        return self.path / "exit_status"

    def agent_inputs(self) -> list[Path]:
        """The files agents.prepare wrote for the Agent (script.sh, prompt.md), those that exist."""
        return [self.path / name for name in INPUT_FILES if (self.path / name).is_file()]

    def assignment(self) -> dict[str, Any]:
        return read_json(self.path / "assignment.json")

    def write_assignment(self, data: dict[str, Any]) -> None:
        write_json(self.path / "assignment.json", data, mode=FILE_MODE, durable=False)

    def pid(self) -> int | None:
        try:
            return int((self.path / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_pid(self, pid: int) -> None:
        fd = os.open(self.path / "pid", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(str(pid))

    def exit_code(self) -> int | None:
        """How the Agent exited (128+N for signal N), from bwrap's exit_status or the wrapper's exit_code."""
        try:
            return _bwrap_exit_code(self.exit_status_path.read_bytes())
        except FileNotFoundError:
            pass
        try:
            return int((self.path / "exit_code").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> dict[str, Any] | None:
        return _maybe(self.path / "stop.json")

    def write_stop(self, status: str, reason: str) -> None:
        write_json(self.path / "stop.json", {"status": status, "reason": reason}, mode=FILE_MODE, durable=False)

    def result(self) -> dict[str, Any] | None:
        return _maybe(self.path / "result.json")

    def write_result(self, data: dict[str, Any]) -> None:
        write_json(self.path / "result.json", data, mode=FILE_MODE, durable=False)

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
    """True while the Run's group leader runs (bwrap, or the wrapper): the Run goes on.

    Only the leader counts, as it does for a session's own Agents, whose Popen
    is the leader: once it is gone the Run has ended, its exit status is
    written, and the caller kills what is left of the group. Processes the
    Agent left behind (for a confined Agent, bwrap's pid 1 always stays while
    any does) must not keep a Run going until its timeout. A zombie leader has
    ended: in containers whose PID 1 does not reap orphans, that is how a
    finished Run adopted from an earlier session looks.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pgid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return False  # the leader is gone; only stragglers are left
    except (OSError, IndexError):
        return True
    # A pid reused by another process after the leader died is not this Run's.
    return fields[0] != b"Z" and int(fields[2]) == pgid


def _bwrap_exit_code(data: bytes) -> int | None:
    """The "exit-code" of bwrap's --json-status-fd lines, or None while there is none."""
    for line in data.splitlines():
        try:
            status = json.loads(line)
        except ValueError:
            continue
        code = status.get("exit-code") if isinstance(status, dict) else None
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    return None


def _maybe(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except FileNotFoundError:
        return None
