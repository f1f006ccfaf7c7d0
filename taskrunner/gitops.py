"""git, for the daemon: the only module that touches GitPython.

We use GitPython's command runner (`git.Git`), not `git.Repo`: the runner
spawns one short-lived git process per call, while a long-lived `Repo` keeps
`git cat-file` processes around (a known leak in daemons).

Commits never go through the user's index: `git fast-import` builds the
commit from HEAD with only our paths changed (on a scratch ref, writing one
pack per batch), HEAD moves by compare-and-swap (`update-ref HEAD NEW OLD`),
and afterwards only our paths are set in the user's index, to exactly what
was committed (`update-index --index-info`: mode, blob, path; the work tree
is not read again), so whatever they staged stays staged. Every
GC_EVERY_COMMITS commits a geometric repack folds the small packs together
and `git gc --auto` does what `git commit` would (Git._gc_auto).

The user's git may hold `index.lock` for seconds (an IDE, a long `git add`).
The refresh waits for it up to INDEX_LOCK_WAIT_SECONDS, and if it is still
held keeps the entries pending (`index_pending`) for the next
`refresh_index`, never dropping them: an index that lacks a committed record
shows it as a staged deletion, and the user's next commit would delete it.
When HEAD moved while entries were pending, `refresh_index` also reports
the records HEAD no longer holds as committed, so they are committed again.

Remote commands exist (`remote`: fetch and push, for `git.push` and sync):
they run with GIT_TERMINAL_PROMPT=0, stdin closed and no controlling
terminal (they fail rather than wait for a password), the repository's
GIT_* environment removed (the git directory is passed explicitly), SAFE_CONFIG,
and a timeout (REMOTE_TIMEOUT_SECONDS). The remote's URL, `core.sshCommand`
and credential helpers are the user's own, from the clone's .git/config,
which no push can change.

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

import collections
import hashlib
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from taskrunner import crashpoints, diskspace, leaks
from taskrunner.atomic import open_regular, read_file, write_bytes
from taskrunner.errors import GitError, UnsafePath
from taskrunner.gitbase import (  # noqa: F401 (named here too)
    SAFE_CONFIG,
    command,
    git_dirs,
    head_of,
    state_dir,
    toplevel,
)
from taskrunner.lazymodule import lazy
from taskrunner.safefs import REFUSAL, Beneath

git = lazy("git")  # GitPython, imported when a command first runs git through it

ZERO = "0" * 40
#: Identity for commits in a repository whose user has none configured.
FALLBACK_IDENTITY = {"name": "taskrun", "email": "taskrun@localhost"}
#: How long one index refresh waits for the user's git to release index.lock
#: before leaving the refresh pending (it is tried again with the next batch and on a timer).
INDEX_LOCK_WAIT_SECONDS = 1.0
#: Compare-and-swap attempts of one commit_paths before it gives up with a GitError
#: (the recorder keeps the batch and tries again after a backoff).
COMMIT_ATTEMPTS = 20
#: A fetch or push that takes longer than this is stopped and counts as failed.
REMOTE_TIMEOUT_SECONDS = 120.0
#: git's variables of the daemon's environment that remote commands keep (how to reach the remote).
REMOTE_ENV_KEPT = ("GIT_SSH", "GIT_SSH_COMMAND")
#: fast-import builds each commit here; HEAD then moves to it by compare-and-swap.
SCRATCH_REF = "refs/taskrun/recorder"
#: In the state dir: the commits taskrun made in this clone, one sha a line (Git.remember_own).
OWN_COMMITS = "own-commits"
OWN_COMMITS_MAX_BYTES = 4 * 1024 * 1024
_COMMIT_ID = re.compile(rb"[0-9a-f]{40}|[0-9a-f]{64}")  # a line of OWN_COMMITS
#: A file committed is read and written to fast-import in chunks of this many bytes (one read when smaller).
STREAM_CHUNK_BYTES = 1024 * 1024
#: fast-import streams a blob larger than this straight into its pack instead of holding it in memory.
BIG_FILE_BYTES = 8 * 1024 * 1024
#: A chunk is checked for a private key block together with this much of the chunk before it: a key
#: header (leaks.PRIVATE_KEY_PATTERN) split between two chunks is found while it is shorter than this.
KEY_OVERLAP_BYTES = 4096
#: Fold the packs (a geometric repack) and run `git gc --auto` (what `git commit` does after each) this often.
GC_EVERY_COMMITS = 50
#: In the git directory while a person's git command is half way through (as `git status` tells them).
IN_PROGRESS = (("rebase-merge", "a rebase"), ("rebase-apply", "a rebase or `git am`"), ("MERGE_HEAD", "a merge"),
               ("CHERRY_PICK_HEAD", "a cherry-pick"), ("REVERT_HEAD", "a revert"))
class Git:
    def __init__(self, root: Path, notice: Callable[[str], None] | None = None) -> None:
        self.root = root
        # A Path, not a str: GitPython expands "~" and "$VARS" in a str (a clone at /srv/$HOME/x would
        # have git run elsewhere), and only resolves a Path.
        self._git = git.Git(Path(root))
        self._env: dict[str, str] | None = None
        self._commits = 0
        self._notice = notice or (lambda message: None)
        self._tree = Beneath(root)
        self._hash: str | None = None
        self._index_file: Path | None = None
        self._git_dir: Path | None = None
        #: path -> (mode, blob) to set in the user's index, or None to remove it; see refresh_index.
        self.index_pending: dict[str, tuple[str, str] | None] = {}
        #: Committed paths a later commit removed or changed (see refresh_index): to commit again.
        self.recommit: set[str] = set()
        #: The commit the pending entries were last made for.
        self._pending_commit: str | None = None
        #: A sync is moving the work tree and HEAD (gitflow/sync.move); the daemon clears it once it
        #: has taken the new HEAD as the base of new Runs.
        self.moving = False
        #: The last commits commit_paths made, each noted before HEAD moves to it.
        self.made: collections.deque[str] = collections.deque(maxlen=64)

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

    def commit_paths(self, paths: Sequence[str], message: str, refresh: bool = True) -> str | None:
        """Commit exactly `paths` as they are in the work tree; None if nothing changed.

        HEAD moves by compare-and-swap; when a user's commit moved it meanwhile
        the commit is built again on the new HEAD, up to COMMIT_ATTEMPTS times
        with a short random pause, then GitError (nothing is lost: the caller
        tries again later). Afterwards the user's index gets the committed
        entries (`refresh_index`); a refresh the user's git blocks stays
        pending and does not fail the commit. With `refresh` False the entries
        only join `index_pending`, for the caller's next `refresh_index`: git
        rewrites the whole index for any change, so a caller committing batch
        after batch refreshes it once for several. While a person's rebase, merge,
        cherry-pick or revert is half way through in the clone, GitError: HEAD
        is theirs until it ends, and the records wait.
        """
        for attempt in range(COMMIT_ATTEMPTS):
            busy = self.in_progress()
            if busy:
                raise GitError(f"{busy} is in progress in this clone: the records are committed once it ends")
            old = self.head()
            commit, changed, written, deleted = self._import(paths, message, old)
            if not changed:
                return None
            self.made.append(commit)  # before HEAD moves: whoever sees it on HEAD knows it is ours
            # Noted before HEAD moves too: killed in between, the next daemon still knows the commit on
            # HEAD for its own (a push rebases it instead of calling the clone diverged). A noted commit
            # that never reached HEAD is on no branch, and nothing is ever rebuilt from it.
            self.remember_own([commit])
            crashpoints.reached("daemon.commit_built")
            try:
                self.run("update-ref", "-m", "taskrun: record Runs", "HEAD", commit, old or ZERO)
            except GitError as exc:
                if self.head() == old and diskspace.git_full(str(exc), self.root):
                    # Not moved: its lock found no room (git says only "couldn't write"). Kept; tried again.
                    raise GitError(f"cannot move HEAD: {diskspace.reason('the repository', self.root)} "
                                   f"({error_text(str(exc))})") from None
                # HEAD moved under us (a user commit), or its ref is locked: build on the new HEAD.
                time.sleep(random.uniform(0.0, 0.01 * min(attempt + 1, 10)))
                continue
            crashpoints.reached("daemon.head_moved")
            for path, blob in written:
                self.index_pending[path] = ("100644", blob)
            for path in deleted:
                self.index_pending[path] = None
            self._pending_commit = commit
            if refresh:
                self.refresh_index()
            self._commits += 1
            if self._commits % GC_EVERY_COMMITS == 0:
                self._gc_auto()
            return commit
        raise GitError(f"HEAD kept moving while committing records ({COMMIT_ATTEMPTS} attempts); "
                       "the records are kept and committed on the next attempt")

    def _import(self, paths: Sequence[str], message: str,
                old: str | None) -> tuple[str, bool, list[str], list[str]]:
        """One commit on top of `old` through `git fast-import`.

        Returns its sha, whether its tree differs from `old`'s, the paths
        committed as files with their blob ids, and the paths committed as
        deleted (a path left out, holding a private key, is in neither).

        fast-import writes the blobs, trees and commit of a batch as one pack
        instead of a loose object file (plus a link and an unlink) per object,
        which was most of the cost of recording a Run. It works on
        SCRATCH_REF, never on the user's index or HEAD; HEAD moves afterwards by
        compare-and-swap.

        A failed fast-import (a full disk, say) leaves nothing behind: the
        crash report it writes into the git directory is removed, its pack
        is never kept (unpackLimit), and the GitError says why, in words a
        user acts on when the disk is full; the recorder tries again later.
        """
        identity = self._identity()
        argv = command("-c", "fastimport.unpackLimit=1", "fast-import", "--quiet", "--force", "--date-format=now",
                       f"--big-file-threshold={BIG_FILE_BYTES}")
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
            written: list[tuple[str, str]] = []
            deleted: list[str] = []
            for path in paths:
                fd = self._read(path)
                if fd is None:
                    proc.stdin.write(f"D {_quote(path)}\n".encode())
                    deleted.append(path)
                    continue
                with os.fdopen(fd, "rb") as handle:
                    blob = self._stream_blob(path, handle, proc.stdin)
                if blob is None:
                    self._notice(f"{path} holds a private key block: left out of the commit (delete the file, "
                                 "and replace the key if it was a real one)")
                else:
                    written.append((path, blob))
            proc.stdin.write(b'ls ""\n\nget-mark :1\n')
            out, err = proc.communicate()
        except (OSError, ValueError) as exc:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    pipe.close()  # type: ignore[union-attr]
                except OSError:
                    pass  # its unwritten buffer: the process is gone
            self._drop_crash_report(proc.pid, "")
            raise GitError(f"git fast-import failed: {exc}") from exc
        lines = out.decode().splitlines()
        if proc.returncode != 0 or len(lines) != (3 if old else 2):
            detail = err.decode(errors="replace").strip() or f"exit {proc.returncode}"
            self._drop_crash_report(proc.pid, detail)
            full = diskspace.git_full(detail, self.root)
            if full:
                detail = f"{diskspace.reason('the repository', self.root)} ({full})"
            raise GitError(f"git fast-import failed: {detail}")
        trees = [line.split()[2] for line in lines[:-1]]
        return lines[-1].strip(), len(trees) == 1 or trees[0] != trees[1], written, deleted

    def _drop_crash_report(self, pid: int, stderr: str) -> None:
        """Remove what a failed fast-import (process `pid`) left in the git directory: its crash report
        (fast_import_crash_<pid>) and the temp packs its `stderr` names (objects/pack/tmp_pack_*)."""
        packs = set(re.findall(r"\btmp_pack_[A-Za-z0-9]{6}\b", stderr))
        for directory in git_dirs(self.root):
            for path in [directory / f"fast_import_crash_{pid}", *(directory / "objects" / "pack" / name
                                                                  for name in sorted(packs))]:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _stream_blob(self, path: str, handle: BinaryIO, out: BinaryIO) -> str | None:
        """Write `M 100644 inline <path>` and the file's bytes into fast-import's `out`; the blob id, or
        None when the file holds a private key block (nothing is written then).

        A file up to STREAM_CHUNK_BYTES is read at once. A larger one is read twice in chunks, never
        whole: once for its blob id and the key check, then into `data <size>`; memory stays the same
        whatever its size. A file that changes between the two reads fails the commit (GitError; the
        recorder tries again), since what was checked must be what is committed.
        """
        size = os.fstat(handle.fileno()).st_size
        if size <= STREAM_CHUNK_BYTES:
            data = handle.read()
            if leaks.holds_private_key(data):
                return None
            out.write(f"M 100644 inline {_quote(path)}\n".encode() + _data(data))
            return self.blob_id(data)
        first = self._scan(handle, size, None)
        if first is None:
            return None
        handle.seek(0)
        out.write(f"M 100644 inline {_quote(path)}\ndata {size}\n".encode())
        if self._scan(handle, size, out) != first:
            raise OSError(f"{path} changed while it was committed")
        out.write(b"\n")
        return first

    def _scan(self, handle: BinaryIO, size: int, out: BinaryIO | None) -> str | None:
        """Read `size` bytes of `handle` in chunks (copying them to `out`); their blob id, None when they
        hold a private key block. Each chunk is checked with the tail of the one before it
        (KEY_OVERLAP_BYTES), so a key block across two chunks is found. OSError when the file is shorter."""
        digest = hashlib.new(self._object_format(), b"blob %d\0" % size)
        carry = b""
        left = size
        while left:
            chunk = handle.read(min(STREAM_CHUNK_BYTES, left))
            if not chunk:
                raise OSError("the file got shorter while it was committed")
            left -= len(chunk)
            digest.update(chunk)
            if leaks.holds_private_key(carry + chunk):
                return None
            carry = chunk[-KEY_OVERLAP_BYTES:]
            if out is not None:
                out.write(chunk)
        return digest.hexdigest()

    def _read(self, path: str) -> int | None:
        """A read-only fd of a work-tree file for a commit (the caller closes it); None for one to commit as
        deleted (missing, or refused). Opened beneath the work tree without following links (safefs)."""
        try:
            return self._tree.open_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except UnsafePath as exc:
            self._notice(f"{exc.path} is {exc.what}; {exc.reason or REFUSAL}: {path} is committed as deleted")
            return None

    def _gc_auto(self) -> None:
        # Each batch is one small pack. `gc --auto` alone repacks the whole repository once there are 50: with
        # 10,000 Runs' records 1.5 s of CPU every 50 commits. A geometric repack (git >= 2.32) rolls only the
        # small packs together (each object rewritten about log2(count) times), so gc --auto finds few packs.
        for args in (("repack", "--geometric=2", "-d", "-l", "-q"), ("gc", "--auto", "--quiet")):
            try:
                self.run(*args)
            except GitError:
                pass  # housekeeping: the next round tries again (an older git lacks --geometric: gc does it)

    def blob_id(self, data: bytes) -> str:
        """The id git gives a blob of `data` (sha1 or sha256, as the repository uses)."""
        return hashlib.new(self._object_format(), b"blob %d\0" % len(data) + data).hexdigest()

    def _object_format(self) -> str:
        """The repository's hash, "sha1" or "sha256" (asked once)."""
        if self._hash is None:
            try:
                self._hash = self.run("rev-parse", "--show-object-format") or "sha1"
            except GitError:
                self._hash = "sha1"
        return self._hash

    def index_file(self) -> Path:
        """The user's index (`git rev-parse --git-path index`: worktrees and GIT_INDEX_FILE included)."""
        if self._index_file is None:
            path = Path(self.run("rev-parse", "--git-path", "index"))
            self._index_file = path if path.is_absolute() else self.root / path
        return self._index_file

    def refresh_index(self, wait: float | None = None) -> bool:
        """Set the pending entries in the user's index (only those); False while they stay pending.

        Waits up to `wait` seconds (None: INDEX_LOCK_WAIT_SECONDS) for the user's git to release index.lock.
        If it is still held, or appears before update-index takes it, nothing
        is lost: the entries stay pending and False comes back. Paths
        committed as deleted are removed without git looking at the work tree,
        where a link or special file may be. When HEAD has moved past the
        commit the entries came from, the paths HEAD no longer holds as they
        were committed (a user's commit made from an index that lacked them
        removed them) are added to `recommit`, to be committed again. GitError for any other
        failure of git (the entries stay pending).
        """
        if not self.index_pending:
            return True
        lock = self.index_file().with_name(self.index_file().name + ".lock")
        deadline = time.monotonic() + (INDEX_LOCK_WAIT_SECONDS if wait is None else wait)
        while os.path.lexists(lock):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        entries = dict(self.index_pending)
        removed = "0" * len(self.blob_id(b""))  # mode 0 removes the entry (git-update-index(1), --index-info)
        lines = [f"{entry[0]} {entry[1]}\t{path}" if entry else f"0 {removed}\t{path}"
                 for path, entry in entries.items()]
        done = subprocess.run(command("update-index", "-z", "--index-info"), cwd=self.root, capture_output=True,
                              input=b"".join(os.fsencode(line) + b"\0" for line in lines))
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()
            if "index.lock" in detail:
                return False
            raise GitError(f"git update-index failed: {detail or done.returncode}")
        for path, entry in entries.items():
            if self.index_pending.get(path) == entry:
                del self.index_pending[path]
        crashpoints.reached("daemon.index_refreshed")
        commit, self._pending_commit = self._pending_commit, None
        if commit is not None:
            # Not only when HEAD moved past our last commit: with one refresh for several commits, a user's
            # commit may sit between two of ours, and HEAD is then our own commit on top of it.
            self.recommit.update(self._lost(self.head(), entries))
        return True

    def _lost(self, head: str | None, entries: dict[str, tuple[str, str] | None]) -> list[str]:
        """Those of `entries` that HEAD does not hold as they were committed."""
        try:
            held = tree_entries(self.root, head, list(entries)) if head is not None else {}
        except GitError:
            held = {}  # unknown: all are committed again (a commit of unchanged files changes nothing)
        return sorted(path for path, entry in entries.items() if held.get(path) != entry)

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

    def branch(self) -> str | None:
        """The branch HEAD is on (`main`), or None when HEAD is detached."""
        try:
            return self.run("symbolic-ref", "--quiet", "--short", "HEAD") or None
        except GitError:
            return None

    def remote(self, *args: str, timeout: float = REMOTE_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
        """`git <args>` for a command that reaches a remote (fetch, push): never prompts, never hangs.

        The repository is named explicitly (`--git-dir`), git's variables of
        the daemon's environment are left out but GIT_SSH and GIT_SSH_COMMAND
        (`REMOTE_ENV_KEPT`), GIT_TERMINAL_PROMPT=0, stdin closed, a new session
        (no controlling terminal, so ssh cannot ask either). Returns the
        finished process whatever its exit code (a rejected push is an
        answer to read); GitError when git cannot be started or times out.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k in REMOTE_ENV_KEPT}
        env.update(GIT_TERMINAL_PROMPT="0", SSH_ASKPASS_REQUIRE="never", LC_ALL="C")
        argv = command(f"--git-dir={self.git_dir()}", *args)
        try:
            return subprocess.run(argv, cwd=self.root, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise GitError(f"git {args[0]} took longer than {timeout:.0f}s and was stopped") from exc
        except OSError as exc:
            raise GitError(f"git {args[0]} failed: {exc}") from exc

    def remember_own(self, commits: Sequence[str]) -> None:
        """Note `commits` as made by taskrun in this clone (OWN_COMMITS); only such commits are ever
        rebuilt onto another parent (gitflow/sync.py). A message or an author says nothing: anyone
        who can push can write `taskrun: ...` as a subject."""
        path = self.git_dir() / "taskrun" / OWN_COMMITS
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT  # read too: the newer half is kept (below)
            try:
                fd = open_regular(path, flags)
            except OSError:  # a link, a FIFO, a device: never written through; a file of our own instead
                path.unlink(missing_ok=True)
                fd = open_regular(path, flags | os.O_EXCL)
            try:
                # From a line of its own, whatever the file ended with (a writer killed mid-line, garbage).
                os.write(fd, "".join(f"\n{sha}" for sha in commits).encode() + b"\n")
                size = os.fstat(fd).st_size
                # Over the limit (or a giant someone made): keep the newer half, read from its end.
                kept = os.pread(fd, OWN_COMMITS_MAX_BYTES // 2, size - OWN_COMMITS_MAX_BYTES // 2) \
                    if size > OWN_COMMITS_MAX_BYTES else None
            finally:
                os.close(fd)
            if kept is not None:  # a rebase only ever looks at recent commits; only whole commit ids stay
                lines = [line for line in kept.split(b"\n") if _COMMIT_ID.fullmatch(line)]
                write_bytes(path, b"".join(line + b"\n" for line in lines), mode=0o600, durable=False)
        except OSError as exc:  # a directory in its place, a full disk: the commit is kept, tried again
            raise GitError(f"cannot note taskrun's commit in {path}: {exc.strerror or exc}"
                           + ("" if diskspace.is_full(exc) else "; remove it (the daemon makes it again)")) from None

    def own_commits(self) -> set[str]:
        """The commits `remember_own` noted."""
        try:
            return set(read_file(self.git_dir() / "taskrun" / OWN_COMMITS).decode(errors="replace").split())
        except OSError:  # missing, or not a regular file (a link, a FIFO): none known
            return set()

    def in_progress(self) -> str | None:
        """What a person's git is half way through in this work tree ("a rebase", "a merge", ...), or None."""
        return next((what for name, what in IN_PROGRESS if os.path.lexists(self.git_dir() / name)), None)

    def git_dir(self) -> Path:
        """This work tree's git directory, absolute (asked once)."""
        if self._git_dir is None:
            dirs = git_dirs(self.root)
            if not dirs:
                raise GitError(f"{self.root} is not in a git repository")
            self._git_dir = dirs[0]
        return self._git_dir

    def log(self, count: int = 10) -> list[str]:
        if self.head() is None:
            return []
        return self.run("log", f"-{count}", "--format=%h %s").splitlines()


#: Paths per `git ls-tree` in tree_entries (an argv stays well under the system's limit).
LS_TREE_PATHS = 500


def tree_entries(root: Path, commit: str, paths: Sequence[str]) -> dict[str, tuple[str, str]]:
    """path -> (mode, blob id) of those of `paths` that `commit` holds (literal paths, from the top); GitError
    when git fails."""
    held: dict[str, tuple[str, str]] = {}
    for start in range(0, len(paths), LS_TREE_PATHS):
        done = subprocess.run(command("--literal-pathspecs", "ls-tree", "-z", "--full-tree", commit, "--",
                                      *paths[start:start + LS_TREE_PATHS]), cwd=root, capture_output=True)
        if done.returncode != 0:
            raise GitError(f"git ls-tree failed: {error_text(done.stderr.decode(errors='replace'))}")
        for record in done.stdout.split(b"\0"):
            meta, _, name = record.partition(b"\t")
            if name:
                mode, _, blob = meta.decode().split(" ")
                held[os.fsdecode(name)] = (mode, blob)
    return held


def error_text(stderr: str) -> str:
    """What git said went wrong, on one line: its `fatal:`/`error:` lines, else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return " ".join(errors or lines[-1:]) or "no message"


def _data(payload: bytes) -> bytes:
    return f"data {len(payload)}\n".encode() + payload + b"\n"


def _quote(path: str) -> str:
    """A path as fast-import reads it: C-style quoted when it holds anything unusual."""
    if path.isascii() and path.isprintable() and not path.startswith('"') and "\\" not in path:
        return path
    escaped = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else
                      "".join(f"\\{b:03o}" for b in c.encode()) for c in path)
    return f'"{escaped}"'


def init(path: Path) -> None:
    try:
        git.Git(Path(path)).execute(command("init", "--quiet"))  # a Path: see Git.__init__
    except (git.GitCommandError, OSError) as exc:
        raise GitError(f"git init failed in {path}: {exc}") from exc
