"""The Worker's object cache, and a Run's checkout from it.

    <home>/repos/<repo-id>.git    a bare repository per repository id, 0700
        refs/taskrun/have/<sha>   every base commit received (keeps its objects)
        taskrun-recent.json       the last RECENT_COMMITS base commits received, newest last

A control plane sends a Run the objects of its base commit that this Worker
lacks, as a git pack (transfer.py); the Worker checks that the pack's
prerequisites (the commits the control plane believed it had) are here before
the Run is admitted, imports the pack with object checks on (`index-pack
--strict`, `transfer.fsckObjects`), and names the base commit under
`refs/taskrun/have/`. The session's `ready` reports `recent()` per repository
id, so the next Run sends only what changed since.

The cache is created with `core.sharedRepository=0644`: its object files are
readable by others, because a root Worker's Agent runs as a uid of its own and
reads them, read-only, through its workspace's alternates (the Worker binds
the objects directory read-only into the sandbox; the cache directory itself
stays 0700 and is never visible to an Agent).

A checkout (`checkout`) costs one git process: `read-tree --reset -u <base>`
on the cache with the workspace as work tree and an index of the Run's own
(`<run_dir>/index`, outside the sandbox), which fills the workspace (all but
`runs/`: a sparse checkout, SPARSE_CHECKOUT). Then the Worker writes the
Agent's `.git` (HEAD on a local branch at the base commit, no remote,
alternates to the cache, a copy of the index): `git status`, `git log` and
`git diff` work there. change.py collects the Agent's change with the cache
as git directory, the Run's own index and an object directory of the Run's
own, never with the workspace's `.git`, which is the Agent's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from taskrunner.atomic import write_bytes
from taskrunner.errors import GitError, WorkerError
from taskrunner.gitflow.plumbing import git, present, write_file

#: How many recently received base commits a Worker reports per repository (its `ready`).
RECENT_COMMITS = 16
#: The cache's packs are folded into one when it holds this many (one arrives per new base commit).
REPACK_AT = 32
#: A repository id: what transfer.repo_id makes.
REPO_ID_RE = re.compile(r"^[0-9a-f]{32}$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
#: Settings for every git process on the cache: packs checked object by object as they arrive.
CACHE_CONFIG = ("transfer.fsckObjects=true", "receive.fsckObjects=true", "fetch.fsckObjects=true",
                "core.sharedRepository=0644", "gc.auto=0")
#: Settings for a Run's own git directory: stat data compared leniently, since a root Worker hands the
#: workspace to the Agent's uid (chown changes ctime and owner, not contents).
RUN_CONFIG = ("core.checkStat=minimal", "core.trustctime=false", "core.filemode=true", "core.symlinks=true")
#: Not checked out into a workspace: the records (the daemon's, growing with every Run; an Agent
#: has no use for them, and writing them cost most of a checkout). The cache's info/sparse-checkout.
SPARSE_CHECKOUT = b"/*\n!/runs/\n"
#: A checkout from the cache: its own work tree and index, the records left out.
CHECKOUT_CONFIG = (*RUN_CONFIG, "core.bare=false", "core.sparseCheckout=true")


class MissingObjects(WorkerError):
    """Raised when a Run's pack needs commits this Worker's cache lacks (wiped, or never received)."""


class CacheError(WorkerError):
    """Raised when the cache cannot take a pack or check out a commit; the message says why."""


class ObjectCache:
    """One repository's object cache on a Worker (see the module doc)."""

    def __init__(self, home: Path, repo_id: str) -> None:
        if not REPO_ID_RE.match(repo_id):
            raise CacheError(f"invalid repository id {repo_id!r}")
        self.repo_id = repo_id
        self.path = home / "repos" / f"{repo_id}.git"

    @property
    def objects(self) -> Path:
        return self.path / "objects"

    def ensure(self) -> None:
        """Create the cache on first use (0700)."""
        if (self.path / "HEAD").is_file() and (self.path / "info" / "sparse-checkout").is_file():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        # --template= : no sample hooks or other template files; the config is ours alone.
        if not (self.path / "HEAD").is_file():
            git(self.path, "init", "--quiet", "--bare", "--template=", "--shared=0644", str(self.path))
        (self.path / "info").mkdir(exist_ok=True)
        write_bytes(self.path / "info" / "sparse-checkout", SPARSE_CHECKOUT, mode=0o644, durable=False)
        os.chmod(self.path, 0o700)

    def missing(self, commits: list[str]) -> list[str]:
        """Those of `commits` the cache does not hold."""
        if not commits:
            return []
        if not (self.path / "HEAD").is_file():
            return list(commits)
        # Commits this cache checked out before have a ref file: no git process for the usual case.
        unsure = [sha for sha in commits if not (SHA_RE.match(sha) and
                                                 (self.path / "refs" / "taskrun" / "have" / sha).is_file())]
        if not unsure:
            return []
        found = present(self.path, unsure)
        return [sha for sha in unsure if sha not in found]

    def receive(self, pack: bytes, base: str) -> None:
        """Import `pack` with object checks on. CacheError when the pack is damaged or fails the checks.

        `index-pack --strict` checks every object, and that every object one of them names is here
        (in the pack or the cache): so, as the cache takes objects no other way, whatever it holds is
        complete. Whether it holds `base` itself, `checkout` finds out (read-tree fails without it),
        and only then is `base` kept (`refs/taskrun/have/`) and listed as received.
        """
        self.ensure()
        if not SHA_RE.match(base):
            raise CacheError(f"invalid base commit {base!r}")
        if pack:
            try:
                git(self.path, "index-pack", "--strict", "--stdin", "--fix-thin", stdin=pack, config=CACHE_CONFIG)
            except GitError as exc:
                raise CacheError(f"the repository pack was refused: {exc}") from None

    def _have(self, base: str) -> None:
        """`base` is here, whole: keep it under a ref of our own (written directly, one process less per
        Run), so a repack keeps its objects, and list it for `ready`."""
        have = self.path / "refs" / "taskrun" / "have" / base
        if have.is_file():
            return
        have.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(have, f"{base}\n".encode(), mode=0o644, durable=False)
        self._remember(base)
        self._consolidate()

    def _consolidate(self) -> None:
        """Fold the packs received into one once there are REPACK_AT of them. Nothing is dropped
        (--keep-unreachable): a pack another session just took for a Run not yet checked out names
        no ref yet, and a running checkout reads its objects."""
        try:
            packs = sum(1 for entry in os.scandir(self.objects / "pack") if entry.name.endswith(".pack"))
        except OSError:
            return
        if packs >= REPACK_AT:
            with self.lock(exclusive=True) as held:
                if not held:
                    return  # a checkout or a change being collected reads the packs: the next pack tries again
                try:
                    git(self.path, "repack", "-a", "-d", "-q", "--keep-unreachable", config=CACHE_CONFIG)
                except GitError:
                    pass  # housekeeping: the next pack received tries again

    @contextlib.contextmanager
    def lock(self, exclusive: bool = False) -> Iterator[bool]:
        """The cache's lock: shared while git reads objects (a checkout, a change collected), exclusive
        (never waited for; yields False when busy) while a repack replaces the packs they read."""
        self.ensure()
        fd = os.open(self.path / "taskrun.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def recent(self) -> list[str]:
        """The last RECENT_COMMITS base commits received, newest last."""
        try:
            data = json.loads((self.path / "taskrun-recent.json").read_bytes())
        except (OSError, ValueError):
            return []
        if not isinstance(data, list):
            return []
        return [sha for sha in data if isinstance(sha, str) and SHA_RE.match(sha)][-RECENT_COMMITS:]

    def _remember(self, base: str) -> None:
        commits = [sha for sha in self.recent() if sha != base] + [base]
        write_bytes(self.path / "taskrun-recent.json", json.dumps(commits[-RECENT_COMMITS:]).encode(),
                    mode=0o600, durable=False)

    def checkout(self, index: Path, workspace: Path, base: str, branch: str) -> None:
        """Fill the fresh directory `workspace` with `base` and give it a `.git` of its own (module doc).

        `index` (which must not exist; in the Run's directory, outside the sandbox) becomes the
        Worker's own index of the checkout, which change.py collects the Agent's change with.
        """
        workspace.mkdir(mode=0o700)
        try:
            with self.lock():
                git(self.path, "read-tree", "--reset", "-u", base, work_tree=workspace,
                    env={"GIT_INDEX_FILE": str(index)}, config=CHECKOUT_CONFIG)
        except GitError as exc:
            raise CacheError(f"cannot check out {base}: the repository cache does not hold it whole ({exc})") from None
        self._have(base)
        _agent_git_dir(workspace / ".git", base, (os.path.abspath(self.objects) + "\n").encode(), branch)
        shutil.copyfile(index, workspace / ".git" / "index")


def _agent_git_dir(git_dir: Path, base: str, alternates: bytes, branch: str) -> None:
    """The Agent's `.git`, in as few file-system operations as git accepts (each costs about a
    millisecond on a busy disk, per Run): HEAD on `branch` (a packed ref) at `base`, objects
    borrowed from the cache, no configuration (git's defaults), no remote."""
    (git_dir / "objects" / "info").mkdir(parents=True, mode=0o700)
    (git_dir / "refs").mkdir(mode=0o700)
    write_file(git_dir / "HEAD", f"ref: refs/heads/{branch}\n".encode())
    write_file(git_dir / "packed-refs", f"# pack-refs with: peeled fully-peeled sorted \n{base} refs/heads/{branch}\n"
               .encode())
    write_file(git_dir / "objects" / "info" / "alternates", alternates)


def branch_name(prefix: str, task_id: str) -> str:
    """The branch the Agent's checkout is on: `<prefix><task-id>` when that is a valid branch name, else
    `taskrun`."""
    name = f"{prefix}{task_id}"
    parts = name.split("/")
    if (not re.fullmatch(r"[A-Za-z0-9._/-]+", name) or ".." in name or "//" in name
            or name.endswith((".lock", "/", "."))
            or any(not part or part.startswith(".") or part.endswith(".lock") for part in parts)):
        return "taskrun"
    return name


# -- what serve.py calls ------------------------------------------------------------------------


def cached_commits(home: Path) -> dict[str, list[str]]:
    """{repository id: recent base commits} of every cache in `home`: the `repos` field of `ready`."""
    found: dict[str, list[str]] = {}
    try:
        entries = sorted((home / "repos").iterdir())
    except OSError:
        return found
    for entry in entries:
        repo_id = entry.name.removesuffix(".git")
        if entry.name.endswith(".git") and REPO_ID_RE.match(repo_id):
            found[repo_id] = ObjectCache(home, repo_id).recent()
    return found


def missing_objects(home: Path, manifest: dict[str, Any]) -> str | None:
    """Why this Worker cannot take the assignment's pack (prerequisites it lacks), or None."""
    repo = manifest.get("repo")
    if not isinstance(repo, dict) or not repo.get("prerequisites"):
        return None
    try:
        lacking = ObjectCache(home, repo["id"]).missing(list(repo["prerequisites"]))
    except (WorkerError, GitError) as exc:
        return f"the repository cache cannot be read: {exc}"
    if not lacking:
        return None
    return (f"this Worker's repository cache lacks {len(lacking)} of the commits the pack builds on "
            f"({lacking[0][:12]}…): send the whole history")


def prepare_workspace(home: Path, run_dir: Any, manifest: dict[str, Any], pack: bytes) -> bool:
    """Import the assignment's pack and check out its base into the Run's fresh workspace; False when the
    Run has no repository state (the archive alone goes into an empty workspace)."""
    repo = manifest.get("repo")
    if not isinstance(repo, dict):
        return False
    cache = ObjectCache(home, repo["id"])
    try:
        cache.receive(pack, repo["base"])
        git_fields = manifest.get("git") if isinstance(manifest.get("git"), dict) else {}
        # A name checked here too: it becomes a path under the workspace's .git/refs/heads.
        cache.checkout(run_dir.path / "index", run_dir.workspace, repo["base"],
                       branch_name("", str(git_fields.get("branch") or "taskrun")))
    except GitError as exc:
        raise CacheError(str(exc)) from None
    return True
