"""The repository to the Worker (control plane): what git data an assignment carries.

A Run works in a checkout of its base commit (the daemon clone's HEAD when the
Run was assigned). The bundle's manifest signs a `repo` object:

    repo  {id, base, sha256, size, prerequisites}
          id             this repository's random id (`<state dir>/repo-id`, made on first need),
                         so one Worker can serve several repositories
          base           the base commit (as manifest.base_commit)
          sha256, size   of the git pack that follows the archive in the `assign` payload
                         (size 0: no git data, the Worker has the base already)
          prerequisites  commits the pack's objects may lean on: the Worker must hold them all

and the manifest's `git` object says how to commit the Agent's change
(change.py): {author_name, author_email, max_result_bytes, branch, title}.

What the Worker has: its `ready` lists, per repository id, the base commits
its cache received recently (cache.RECENT_COMMITS); every base sent in this
session is added. The pack is `git pack-objects --revs` of the base, not
those of them the daemon clone holds: after a one-file change it holds one
commit, the trees on the way to the file, and the file. A Worker already
holding the base gets no git data at all. Packs are cached per (base, what the
Worker has), so Runs assigned together build one.

A Worker whose cache lacks a prerequisite (wiped, say) refuses the assignment
before its replay ledger sees it (`error {request: assign, missing_objects:
true}`); `resend` then builds the same Run's bundle again (new nonce and
sequence number) with a full pack, and forgets what it believed the Worker had.

A shallow daemon clone cannot give a Worker a complete history: such a Run
fails with a message saying to run `git fetch --unshallow` (README).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

from taskrunner import bundle, gitops
from taskrunner.atomic import read_file
from taskrunner.errors import GitError
from taskrunner.gitflow.cache import REPO_ID_RE, SHA_RE, branch_name
from taskrunner.gitflow.plumbing import git, present
from taskrunner.protocol import Message
from taskrunner.signing import SigningKey

#: Packs kept for reuse, per (base, the Worker's commits).
PACK_CACHE_ENTRIES = 8
#: Commits believed held per Worker, at most (the newest kept).
KNOWN_PER_WORKER = 64


def repo_id(state_dir: Path) -> str:
    """This repository's id (32 hex digits), made at random on first need and kept in `<state_dir>/repo-id`.

    It only names the repository in Workers' object caches, so it never fails a Run: a file that is
    no id of ours (garbage, a link, a FIFO, a giant: never read through) is replaced by a new id, and
    when none can be written (a full disk, a directory in its place) the new id serves from memory
    (Workers then send the whole history once more, under the id written later).
    """
    path = state_dir / "repo-id"
    try:
        found = read_file(path, 1024).decode(errors="replace").strip()
        if REPO_ID_RE.match(found):
            return found
        damaged = True
    except FileNotFoundError:
        damaged = False
    except OSError:  # a link, a FIFO, a directory, a giant
        damaged = True
    made = secrets.token_hex(16)
    tmp = path.with_name(f".repo-id.{os.getpid()}")
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.write_text(made + "\n")
        if damaged:
            os.replace(tmp, path)  # over the link or FIFO itself, never through it
            return made
        try:
            os.link(tmp, path)  # a concurrent maker's id, if it was first, stands
        except FileExistsError:
            pass
        found = read_file(path, 1024).decode(errors="replace").strip()
    except OSError:
        return made
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return found if REPO_ID_RE.match(found) else made


class Transfer:
    """Per daemon: the repository id, what each Worker holds, and the packs built (module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._repo_id: str | None = None
        self._git_dir: Path | None = None
        self.known: dict[str, list[str]] = {}
        self._packs: OrderedDict[tuple[str, tuple[str, ...]], bytes] = OrderedDict()
        self._pending: dict[str, dict[str, Any]] = {}  # run id -> what its bundle was built from
        self._seen: set[str] = set()  # commits found in the daemon clone
        #: Worker name -> the last bundle sequence number sent (next_seq).
        self.seqs: dict[str, int] = {}

    @property
    def git_dir(self) -> Path:
        if self._git_dir is None:
            dirs = gitops.git_dirs(self.root)
            if not dirs:
                raise GitError(f"{self.root} is not in a git repository")
            self._git_dir = dirs[-1]
        return self._git_dir

    def repo_id(self) -> str:
        if self._repo_id is None:
            self._repo_id = repo_id(gitops.state_dir(self.root))
        return self._repo_id

    # -- what Workers hold ---------------------------------------------------------------

    def worker_ready(self, worker: str, repos: Any) -> None:
        """A session's `ready`: `repos` is {repo id: [base commits]} as the Worker's cache lists them."""
        commits: list[str] = []
        if isinstance(repos, dict):
            listed = repos.get(self.repo_id())
            if isinstance(listed, list):
                commits = [sha for sha in listed if isinstance(sha, str) and SHA_RE.match(sha)]
        with self._lock:
            self.known[worker] = commits[-KNOWN_PER_WORKER:]

    def forget(self, worker: str) -> None:
        with self._lock:
            self.known.pop(worker, None)

    def _sent(self, worker: str, base: str) -> None:
        with self._lock:
            known = [sha for sha in self.known.get(worker, []) if sha != base] + [base]
            self.known[worker] = known[-KNOWN_PER_WORKER:]

    # -- building --------------------------------------------------------------------------

    def repo_part(self, worker: str, base: str | None, full: bool = False) -> tuple[dict[str, Any] | None, bytes]:
        """The manifest's `repo` object for `base` on `worker`, and the pack. GitError saying why not."""
        if base is None:
            return None, b""  # a clone with no commit yet: the archive alone (README)
        if (self.git_dir / "shallow").is_file():
            raise GitError("the daemon's clone is shallow: a Worker needs the whole history of the base commit; "
                           "run `git fetch --unshallow` in it")
        with self._lock:
            believed = [] if full else list(self.known.get(worker, []))
        # The usual case, every Run after the first on a base: no git process at all.
        haves = [base] if base in believed else self._present(believed)
        if base in haves:
            pack, prerequisites = b"", [base]
        else:
            key = (base, tuple(haves))
            with self._lock:
                cached = self._packs.get(key)
            if cached is None:
                revs = "".join([f"{base}\n", *(f"^{sha}\n" for sha in haves)]).encode()
                # --thin: objects may be deltas against the Worker's (the prerequisites'), which
                # index-pack --fix-thin completes there: a changed directory's tree costs a few bytes.
                # One thread: the same objects give the same bytes (a captured assignment can be rebuilt
                # to test the Worker's replay checks), and the daemon leaves the other core to the Workers.
                cached = git(self.git_dir, "pack-objects", "--stdout", "--revs", "--quiet", "--delta-base-offset",
                             "--threads=1", *(["--thin"] if haves else []), stdin=revs)
                with self._lock:
                    self._packs[key] = cached
                    while len(self._packs) > PACK_CACHE_ENTRIES:
                        self._packs.popitem(last=False)
            pack, prerequisites = cached, haves
        repo = {"id": self.repo_id(), "base": base, "sha256": hashlib.sha256(pack).hexdigest(), "size": len(pack),
                "prerequisites": prerequisites}
        return repo, pack

    def _present(self, commits: list[str]) -> list[str]:
        """Those of `commits` the daemon clone holds, sorted; each looked up once (a commit stays)."""
        unsure = [sha for sha in commits if sha not in self._seen]
        if unsure:
            found = present(self.git_dir, unsure)
            with self._lock:
                self._seen.update(found)
                while len(self._seen) > 4 * KNOWN_PER_WORKER * 16:
                    self._seen.pop()
        return sorted(sha for sha in commits if sha in self._seen)

    def assign(self, to: str, files: Mapping[str, bytes], signer: SigningKey, *, now: float, seq: int,
               base: str | None, git_fields: dict[str, Any], **fields: Any) -> tuple[bundle.Bundle, Message]:
        """The Run's signed bundle for Worker `to` and its `assign` record (archive, then pack, as the payload).

        GitError when the repository cannot be sent (the Run fails with it).
        """
        worker = to
        repo, pack = self.repo_part(worker, base)
        package = bundle.build(files, signer, now=now, seq=seq, base_commit=base, repo=repo, git=git_fields,
                               **fields)
        self._pending[fields["run_id"]] = {"files": dict(files), "signer": signer, "base": base,
                                           "git_fields": git_fields, "fields": fields, "worker": worker}
        if base is not None:
            self._sent(worker, base)
        return package, Message("assign", {"run_id": fields["run_id"], "envelope": package.envelope},
                                package.archive + pack)

    def next_seq(self, worker: str, now: float) -> int:
        """The next bundle sequence number for `worker`: microseconds since the epoch, and above the last
        one sent, so a restarted daemon continues above what the Worker's ledger holds."""
        seq = self.seqs[worker] = max(self.seqs.get(worker, 0) + 1, int(now * 1e6))
        return seq

    def resend(self, worker: str, run_id: str, now: float) -> tuple[bundle.Bundle, Message] | None:
        """The bundle of a Run the Worker refused for missing objects, again, with a full pack; None when
        this daemon did not build it (restarted since) or already resent it."""
        self.forget(worker)
        sent = self._pending.pop(run_id, None)
        if sent is None or sent.get("resent") or sent["worker"] != worker:
            return None
        seq = self.next_seq(worker, now)
        repo, pack = self.repo_part(worker, sent["base"], full=True)
        package = bundle.build(sent["files"], sent["signer"], now=now, seq=seq, base_commit=sent["base"], repo=repo,
                               git=sent["git_fields"], **sent["fields"])
        self._pending[run_id] = {**sent, "resent": True}
        if sent["base"] is not None:
            self._sent(worker, sent["base"])
        return package, Message("assign", {"run_id": run_id, "envelope": package.envelope}, package.archive + pack)

    def done(self, run_id: str) -> None:
        """The Run started or ended: its bundle is not needed again."""
        self._pending.pop(run_id, None)


def git_fields(config: Any, task_id: str, title: str) -> dict[str, Any]:
    """The manifest's `git` object from the configuration's `git` section (config.GitConfig)."""
    return {"author_name": config.author_name, "author_email": config.author_email,
            "max_result_bytes": config.max_result_bytes,
            "branch": branch_name(config.result_branch_prefix, task_id), "title": title}
