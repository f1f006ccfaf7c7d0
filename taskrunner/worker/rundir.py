"""One Run's directory on a Worker: what survives the session that started it.

    <home>/runs/<run_id>/     0700, its files 0600: the Agent's output is nobody else's
        starting          locked (flock) by the session starting the Run, until `pid` or
                          `result.json` is written; then removed
        assignment.json   what was asked: task, agent, deadline; marks the Run as held
        workspace/        a checkout of the base commit with the bundle's files laid over it
                          (gitflow/cache.py); the Agent's working directory
        index             the Worker's own index of the checkout, never the Agent's
        objects/          the objects of the Agent's change, then change.pack: it packed (gitflow/change.py)
        home/             the Agent's HOME, its own for this Run
        script.sh, prompt.md   what agents.prepare wrote for the Agent (read-only to it)
        agent_uid         the uid (and gid) a root Worker runs this Agent as (confine.py)
        output.log        the Agent's stdout and stderr, appended as it runs; for an Agent read through
                          its event stream, the text its reader renders, written by the Worker (streaming.py)
        events.jsonl      such an Agent's stdout and stderr: its raw event stream
        pid               the Agent's process group id
        exit_status       a confined Agent's end, written by bwrap outside the sandbox
        exit_code         an unconfined Agent's end, written by the wrapper
        stop.json         why the Worker is stopping it (cancel, timeout, truncated output)
        result.json       the final outcome: created once, by whichever session judges the Run first

**Starting is atomic for other sessions.** A session creates and locks
`starting` before it writes `assignment.json`, and lets go of the lock only
once the Agent's `pid` (or the Run's result, when it failed before starting)
is on disk. Another session that finds a Run with neither reads the lock
first: held, the Run is still being started (never judged ended); free (the
starter ended, the kernel dropped its lock), it reads `pid` and `result.json`
again, and a Run that still has neither lost its start: the Worker kills
what the starter may have started (`stray_groups`) and fails it.

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

**A full Worker home** (ENOSPC, EDQUOT, EFBIG; EIO and EROFS alike,
diskspace.py) refuses new Runs before anything of them is on disk
(`home_refusal`, `HomeFull`); a Run whose start fails for want of room is
removed whole (`discard`), so no empty directory stays behind. A write that
fails leaves no temp file: `_create` removes its own, safefs.write_in too.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskrunner.agents import INPUT_FILES, SHELL_ARGV
from taskrunner import diskspace
from taskrunner.atomic import read_json, write_bytes, write_json
from taskrunner.errors import WorkerError

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Files the Worker writes here: for its owner only.
FILE_MODE = 0o600
#: The lock file of a Run being started (see the module doc).
STARTING = "starting"

#: $1 is the run directory; the rest is the Agent's argv, run as given.
WRAPPER = 'd=$1; shift; "$@"; rc=$?; printf "%s\\n" "$rc" > "$d/exit_code"; exit "$rc"'
#: The shell preset (`bash -euo pipefail SCRIPT`) without a second bash to
#: start: the script runs in a subshell of the wrapper (a fork, no exec), with
#: the same options, no positional parameters, and its own EXIT traps.
SHELL_WRAPPER = 'd=$1; s=$2; shift 2; (set -euo pipefail; . "$s"); rc=$?; printf "%s\\n" "$rc" > "$d/exit_code"; exit "$rc"'


class HomeFull(WorkerError):
    """The Worker home has no room for a new Run (diskspace.py); str() is the reason the control plane shows."""


def home_reason(home: Path, exc: BaseException | None = None) -> str:
    """The sentence for a full Worker home, naming the disk and what happens next."""
    return diskspace.reason("the Worker home", home, exc, resumes="this Worker takes new Runs again by itself "
                                                                 "once there is room; the Runs it holds go on")


def home_refusal(home: Path, need: int = diskspace.ROOM_BYTES) -> str | None:
    """Why the Worker home cannot take a new Run now (statvfs shows less than `need` bytes free); None if it can."""
    return None if diskspace.has_room(home, need) else home_reason(home)


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

    def shared_paths(self) -> tuple[str, ...]:
        """Directories the Agent reads but does not own: the objects of the repository cache its
        workspace's `.git` borrows (gitflow/cache.py), named by the assignment's repository id."""
        try:
            repo = self.assignment().get("repo")
        except (FileNotFoundError, ValueError):
            return ()
        if not isinstance(repo, dict) or not isinstance(repo.get("id"), str) or not re.fullmatch(r"[0-9a-f]{32}",
                                                                                                   repo["id"]):
            return ()
        objects = self.path.parent.parent / "repos" / f"{repo['id']}.git" / "objects"
        return (os.path.abspath(objects),) if objects.is_dir() else ()

    def assignment(self) -> dict[str, Any]:
        return read_json(self.path / "assignment.json")

    def create(self, home: Path) -> None:
        """Make this Run's directory (0700). FileExistsError when it is there; HomeFull when there is no room
        (nothing is left behind); any other OSError as raised."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            raise
        except OSError as exc:
            if diskspace.is_full(exc):
                raise HomeFull(home_reason(home, exc)) from exc
            raise

    def discard(self) -> None:
        """Remove this Run's directory and all in it (its start failed for want of room); never raises."""
        shutil.rmtree(self.path, ignore_errors=True)

    def write_assignment(self, data: dict[str, Any]) -> None:
        write_json(self.path / "assignment.json", data, mode=FILE_MODE, durable=False)

    def pid(self) -> int | None:
        try:
            return int((self.path / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_pid(self, pid: int) -> None:
        # Atomic: a reader never takes a half-written pid for another process group to kill.
        write_bytes(self.path / "pid", str(pid).encode(), mode=FILE_MODE, durable=False)

    def begin_start(self) -> int:
        """Create and lock `starting` (see the module doc); the locked fd, for `end_start`."""
        fd = os.open(self.path / STARTING, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def end_start(self, fd: int) -> None:
        """The start is recorded (`pid` or `result.json` written): let other sessions judge the Run."""
        try:
            os.unlink(self.path / STARTING)
        except FileNotFoundError:
            pass
        os.close(fd)

    def being_started(self) -> bool:
        """True while a live session holds `starting`: the Run's start is not finished, nothing is to judge."""
        try:
            fd = os.open(self.path / STARTING, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return False  # not a file this Worker made: no session holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def agent_uid(self) -> int | None:
        try:
            return int((self.path / "agent_uid").read_text())
        except (OSError, ValueError):
            return None

    def write_agent_uid(self, uid: int) -> None:
        write_bytes(self.path / "agent_uid", str(uid).encode(), mode=FILE_MODE, durable=False)

    def stray_groups(self) -> list[int]:
        """Process groups started for this Run whose pid was never recorded (its starter died in between).

        The Agent's group leader is bwrap or the wrapper, started by this
        Worker's user with this Run's directory or workspace as an argument
        (rundir.wrapped, sandbox.bwrap_argv): processes of this user whose argv
        holds one of those paths. Scans /proc: only for a Run whose start was cut short.
        """
        marks = {os.fsencode(p) for p in (self.path, self.workspace, os.path.abspath(self.path),
                                           os.path.abspath(self.workspace))}
        me, ours = os.geteuid(), os.getpgrp()
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != me:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if not marks.intersection(handle.read().split(b"\0")):
                        continue
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    pgid = int(handle.read().rsplit(b")", 1)[1].split()[2])
            except (OSError, IndexError, ValueError):
                continue
            if pgid > 1 and pgid != ours:
                found.add(pgid)
        return sorted(found)

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

    def create_stop(self, status: str, reason: str) -> bool:
        """Write stop.json unless a session already did (False): the first reason stands."""
        return self._create("stop.json", {"status": status, "reason": reason})

    def result(self) -> dict[str, Any] | None:
        return _maybe(self.path / "result.json")

    def create_result(self, data: dict[str, Any]) -> bool:
        """Write result.json unless a session already did (False): two sessions never send two outcomes."""
        return self._create("result.json", data)

    def write_result(self, data: dict[str, Any]) -> None:
        """Replace result.json (a finished Run whose output the Agent truncated after it ended)."""
        write_json(self.path / "result.json", data, mode=FILE_MODE, durable=False)

    def _create(self, name: str, data: dict[str, Any]) -> bool:
        # Complete before it appears (a temp file, then a hard link, which never replaces one there).
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=2, sort_keys=True, ensure_ascii=False)
                handle.write("\n")
            try:
                os.link(tmp, self.path / name)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

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
    held = []
    for path in runs.iterdir():
        try:
            if (path / "assignment.json").is_file():
                held.append((path.stat().st_mtime, RunDir(path)))
        except FileNotFoundError:
            pass  # acknowledged and removed by another session just now
    return [run for _, run in sorted(held, key=lambda pair: pair[0])]


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


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to the Run's process group `pgid` (gone or not ours: nothing happens)."""
    if pgid <= 1:
        return  # 0 is this process's own group, 1 init's: never a Run's
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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
