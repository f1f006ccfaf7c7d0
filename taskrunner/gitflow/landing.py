"""Records that must land: what a starting daemon finds written but not committed.

A daemon that stopped before its recorder committed everything (killed,
a commit that kept failing, a user's commit that removed records while
the index was locked) left records under runs/ that HEAD lacks. On start
the recorder thread commits them (`unrecorded`), so records land
eventually, always.

Only records this clone's daemon wrote count: a Task's files are taken when
its `runs/<id>/status.json` carries this clone's seal (records.py), a Run's
files when its `run-<n>/status.json` does too. Only what is settled is
committed, as the engine would have: a Task's record when the Task is final
(COMPLETED, FAILED, CANCELLED, BLOCKED, INVALID), a Run's files when the Run
is (a Run still going is committed when it ends). Files of other names, and
files whose Task or Run record is foreign, are left alone.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections import defaultdict
from pathlib import Path

from taskrunner.defaults import RUNS_DIR
from taskrunner.errors import GitError, RecordError
from taskrunner.gitops import Git, command
from taskrunner.model import RECORD_NAMES, RUN_DIR_RE, RunStatus, TaskStatus
from taskrunner.recorder import CommitItem
from taskrunner.records import Records
from taskrunner.safefs import Beneath, UnsafePath


def unrecorded(repo: Git, records: Records) -> list[CommitItem]:
    """One CommitItem per Task whose sealed records in the work tree differ from HEAD's (missing or changed).

    Files deleted from the work tree are not counted (a record HEAD has and
    the work tree lacks is not one HEAD lacks). Records HEAD already holds
    as the work tree does but the user's index does not (a daemon killed
    after HEAD moved, before it refreshed the index) are put into
    `repo.index_pending`, for the recorder to refresh. GitError when git fails.
    """
    by_task: dict[str, list[str]] = defaultdict(list)
    for path in _differing(repo) - _reindex(repo, records):
        owner = _owner(path)
        if owner is not None and _regular(repo.root / path):
            by_task[owner[0]].append(path)
    items: list[CommitItem] = []
    for task_id, paths in sorted(by_task.items()):
        try:
            task = records.load_task(task_id)
        except RecordError:  # ForeignRecord included: not this daemon's
            continue
        if task is None:
            continue
        settled = _final(TaskStatus, task.get("status"))
        kept = [p for p in paths if _run_is_ours(records, task_id, p) and (settled or not _task_level(p))]
        if kept:
            items.append(CommitItem(paths=tuple(sorted(kept)), task_id=task_id, run_id=None, run_number=None,
                                    worker=None, agent=None, status=str(task.get("status", "")),
                                    title=f"{len(kept)} record file(s) left uncommitted by an earlier daemon"))
    return items


def _reindex(repo: Git, records: Records) -> set[str]:
    """Queue HEAD's entry (mode, blob) in `repo.index_pending` for each of this daemon's records that HEAD
    holds as the work tree does while the user's index holds it otherwise or not at all; those paths."""
    if repo.head() is None:
        return set()
    staged = _listed(repo, command("diff", "--cached", "--no-renames", "--name-only", "-z", "HEAD", "--",
                                   f"{RUNS_DIR}/"))
    wanted = sorted(path for path in staged if (owner := _owner(path)) is not None
                    and _sealed_task(records, owner[0]) and _run_is_ours(records, owner[0], path))
    if not wanted:
        return set()
    done = subprocess.run(command("--literal-pathspecs", "ls-tree", "-z", "--full-tree", "HEAD", "--", *wanted),
                          cwd=repo.root, capture_output=True)
    if done.returncode != 0:
        raise GitError(f"git failed listing HEAD's {RUNS_DIR}/: {done.stderr.decode(errors='replace').strip()}")
    tree = Beneath(repo.root)
    queued: set[str] = set()
    for entry in done.stdout.split(b"\0"):
        meta, _, name = entry.partition(b"\t")
        if not name:
            continue
        mode, _, blob = meta.decode().split(" ")
        path = os.fsdecode(name)
        try:
            same = mode == "100644" and repo.blob_id(tree.read_bytes(path)) == blob
        except (OSError, UnsafePath):
            same = False
        if same:
            repo.index_pending[path] = (mode, blob)
            queued.add(path)
    return queued


def _sealed_task(records: Records, task_id: str) -> bool:
    try:
        return records.load_task(task_id) is not None
    except RecordError:  # ForeignRecord included: not this daemon's
        return False


def _listed(repo: Git, argv: list[str]) -> set[str]:
    """The NUL-separated paths git prints for `argv`; GitError when it fails."""
    try:
        done = subprocess.run(argv, cwd=repo.root, capture_output=True)
    except OSError as exc:
        raise GitError(f"git failed listing {RUNS_DIR}/: {exc}") from exc
    if done.returncode != 0:
        raise GitError(f"git failed listing {RUNS_DIR}/: {done.stderr.decode(errors='replace').strip()}")
    return {os.fsdecode(name) for name in done.stdout.split(b"\0") if name}


def _differing(repo: Git) -> set[str]:
    """Paths under runs/ whose work-tree file is not what HEAD holds, untracked and ignored ones included."""
    found: set[str] = set()
    argvs = [command("ls-files", "-z", "--others", "--", f"{RUNS_DIR}/")]
    if repo.head() is not None:
        argvs.append(command("diff", "--no-renames", "--name-only", "-z", "HEAD", "--", f"{RUNS_DIR}/"))
    for argv in argvs:
        found |= _listed(repo, argv)
    return found


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _owner(path: str) -> tuple[str, int | None] | None:
    """(Task id, Run number or None) of a record path `runs/<id>/status.json` or `runs/<id>/run-<n>/<name>`."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != RUNS_DIR:
        return None
    if parts[-1] == "status.json" and (len(parts) == 3 or not RUN_DIR_RE.match(parts[-2])):
        return "/".join(parts[1:-1]), None
    if len(parts) >= 4 and parts[-1] in RECORD_NAMES and (match := RUN_DIR_RE.match(parts[-2])):
        return "/".join(parts[1:-2]), int(match.group(1))
    return None


def _task_level(path: str) -> bool:
    owner = _owner(path)
    return owner is not None and owner[1] is None


def _run_is_ours(records: Records, task_id: str, path: str) -> bool:
    """True for a Task-level path, and for a Run's path when its sealed record says the Run is over."""
    owner = _owner(path)
    if owner is None or owner[1] is None:
        return True
    try:
        run = records.load_run(task_id, owner[1])
    except RecordError:
        return False
    return run is not None and _final(RunStatus, run.get("status"))


def _final(kind: type[TaskStatus] | type[RunStatus], value: object) -> bool:
    try:
        return kind(value).final
    except ValueError:
        return False
