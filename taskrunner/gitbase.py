"""How every git process of taskrun is started, and where a work tree's git directory and state are.

Apart from gitops.py (the daemon's commits, index and remotes) so that what
only needs to find a repository (records, status, the CLI) loads neither
GitPython nor the commit machinery. gitops names everything here too.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from taskrunner.defaults import STATE_DIR

#: Put before every git subcommand the daemon runs (`command`). The repository's
#: configuration may name programs for git to run, and may name them in the work
#: tree, which anyone who can push controls (`core.hooksPath hooks` makes every
#: update-ref run a pushed `reference-transaction` hook, update-index a
#: `post-index-change`, gc --auto a `pre-auto-gc`). With these git finds no hook
#: (/dev/null is no directory: it holds none) and asks no file-system monitor
#: program what changed. git passes `-c` settings on to the git processes it
#: starts itself (gc's repack and prune). Remote commands (`Git.remote`) use the
#: remote, core.sshCommand and credential helpers of the clone's own .git/config.
SAFE_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


def command(*args: str) -> list[str]:
    """The argv of `git <args>` as taskrun runs it: no hook, no configured monitor program (SAFE_CONFIG)."""
    return ["git", *SAFE_CONFIG, *args]


def git_dirs(root: Path) -> tuple[Path, ...]:
    """The git directory of the work tree at `root` and its common directory (they differ in a worktree).

    Absolute; empty when `root` is not in a repository. Files in them are
    never read for a Task (intake.RepoFiles), wherever they are.
    """
    where = os.path.abspath(root)
    # Asked before, its git directory still there, and no `.git` made or removed in `root` since (a repository
    # made inside another): no `git rev-parse`.
    key = (where, os.path.lexists(f"{where}/.git"), *(os.environ.get(name) for name in _GIT_DIR_ENV))
    known = _GIT_DIRS.get(key)
    if known is not None and os.path.isdir(known[0]):
        return known
    out = _ask(root, "rev-parse", "--path-format=absolute", "--absolute-git-dir", "--git-common-dir")
    dirs = tuple(dict.fromkeys(Path(line) for line in (out or "").splitlines() if line))
    if dirs:  # not a repository (yet): asked again next time
        _GIT_DIRS[key] = dirs
    return dirs


#: git_dirs' answers by (work tree, and the environment that moves a git directory), for this process: a
#: start asked git about five times for the same repository (state_dir from the daemon, engine, doctor).
_GIT_DIRS: dict[tuple[str | bool | None, ...], tuple[Path, ...]] = {}
_GIT_DIR_ENV = ("GIT_DIR", "GIT_COMMON_DIR", "GIT_WORK_TREE")


def state_dir(root: Path) -> Path:
    """Where the daemon of the work tree at `root` keeps its local state: `<git dir>/taskrun`, absolute.

    The git directory is git's answer (`rev-parse --absolute-git-dir`), so a
    linked worktree (`.git` is a file), a submodule and `GIT_DIR` in the
    environment all work. The state is per work tree: each worktree has its
    own HEAD, tasks/ and runs/, so it has its own daemon, lock, socket, keys
    and record key (README "Records, pushing and syncing"). Outside a
    repository: `<root>/.git/taskrun`, which callers then fail to use with a
    clear message.
    """
    dirs = git_dirs(root)
    return dirs[0] / "taskrun" if dirs else root / STATE_DIR


def toplevel(path: Path) -> Path | None:
    out = _ask(path, "rev-parse", "--show-toplevel")
    return Path(out) if out else None


def head_of(root: Path) -> str | None:
    """The commit HEAD of the work tree at `root` names, or None (no commit yet, or git failed).

    A process of its own, so any thread may ask (the recorder thread's Git is not shared)."""
    return _ask(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")


def _ask(cwd: Path, *args: str) -> str | None:
    """The output of `git <args>` run in `cwd`, without its final newline (nothing else is stripped:
    a work tree's path may end in a space); None when git fails or `cwd` is no directory.

    Run with `cwd` itself (never the process's own directory when `cwd` is
    missing, as GitPython's runner would: that asked the wrong repository).
    """
    if not cwd.is_dir():
        return None
    try:
        done = subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.removesuffix("\n") if done.returncode == 0 else None  # a path may end in a space
