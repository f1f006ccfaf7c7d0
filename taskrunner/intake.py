"""From a file under tasks/ to a TaskSpec, checked against the configuration.

The daemon reads two kinds of repository files for a Task, and both are
content anyone who can push controls: the Task file and its `context` files
(which travel to a Worker in the bundle). `RepoFiles` reads them under one
rule: a regular file inside the work tree and outside the git directory,

- opened beneath the work tree without following links (safefs): a
  symbolic link anywhere on the path is refused, not followed;
- only if it is a regular file, opened non-blocking: a FIFO, socket, device
  or directory is refused and never blocks the daemon;
- never a path with a `.git` part (taskfile.is_git_name: any case, a
  submodule's `.git` file too), never inside the git directory wherever it
  is (`git rev-parse --absolute-git-dir` and `--git-common-dir`, e.g. a
  GIT_DIR elsewhere in the work tree).

A refused Task file makes its Task INVALID with the reason; a refused
`context` file does too when it is refused at intake, and fails the Run
when it turns bad between intake and the bundle.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from taskrunner.config import Config
from taskrunner.defaults import MAX_TASK_FILE_BYTES, TASKS_DIR
from taskrunner.errors import TaskFileError, UnsafePath
from taskrunner.model import TaskSpec
from taskrunner.safefs import REFUSAL, Beneath, kind_of
from taskrunner.taskfile import is_git_name, is_ignored_name, parse_task, shell_script

#: Why a path in the git directory is refused, whatever it is.
GIT_REFUSAL = "taskrun never reads git's files (its configuration, the daemon's keys) for a Task"


@dataclass(frozen=True)
class Intake:
    """One reading of a Task file: a valid spec, or the error that makes it INVALID."""

    task_id: str
    path: str
    revision: str
    spec: TaskSpec | None
    error: str | None


class RepoFiles:
    """The work tree's files as a Task may name them (see the module doc). Safe to share between threads."""

    def __init__(self, root: Path, git_dirs: Sequence[Path] = ()) -> None:
        self.root = root
        self.tree = Beneath(root)
        # Compared as strings (pathlib costs more than the open): below the root nothing
        # is a link (they are refused), so root + rel is the real path.
        self._real_root = os.path.realpath(root)
        self._git_dirs = tuple(os.path.realpath(d) for d in git_dirs)

    def problem(self, rel: str) -> str | None:
        """What makes `rel` unreadable for a Task whatever is on disk (a '.git' part, the git directory)."""
        if any(is_git_name(part) for part in rel.split("/")):
            return "inside a git directory (a '.git' part)"
        where = f"{self._real_root}/{rel}"
        for git_dir in self._git_dirs:
            if where == git_dir or where.startswith(git_dir + "/"):
                return f"inside the git directory {git_dir}"
        return None

    def open(self, rel: str) -> int:
        """An fd of the regular file `rel`, read-only; the caller closes it.

        FileNotFoundError when it is missing; UnsafePath when it is refused.
        """
        problem = self.problem(rel)
        if problem:
            raise UnsafePath(rel, problem, GIT_REFUSAL)
        return self.tree.open_file(rel)

    def read(self, rel: str) -> bytes:
        with os.fdopen(self.open(rel), "rb") as handle:
            return handle.read()

    def check(self, rel: str) -> str | None:
        """Why `rel` is refused as it is on disk now, or None: fine, or missing (looked at again when read)."""
        problem = self.problem(rel)
        if problem:
            return refusal(rel, UnsafePath(rel, problem, GIT_REFUSAL))
        try:
            found = self.tree.lstat(rel)
        except UnsafePath as exc:
            return refusal(rel, exc)
        if found is None or stat.S_ISREG(found.st_mode):
            return None
        return refusal(rel, UnsafePath(rel, kind_of(found.st_mode), REFUSAL))

    def context(self, task_path: str, rel: str) -> bytes:
        """A `context` file's bytes for the bundle; TaskFileError (key 'context') when it cannot be sent."""
        try:
            return self.read(rel)
        except FileNotFoundError:
            raise TaskFileError(task_path, f"context file '{rel}' does not exist", key="context") from None
        except UnsafePath as exc:
            raise TaskFileError(task_path, f"context file '{rel}': {refusal(rel, exc)}", key="context") from None
        except OSError as exc:
            raise TaskFileError(task_path, f"context file '{rel}' cannot be read: {exc.strerror or exc}",
                                key="context") from None


def refusal(rel: str, exc: UnsafePath) -> str:
    """The reason a path is refused, as an INVALID or FAILED message says it."""
    where = "the file" if exc.path == rel else exc.path
    return f"{where} is {exc.what}" + (f"; {exc.reason}" if exc.reason else "")


def read_task(files: RepoFiles, task_id: str, path: str, config: Config) -> Intake:
    """Read and validate tasks/<id>.md; FileNotFoundError means it is gone.

    A file that is refused (a link, a special file, see RepoFiles) is an
    INVALID Intake saying why; nothing of it is read.
    """
    try:
        fd = files.open(path)
    except UnsafePath as exc:
        reason = refusal(path, exc)
        return Intake(task_id, path, "refused:" + hashlib.sha256(reason.encode()).hexdigest(), None,
                      str(TaskFileError(path, reason)))
    with os.fdopen(fd, "rb", buffering=0) as handle:
        # As much as the file holds (a read of the whole limit allocates 256 KiB every time),
        # one byte more to see it end; a file past the limit reads as the limit plus one.
        data = handle.read(min(os.fstat(fd).st_size, MAX_TASK_FILE_BYTES) + 1) or b""
        if len(data) > MAX_TASK_FILE_BYTES:
            # Hash what we read plus the size: enough to tell revisions apart
            # without pulling an oversized file into memory.
            data += str(os.fstat(fd).st_size).encode()
    revision = hashlib.sha256(data).hexdigest()
    try:
        spec = parse_task(task_id, path, data)
        _check_against(spec, config)
        _check_context(spec, files)
    except TaskFileError as exc:
        return Intake(task_id, path, revision, None, str(exc))
    return Intake(task_id, path, spec.revision, spec, None)


def task_paths(files: RepoFiles, notice: list[str] | None = None) -> Iterator[str]:
    """Every path under tasks/ that names a Task (`*.md`, not an editor's file), whatever it is.

    Links, FIFOs, directories named `x.md` are listed too, so that they
    become INVALID with their reason instead of vanishing; nothing is
    followed: a directory that is a link is not entered, and its path is
    added to `notice` (as is a tasks/ that is a link itself).
    """
    top = files.tree.lstat(TASKS_DIR)
    if top is None:
        return
    if not stat.S_ISDIR(top.st_mode):
        if notice is not None:
            notice.append(f"{TASKS_DIR} is {kind_of(top.st_mode)}; {REFUSAL}: no Task is read through it")
        return
    base = files.root / TASKS_DIR
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames):
            if os.path.islink(here / name) and notice is not None and not is_ignored_name(name):
                notice.append(f"{(here / name).relative_to(files.root).as_posix()} is a symbolic link; "
                              f"{REFUSAL}: no Task is read through it")
        for name in sorted([*filenames, *dirnames]):
            if name.endswith(".md") and not is_ignored_name(name):
                yield (here / name).relative_to(files.root).as_posix()
        # Hidden directories hold no Tasks (task_id_for refuses a part starting with '.').
        dirnames[:] = [d for d in dirnames if not is_ignored_name(d)]


def agent_of(spec: TaskSpec, config: Config) -> str:
    return spec.agent or config.default_agent


def _check_against(spec: TaskSpec, config: Config) -> None:
    agent = agent_of(spec, config)
    if agent not in config.agents:
        configured = ", ".join(sorted(config.agents)) or "none"
        raise TaskFileError(spec.path, f"unknown Agent '{agent}' (configured: {configured})", key="agent")
    if config.agents[agent].preset == "shell" and shell_script(spec.body) is None:
        # Known now, from the file alone: no Run is started to find it out.
        raise TaskFileError(spec.path, f"the shell Agent '{agent}' runs the body's ```sh or ```bash blocks, and "
                            "this Task has none")


def _check_context(spec: TaskSpec, files: RepoFiles) -> None:
    """Refuse at intake what can be refused now; a missing file fails the Run when it is still missing."""
    for rel in spec.context:
        problem = files.check(rel)
        if problem:
            raise TaskFileError(spec.path, f"context file '{rel}': {problem}", key="context")
