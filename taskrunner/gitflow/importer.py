"""Changes back (control plane): a Worker's returned commit, verified, imported and given its refs.

A verified result (results.py) may carry `change` {commit, base, sha256, size}:
the Agent's change, committed by the Worker (change.py), whose new objects
arrive as the `result` record's payload, a git pack. The signature covers the
pack's digest, so nothing of the pack is read before its size and sha256
match. Then:

1. the pack is indexed with object checks on (`index-pack --strict`, with
   `transfer.fsckObjects`) into a quarantine, `objects/incoming-taskrun-<run-id>/`
   (the clone's objects its alternate): a corrupt or malformed object refuses it;
2. only the one signed commit is taken: it must be a commit, its only
   parent the Run's base commit, and every object it reaches present (`rev-list
   --objects <commit> --not <base>`). Only then does the pack move into the
   clone's objects/pack; a refused or failed pack is deleted with its
   quarantine. Other objects of an admitted pack are never referenced (git's gc
   removes them in time);
3. `refs/taskrun/runs/<run-id>` is created (never moved: one per Run, so no
   attempt is lost when the branch moves);
4. `refs/heads/<git.result_branch_prefix><task-id>` moves to the commit by
   compare-and-swap, only when the branch is absent or points at a commit one
   of our own `refs/taskrun/runs/*` holds. Otherwise a person pushed to it:
   it is left alone and the Run's `result_note` says so.

A result that fails 1 or 2 (or whose digest or size do not match, or whose
pack is over `git.max_result_bytes`) is refused with the reason
(ChangeRejected): the Run is recorded FAILED with it and no ref names anything
of it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskrunner import crashpoints, diskspace
from taskrunner.errors import GitError, TaskrunError
from taskrunner.gitflow.cache import SHA_RE
from taskrunner.gitflow.plumbing import git

#: Where every Run's commit is kept, by run id.
RUN_REFS = "refs/taskrun/runs/"
#: Settings for importing a Worker's pack: every object checked.
IMPORT_CONFIG = ("transfer.fsckObjects=true", "receive.fsckObjects=true", "fetch.fsckObjects=true")
#: A Run's pack is checked in objects/<this><run-id>/ before it joins the clone's objects.
QUARANTINE_PREFIX = "incoming-taskrun-"
_ZERO = "0" * 40
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ChangeRejected(TaskrunError):
    """Raised when a Worker's returned change is refused (module doc); the message says why."""


@dataclass(frozen=True)
class Imported:
    """What became of a Run's change: its commit, the branch moved (None: not moved) and why not."""

    commit: str
    branch: str | None
    note: str | None


def import_change(git_dir: Path, change: Any, pack: bytes, *, run_id: str, task_id: str, base: str | None,
                  prefix: str, max_bytes: int) -> Imported:
    """Verify and import a Run's change (module doc). ChangeRejected saying why it is refused; GitError when
    the repository cannot take it now (its disk is full, a ref cannot be written): the caller looks at the
    disk and takes the result again once there is room."""
    if not isinstance(change, dict):
        raise ChangeRejected("change rejected: the result's change is malformed")
    commit, size, digest = change.get("commit"), change.get("size"), change.get("sha256")
    if not (isinstance(commit, str) and SHA_RE.match(commit)) or not isinstance(size, int) \
            or isinstance(size, bool) or not isinstance(digest, str):
        raise ChangeRejected("change rejected: the result's change lacks a commit, size or sha256")
    if base is None or change.get("base") != base:
        raise ChangeRejected(f"change rejected: it builds on {change.get('base')!r}, the Run's base commit is "
                             f"{base!r}")
    if size > max_bytes:
        raise ChangeRejected(f"change rejected: {size} bytes, over git.max_result_bytes ({max_bytes})")
    if len(pack) != size or hashlib.sha256(pack).hexdigest() != digest:
        raise ChangeRejected("change rejected: the pack sent does not match the size and sha256 the Worker signed")
    if not _RUN_ID_RE.match(run_id):
        raise ChangeRejected(f"change rejected: run id {run_id!r} cannot name a ref")
    quarantine = Path(os.path.abspath(git_dir)) / "objects" / f"{QUARANTINE_PREFIX}{run_id}"
    shutil.rmtree(quarantine, ignore_errors=True)  # what a daemon killed during this Run's last try left
    try:
        _check_in_quarantine(git_dir, quarantine, pack, commit, base)
        _admit(quarantine / "pack", quarantine.parent / "pack")
    finally:
        shutil.rmtree(quarantine, ignore_errors=True)
    crashpoints.reached("daemon.change_imported")
    run_ref = f"{RUN_REFS}{run_id}"
    try:
        git(git_dir, "update-ref", "-m", "taskrun: a Run's change", run_ref, commit, _ZERO)
    except GitError as exc:
        existing = _resolve(git_dir, run_ref)
        if existing is None:
            raise  # nothing names another commit: the ref could not be written (a full disk, a lock)
        if existing != commit:
            raise ChangeRejected(f"change rejected: {run_ref} already names another commit ({exc})") from None
    crashpoints.reached("daemon.run_ref_moved")
    return Imported(commit, *_move_branch(git_dir, f"{prefix}{task_id}", commit, run_ref))


def _check_in_quarantine(git_dir: Path, quarantine: Path, pack: bytes, commit: str, base: str) -> None:
    """Steps 1 and 2 of the module doc with the pack's objects in `quarantine`, an object directory of
    their own whose alternate is the clone's (as git's receive-pack does): nothing of a refused or failed
    pack, not even git's temp pack, is ever in the clone's objects. ChangeRejected saying why; GitError
    when the disk is full."""
    env = {"GIT_OBJECT_DIRECTORY": str(quarantine), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(quarantine.parent)}
    try:
        (quarantine / "pack").mkdir(parents=True)
    except OSError as exc:
        raise GitError(f"cannot make {quarantine}: {exc}") from None
    try:
        git(git_dir, "index-pack", "--strict", "--stdin", stdin=pack, env=env, config=IMPORT_CONFIG)
    except GitError as exc:
        if diskspace.git_full(str(exc), git_dir):
            raise  # the repository's disk is full: nothing wrong with the pack (the caller waits for room)
        raise ChangeRejected(f"change rejected: the pack failed git's object checks ({exc})") from None
    try:
        parents = git(git_dir, "rev-list", "--parents", "-n", "1", f"{commit}^{{commit}}", env=env).decode().split()
    except GitError:
        raise ChangeRejected(f"change rejected: {commit} is not a commit of the pack") from None
    if parents[:1] != [commit] or parents[1:] != [base]:
        raise ChangeRejected(f"change rejected: the parent of {commit[:12]} is not the base commit {base[:12]}")
    try:
        git(git_dir, "rev-list", "--objects", "--quiet", commit, "--not", base, env=env)
    except GitError as exc:
        raise ChangeRejected(f"change rejected: objects of {commit[:12]} are missing ({exc})") from None


def _admit(source: Path, packs: Path) -> None:
    """Move the checked pack from the quarantine into the clone's objects/pack: the .pack and its other
    files first and the .idx last, as git does, since a pack counts once its .idx is there."""
    names = sorted(os.listdir(source), key=lambda name: (name.endswith(".idx"), name))
    for name in names:
        os.replace(source / name, packs / name)


def _move_branch(git_dir: Path, branch: str, commit: str, run_ref: str) -> tuple[str | None, str | None]:
    """Point refs/heads/<branch> at `commit` when that overwrites nothing of a person's; (branch, None) or
    (None, why not)."""
    ref = f"refs/heads/{branch}"
    try:
        git(git_dir, "check-ref-format", ref)
    except GitError:
        return None, f"'{branch}' is not a valid branch name; this Run's change is at {run_ref}"
    failed: GitError | None = None  # the last update-ref that failed while the branch stayed where it was
    for _ in range(3):
        current = _resolve(git_dir, ref)
        if current is not None and current != commit and not _ours(git_dir, current):
            return None, (f"the branch {branch} holds commits taskrun did not make (someone pushed to it): left "
                          f"as it is; this Run's change is at {run_ref}")
        try:
            git(git_dir, "update-ref", "-m", "taskrun: result branch", ref, commit, current or _ZERO)
            crashpoints.reached("daemon.result_ref_moved")
            return branch, None
        except GitError as exc:
            if _resolve(git_dir, ref) != current:
                failed = None
                continue  # moved meanwhile: look again
            if diskspace.git_full(str(exc), git_dir):
                raise  # its lock could not be written for want of room: the caller waits for room
            failed = exc
    if failed is not None:
        return None, f"the branch {branch} could not be moved ({failed}); this Run's change is at {run_ref}"
    return None, f"the branch {branch} kept moving; this Run's change is at {run_ref}"


def _resolve(git_dir: Path, ref: str) -> str | None:
    try:
        return git(git_dir, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip() or None
    except GitError:
        return None


def _ours(git_dir: Path, commit: str) -> bool:
    """True when one of taskrun's run refs names `commit`."""
    out = git(git_dir, "for-each-ref", "--points-at", commit, "--format=%(refname)", RUN_REFS)
    return bool(out.strip())


def diffstat(git_dir: Path, base: str, commit: str) -> str:
    """`git diff --stat base commit`, or a line saying why there is none."""
    try:
        return git(git_dir, "diff", "--stat", "--no-color", "--no-ext-diff", "--no-textconv", base, commit,
                   "--").decode(errors="replace").rstrip()
    except GitError as exc:
        return f"(no diffstat: {exc})"
