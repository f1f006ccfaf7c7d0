"""Pushing records and result branches (`git.push: true`), on the recorder thread after each commit.

One `git push --porcelain REMOTE` carries:

- the tracked branch, with an explicit refspec `HEAD:refs/heads/<branch>`
  and never a force: git refuses anything but a fast-forward, so no
  commit anyone pushed is ever replaced;
- every result branch `refs/heads/<result_branch_prefix>*` whose commit
  differs from what the daemon last pushed there, each with
  `--force-with-lease=refs/heads/<name>:<expected>`, the expected value
  being what the daemon itself last pushed (kept under
  refs/taskrun/pushed/<remote>/<name>), or empty for a branch the daemon
  never pushed (it must not exist on the remote). A result branch a person
  pushed to therefore fails the lease and is never overwritten; it is
  reported (`taskrun status`) and not tried again until its local commit
  changes.

When the branch is rejected because the remote moved on (someone pushed
meanwhile), the pusher fetches, rebases only the daemon's own record
commits onto the new tip (sync.integrate) and pushes again, up to
PUSH_ATTEMPTS times with a growing pause. A push that still fails (the
remote unreachable, a clone that diverged, a rejecting hook) is reported in
`taskrun status` and the log and tried again after RETRY_BASE_SECONDS,
doubling up to RETRY_MAX_SECONDS, and with the next commit. Records are
never dropped: they are commits in the clone whatever the remote says.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

from taskrunner import crashpoints
from taskrunner.errors import GitError
from taskrunner.gitflow import sync
from taskrunner.gitflow.gitstate import GitState
from taskrunner.gitops import Git, error_text

#: Rounds of push, fetch and rebase in one go before waiting for the next retry.
PUSH_ATTEMPTS = 5
#: Pause before the first retry of a failed push round; it doubles with each failure in a row.
RETRY_BASE_SECONDS = 2.0
RETRY_MAX_SECONDS = 300.0
#: Where the daemon remembers what it last pushed to each result branch (the lease's expected value).
PUSHED_PREFIX = "refs/taskrun/pushed/"


class Pusher:
    """Pushes when `wanted` and due; see the module docstring. For Recorder.add_job."""

    def __init__(self, repo: Git, remote: str, result_prefix: str, state: GitState,
                 notice: Callable[[str], None], on_moved: Callable[[str | None], None] | None = None,
                 on_branch_pushed: Callable[[str], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.repo = repo
        self.remote = remote
        self.result_prefix = result_prefix
        self.state = state
        self._notice = notice
        #: Called with the new HEAD when a rejected push brought the remote's commits in (the daemon rescans tasks/).
        self._on_moved = on_moved or (lambda head: None)
        #: Called with a result branch's name once a new commit of it is on the remote (pull requests).
        self._on_branch_pushed = on_branch_pushed or (lambda name: None)
        #: Called with ("push", {"ok", "error"}) after each round (hooks.Hooks.event: metrics, notifications).
        self._on_event = on_event or (lambda kind, fields: None)
        self._wanted = True  # a start pushes whatever an earlier daemon could not
        self._next = 0.0
        self._failures = 0
        self._refused: dict[str, tuple[str, str]] = {}  # branch -> (local sha refused, reason)
        self.pushes = 0

    def wanted(self, sha: str = "") -> None:
        """A commit was made: push with the next round (Recorder.after_commit)."""
        self._wanted = True

    def due(self, now: float) -> float | None:
        return max(self._next, 0.0) if self._wanted else None

    def run(self) -> None:
        """One push round; never raises (failures are reported and retried)."""
        self.state.update("push", last_try_at=time.time())
        try:
            error = self._round()
        except GitError as exc:
            error = str(exc)
        if error is None:
            if self._failures:
                self._notice(f"push to {self.remote} succeeded again after {self._failures} failed round(s)")
            self._failures = 0
            self._wanted = False
            self._next = 0.0
            self.state.update("push", ok=True, error=None, failures=0, last_ok_at=time.time(),
                              refused={b: r for b, (_, r) in self._refused.items()})
            self._on_event("push", {"ok": True, "error": None})
            return
        self._failures += 1
        pause = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (self._failures - 1))
        self._next = time.monotonic() + pause * random.uniform(0.8, 1.2)
        self.state.update("push", ok=False, error=error, failures=self._failures,
                          refused={b: r for b, (_, r) in self._refused.items()})
        self._notice(f"push to {self.remote} failed (round {self._failures}; records stay committed in the clone, "
                     f"retried in {pause:.0f}s): {error}")
        self._on_event("push", {"ok": False, "error": error})

    def _round(self) -> str | None:
        """Push until the branch is on the remote; None on success, else why not."""
        busy = self.repo.in_progress()
        if busy:
            return f"{busy} is in progress in the daemon's clone; pushing once it ends"
        branch = self.repo.branch()
        if branch is None:
            return "HEAD is detached: no branch to push"
        if self.repo.head() is None:
            return (f"the clone has no commit yet: commit .taskrun.yaml and tasks/, then "
                    f"`git push {self.remote} HEAD`")
        error = "not tried"
        for attempt in range(PUSH_ATTEMPTS):
            rejected, error = self._push(branch)
            if error is None:
                return None
            if not rejected:
                return error
            # The remote moved on: take its commits, rebase only ours, push again.
            tip = sync.fetch(self.repo, self.remote, branch)
            outcome = sync.integrate(self.repo, tip)
            if outcome.moved:
                self._on_moved(outcome.head)
            if outcome.state != "ok":
                return f"{error}; then {outcome.state}: {outcome.message}"
            time.sleep(random.uniform(0.0, 0.1 * 2 ** attempt))
        return f"{error} (still rejected after {PUSH_ATTEMPTS} rounds of fetch and rebase)"

    def _push(self, branch: str) -> tuple[bool, str | None]:
        """One `git push`: (the branch was rejected as not a fast-forward, error or None)."""
        target = f"refs/heads/{branch}"
        refspecs = [f"HEAD:{target}"]
        leases: list[str] = []
        results = self._result_branches()
        for name, (local, pushed) in results.items():
            if local == pushed or self._refused.get(name, ("", ""))[0] == local:
                continue
            self._refused.pop(name, None)
            refspecs.append(f"{local}:refs/heads/{name}")
            leases.append(f"--force-with-lease=refs/heads/{name}:{pushed}")
        crashpoints.reached("daemon.push_started")
        done = self.repo.remote("push", "--porcelain", *leases, self.remote, *refspecs)
        if done.returncode == 0:
            crashpoints.reached("daemon.push_done")
        self.pushes += 1
        statuses = _statuses(done.stdout)
        for name, (local, pushed) in results.items():
            flag, summary = statuses.get(f"refs/heads/{name}", ("", ""))
            if flag in (" ", "+", "*", "="):
                self.repo.run("update-ref", f"{PUSHED_PREFIX}{self.remote}/{name}", local)
                if flag != "=":
                    self._on_branch_pushed(name)
            elif flag == "!":
                reason = (f"the remote's {name} is not what taskrun last pushed there (a person's commits?): "
                          f"not overwritten ({summary})")
                self._refused[name] = (local, reason)
                self._notice(f"result branch {name} not pushed to {self.remote}: {reason}")
        flag, summary = statuses.get(target, ("", ""))
        if flag in (" ", "+", "*", "="):
            return False, None
        if flag == "!":
            rejected = any(word in summary for word in ("fetch first", "non-fast-forward", "stale info"))
            return rejected, f"{self.remote} rejected {branch}: {summary}"
        return False, f"git push to {self.remote} failed: {error_text(done.stderr) or done.returncode}"

    def _result_branches(self) -> dict[str, tuple[str, str]]:
        """name -> (local commit, what taskrun last pushed there or "") for every local result branch."""
        local = _refs(self.repo, f"refs/heads/{self.result_prefix}", "refs/heads/")
        pushed = _refs(self.repo, f"{PUSHED_PREFIX}{self.remote}/{self.result_prefix}",
                       f"{PUSHED_PREFIX}{self.remote}/")
        return {name: (sha, pushed.get(name, "")) for name, sha in local.items()}


def _refs(repo: Git, prefix: str, strip: str) -> dict[str, str]:
    # for-each-ref matches a pattern by whole path components, or by a prefix ending in "/".
    pattern = prefix if prefix.endswith("/") else prefix.rsplit("/", 1)[0] + "/"
    out = repo.run("for-each-ref", "--format=%(objectname) %(refname)", pattern)
    refs: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, ref = line.partition(" ")
        if ref.startswith(prefix):
            refs[ref.removeprefix(strip)] = sha
    return refs


def _statuses(porcelain: str) -> dict[str, tuple[str, str]]:
    """`git push --porcelain` lines `<flag>\\t<from>:<to>\\t<summary>` -> {to: (flag, summary)}."""
    found: dict[str, tuple[str, str]] = {}
    for line in porcelain.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and len(parts[0]) == 1 and ":" in parts[1]:
            found[parts[1].rsplit(":", 1)[1]] = (parts[0], parts[2] if len(parts) > 2 else "")
    return found

