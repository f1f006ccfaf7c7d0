"""Changes back (Worker): the Agent's workspace, turned into one commit and a pack of its new objects.

When an Agent's Run ends COMPLETED, the Worker (outside the sandbox, as
itself) looks at the workspace with the repository cache as git directory
(read only), the Run's own index (`<run_dir>/index`, written by
cache.checkout), an object directory of the Run's own (`<run_dir>/objects`,
the cache's as alternates) and `--work-tree=<workspace>`. It never uses the
workspace's `.git`, which the Agent controls (config, hooks, attribute
filters, index): git runs with SAFE_CONFIG, no system or global
configuration, a clean environment (plumbing.py), and no git directory it
uses holds anything an Agent could have written.

What counts as the change (README "Changes come back as commits"):

- every tracked change and every new file, as `git add -A` sees them: files
  the work tree's `.gitignore` ignores are left out; links are committed as
  links (never followed); FIFOs, sockets and devices are skipped; a nested
  repository (a directory holding `.git`) is left out;
- minus taskrun's own metadata: `runs/` (records are the control plane's)
  and the Task and context files laid over the checkout, unless the Agent
  changed them (then its version is committed).

The commit: tree of the above, parent the base commit, author and committer
from the manifest's `git` object (the control plane's `git.author`), message
the Task's title with trailers `Task-Id`, `Run-Id`, `Worker`, `Agent`. Its new
objects are packed (`pack-objects --revs <commit> --not <base>`) into
`<run_dir>/change.pack`.

Refused, never committed or sent (ChangeRefused; the Run ends FAILED saying
why): a change holding the value of one of the Agent's secrets (in a file's
contents or its path), and a pack over the manifest's `max_result_bytes`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from taskrunner.errors import GitError, WorkerError
from taskrunner.gitflow.cache import CHECKOUT_CONFIG, ObjectCache
from taskrunner.gitflow.plumbing import git

#: The pack of a Run's change, in its run directory.
CHANGE_PACK = "change.pack"
#: Work-tree paths that are never part of a change: the records' directory.
METADATA_DIRS = ("runs",)
_ZERO = "0" * 40


class ChangeRefused(WorkerError):
    """Raised when the Agent's change may not be returned (a secret in it, or too large); says why."""


def collect(run_dir: Path, workspace: Path, manifest: Mapping[str, Any], secrets: Sequence[bytes],
            worker: str) -> dict[str, Any] | None:
    """The Run's change: {commit, sha256, size} of `<run_dir>/change.pack`, or None when nothing changed.

    ChangeRefused (secret, size) or GitError (git failed) when no change can be returned.
    """
    repo = manifest.get("repo")
    if not isinstance(repo, dict):
        return None  # no checkout: the repository had no commit yet
    cache = ObjectCache(run_dir.parent.parent, repo["id"])
    with cache.lock():  # no repack replaces the packs while git reads them
        return _collect(cache, run_dir, workspace, manifest, secrets, worker)


def _collect(cache: ObjectCache, run_dir: Path, workspace: Path, manifest: Mapping[str, Any],
             secrets: Sequence[bytes], worker: str) -> dict[str, Any] | None:
    fields = manifest.get("git") or {}
    base = manifest["repo"]["base"]
    objects = run_dir / "objects"
    # The cache is the git directory, read only: what git writes goes to the Run's own index and objects.
    env = {"GIT_INDEX_FILE": str(run_dir / "index"), "GIT_OBJECT_DIRECTORY": str(objects),
           "GIT_ALTERNATE_OBJECT_DIRECTORIES": os.path.abspath(cache.objects)}
    config = (*CHECKOUT_CONFIG, "core.quotePath=false")

    def run(*args: str, stdin: bytes | None = None, extra: Mapping[str, str] | None = None) -> bytes:
        return git(cache.path, *args, work_tree=workspace, stdin=stdin, env={**env, **(extra or {})}, config=config)

    laid_files = {entry["path"]: entry for entry in manifest.get("files") or []}
    pathspec = ("--", ".", *(f":(top,exclude){name}" for name in METADATA_DIRS))
    # A dry run writes nothing (no object directory of the Run's needed yet).
    dry_run = git(cache.path, "add", "--all", "--dry-run", *pathspec, work_tree=workspace,
                  env={"GIT_INDEX_FILE": env["GIT_INDEX_FILE"]}, config=config)
    if not _anything_changed(dry_run, workspace, laid_files):
        return None  # the usual quick Run: one git process to find that out
    objects.mkdir(exist_ok=True)
    run("add", "--all", *pathspec)
    changes = _diff(run("diff-index", "--cached", "-z", "--no-renames", base))
    laid = [entry["path"] for entry in manifest.get("files") or []
            if entry["path"] in changes and _unchanged(workspace, entry)]
    nested = [path for path, (_, mode, _) in changes.items() if mode == "160000"]
    if laid or nested:
        if laid:
            run("reset", "--quiet", base, "--", *laid)
        if nested:
            run("update-index", "--force-remove", "--", *nested)
        changes = _diff(run("diff-index", "--cached", "-z", "--no-renames", base))
    if not changes:
        return None
    _check_secrets(run, changes, secrets)
    tree = run("write-tree").decode().strip()
    name, email = str(fields.get("author_name") or "taskrun"), str(fields.get("author_email") or "taskrun@localhost")
    now = f"{int(time.time())} +0000"
    identity = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": now,
                "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email, "GIT_COMMITTER_DATE": now}
    commit = run("commit-tree", tree, "-p", base, stdin=message(manifest, worker).encode(),
                 extra=identity).decode().strip()
    pack = run("pack-objects", "--stdout", "--revs", "--quiet", stdin=f"{commit}\n^{base}\n".encode())
    most = fields.get("max_result_bytes")
    if isinstance(most, int) and len(pack) > most:
        raise ChangeRefused(f"the change is {len(pack)} bytes packed, over git.max_result_bytes ({most}): "
                            "nothing was returned")
    fd = os.open(run_dir / CHANGE_PACK, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pack)
    return {"commit": commit, "base": base, "sha256": hashlib.sha256(pack).hexdigest(), "size": len(pack)}


def message(manifest: Mapping[str, Any], worker: str) -> str:
    """The commit message: the Task's title, then the trailers."""
    fields = manifest.get("git") or {}
    title = " ".join(str(fields.get("title") or manifest.get("task_id")).split()) or str(manifest.get("task_id"))
    agent = manifest.get("agent") or {}
    return (f"{title}\n\nTask-Id: {manifest.get('task_id')}\nRun-Id: {manifest.get('run_id')}\n"
            f"Worker: {worker}\nAgent: {agent.get('name')}\n")


def read_pack(run_dir: Path) -> bytes:
    """The pack `collect` wrote (empty when there is none)."""
    try:
        fd = os.open(run_dir / CHANGE_PACK, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _anything_changed(dry_run: bytes, workspace: Path, laid: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether `git add --all --dry-run` names a change that counts (not a laid-over file the Agent left
    as it was laid). Its lines are `add 'PATH'` and `remove 'PATH'`; one that is not understood counts."""
    for line in dry_run.decode("utf-8", errors="surrogateescape").splitlines():
        verb, _, rest = line.partition(" ")
        path = rest[1:-1] if verb in ("add", "remove") and rest.startswith("'") and rest.endswith("'") else None
        if path is not None and path in laid and _unchanged(workspace, laid[path]):
            continue
        return True
    return False


def _diff(out: bytes) -> dict[str, tuple[str, str, str]]:
    """`diff-index -z` output: path -> (status, new mode, new object)."""
    parts = out.split(b"\0")
    changes: dict[str, tuple[str, str, str]] = {}
    for i in range(0, len(parts) - 1, 2):
        head = parts[i].decode().lstrip(":").split()
        if len(head) < 5:
            continue
        changes[os.fsdecode(parts[i + 1])] = (head[4], head[1], head[3])
    return changes


def _unchanged(workspace: Path, entry: Mapping[str, Any]) -> bool:
    """True when the laid-over file at `entry['path']` still holds exactly the bytes that were laid."""
    try:
        fd = os.open(workspace / entry["path"], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry["size"]:
            return False
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1024 * 1024):
            digest.update(chunk)
        return digest.hexdigest() == entry["sha256"]
    finally:
        os.close(fd)


def _check_secrets(run: Any, changes: Mapping[str, tuple[str, str, str]], secrets: Sequence[bytes]) -> None:
    """ChangeRefused when a secret value is in a changed path or in a new object's contents."""
    if not secrets:
        return
    for path in changes:
        if any(secret in os.fsencode(path) for secret in secrets):
            raise ChangeRefused("the change holds the value of one of the Agent's secrets (in a file name): "
                                "nothing was committed")
    blobs = sorted({sha for status, mode, sha in changes.values() if sha != _ZERO and mode != "160000"})
    if not blobs:
        return
    out = run("cat-file", "--batch", stdin="".join(f"{sha}\n" for sha in blobs).encode())
    at = 0
    while at < len(out):
        end = out.index(b"\n", at)
        header = out[at:end].split()
        size = int(header[2]) if len(header) == 3 else 0
        body = out[end + 1:end + 1 + size]
        if any(secret in body for secret in secrets):
            paths = sorted(p for p, (_, _, sha) in changes.items() if sha.encode() == header[0])
            raise ChangeRefused(f"the change holds the value of one of the Agent's secrets (in "
                                f"{', '.join(paths[:3]) or 'a file'}): nothing was committed")
        at = end + 1 + size + 1


__all__ = ["CHANGE_PACK", "ChangeRefused", "GitError", "collect", "message", "read_pack"]
