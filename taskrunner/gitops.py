"""git, for the daemon: the only module that touches GitPython.

We use GitPython's command runner (`git.Git`), not `git.Repo`: the runner
spawns one short-lived git process per call, while a long-lived `Repo` keeps
`git cat-file` processes around (a known leak in daemons).

Commits never go through the user's index: `git fast-import` builds the
commit from HEAD with only our paths changed (on a scratch ref, writing one
pack per batch), HEAD moves by compare-and-swap (`update-ref HEAD NEW OLD`),
and afterwards only our paths are refreshed in the user's index, so whatever
they staged stays staged. Every GC_EVERY_COMMITS commits `git gc --auto`
folds the small packs together, as `git commit` would.

The files committed are read beneath the work tree without following links
(safefs): a path that is a link, a special file or a file with other hard
links, or lies under a link, is committed as deleted and never read through, and its index entry is
removed without git looking at the work tree (`--force-remove`). A file
holding a private key (leaks.holds_private_key) is left out of the commit:
the commit keeps whatever it had at that path before, the user's index is
not touched for it, and `notice` names it.

Every git process the package starts goes through `command` (argv) or
`Git.run`: hooks and the programs a repository's configuration can name for
git to run are off (SAFE_CONFIG). The work tree is whatever anyone who can
push made it, and a configuration such as `core.hooksPath hooks` points git
at scripts in it: they would run as the daemon's user, unconfined, on every
update-ref, update-index and gc the daemon does.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import git

from taskrunner import leaks
from taskrunner.errors import GitError, UnsafePath
from taskrunner.safefs import REFUSAL, Beneath

ZERO = "0" * 40
#: Identity for commits in a repository whose user has none configured.
FALLBACK_IDENTITY = {"name": "taskrun", "email": "taskrun@localhost"}
#: The user's git may hold index.lock for a moment; retry this many times.
INDEX_LOCK_RETRIES = 50
#: fast-import builds each commit here; HEAD then moves to it by compare-and-swap.
SCRATCH_REF = "refs/taskrun/recorder"
#: Run `git gc --auto` after this many commits (what `git commit` does after each).
GC_EVERY_COMMITS = 50
#: Put before every git subcommand the daemon runs (`command`). The repository's
#: configuration may name programs for git to run, and may name them in the work
#: tree, which anyone who can push controls (`core.hooksPath hooks` makes every
#: update-ref run a pushed `reference-transaction` hook, update-index a
#: `post-index-change`, gc --auto a `pre-auto-gc`). With these git finds no hook
#: (/dev/null is no directory: it holds none) and asks no file-system monitor
#: program what changed. git passes `-c` settings on to the git processes it
#: starts itself (gc's repack and prune). The daemon runs no git command that
#: reaches a remote, so core.sshCommand and credential helpers never come into play.
SAFE_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


def command(*args: str) -> list[str]:
    """The argv of `git <args>` as taskrun runs it: no hook, no configured monitor program (SAFE_CONFIG)."""
    return ["git", *SAFE_CONFIG, *args]


class Git:
    def __init__(self, root: Path, notice: Callable[[str], None] | None = None) -> None:
        self.root = root
        self._git = git.Git(str(root))
        self._env: dict[str, str] | None = None
        self._commits = 0
        self._notice = notice or (lambda message: None)
        self._tree = Beneath(root)

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        try:
            return self._git.execute(command(*args), env=env)  # type: ignore[call-overload, no-any-return]
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
            commit, changed, written, deleted = self._import(paths, message, old)
            if not changed:
                return None
            try:
                self.run("update-ref", "-m", "taskrun: record Runs", "HEAD", commit, old or ZERO)
            except GitError:
                continue  # HEAD moved under us (a user commit): build on the new HEAD
            self._refresh_user_index(written, deleted)
            self._commits += 1
            if self._commits % GC_EVERY_COMMITS == 0:
                self._gc_auto()
            return commit
        raise GitError("HEAD kept moving while committing records; will try again with the next batch")

    def _import(self, paths: Sequence[str], message: str,
                old: str | None) -> tuple[str, bool, list[str], list[str]]:
        """One commit on top of `old` through `git fast-import`.

        Returns its sha, whether its tree differs from `old`'s, the paths
        committed as files and the paths committed as deleted (a path left
        out, holding a private key, is in neither).

        fast-import writes the blobs, trees and commit of a batch as one pack
        instead of a loose object file (plus a link and an unlink) per object,
        which was most of the cost of recording a Run. It works on
        SCRATCH_REF, never on the user's index or HEAD; HEAD moves afterwards by
        compare-and-swap.
        """
        identity = self._identity()
        argv = command("-c", "fastimport.unpackLimit=1", "fast-import", "--quiet", "--force", "--date-format=now")
        try:
            proc = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=dict(os.environ, **identity))
        except OSError as exc:
            raise GitError(f"git fast-import failed: {exc}") from exc
        assert proc.stdin is not None
        try:
            head = [f"ls {old} \"\"\n" if old else "", f"reset {SCRATCH_REF}\n",
                    f"commit {SCRATCH_REF}\nmark :1\n",
                    f"author {identity['GIT_AUTHOR_NAME']} <{identity['GIT_AUTHOR_EMAIL']}> now\n",
                    f"committer {identity['GIT_COMMITTER_NAME']} <{identity['GIT_COMMITTER_EMAIL']}> now\n"]
            text = message if message.endswith("\n") else message + "\n"
            proc.stdin.write("".join(head).encode() + _data(text.encode()))
            if old:
                proc.stdin.write(f"from {old}\n".encode())
            written: list[str] = []
            deleted: list[str] = []
            for path in paths:
                data = self._read(path)
                if data is None:
                    proc.stdin.write(f"D {_quote(path)}\n".encode())
                    deleted.append(path)
                elif leaks.holds_private_key(data):
                    self._notice(f"{path} holds a private key block: left out of the commit (delete the file, "
                                 "and replace the key if it was a real one)")
                else:
                    proc.stdin.write(f"M 100644 inline {_quote(path)}\n".encode() + _data(data))
                    written.append(path)
            proc.stdin.write(b'ls ""\n\nget-mark :1\n')
            out, err = proc.communicate()
        except (OSError, ValueError) as exc:
            proc.kill()
            proc.wait()
            raise GitError(f"git fast-import failed: {exc}") from exc
        lines = out.decode().splitlines()
        if proc.returncode != 0 or len(lines) != (3 if old else 2):
            raise GitError(f"git fast-import failed: {err.decode().strip() or f'exit {proc.returncode}'}")
        trees = [line.split()[2] for line in lines[:-1]]
        return lines[-1].strip(), len(trees) == 1 or trees[0] != trees[1], written, deleted

    def _read(self, path: str) -> bytes | None:
        """A work-tree file's bytes for a commit; None for one to commit as deleted (missing, or refused)."""
        try:
            return self._tree.read_bytes(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except UnsafePath as exc:
            self._notice(f"{exc.path} is {exc.what}; {exc.reason or REFUSAL}: {path} is committed as deleted")
            return None

    def _gc_auto(self) -> None:
        # Each batch is one small pack; git consolidates them once there are enough (gc.autoPackLimit).
        try:
            self.run("gc", "--auto", "--quiet")
        except GitError:
            pass  # housekeeping: the next round tries again

    def _refresh_user_index(self, written: Sequence[str], deleted: Sequence[str]) -> None:
        """Make the user's index agree with HEAD for our paths, and only those.

        Paths committed as deleted are removed from the index without git
        looking at the work tree, where a link or special file may be (git
        would add a link as one, and refuse a path beneath one).
        """
        # update-index applies each option to the paths after it; ours all start with runs/, never '-'.
        argv = ["update-index", "--add", "--remove", *written, "--force-remove", "--", *deleted]
        for attempt in range(INDEX_LOCK_RETRIES):
            try:
                self.run(*argv)
                return
            except GitError as exc:
                if "index.lock" not in str(exc) or attempt == INDEX_LOCK_RETRIES - 1:
                    raise
                time.sleep(0.02)  # the user's git holds the index; it releases it in milliseconds

    def _identity(self) -> dict[str, str]:
        """Author and committer name and email, as git resolves them, with our fallback where it has none."""
        if self._env is None:
            env: dict[str, str] = {}
            for key in ("name", "email"):
                try:
                    self.run("config", f"user.{key}")
                except GitError:
                    if not os.environ.get(f"GIT_AUTHOR_{key.upper()}"):
                        env[f"GIT_AUTHOR_{key.upper()}"] = FALLBACK_IDENTITY[key]
                        env[f"GIT_COMMITTER_{key.upper()}"] = FALLBACK_IDENTITY[key]
            for role in ("AUTHOR", "COMMITTER"):
                # "Name <email> 1700000000 +0000": git's own resolution of config and environment.
                ident = self.run("var", f"GIT_{role}_IDENT", env=dict(os.environ, **env))
                name, _, rest = ident.rpartition(" <")
                env[f"GIT_{role}_NAME"], env[f"GIT_{role}_EMAIL"] = name, rest.split(">", 1)[0]
            self._env = env
        return self._env

    def log(self, count: int = 10) -> list[str]:
        if self.head() is None:
            return []
        return self.run("log", f"-{count}", "--format=%h %s").splitlines()


def _data(payload: bytes) -> bytes:
    return f"data {len(payload)}\n".encode() + payload + b"\n"


def _quote(path: str) -> str:
    """A path as fast-import reads it: C-style quoted when it holds anything unusual."""
    if path.isascii() and path.isprintable() and not path.startswith('"') and "\\" not in path:
        return path
    escaped = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else
                      "".join(f"\\{b:03o}" for b in c.encode()) for c in path)
    return f'"{escaped}"'


def git_dirs(root: Path) -> tuple[Path, ...]:
    """The git directory of the work tree at `root` and its common directory (they differ in a worktree).

    Absolute; empty when `root` is not in a repository. Files in them are
    never read for a Task (intake.RepoFiles), wherever they are.
    """
    try:
        out = git.Git(str(root)).execute(command("rev-parse", "--path-format=absolute", "--absolute-git-dir",
                                                 "--git-common-dir"))
    except (git.GitCommandError, OSError):
        return ()
    return tuple(dict.fromkeys(Path(line) for line in str(out).splitlines() if line))


def tracked(root: Path, paths: Sequence[str]) -> set[str]:
    """Those of `paths` (relative to the work tree `root`) that are in git's index: one `git ls-files`.

    Names are matched literally (`--literal-pathspecs`: a `*` in a name is no
    pattern), and only files, not directories, are in the answer. GitError
    when git fails.
    """
    if not paths:
        return set()
    argv = command("--literal-pathspecs", "ls-files", "-z", "--cached", "--", *paths)
    try:
        done = subprocess.run(argv, cwd=root, capture_output=True)
    except OSError as exc:
        raise GitError(f"git ls-files failed: {exc}") from exc
    if done.returncode != 0:
        raise GitError(f"git ls-files failed: {done.stderr.decode(errors='replace').strip() or done.returncode}")
    return {os.fsdecode(name) for name in done.stdout.split(b"\0") if name} & set(paths)


def toplevel(path: Path) -> Path | None:
    try:
        out = git.Git(str(path)).execute(command("rev-parse", "--show-toplevel"))
    except (git.GitCommandError, OSError):
        return None
    return Path(str(out))


def init(path: Path) -> None:
    try:
        git.Git(str(path)).execute(command("init", "--quiet"))
    except (git.GitCommandError, OSError) as exc:
        raise GitError(f"git init failed in {path}: {exc}") from exc
