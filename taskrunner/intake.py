"""From a file under tasks/ to a TaskSpec, checked against the configuration.

The daemon reads two kinds of repository files for a Task, and both are
content anyone who can push controls: the Task file and its `context` files
(which travel to a Worker in the bundle). `RepoFiles` reads them under one
rule: a regular file inside the work tree and outside the git directory,

- opened beneath the work tree without following links (safefs): a
  symbolic link anywhere on the path is refused, not followed;
- only if it is a regular file, opened non-blocking: a FIFO, socket, device
  or directory is refused and never blocks the daemon;
- only if it has no other hard link (st_nlink 1): `ln .git/config docs/cfg`
  is git's configuration under another name;
- never a path with a `.git` part (taskfile.is_git_name: any case, a
  submodule's `.git` file too), never inside the git directory wherever it
  is (`git rev-parse --absolute-git-dir` and `--git-common-dir`, e.g. a
  GIT_DIR elsewhere in the work tree).

A refused Task file makes its Task INVALID with the reason; a refused
`context` file does too when it is refused at intake, and fails the Run
when it turns bad between intake and the bundle.

`context` files are sent only if git tracks them (they are in the index):
a work tree also holds files nobody meant to share, above all the ignored
ones (`.env`, credentials, build output). That is looked at when the bundle
is built (one `git ls-files` for all of a Task's context files, none for a
Task without), not at intake: only tasks/ is watched, and a file may be
added, or `git add`ed, after the Task was read. Then a Run fails with the
fix, never the Task. So does one whose context files hold more than
MAX_CONTEXT_BYTES together, known from their sizes before a byte is read.

Under `security.allowed_signers` a valid Task file is taken only if an
allowed signer signed the commit that introduced its bytes
(gitflow/signers.py); the spec then carries the signer (`authorized_by`).
Otherwise it is INVALID with a reason starting "refused: ", under a
revision of its own (`refused_revision`), so that the same bytes, once
committed signed, are a new revision and run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from taskrunner import gitops
from taskrunner.defaults import MAX_CONTEXT_BYTES, MAX_TASK_FILE_BYTES, TASKS_DIR
from taskrunner.errors import GitError, TaskFileError, UnsafePath
from taskrunner.model import TaskSpec
from taskrunner.safefs import REFUSAL, Beneath, kind_of, open_given, refused
from taskrunner.taskfile import MAX_TASK_ID_CHARS, is_git_name, is_ignored_name, parse_task, shell_script, task_id_for

if TYPE_CHECKING:  # the configuration's modules (cryptography) are not for `taskrun status`, which lists Task files
    from taskrunner.config import Config

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

    @property
    def git_dirs(self) -> tuple[Path, ...]:
        """The repository's git directories (real paths), whose files are never read for a Task."""
        return tuple(Path(d) for d in self._git_dirs)

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
        problem = None if found is None else refused(found)
        return None if problem is None else refusal(rel, UnsafePath(rel, *problem))

    def context(self, task_path: str, rel: str) -> bytes:
        """One `context` file's bytes, as `contexts` gives them."""
        return self.contexts(task_path, [rel])[rel]

    def contexts(self, task_path: str, rels: Sequence[str]) -> dict[str, bytes]:
        """A Task's `context` files for its bundle, by path; TaskFileError (key 'context') names one that cannot go.

        See the module doc for why a file cannot go. All are opened first, then their sizes added up (fstat), then asked
        about in git's index, and only then read, each no further than what is
        left of MAX_CONTEXT_BYTES (a file that grows meanwhile is caught too).
        """
        if not rels:
            return {}
        fds: dict[str, int] = {}
        try:
            total = 0
            for rel in dict.fromkeys(rels):
                fds[rel] = fd = self._open_context(task_path, rel)
                total += os.fstat(fd).st_size
                if total > MAX_CONTEXT_BYTES:
                    raise _too_much(task_path, rel, total)
            tracked = tracked_files(self.root, list(fds))
            for rel in fds:
                if rel not in tracked:
                    task = task_id_for(task_path) or task_path
                    raise TaskFileError(
                        task_path, f"context file '{rel}' is not tracked by git: taskrun sends only files git "
                        "tracks, so an ignored or untracked file (a .env, say) never leaves this machine; if it "
                        f"is meant to be shared, `git add {shlex.quote(rel)}`, then `taskrun retry {task}`",
                        key="context")
            data: dict[str, bytes] = {}
            left = MAX_CONTEXT_BYTES
            for rel, fd in fds.items():
                try:
                    content = _read_at_most(fd, os.fstat(fd).st_size, left)
                except OSError as exc:
                    raise TaskFileError(task_path, f"context file '{rel}' cannot be read: {exc.strerror or exc}",
                                        key="context") from None
                if content is None:  # it grew since its size was looked at
                    raise _too_much(task_path, rel, None)
                data[rel] = content
                left -= len(content)
            return data
        finally:
            for fd in fds.values():
                os.close(fd)

    def _open_context(self, task_path: str, rel: str) -> int:
        try:
            return self.open(rel)
        except FileNotFoundError:
            raise TaskFileError(task_path, f"context file '{rel}' does not exist", key="context") from None
        except UnsafePath as exc:
            raise TaskFileError(task_path, f"context file '{rel}': {refusal(rel, exc)}", key="context") from None
        except OSError as exc:
            raise TaskFileError(task_path, f"context file '{rel}' cannot be read: {exc.strerror or exc}",
                                key="context") from None


def _too_much(task_path: str, rel: str, total: int | None) -> TaskFileError:
    """`total`: the bytes of the context files up to `rel`; None when `rel` grew while it was read."""
    limit = f"the {MAX_CONTEXT_BYTES // (1024 * 1024)} MiB of context files taskrun sends with one Task " \
            "(MAX_CONTEXT_BYTES)"
    what = (f"grew past {limit} while it was read" if total is None else
            f"brings the Task's context files to {total} bytes, over {limit}")
    return TaskFileError(task_path, f"context file '{rel}' {what}: name fewer or smaller files", key="context")


def _read_at_most(fd: int, size: int, limit: int) -> bytes | None:
    """The rest of the file `fd`, or None when it holds more than `limit` bytes.

    The first read asks for its size plus one byte (a read of `limit` would
    allocate all of it), later ones for what a file that grew still may add.
    """
    parts: list[bytes] = []
    got = 0
    want = min(size, limit) + 1
    while chunk := os.read(fd, want):
        parts.append(chunk)
        got += len(chunk)
        if got > limit:
            return None
        want = min(1024 * 1024, limit - got + 1)
    return b"".join(parts)


def refusal(rel: str, exc: UnsafePath) -> str:
    """The reason a path is refused, as an INVALID or FAILED message says it."""
    where = "the file" if exc.path == rel else exc.path
    return f"{where} is {exc.what}" + (f"; {exc.reason}" if exc.reason else "")


def read_submitted(name: str, work_tree: Path) -> bytes:
    """The bytes of a file given to `taskrun submit`; TaskFileError naming it and why it cannot be submitted.

    A path the person typed, opened by safefs.open_given: its own name is
    never followed and a FIFO never waited on, and inside the work tree no
    link at all is (a pushed `ci/leak.md -> ../.git/taskrun/keys/1.pem`).
    Read only up to MAX_TASK_FILE_BYTES, the most the daemon takes.
    """
    try:
        fd = open_given(name, work_tree)
    except UnsafePath as exc:
        where = "the file" if os.path.abspath(exc.path) == os.path.abspath(name) else exc.path
        raise TaskFileError(name, f"{where} is {exc.what}; {exc.reason}") from None
    except OSError as exc:
        raise TaskFileError(name, f"cannot read it: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        size = os.fstat(fd).st_size
        data = handle.read(min(size, MAX_TASK_FILE_BYTES) + 1) or b""
    if len(data) > MAX_TASK_FILE_BYTES:
        raise TaskFileError(name, f"the file is {max(size, len(data))} bytes, over the limit of "
                            f"{MAX_TASK_FILE_BYTES} for a Task file")
    return data


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
        check_spec(spec, files, config)
    except TaskFileError as exc:
        return Intake(task_id, path, revision, None, str(exc))
    if config.security.allowed_signers is not None:
        from taskrunner.gitflow import signers

        verdict = signers.authorize(files.root, path, data, config.security, files.git_dirs)
        if verdict.principal is None:
            reason = f"refused: {verdict.reason}"
            return Intake(task_id, path, refused_revision(revision, reason), None, reason)
        spec = dataclasses.replace(spec, authorized_by=verdict.principal)
    return Intake(task_id, path, spec.revision, spec, None)


def check_spec(spec: TaskSpec, files: RepoFiles, config: Config, has_script: bool | None = None) -> None:
    """What read_task checks of a parsed spec beyond its bytes: its Agent under `config`, its context files.

    `has_script`: whether the body holds a ```sh or ```bash block, when known (None: looked at here).
    Raises TaskFileError (the Task is INVALID for that reason).
    """
    _check_against(spec, config, has_script)
    _check_context(spec, files)


def refused_revision(revision: str, reason: str) -> str:
    """The revision of a Task file refused under security.allowed_signers: `refused:<sha256 of bytes>:<reason's>`.

    Not the file's own revision, so that the same bytes, once committed
    signed, are a new revision and run; the reason is part of it, so that a
    new reason (committed, but unsigned) is recorded. A reader waiting for
    the file's revision R takes a record at `refused:R:...` as its answer.
    """
    return f"refused:{revision}:{hashlib.sha256(reason.encode()).hexdigest()[:16]}"


#: Directories below tasks/ a Task file can be in, at most: an id of MAX_TASK_ID_CHARS has at most this many
#: parts ('a/a/…/a').
MAX_TASK_DIR_DEPTH = (MAX_TASK_ID_CHARS + 1) // 2


def task_paths(files: RepoFiles, notice: list[str] | None = None) -> Iterator[str]:
    """Every path under tasks/ that names a Task (`*.md`, not an editor's file), whatever it is.

    Links, FIFOs, directories named `x.md` are listed too, so that they
    become INVALID with their reason instead of vanishing; nothing is
    followed: a directory that is a link is not entered, and its path is
    added to `notice` (as is a tasks/ that is a link itself). Directories
    deeper than MAX_TASK_DIR_DEPTH are not entered, with a notice.
    """
    top = files.tree.lstat(TASKS_DIR)
    if top is None:
        return
    if not stat.S_ISDIR(top.st_mode):
        if notice is not None:
            notice.append(f"{TASKS_DIR} is {kind_of(top.st_mode)}; {REFUSAL}: no Task is read through it")
        return
    # Strings, not pathlib: at 10,000 files pathlib's joins and relative_to cost more than the walk.
    root = str(files.root)
    cut = len(root) + 1
    deep: list[str] = []
    for dirpath, dirnames, filenames in os.walk(f"{root}/{TASKS_DIR}", followlinks=False):
        here = dirpath[cut:]  # relative to the root, '/'-separated
        if here.count("/") >= MAX_TASK_DIR_DEPTH:
            # Deeper, no path can be a Task id: not walked (nor recursed into, however deep it goes).
            if any(not is_ignored_name(d) for d in dirnames):
                deep.append(here)
            dirnames[:] = []
        for name in sorted(dirnames):
            if notice is not None and not is_ignored_name(name) and os.path.islink(f"{dirpath}/{name}"):
                notice.append(f"{here}/{name} is a symbolic link; {REFUSAL}: no Task is read through it")
        for name in sorted([*filenames, *dirnames]):
            if name.endswith(".md") and not is_ignored_name(name):
                yield f"{here}/{name}"
        # Hidden directories hold no Tasks (task_id_for refuses a part starting with '.').
        dirnames[:] = [d for d in dirnames if not is_ignored_name(d)]
    if deep and notice is not None:  # one notice for them all (500 siblings at that depth: one line)
        many = len(deep) > 1
        notice.append(f"{deep[0][:120]}…{f' and {len(deep) - 1} more' if many else ''} "
                      f"{'hold' if many else 'holds'} directories {MAX_TASK_DIR_DEPTH} levels below {TASKS_DIR}/, "
                      f"deeper than a Task id can go ({MAX_TASK_ID_CHARS} characters): nothing under "
                      f"{'them' if many else 'it'} is read; move {'their' if many else 'its'} Task files up")


def agent_of(spec: TaskSpec, config: Config) -> str:
    return spec.agent or config.default_agent


def _check_against(spec: TaskSpec, config: Config, has_script: bool | None = None) -> None:
    agent = agent_of(spec, config)
    if agent not in config.agents:
        configured = ", ".join(sorted(config.agents)) or "none"
        raise TaskFileError(spec.path, f"unknown Agent '{agent}' (configured: {configured})", key="agent")
    if config.agents[agent].preset == "shell" and not (
            shell_script(spec.body) is not None if has_script is None else has_script):
        # Known now, from the file alone: no Run is started to find it out.
        raise TaskFileError(spec.path, f"the shell Agent '{agent}' runs the body's ```sh or ```bash blocks, and "
                            "this Task has none")


def _check_context(spec: TaskSpec, files: RepoFiles) -> None:
    """Refuse at intake what can be refused now; a missing file fails the Run when it is still missing."""
    for rel in spec.context:
        problem = files.check(rel)
        if problem:
            raise TaskFileError(spec.path, f"context file '{rel}': {problem}", key="context")


def tracked_files(root: Path, paths: Sequence[str]) -> set[str]:
    """Those of `paths` (relative to the work tree `root`) that are in git's index: one `git ls-files`.

    Names are matched literally (`--literal-pathspecs`: a `*` in a name is no
    pattern), and only files, not directories, are in the answer. GitError
    when git fails.
    """
    if not paths:
        return set()
    argv = gitops.command("--literal-pathspecs", "ls-files", "-z", "--cached", "--", *paths)
    try:
        done = subprocess.run(argv, cwd=root, capture_output=True)
    except OSError as exc:
        raise GitError(f"git ls-files failed: {exc}") from exc
    if done.returncode != 0:
        raise GitError(f"git ls-files failed: {done.stderr.decode(errors='replace').strip() or done.returncode}")
    return {os.fsdecode(name) for name in done.stdout.split(b"\0") if name} & set(paths)
