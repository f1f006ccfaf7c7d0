"""Whether HEAD, or the branch it names, may have moved: by lstat alone, no git process.

git moves a ref by writing `<ref>.lock` and renaming it over the ref (or rewriting packed-refs, or a
reftable's tables.list), so each move gives the file a new inode and mtime. `HeadWatch.signature` is the
(st_mtime_ns, st_ino, st_size) of the git directory's HEAD, the branch's loose ref, packed-refs and
reftable/tables.list (in the common directory, for a worktree); a caller asks git only when it changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from taskrunner.atomic import read_file
from taskrunner.gitbase import git_dirs


class HeadWatch:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._head: tuple[int, int, int] | None = None
        self._ref: str | None = None

    def signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        """The files' (st_mtime_ns, st_ino, st_size), None for one missing; () outside a repository."""
        dirs = git_dirs(self.root)
        if not dirs:
            return ()
        head = _stat(dirs[0] / "HEAD")
        if head != self._head:  # HEAD rewritten: the branch it names is read again
            self._head, self._ref = head, _ref_of(dirs[0] / "HEAD")
        names = [name for name in (self._ref, "packed-refs", "reftable/tables.list") if name]
        return (head, *(_stat(dirs[-1] / name) for name in names))


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        found = os.lstat(path)
    except OSError:
        return None
    return found.st_mtime_ns, found.st_ino, found.st_size


def _ref_of(head: Path) -> str | None:
    """The ref a symbolic HEAD names (`refs/heads/main`); None when detached or unreadable."""
    try:
        text = read_file(head, limit=4096).decode(errors="replace").strip()
    except OSError:
        return None
    ref = text.removeprefix("ref: ")
    return ref if ref != text and ref.startswith("refs/") and ".." not in ref else None
