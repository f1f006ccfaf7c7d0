"""Syncing the daemon's clone with its remote: fetch, fast-forward, or rebase the daemon's own commits.

Runs on the recorder thread (the one thread that owns git), from
`Recorder.sync(reason)`, which `taskrun trigger`, the hooks, `git.poll`
and the webhook receiver call through the daemon.

`Syncer.sync` fetches `git.remote`'s branch of the same name as the
clone's current branch, then `integrate`s its tip:

- HEAD already holds the tip: nothing to do.
- HEAD is behind: fast-forward (`move`): `read-tree -m -u OLD NEW` updates
  the index and the work tree for the paths that differ between the two
  commits, and refuses, changing nothing, when that would overwrite a
  user's uncommitted change or untracked file; then HEAD moves by
  compare-and-swap.
- Only taskrun's own commits are ahead of the merge base (`own_commit`:
  subject `taskrun: ...`, one parent, only paths under runs/, or under
  tasks/ for `taskrun submit`'s commits): they are rebuilt on the tip with fast-import (`replay`, author,
  committer, dates and message kept) and the clone fast-forwards to them.
- Anything else (a person's commit in the daemon's clone that the remote
  lacks, while the remote has commits the clone lacks) is *diverged*:
  nothing is reset or merged; `taskrun status` and the log say so, and the
  engine starts no new Run until a sync finds the clone in step again
  (`Syncer.stale`).

Afterwards the daemon rescans tasks/ (`on_done`, given HEAD), so Tasks that arrived run
as dropped files do, and a Task file the commits deleted cancels its Task.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from taskrunner import crashpoints
from taskrunner.defaults import RUNS_DIR, TASKS_DIR
from taskrunner.errors import GitError
from taskrunner.gitflow.gitstate import STALE_STATES, GitState
from taskrunner.gitops import SCRATCH_REF, Git, command, error_text

#: The subject every record commit of the daemon starts with (recorder.commit_message).
OWN_SUBJECT = "taskrun: "
#: The subject of the commit `taskrun submit` makes of the Task files it adds.
SUBMIT_SUBJECT = "taskrun: submit "


@dataclass(frozen=True)
class Outcome:
    """What `integrate` did. state: "ok" | "diverged" | "refused" | "failed"; head: HEAD afterwards."""

    state: str
    message: str
    head: str | None = None
    moved: bool = False


def fetch(repo: Git, remote: str, branch: str) -> str:
    """Fetch `remote`'s `branch` into refs/remotes/<remote>/<branch>; its sha. GitError when it fails."""
    tracking = f"refs/remotes/{remote}/{branch}"
    done = repo.remote("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", remote,
                       f"+refs/heads/{branch}:{tracking}")
    if done.returncode != 0:
        raise GitError(f"git fetch {remote} {branch} failed: {error_text(done.stderr)}")
    return repo.run("rev-parse", "--verify", f"{tracking}^{{commit}}")


def integrate(repo: Git, tip: str) -> Outcome:
    """Bring the clone up to `tip` without losing anything: fast-forward, or replay own commits, or report."""
    busy = repo.in_progress()
    if busy:
        return Outcome("refused", f"{busy} is in progress in the daemon's clone; syncing once it ends", repo.head())
    head = repo.head()
    if head is None:
        return Outcome("refused", "the clone has no commit yet; nothing to fast-forward from")
    if head == tip or _is_ancestor(repo, tip, head):
        return Outcome("ok", "up to date", head)
    if _is_ancestor(repo, head, tip):
        return move(repo, head, tip)
    base = repo.run("merge-base", head, tip)
    ahead = repo.run("rev-list", "--reverse", f"{base}..{head}").split()
    own = repo.own_commits()
    foreign = [sha for sha in ahead if not own_commit(repo, sha, own)]
    if foreign:
        return Outcome("diverged", f"the clone's branch has {len(foreign)} commit(s) the remote lacks (first "
                       f"{foreign[0][:12]}) and the remote has commits the clone lacks; it is not reset or merged: "
                       "push or merge by hand, then `taskrun trigger`", head)
    rebuilt = replay(repo, ahead, tip)
    return move(repo, head, rebuilt, replayed=len(ahead))


def own_commit(repo: Git, sha: str, own: set[str] | None = None) -> bool:
    """Whether `sha` is a commit taskrun made in this clone, safe to rebuild on another parent.

    That is: one this clone's taskrun noted when it made it (Git.remember_own:
    a commit someone pushed with a `taskrun: ` subject is not taskrun's, and
    rebuilding it after the remote dropped it would push it back), with one
    parent, a subject starting `taskrun: `, and only paths under runs/ changed
    (a record commit), or only paths under tasks/ for a `taskrun: submit ...`
    commit (cli/submit.py).
    """
    if sha not in (own if own is not None else repo.own_commits()):
        return False
    out = repo.run("show", "-s", "--format=%P%x00%s", sha)
    parents, _, subject = out.partition("\0")
    if not subject.startswith(OWN_SUBJECT) or len(parents.split()) != 1:
        return False
    top = TASKS_DIR if subject.startswith(SUBMIT_SUBJECT) else RUNS_DIR
    paths = repo.run("diff-tree", "--no-commit-id", "--name-only", "-r", "--no-renames", "-z", sha)
    return all(p.startswith(f"{top}/") for p in paths.split("\0") if p)


def replay(repo: Git, commits: list[str], onto: str) -> str:
    """Rebuild `commits` (oldest first, each one parent) on `onto` with fast-import; the new last commit.

    Each keeps its author, committer, dates and message; its changes (the
    paths it set or deleted against its parent) are applied on the new
    parent, so a path the other side changed too takes this commit's version.
    Works on gitops.SCRATCH_REF; touches no branch, HEAD, index or work tree.
    """
    if not commits:
        return onto
    stream: list[bytes] = [f"reset {SCRATCH_REF}\n".encode()]
    for number, sha in enumerate(commits, 1):
        raw = _cat_commit(repo, sha)
        header, _, message = raw.partition(b"\n\n")
        lines = {line.split(b" ", 1)[0]: line.split(b" ", 1)[1] for line in header.split(b"\n") if b" " in line}
        stream += [f"commit {SCRATCH_REF}\nmark :{number}\n".encode(),
                   b"author " + lines[b"author"] + b"\n", b"committer " + lines[b"committer"] + b"\n",
                   f"data {len(message)}\n".encode() + message + b"\n",
                   (f"from {onto}\n" if number == 1 else f"from :{number - 1}\n").encode()]
        stream += _changes(repo, sha)
    stream += [f"get-mark :{number}\n".encode() for number in range(1, len(commits) + 1)]
    done = subprocess.run(command("fast-import", "--quiet", "--force", "--date-format=raw"), cwd=repo.root,
                          input=b"".join(stream), capture_output=True)
    if done.returncode != 0:
        raise GitError(f"git fast-import failed rebuilding record commits: {error_text(done.stderr.decode())}")
    rebuilt = done.stdout.decode().split()
    repo.remember_own(rebuilt)  # still taskrun's own, on their new parent
    return rebuilt[-1]


def move(repo: Git, old: str, new: str, replayed: int = 0) -> Outcome:
    """Fast-forward the clone from `old` to `new`: index and work tree first (refusing over a user's work), then HEAD.

    The user's index first gets what the recorder left pending
    (gitops.refresh_index), and git refreshes its stat data, so a record
    committed a moment ago counts as clean. `read-tree -m -u` changes only
    the paths that differ between `old` and `new`, and changes nothing when
    one of them is modified or untracked in the work tree. If HEAD moved
    meanwhile (a person's `git pull` in the clone), the index and work tree
    follow HEAD as it is now and the sync is retried later.
    """
    if not repo.refresh_index():
        return Outcome("refused", "the index is locked by another git command; trying again later", old)
    subprocess.run(command("update-index", "-q", "--refresh"), cwd=repo.root, capture_output=True)
    # Task files appear before HEAD moves: no Run starts until the daemon has taken the new HEAD for
    # its base (it clears this when the sync's outcome reaches it), or it would run them on `old`.
    repo.moving = True
    done = subprocess.run(command("read-tree", "-m", "-u", old, new), cwd=repo.root, capture_output=True, text=True,
                          errors="replace")
    if done.returncode != 0:
        repo.moving = False
        return Outcome("refused", "fast-forward refused, nothing changed: it would overwrite uncommitted work in "
                       f"the daemon's clone ({error_text(done.stderr)}); commit or remove it, then "
                       "`taskrun trigger`", old)
    try:
        repo.run("update-ref", "-m", "taskrun: sync", "HEAD", new, old)
        crashpoints.reached("daemon.sync_moved")
    except GitError as exc:
        # Someone's git (a `git pull` in this clone, say) moved HEAD meanwhile: the index and work tree go
        # to what HEAD is now, not back to `old`, which would undo the files that git just brought.
        head = repo.head()
        if head is not None and head != new:
            subprocess.run(command("read-tree", "-m", "-u", new, head), cwd=repo.root, capture_output=True)
        repo.moving = False
        return Outcome("failed", f"HEAD moved during the sync; trying again later ({exc})", head)
    what = f"rebased {replayed} record commit(s) onto the remote's" if replayed else "fast-forwarded to the remote's"
    return Outcome("ok", f"{what} {new[:12]}", new, moved=True)


class Syncer:
    """`sync(reason)` for the recorder thread; see the module docstring."""

    def __init__(self, repo: Git, remote: str, state: GitState, notice: Callable[[str], None],
                 on_done: Callable[[str | None], None]) -> None:
        self.repo = repo
        self.remote = remote
        self.state = state
        self._notice = notice
        self._on_done = on_done
        #: Why no new Run may start (the clone diverged), or None. A restart keeps the last sync's answer.
        last = state.get("sync")
        self.stale: str | None = str(last.get("message")) if last.get("state") in STALE_STATES else None

    def sync(self, reason: str) -> None:
        try:
            outcome = self._sync()
        except GitError as exc:
            outcome = Outcome("failed", str(exc), self.repo.head())
        moved = outcome.moved
        self.stale = outcome.message if outcome.state == "diverged" else None
        before = self.state.get("sync")
        self.state.update("sync", state=outcome.state, message=outcome.message, at=time.time(), head=outcome.head)
        # Said when something happened or changed: a poll every 30 s repeating the same answer says nothing new.
        if moved or (outcome.state, outcome.message) != (before.get("state", "ok"), before.get("message", "up to date")):
            self._notice(f"sync ({reason}): {outcome.state}: {outcome.message}"
                         + (" (no new Run starts until this is resolved)" if self.stale else ""))
        self._on_done(outcome.head)

    def _sync(self) -> Outcome:
        busy = self.repo.in_progress()
        if busy:  # its HEAD is detached meanwhile: said as what it is
            return Outcome("refused", f"{busy} is in progress in the daemon's clone; syncing once it ends",
                           self.repo.head())
        branch = self.repo.branch()
        if branch is None:
            return Outcome("refused", "HEAD is detached: there is no branch to sync", self.repo.head())
        if not self._has_remote():
            return Outcome("no-remote", f"no remote '{self.remote}' (git.remote): tasks/ rescanned only",
                           self.repo.head())
        tip = fetch(self.repo, self.remote, branch)
        crashpoints.reached("daemon.sync_fetched")
        self.state.update("sync", remote_tip=tip)
        return integrate(self.repo, tip)

    def _has_remote(self) -> bool:
        try:
            return bool(self.repo.run("config", "--get", f"remote.{self.remote}.url"))
        except GitError:
            return False


def _is_ancestor(repo: Git, maybe: str, of: str) -> bool:
    done = subprocess.run(command("merge-base", "--is-ancestor", maybe, of), cwd=repo.root, capture_output=True)
    return done.returncode == 0


def _cat_commit(repo: Git, sha: str) -> bytes:
    done = subprocess.run(command("cat-file", "commit", sha), cwd=repo.root, capture_output=True)
    if done.returncode != 0:
        raise GitError(f"git cat-file failed: {error_text(done.stderr.decode(errors='replace'))}")
    return done.stdout


def _changes(repo: Git, sha: str) -> list[bytes]:
    """fast-import file commands for what `sha` changed against its parent (`M mode sha path`, `D path`)."""
    done = subprocess.run(command("diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", f"{sha}^", sha),
                          cwd=repo.root, capture_output=True)
    if done.returncode != 0:
        raise GitError(f"git diff-tree failed: {error_text(done.stderr.decode(errors='replace'))}")
    fields = done.stdout.split(b"\0")
    out: list[bytes] = []
    for meta, path in zip(fields[0::2], fields[1::2]):
        if not meta:
            continue
        _, new_mode, _, new_sha, status = meta.decode().lstrip(":").split(" ")
        quoted = _fast_import_path(path)
        if status == "D":
            out.append(b"D " + quoted + b"\n")
        else:
            out.append(f"M {new_mode} {new_sha} ".encode() + quoted + b"\n")
    return out


def _fast_import_path(path: bytes) -> bytes:
    """A path as fast-import reads it: C-style quoted when it holds anything unusual."""
    if all(0x20 < b < 0x7F for b in path) and not path.startswith(b'"') and b"\\" not in path:
        return path
    return b'"' + b"".join(bytes([b]) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\{b:03o}".encode()
                           for b in path) + b'"'

