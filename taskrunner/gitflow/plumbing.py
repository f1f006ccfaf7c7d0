"""git plumbing for the repository transfer: one way to start a git process, with nothing inherited.

Every call goes through gitops.command (SAFE_CONFIG: no hooks, no
file-system monitor), names its git directory explicitly (`--git-dir`, and
`--work-tree` where there is one: no discovery, so a `.git` an Agent planted
is never found), and runs in a clean environment: no GIT_* variable of the
caller's, no system or global configuration (GIT_CONFIG_NOSYSTEM=1,
GIT_CONFIG_GLOBAL=/dev/null), no terminal prompt. Only the repository's own
config applies, and the git directories this package runs git in are ones
taskrun wrote itself (the Worker's cache and run git directory, the daemon's
clone), never an Agent's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from taskrunner.errors import GitError
from taskrunner.gitops import command

#: A git process of the transfer that takes longer than this is killed (a work tree may hold a FIFO an
#: Agent planted where git reads; git skips FIFOs, but nothing may block the Worker for ever).
GIT_TIMEOUT_SECONDS = 300.0
#: The only variables of the caller's environment a git process of this package sees.
_KEPT = ("PATH", "LANG", "LC_ALL", "TZ")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a transfer git process: PATH and locale, no configuration but the repository's."""
    env = {k: v for k, v in os.environ.items() if k in _KEPT}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null", GIT_TERMINAL_PROMPT="0",
               HOME="/nonexistent")
    if extra:
        env.update(extra)
    return env


def git(git_dir: Path, *args: str, work_tree: Path | None = None, stdin: bytes | None = None,
        env: Mapping[str, str] | None = None, config: Sequence[str] = (), check: bool = True,
        timeout: float = GIT_TIMEOUT_SECONDS) -> bytes:
    """Run `git <args>` on `git_dir` (and `work_tree`); its stdout. GitError with git's message when it fails.

    `config` is a sequence of `name=value` settings given as `-c` (after SAFE_CONFIG).
    """
    argv = command(*(part for setting in config for part in ("-c", setting)), f"--git-dir={git_dir}",
                   *([f"--work-tree={work_tree}"] if work_tree is not None else []), *args)
    try:
        cwd = work_tree or (git_dir if git_dir.is_dir() else git_dir.parent)  # `init` makes git_dir
        done = subprocess.run(argv, input=stdin, capture_output=True, env=clean_env(env), timeout=timeout,
                              cwd=str(cwd), stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} took longer than {timeout:.0f}s") from None
    except OSError as exc:
        raise GitError(f"git {args[0]} failed: {exc}") from exc
    if check and done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise GitError(f"git {args[0]} failed: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout


def is_commit(git_dir: Path, sha: str) -> bool:
    """True when `sha` names a commit present in `git_dir` (its objects or alternates)."""
    try:
        return git(git_dir, "cat-file", "-t", sha, check=True).strip() == b"commit"
    except GitError:
        return False


def present(git_dir: Path, shas: Sequence[str]) -> set[str]:
    """Those of `shas` that are objects in `git_dir`: one `git cat-file --batch-check`."""
    if not shas:
        return set()
    out = git(git_dir, "cat-file", "--batch-check=%(objectname) %(objecttype)",
              stdin="".join(f"{sha}\n" for sha in shas).encode())
    found = set()
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] != "missing":
            found.add(parts[0])
    return found


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` with `data` (no link followed, nothing replaced: the directory is fresh)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
