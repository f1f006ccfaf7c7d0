"""Records a person's `git reset` dropped: written back into the work tree and committed again.

`git reset --hard HEAD~1` (or to an older commit, or a checkout of one) can move HEAD past record commits
the daemon made and take their files out of the work tree; the daemon's memory still holds those Tasks as
settled, and the next daemon would run them again. DroppedRecords, a job of the recorder thread, undoes it:

- Detection: every CHECK_SECONDS an lstat of HEAD and its branch's ref (headwatch.py); only when they
  changed, git is asked which of the commits this daemon made (`landed`: each record and prune commit)
  HEAD no longer holds (`rev-list <ours> --not HEAD`). Not while a sync moves HEAD (Git.moving) nor
  while a person's rebase or merge is half way through.
- Plan (`plan`, pure): each record path (landing._owner) whose newest change by the daemon is in a
  dropped commit, as that commit holds it (ours), as HEAD and the work tree do: a work tree as HEAD has
  it gets ours back (deleted again for a prune's deletion), one already as ours is only committed, one
  changed since is left and named. A rebase that kept the content does nothing. A status.json goes back
  only with this clone's seal.
- Writes (putback.py, no link followed, blobs streamed): a finished Run's files, which the engine never
  writes again, here; a Task's own record only when the main thread (`post`) finds the Task settled with
  no Run going, on the write-behind thread (`write`) after the engine's records before it. Then one
  CommitItem ("records a reset dropped, committed again") goes to `submit`, and a notice says what happened.
"""

from __future__ import annotations

import collections
import hmac
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from taskrunner.errors import GitError, RecordError, UnsafePath
from taskrunner.gitflow import putback
from taskrunner.gitflow.headwatch import HeadWatch
from taskrunner.gitflow.landing import _owner
from taskrunner.gitops import Git
from taskrunner.recorder import CommitItem
from taskrunner.records import SEAL_KEY, Records
from taskrunner.safefs import Beneath

if TYPE_CHECKING:
    from taskrunner.state import TaskState

#: How often the lstat of HEAD and the branch's ref is compared with the last one (no process unless it changed).
CHECK_SECONDS = 1.0
RETRY_SECONDS = 10.0  #: after git failed a check, the next one waits this long
LANDED_MAX = 64  #: the daemon's newest commits remembered to tell whether HEAD dropped one
#: The title of the commit of restored records (its subject: `taskrun: <title>`).
TITLE = "records a reset dropped, committed again"


@dataclass(frozen=True)
class Plan:
    """What to do with each record path: write ours back, delete it again, only commit it, or leave it."""

    write: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    commit: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


def plan(ours: Mapping[str, str | None], head: Mapping[str, str | None], tree: Mapping[str, str | None]) -> Plan:
    """The Plan for the paths of `ours` (path -> blob id in the daemon's dropped commit, None: it deleted it).

    `head` and `tree`: the same paths' blob ids in HEAD and in the work tree (None: absent; HEAD's entry
    of another mode than 100644 and CHANGED never equal a blob id of ours).
    """
    out: dict[str, list[str]] = {"write": [], "delete": [], "commit": [], "kept": []}
    for path in sorted(ours):
        mine, theirs, now = ours[path], head.get(path), tree.get(path)
        if mine == theirs:
            continue  # HEAD holds it as the daemon committed it (a rebase that kept the content)
        if now == mine:
            out["commit"].append(path)
        elif now == theirs:
            out["delete" if mine is None else "write"].append(path)
        else:
            out["kept"].append(path)
    return Plan(**{key: tuple(value) for key, value in out.items()})


@dataclass
class Found:
    """One detection: `dropped` commits; `done` paths to commit; Task-level steps (path, "write" | "delete" |
    "commit", ours' bytes, HEAD's blob) left to the engine's threads; paths left as they are, with why."""

    dropped: int
    done: list[str] = field(default_factory=list)
    task_level: list[tuple[str, str, bytes | None, str | None]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    waiting: int = 0

    def text(self) -> str:
        said = (f"HEAD moved past {self.dropped} record commit(s) of the daemon (a reset?): {len(self.done)} record "
                f"file(s) written and committed again")
        if self.kept:
            said += (f"; {len(self.kept)} changed since (or not this daemon's) are left as they are: "
                     f"{', '.join(self.kept[:3])}{' ...' if len(self.kept) > 3 else ''}")
        if self.waiting:
            said += f"; {self.waiting} of Tasks with a Run going are left to the engine"
        return said


class DroppedRecords:
    """The recorder.GitJob of the module docstring; `landed(sha)` follows each commit (Recorder.after_commit)."""

    def __init__(self, repo: Git, records: Records, tasks: Mapping[str, TaskState], notice: Callable[[str], None],
                 post: Callable[[Callable[[], None]], None], write: Callable[[Callable[[], None]], None],
                 submit: Callable[[CommitItem], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._repo, self._records, self._tasks, self._notice = repo, records, tasks, notice
        self._post, self._write, self._submit, self._clock = post, write, submit, clock
        self._landed: collections.deque[str] = collections.deque(maxlen=LANDED_MAX)
        self._watch = HeadWatch(repo.root)
        self._seen: tuple[object, ...] | None = None
        self._next = 0.0
        self._tree = Beneath(repo.root)
        self._algo = "sha1"

    def landed(self, sha: str) -> None:  # the recorder thread, after each commit of the daemon's
        self._landed.append(sha)

    def due(self, now: float) -> float | None:
        return self._next if self._landed else None

    def run(self) -> None:
        self._next = self._clock() + CHECK_SECONDS
        seen = self._watch.signature()
        if seen == self._seen or self._repo.moving or self._repo.in_progress() \
                or os.path.lexists(self._repo.git_dir() / "BISECT_LOG"):
            return  # unchanged; or HEAD is a sync's, a person's rebase's or bisect's until it ends: looked at then
        try:
            found = self._check()
        except (GitError, OSError, UnsafePath) as exc:
            self._notice(f"could not tell whether HEAD dropped record commits (trying again): {exc}")
            self._next = self._clock() + RETRY_SECONDS
            return
        self._seen = seen
        if found is not None:
            self._post(lambda: self._settled_only(found))

    def _check(self) -> Found | None:
        landed = list(self._landed)
        gone = self._gone(landed, "HEAD")  # one process when nothing is dropped (after each of our commits)
        head = self._repo.head() if gone else None
        gone = self._gone(landed, head) if head else set()  # again for HEAD as now named: it may have moved
        if not gone or head is None:
            self._landed = collections.deque(landed[-1:], maxlen=LANDED_MAX)  # older ones: its ancestors
            return None
        self._algo = "sha256" if len(head) == 64 else "sha1"
        last: dict[str, str] = {}  # record path -> the newest of the daemon's commits that changed it
        current = None
        listed = putback.git_bytes(self._repo.root, ["diff-tree", "--stdin", "-r", "-z", "--no-renames", "--name-only",
                                                     "--root"], "".join(f"{sha}\n" for sha in landed).encode())
        for token in listed.split(b"\0"):
            name = os.fsdecode(token)
            if name in landed:
                current = name
            elif current is not None and _owner(name) is not None:
                last[name] = current
        paths = sorted(path for path, sha in last.items() if sha in gone)
        ours: dict[str, str | None] = {}
        for sha in {last[path] for path in paths}:
            ours.update(putback.entries(self._repo.root, sha, [path for path in paths if last[path] == sha]))
        theirs = putback.entries(self._repo.root, head, paths)
        ours = {path: blob for path, blob in ours.items() if blob != theirs[path]}
        if not ours:
            # HEAD holds every record as the daemon committed it (another branch with the same records, a
            # rebase that kept them): nothing to do, and the commits stay watched, for a reset of that HEAD.
            return None
        self._landed.clear()
        steps = plan(ours, theirs, {path: putback.blob_of(self._tree, path, self._algo) for path in ours})
        found = Found(dropped=len(gone), kept=list(steps.kept))
        for kind, chosen in (("write", steps.write), ("delete", steps.delete), ("commit", steps.commit)):
            for path in chosen:
                blob = ours[path] if kind == "write" and path.endswith("/status.json") else None
                data = putback.git_bytes(self._repo.root, ["cat-file", "blob", blob]) if blob else None
                if data is not None and not self._sealed(path, data):
                    found.kept.append(path)  # a record this clone's daemon would not believe: never written back
                elif _owner(path)[1] is None:  # type: ignore[index]
                    found.task_level.append((path, kind, data, theirs[path]))
                elif self._apply(path, kind, ours[path], data):
                    found.done.append(path)
                else:
                    found.kept.append(path)
        return found if found.done or found.task_level or found.kept else None

    def _gone(self, landed: list[str], head: str) -> set[str]:
        """Those of `landed` that `head` does not hold (none on an orphan branch, where HEAD names no commit)."""
        try:
            return set(self._repo.run("rev-list", *landed, "--not", head, "--").split()).intersection(landed)
        except GitError:
            if self._repo.head() is None:
                return set()
            raise

    def _apply(self, path: str, kind: str, blob: str | None, data: bytes | None) -> bool:
        """Write ours (`data`, or `blob` streamed) or delete `path`; False (said in the notice) when it failed."""
        try:
            if kind == "write" and data is not None:
                self._tree.write_atomic(path, data)
            elif kind == "write" and blob is not None:
                putback.stream_blob(self._tree, path, blob)
            elif kind == "delete":
                putback.unlink(self._tree, path)
            return True
        except (OSError, UnsafePath, GitError):
            return False

    def _sealed(self, path: str, data: bytes) -> bool:
        """Whether `data` is a status record this clone sealed for `path` (records.py)."""
        try:
            body = json.loads(data)
            seal = body.pop(SEAL_KEY, None)
            return isinstance(seal, str) and hmac.compare_digest(seal, self._records.seal(path, body))
        except (ValueError, AttributeError, TypeError, RecordError):  # not JSON, not an object; no key
            return False

    def _settled_only(self, found: Found) -> None:
        """On the main thread: keep the Task-level steps of Tasks settled with no Run going; the write-behind
        thread does them after every record the engine handed it before."""
        tasks = [self._tasks.get(_owner(step[0])[0]) for step in found.task_level]  # type: ignore[index]
        ready = [step for step, task in zip(found.task_level, tasks)
                 if task is None or (task.active_run is None and task.status.final)]
        found.waiting = len(found.task_level) - len(ready)
        found.task_level = ready
        self._write(lambda: self._finish(found))

    def _finish(self, found: Found) -> None:  # the write-behind thread
        for path, kind, data, expect in found.task_level:
            if kind != "commit" and putback.blob_of(self._tree, path, self._algo) != expect:
                found.kept.append(path)  # written since the check (by someone): theirs stays
            elif self._apply(path, kind, None, data):
                found.done.append(path)
            else:
                found.kept.append(path)
        if found.done:
            title = f"{TITLE} ({len(found.done)} file(s))"
            self._submit(CommitItem(paths=tuple(sorted(found.done)), task_id="", run_id=None, run_number=None,
                                    worker=None, agent=None, status="RESTORED", title=title))
        self._notice(found.text())

