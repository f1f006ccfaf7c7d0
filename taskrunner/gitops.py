"""git, for the daemon: the only module that touches GitPython.

We use GitPython's command runner (`git.Git`), not `git.Repo`: the runner
spawns one short-lived git process per call, while a long-lived `Repo` keeps
`git cat-file` processes around (a known leak in daemons).

Commits never go through the user's index: the tree is built in a private
index file seeded from HEAD with only our paths changed, HEAD moves by
compare-and-swap (`update-ref HEAD NEW OLD`), and afterwards only our paths
are refreshed in the user's index, so whatever they staged stays staged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import git

from taskrunner.errors import GitError

ZERO = "0" * 40
#: Identity for commits in a repository whose user has none configured.
FALLBACK_IDENTITY = {"name": "taskrun", "email": "taskrun@localhost"}
#: The user's git may hold index.lock for a moment; retry this many times.
INDEX_LOCK_RETRIES = 50


class Git:
    def __init__(self, root: Path, private_index: Path | None = None) -> None:
        self.root = root
        self._git = git.Git(str(root))
        self._private_index = private_index or root / ".git" / "taskrun" / "index"
        self._env: dict[str, str] | None = None
        # The commit our private index and last tree belong to: while HEAD is
        # still that commit, the index needs no read-tree and the tree no lookup.
        self._last: tuple[str, str] | None = None

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        try:
            return self._git.execute(["git", *args], env=env)  # type: ignore[call-overload, no-any-return]
        except git.GitCommandError as exc:
            detail = (exc.stderr or "").strip().removeprefix("stderr: ").strip("'\n ")
            raise GitError(f"git {args[0]} failed: {detail or exc}") from exc
        except (OSError, git.GitError) as exc:
            raise GitError(f"git {args[0]} failed: {exc}") from exc

    def head(self) -> str | None:
        try:
            return self.run("rev-parse", "--verify", "--quiet", "HEAD^{commit}") or None
        except GitError:
            return None

    def commit_paths(self, paths: Sequence[str], message: str) -> str | None:
        """Commit exactly `paths` as they are in the work tree; None if nothing changed."""
        for _ in range(5):
            old = self.head()
            env = dict(self._identity(), GIT_INDEX_FILE=str(self._private_index))
            ours = self._last is not None and self._last[0] == old and self._private_index.exists()
            if not ours:
                self._private_index.parent.mkdir(parents=True, exist_ok=True)
                self.run("read-tree", *([old] if old else ["--empty"]), env=env)
            self.run("update-index", "--add", "--remove", "--", *paths, env=env)
            # Every blob was just written by update-index or comes from a tree in the
            # repository: skip the existence check of each one (a stat per object).
            tree = self.run("write-tree", "--missing-ok", env=env)
            old_tree = self._last[1] if ours and self._last else (self.run("rev-parse", f"{old}^{{tree}}") if old else None)
            if tree == old_tree:
                return None
            parents = ["-p", old] if old else []
            commit = self.run("commit-tree", tree, *parents, "-m", message, env=env)
            try:
                self.run("update-ref", "-m", "taskrun: record Runs", "HEAD", commit, old or ZERO)
            except GitError:
                self._last = None
                continue  # HEAD moved under us (a user commit): rebuild on the new HEAD
            self._last = (commit, tree)
            self._refresh_user_index(paths)
            return commit
        raise GitError("HEAD kept moving while committing records; will try again with the next batch")

    def _refresh_user_index(self, paths: Sequence[str]) -> None:
        """Make the user's index agree with HEAD for our paths, and only those."""
        for attempt in range(INDEX_LOCK_RETRIES):
            try:
                self.run("update-index", "--add", "--remove", "--", *paths)
                return
            except GitError as exc:
                if "index.lock" not in str(exc) or attempt == INDEX_LOCK_RETRIES - 1:
                    raise
                time.sleep(0.02)  # the user's git holds the index; it releases it in milliseconds

    def _identity(self) -> dict[str, str]:
        if self._env is None:
            env: dict[str, str] = {}
            for key in ("name", "email"):
                try:
                    self.run("config", f"user.{key}")
                except GitError:
                    if not os.environ.get(f"GIT_AUTHOR_{key.upper()}"):
                        env[f"GIT_AUTHOR_{key.upper()}"] = FALLBACK_IDENTITY[key]
                        env[f"GIT_COMMITTER_{key.upper()}"] = FALLBACK_IDENTITY[key]
            self._env = env
        return self._env

    def log(self, count: int = 10) -> list[str]:
        if self.head() is None:
            return []
        return self.run("log", f"-{count}", "--format=%h %s").splitlines()


def toplevel(path: Path) -> Path | None:
    try:
        out = git.Git(str(path)).execute(["git", "rev-parse", "--show-toplevel"])
    except (git.GitCommandError, OSError):
        return None
    return Path(str(out))


def init(path: Path) -> None:
    try:
        git.Git(str(path)).execute(["git", "init", "--quiet"])
    except (git.GitCommandError, OSError) as exc:
        raise GitError(f"git init failed in {path}: {exc}") from exc
