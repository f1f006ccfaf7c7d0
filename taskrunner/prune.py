"""Pruning: finished Tasks leave the work tree in one commit, and git keeps them (docs/records.md "Pruning").

A Task goes when it is finished (COMPLETED, CANCELLED, FAILED or INVALID,
every Run of it final) and its last Run finished (a Task without Runs: its
record changed) before the cut-off. What goes, in ONE commit:

    tasks/<id>.md                      its Task file (the one its record names)
    runs/<id>/status.json, run-<n>/    its records (a nested Task's runs/<id>/<sub>/ stays)
    <state dir>/logs/<id>/run-<n>.log  its full logs (never tracked)

A Task stays, with a reason, when its Task file or records hold changes not
committed (the user's edits are never touched, and git must hold whatever
goes), when its Task file is not the revision it last ran, or when a Task
not finished depends on it. Nothing is followed through a link: entries are
removed one name at a time beneath their directory (safefs.Beneath), a link
itself rather than what it points to.

The pieces: `select` (pure: which Tasks), `inspect` (git and the disk, read
only: what would go, its size in blocks as `du` counts), `remove` (the work
tree and the full logs) and `prune_commit`. `Request` is a prune as the
CLI and the control socket carry it. `pruner.DaemonPruner` is the daemon's side:
the main thread chooses and the engine forgets the Tasks (so neither the
watcher's delete events nor the record writer bring them back), then the
recorder thread, which owns git, checks them again, removes and commits.
Without a daemon, cli/prune.py does the same under the daemon's lock.
`gone` finds the commit that took a Task's record, for the commands that take a Task id.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from taskrunner import gitops
from taskrunner.defaults import RUNS_DIR
from taskrunner.duration import format_duration, parse_duration
from taskrunner.errors import UnsafePath
from taskrunner.gitops import Git
from taskrunner.model import RUN_DIR_RE
from taskrunner.safefs import Beneath

if TYPE_CHECKING:
    from taskrunner.state import TaskState

#: Statuses a Task may be pruned in.
PRUNABLE = ("COMPLETED", "CANCELLED", "FAILED", "INVALID")
#: How a prune commit's subject begins (commit_message).
PRUNE_SUBJECT = "taskrun: prune "
#: Seconds `gone` waits for git (a long history, a slow disk) before saying nothing.
GONE_TIMEOUT = 30.0
#: Ids named one by one in a commit's body; the rest are counted.
BODY_IDS = 200
_FULL_LOG_RE = re.compile(r"run-\d+\.log")  # a Task's full logs beneath the state dir (fulllogs.py)
BLOCK_BYTES = 512  # of a block as st_blocks counts them (POSIX)
#: The cut-offs a prune takes (seconds): finer or larger ones are typing mistakes.
MIN_OLDER_THAN, MAX_OLDER_THAN = 0.001, 100 * 365 * 86400.0


class PruneError(ValueError):
    """Raised when a prune request is malformed (a bad duration, status or pattern); the message says which."""


@dataclass(frozen=True)
class Facts:
    """What choosing needs of one Task: from the daemon's memory (state.TaskState) or its records."""

    id: str
    file: str  # its Task file, relative to the work tree
    status: str
    finished_at: float | None  # the last Run's end; without Runs, when its record last changed (Unix time)
    runs_final: bool  # every Run of it is final
    revision: str | None  # sha256 of the Task file's bytes it last took up
    removed: bool  # its file was deleted
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """One prune: Tasks finished more than `older_than` seconds ago, in `statuses` (none: any finished
    one), whose id matches one of `patterns` (fnmatch; none: any)."""

    older_than: float
    statuses: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    dry_run: bool = False

    def label(self) -> str:
        return format_duration(self.older_than)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], default: float | None) -> Request:
        """The request a control message carries; `default` is `records.prune_after`. PruneError when malformed."""
        older = payload.get("older_than")
        if older is None:
            if default is None:
                raise PruneError("--older-than DURATION is required (or set records.prune_after)")
            older = default
        try:
            seconds = parse_duration(older)
        except ValueError as exc:
            raise PruneError(f"--older-than: {exc}") from None
        if not MIN_OLDER_THAN <= seconds <= MAX_OLDER_THAN:
            raise PruneError(f"--older-than: expected a duration from 1ms to 100 years, got {older!r}")
        statuses, patterns = payload.get("statuses") or [], payload.get("patterns") or []
        if not isinstance(statuses, list) or any(s not in PRUNABLE for s in statuses):
            raise PruneError(f"--status: expected one of {', '.join(PRUNABLE)}")
        if (not isinstance(patterns, list) or len(patterns) > 100
                or any(not isinstance(p, str) or not 0 < len(p) <= 1000 for p in patterns)):
            raise PruneError("Task ids: expected up to 100 ids or globs")
        return cls(seconds, frozenset(statuses), tuple(patterns), bool(payload.get("dry_run")))


@dataclass
class Removal:
    """One Task that goes: the tracked paths its commit deletes, and what it frees (bytes in blocks)."""

    id: str
    status: str
    finished_at: float | None
    file: str | None  # its Task file when present (tracked) in the work tree
    revision: str | None
    paths: list[str] = field(default_factory=list)
    bytes: int = 0

    def view(self) -> dict[str, Any]:
        return {"task": self.id, "status": self.status, "finished_at": self.finished_at, "file": self.file,
                "files": len(self.paths), "bytes": self.bytes}


# -- choosing (pure) ------------------------------------------------------------

#: Run statuses that end a Run (model.RunStatus.final).
_RUN_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


def facts_of_state(task: TaskState) -> Facts:
    """A Task as the daemon holds it."""
    last = task.runs[-1] if task.runs else None
    return Facts(task.id, task.file, task.status.value, last.finished_at if last else task.updated_at,
                 task.active_run is None, task.revision, task.removed,
                 tuple(task.spec.depends_on) if task.spec else ())


def facts_of_record(task: Mapping[str, Any], last_run: Mapping[str, Any] | None) -> Facts:
    """A Task as its records hold it (runs/<id>/status.json and its last Run's status.json)."""
    entries = task.get("runs") if isinstance(task.get("runs"), list) else []
    final = all(isinstance(e, dict) and e.get("status") in _RUN_FINAL for e in entries)
    if entries and last_run is None:
        final = False  # its last Run's record is unreadable: not known to be over
    finished = last_run.get("finished_at") if last_run is not None else task.get("updated_at")
    final = final and (last_run is None or last_run.get("status") in _RUN_FINAL)
    deps = task.get("depends_on") if isinstance(task.get("depends_on"), list) else []
    return Facts(str(task.get("task_id")), str(task.get("file") or ""), str(task.get("status")),
                 finished if isinstance(finished, (int, float)) and not isinstance(finished, bool) else None,
                 final, task.get("revision") if isinstance(task.get("revision"), str) else None,
                 bool(task.get("removed")), tuple(str(d) for d in deps))


def select(tasks: Iterable[Facts], request: Request, now: float) -> tuple[list[Facts], list[tuple[str, str]]]:
    """The Tasks `request` prunes at `now`, by id; and (id, reason) for those it names that stay.

    A Task is named when its id matches a pattern (any finished one when no pattern is given). A Task
    named by its exact id that stays gets its reason: not finished, too recent, of another `--status`, or
    no such Task.
    """
    every = list(tasks)
    regex = (re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in request.patterns))
             if request.patterns else None)
    exact = {p for p in request.patterns if not any(c in p for c in "*?[")}
    needed: dict[str, str] = {}  # id -> a Task not finished that depends on it
    for task in every:
        if task.status not in PRUNABLE or not task.runs_final:
            for dep in task.depends_on:
                needed.setdefault(dep, task.id)
    chosen: list[Facts] = []
    skipped: list[tuple[str, str]] = []
    cut = now - request.older_than
    for task in sorted(every, key=lambda t: t.id):
        if regex is not None and not regex.match(task.id):
            continue
        if request.statuses and task.status not in request.statuses:
            if task.id in exact:
                skipped.append((task.id, f"{task.status}, not {', '.join(sorted(request.statuses))} (--status)"))
            continue
        if task.status not in PRUNABLE or not task.runs_final:
            if task.id in exact:
                skipped.append((task.id, f"not finished ({task.status})"))
            continue
        if task.finished_at is None or task.finished_at > cut:
            if task.id in exact:
                skipped.append((task.id, f"finished less than {request.label()} ago"))
            continue
        if task.id in needed:
            skipped.append((task.id, f"'{needed[task.id]}', not finished, depends on it"))
            continue
        chosen.append(task)
    known = {task.id for task in every}
    skipped += [(name, "no such Task (`taskrun logs ID` says whether it was pruned)")
                for name in sorted(exact - known)]
    return chosen, skipped


def owner(rel: str) -> str | None:
    """The Task whose records hold the work-tree path `rel`: runs/a/b/run-2/x -> 'a/b', runs/a/status.json -> 'a'."""
    parts = rel.split("/")
    if parts[0] != RUNS_DIR or len(parts) < 3:
        return None
    for i in range(2, len(parts) - 1):
        if RUN_DIR_RE.match(parts[i]):
            return "/".join(parts[1:i])
    return "/".join(parts[1:-1])


def commit_message(removals: Sequence[Removal], request: Request) -> str:
    """`taskrun: prune N finished Tasks (older than 30d)`, the ids in the body and how to see one again."""
    count = len(removals)
    subject = f"{PRUNE_SUBJECT}{count} finished Task{'s' if count != 1 else ''} (older than {request.label()})"
    lines = [f"- {r.id} ({r.status})" for r in removals[:BODY_IDS]]
    if count > BODY_IDS:
        lines.append(f"- and {count - BODY_IDS} more")
    return (f"{subject}\n\n" + "\n".join(lines) + "\n\nHistory keeps them: git log -- runs/<id>, "
            "git show <this commit>^:runs/<id>/status.json\n")


# -- what would go (git and the disk, read only) -----------------------------------


def inspect(repo: Git, chosen: Sequence[Facts],
            state_dir: Path | None = None) -> tuple[list[Removal], list[tuple[str, str]]]:
    """The removals for `chosen`, and (id, reason) for those that must stay; GitError when git cannot tell.
    Their bytes count their full logs under `state_dir` too.

    Read only. A Task stays when git status shows anything of it changed, staged or untracked (its Task
    file, or anything under its runs/ directory), or when its Task file is not the revision it last ran.
    """
    if not chosen:
        return [], []
    tops = sorted({RUNS_DIR, *(t.file.split("/", 1)[0] for t in chosen if t.file)})
    dirty = _status(repo, tops)
    tracked = _z(repo.run("--literal-pathspecs", "ls-tree", "-r", "-z", "--name-only", "--full-tree", "HEAD",
                          "--", *tops)) if repo.head() else []
    by_owner: dict[str, list[str]] = {}
    for path in tracked:
        who = owner(path)
        if who is not None:
            by_owner.setdefault(who, []).append(path)
    dirty_owners = {who for who in map(owner, dirty) if who is not None}
    tracked_set = set(tracked)
    tree = Beneath(repo.root)
    removals: list[Removal] = []
    skipped: list[tuple[str, str]] = []
    for task in chosen:
        file = task.file if task.file and not task.removed else None
        if task.file in dirty:
            how = "has changes not committed" if task.file in tracked_set else "is not committed"
            skipped.append((task.id, f"{task.file} {how}: left as it is, and so is its Task; commit or revert "
                                     "it, then prune again"))
            continue
        if task.id in dirty_owners:
            skipped.append((task.id, f"records under runs/{task.id}/ are not all committed (a Run just ended: "
                                     "prune again shortly; a file of your own there: remove it)"))
            continue
        if file is not None:
            if tree.lstat(file) is None:
                file = None
            elif file not in tracked_set:
                skipped.append((task.id, f"{file} is not committed: left as it is, and so is its Task; commit it "
                                         "(or remove it), then prune again"))
                continue
            elif task.revision is not None and _revision(tree, file) not in (task.revision, None):
                skipped.append((task.id, f"{file} changed since its last Run (a revision not run yet)"))
                continue
        paths = sorted(by_owner.get(task.id, []) + ([file] if file else []))
        removal = Removal(task.id, task.status, task.finished_at, file, task.revision, paths)
        removal.bytes = _blocks(tree, task.id, file) + (full_log_blocks(state_dir, task.id) if state_dir else 0)
        removals.append(removal)
    return removals, skipped


def still_clean(repo: Git, removals: Sequence[Removal]) -> tuple[list[Removal], list[tuple[str, str]]]:
    """Those of `removals` still as `inspect` found them (checked again right before they go)."""
    tops = sorted({RUNS_DIR, *(r.file.split("/", 1)[0] for r in removals if r.file)})
    dirty = _status(repo, tops) if removals else set()
    dirty_owners = {who for who in map(owner, dirty) if who is not None}
    tree = Beneath(repo.root)
    kept, skipped = [], []
    for r in removals:
        if r.id in dirty_owners or (r.file is not None and r.file in dirty):
            skipped.append((r.id, "it changed while it was pruned: left as it is"))
        elif r.file is not None and r.revision is not None and _revision(tree, r.file) not in (r.revision, None):
            skipped.append((r.id, f"{r.file} changed while it was pruned: left as it is"))
        else:
            kept.append(r)
    return kept, skipped


def _status(repo: Git, tops: Sequence[str]) -> set[str]:
    """Paths under `tops` that git status shows as changed, staged, deleted or untracked."""
    out = repo.run("--no-optional-locks", "--literal-pathspecs", "status", "--porcelain=v1", "-z",
                   "--untracked-files=all", "--no-renames", "--", *tops)
    return {entry[3:] for entry in _z(out) if len(entry) > 3}


def _z(out: str) -> list[str]:  # git's -z output
    return [entry for entry in out.split("\0") if entry]


def _revision(tree: Beneath, file: str) -> str | None:
    """sha256 of a Task file's bytes; None when it is no regular file (a link: not read)."""
    try:
        return hashlib.sha256(tree.read_bytes(file)).hexdigest()
    except (OSError, UnsafePath):
        return None


def _blocks(tree: Beneath, task_id: str, file: str | None) -> int:
    """Bytes the Task's entries take on disk (blocks, as `du` counts them), links not followed."""
    total = 0
    if file is not None:
        found = tree.lstat(file)
        total += found.st_blocks * BLOCK_BYTES if found is not None else 0
    try:
        fd = tree.open_dir(f"{RUNS_DIR}/{task_id}")
    except (OSError, UnsafePath):
        return total
    try:
        total += os.fstat(fd).st_blocks * BLOCK_BYTES
        for name, found in _own_entries(fd):
            total += found.st_blocks * BLOCK_BYTES
            if stat.S_ISDIR(found.st_mode):
                total += _tree_blocks(fd, name)
    finally:
        os.close(fd)
    return total


def _own_entries(fd: int) -> list[tuple[str, os.stat_result]]:
    """The entries of a Task's runs/ directory that are its own: files (links too) and run-<n> directories."""
    found = []
    for name in sorted(os.listdir(fd)):
        try:
            seen = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(seen.st_mode) or RUN_DIR_RE.match(name):
            found.append((name, seen))
    return found


def _tree_blocks(parent: int, name: str, remove: bool = False) -> int:
    """Bytes (blocks) beneath the directory `name` of `parent`, links not followed; emptied when `remove`."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    total = 0
    try:
        for entry in os.listdir(fd):
            seen = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            total += seen.st_blocks * BLOCK_BYTES
            if stat.S_ISDIR(seen.st_mode):
                total += _tree_blocks(fd, entry, remove)
                if remove:
                    os.rmdir(entry, dir_fd=fd)
            elif remove:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    return total


def full_log_blocks(state_dir: Path, task_id: str) -> int:
    """Bytes (in blocks) of the Task's full logs under the state dir."""
    try:
        fd = Beneath(state_dir).open_dir(f"logs/{task_id}")
    except (OSError, UnsafePath):
        return 0
    try:
        return sum(os.stat(n, dir_fd=fd, follow_symlinks=False).st_blocks * BLOCK_BYTES
                   for n in os.listdir(fd) if _FULL_LOG_RE.fullmatch(n))
    finally:
        os.close(fd)


# -- removing --------------------------------------------------------------------------


def remove(root: Path, state_dir: Path, removals: Iterable[Removal]) -> list[str]:
    """Remove each Task's file, its own entries under runs/<id>/ and its full logs; problems, one a line.

    One name at a time beneath its directory: a link is removed itself, never followed. What a problem
    leaves behind is still listed in the commit, which then keeps the file (it is not deleted).
    """
    tree, state = Beneath(root), Beneath(state_dir)
    problems: list[str] = []
    for r in removals:
        if r.file is not None:
            problems += _unlink(tree, r.file)
        try:
            fd = tree.open_dir(f"{RUNS_DIR}/{r.id}")
        except FileNotFoundError:
            fd = None
        except (OSError, UnsafePath) as exc:
            problems.append(f"runs/{r.id}: {exc}")
            fd = None
        if fd is not None:
            try:
                for name, found in _own_entries(fd):
                    if stat.S_ISDIR(found.st_mode):
                        _tree_blocks(fd, name, remove=True)
                        os.rmdir(name, dir_fd=fd)
                    else:
                        os.unlink(name, dir_fd=fd)
            except OSError as exc:
                problems.append(f"runs/{r.id}: {exc}")
            finally:
                os.close(fd)
        _drop_empty(tree, f"{RUNS_DIR}/{r.id}", RUNS_DIR)
        try:
            logs = state.open_dir(f"logs/{r.id}")
        except (OSError, UnsafePath):
            logs = None
        if logs is not None:
            try:
                for name in os.listdir(logs):
                    if _FULL_LOG_RE.fullmatch(name):
                        os.unlink(name, dir_fd=logs)
            except OSError as exc:
                problems.append(f"the full logs of {r.id}: {exc}")
            finally:
                os.close(logs)
            _drop_empty(state, f"logs/{r.id}", "logs")
    return problems


def _unlink(tree: Beneath, rel: str) -> list[str]:
    parent, _, name = rel.rpartition("/")
    try:
        fd = tree.open_dir(parent)
    except FileNotFoundError:
        return []
    except (OSError, UnsafePath) as exc:
        return [f"{rel}: {exc}"]
    try:
        os.unlink(name, dir_fd=fd)
    except OSError as exc:
        return [] if exc.errno == errno.ENOENT else [f"{rel}: {exc}"]
    finally:
        os.close(fd)
    return []


def _drop_empty(tree: Beneath, rel: str, stop: str) -> None:
    """Remove `rel` and its parents while empty, up to (not including) `stop`."""
    while rel and rel != stop and "/" in rel:
        parent, _, name = rel.rpartition("/")
        try:
            fd = tree.open_dir(parent)
        except (OSError, UnsafePath):
            return
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                return
        finally:
            os.close(fd)
        rel = parent


def prune_commit(repo: Git, removals: Sequence[Removal], request: Request) -> str | None:
    """Commit the removed paths (gitops: only them; the user's index gets just these entries). GitError
    as Git.commit_paths (a rebase in progress, HEAD moving): the work tree is already pruned, try again."""
    paths = sorted({p for r in removals for p in r.paths})
    if not paths:
        return None
    return repo.commit_paths(paths, commit_message(removals, request))


def answer(request: Request, removals: Sequence[Removal], skipped: Sequence[tuple[str, str]],
           commit: str | None = None, waiting: str | None = None, problems: Sequence[str] = ()) -> dict[str, Any]:
    """The reply to a prune, as `taskrun prune --json` prints it (docs/cli.md)."""
    return {"ok": True, "dry_run": request.dry_run, "older_than": request.label(), "commit": commit,
            "pruned": [r.view() for r in removals], "bytes": sum(r.bytes for r in removals),
            "skipped": [{"task": t, "reason": why} for t, why in skipped], "waiting": waiting,
            "problems": list(problems)}


# -- a Task that is no longer there (the CLI's not-found path) ------------------------------------


@dataclass(frozen=True)
class Gone:
    """The commit that deleted a Task's record (runs/<id>/status.json): a prune's or anyone's."""

    task_id: str
    commit: str  # its full sha
    when: float  # its committer time, Unix seconds
    pruned: bool  # its subject is a prune's (commit_message)

    def text(self) -> str:
        """What the CLI says of it: where it went, when, and the commands docs/records.md gives to see it."""
        short, rel = self.commit[:12], f"{RUNS_DIR}/{self.task_id}"
        shown = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.when))
        how = "was pruned" if self.pruned else "has no record: its records were deleted"
        return (f"'{self.task_id}' {how} in commit {short} on {shown}; git keeps it: "
                f"`git show {short}^:{rel}/status.json` shows its record, `git log -- {rel}` the commits of its "
                f"Runs, and `git checkout {short}^ -- {rel} tasks/{self.task_id}.md` brings it back")


def gone(root: Path, task_id: str) -> Gone | None:
    """The commit that deleted `task_id`'s record, from the history of the work tree at `root`; None when
    `task_id` is no Task id (never given to git), when no commit deleted it, or when git fails.

    One `git log -1 --diff-filter=D` (an argv, the path after `--`, pathspecs literal): for the
    not-found path of commands that take a Task id, never a hot one.
    """
    from taskrunner.taskfile import task_id_for, task_id_problem  # (and yaml): only on this path

    if task_id_for(f"tasks/{task_id}.md") != task_id or task_id_problem(task_id) is not None:
        return None
    argv = gitops.command("--literal-pathspecs", "log", "-1", "--no-show-signature", "--format=%H%x00%ct%x00%s",
                          "--diff-filter=D", "--", f"{RUNS_DIR}/{task_id}/status.json")
    try:
        done = subprocess.run(argv, cwd=root, capture_output=True, text=True, errors="replace", timeout=GONE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = done.stdout.rstrip("\n").split("\0")
    if done.returncode != 0 or len(fields) != 3 or not re.fullmatch(r"[0-9a-f]{40,64}", fields[0]) \
            or not fields[1].isdigit():
        return None
    return Gone(task_id, fields[0], float(fields[1]), fields[2].startswith(PRUNE_SUBJECT))
