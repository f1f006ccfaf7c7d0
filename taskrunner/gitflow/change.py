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
- minus taskrun's own metadata: `runs/` (records are the control plane's),
  the Task and context files laid over the checkout, unless the Agent
  changed them (then its version is committed), the Run's Task directory
  `.task/<task-id>/run-<n>/` (agents/workspace.py; n is the manifest's
  `run_number`, else its `attempt`), and taskrun's section of the context
  index file of the Agent's preset (`CLAUDE.md`, `AGENTS.md`, `GEMINI.md`,
  between `<!-- taskrun:begin -->` and `<!-- taskrun:end -->`): a file that
  is the base's content plus that section (or the section alone, where the
  base had no such file) is returned as the base had it (or absent); one the
  Agent also edited is returned with only the section removed. Only the
  exact section this Run wrote is taken out (agents/workspace.py
  `strip_section`, told the Task id, run number and preset from the
  manifest); a block of the repository's own or of the Agent's between the
  same markers stays. When the Agent edited inside the section, nothing is
  taken out and the commit message says so. The section is taken out of the
  staged blob (git's view, after its filters), never by reading the work
  tree again, and only from a regular file of at most MAX_INDEX_STRIP_BYTES.

The commit: tree of the above, parent the base commit, author and committer
from the manifest's `git` object (the control plane's `git.author`), message
the Task's title with trailers `Task-Id`, `Run-Id`, `Worker`, `Agent`. Every
text in the message is made inert with textsafe.clean (one line each: a
terminal escape shows as `\\x1b`, a newline in the title becomes a space and
cannot start a trailer). Its new objects are packed (`pack-objects --revs
<commit> --not <base>`) into `<run_dir>/change.pack`.

Refused, never committed or sent (ChangeRefused; the Run ends FAILED saying
why): a change holding the value of one of the Agent's secrets (in a file's
contents, or its path with or without its `/` separators; exact values only,
best effort: an encoded value is not caught), and a change over the manifest's
`max_result_bytes`: its uncompressed size (the sum of its changed files'
sizes) or its pack. The uncompressed size is checked before the Worker reads
any content: first from the files' sizes on disk (before any git command hashes
them: a sparse or zero-filled file of gigabytes costs nothing), then from the
sizes git gives the new blobs (`cat-file --batch-check`). Only then are blobs
read, for the secret check, a batch at a time; git writes the pack to a file
itself, never through the Worker's memory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from taskrunner.agents.workspace import (
    Expected,
    TaskDirError,
    index_file,
    run_number,
    section_edited,
    strip_section,
    task_dir_rel,
)
from taskrunner.errors import GitError, WorkerError
from taskrunner.gitflow.cache import CHECKOUT_CONFIG, ObjectCache
from taskrunner.gitflow.plumbing import git
from taskrunner.textsafe import clean

#: The pack of a Run's change, in its run directory.
CHANGE_PACK = "change.pack"
#: Work-tree paths that are never part of a change: the records' directory.
METADATA_DIRS = ("runs",)
_ZERO = "0" * 40
#: The secret check reads new blobs in batches of about this many bytes (a larger blob alone).
SCAN_BATCH_BYTES = 16 * 1024 * 1024
#: A context index file larger than this after the Run is left as the Agent left it (not read).
MAX_INDEX_STRIP_BYTES = 64 * 1024 * 1024


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
    pathspec = ("--", ".", *(f":(top,exclude,literal){name}" for name in _excluded(manifest)))
    index_only = {"GIT_INDEX_FILE": env["GIT_INDEX_FILE"]}
    most = fields.get("max_result_bytes")
    cap = most if isinstance(most, int) and not isinstance(most, bool) else None
    if cap is not None:
        # Before any git command hashes (reads) a file, even the dry run below: the sizes on disk of
        # the new and modified files, from one `ls-files` (stat only). A sparse file of terabytes is
        # refused by its size, not read.
        listed = git(cache.path, "ls-files", "-z", "--others", "--modified", "--exclude-standard", *pathspec,
                     work_tree=workspace, env=index_only, config=config)
        _check_size(_disk_size(listed, workspace, laid_files), cap, "on disk")
    if objects.exists():
        # An earlier collect of this Run got past its dry run, and its Worker was killed before the result
        # was written: the Run's index already holds (part of) the change, against which nothing would
        # look changed. It is the base's again (index only; runs/ is out of the pathspec) and all is redone.
        git(cache.path, "read-tree", base, env=index_only, config=config)
    # A dry run writes nothing (no object directory of the Run's needed yet).
    dry_run = git(cache.path, "add", "--all", "--dry-run", *pathspec, work_tree=workspace,
                  env=index_only, config=config)
    if not _anything_changed(dry_run, workspace, laid_files):
        return None  # the usual quick Run: a git process or two to find that out
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
    index = index_file(_preset(manifest))
    notes: list[str] = []
    if index is not None and index in changes:
        stripped, edited = _strip_index(run, base, index, changes[index], _expected(manifest))
        if stripped:
            changes = _diff(run("diff-index", "--cached", "-z", "--no-renames", base))
        if edited:
            notes.append(f"The Agent edited inside taskrun's section of {index}: it was left in this change as "
                         "the Agent wrote it.")
    if not changes:
        return None
    sizes = _blob_sizes(run, changes)  # sizes only: no blob content is read before the size check
    if cap is not None:
        _check_size(sum(sizes[sha] for _, _, sha in changes.values() if sha in sizes), cap, "uncompressed")
    _check_secrets(run, changes, sizes, secrets)
    tree = run("write-tree").decode().strip()
    name, email = str(fields.get("author_name") or "taskrun"), str(fields.get("author_email") or "taskrun@localhost")
    now = f"{int(time.time())} +0000"
    identity = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": now,
                "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email, "GIT_COMMITTER_DATE": now}
    commit = run("commit-tree", tree, "-p", base, stdin=message(manifest, worker, notes).encode(),
                 extra=identity).decode().strip()
    # git writes the pack to a file itself (never through the Worker's memory); after the size check
    # above it is about as large as the change at most (plus its trees and commit).
    scratch = Path(tempfile.mkdtemp(prefix=".change-pack-", dir=run_dir))
    try:
        names = git(cache.path, "pack-objects", "--revs", "--quiet", str(scratch / "change"), work_tree=workspace,
                    stdin=f"{commit}\n^{base}\n".encode(), env=env,
                    config=(*config, "pack.writeReverseIndex=false")).decode().split()
        if len(names) != 1:
            raise GitError(f"git pack-objects wrote {len(names)} packs, not one")
        written = scratch / f"change-{names[0]}.pack"
        size = os.lstat(written).st_size
        if cap is not None:
            _check_size(size, cap, "packed")
        digest = hashlib.sha256()
        with open(written, "rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
        os.chmod(written, 0o600)
        os.replace(written, run_dir / CHANGE_PACK)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"commit": commit, "base": base, "sha256": digest.hexdigest(), "size": size}


def message(manifest: Mapping[str, Any], worker: str, notes: Sequence[str] = ()) -> str:
    """The commit message: the Task's title (else its id), a paragraph per note, then the trailers
    `Task-Id`, `Run-Id`, `Worker`, `Agent`.

    Every value is one line made inert by textsafe.clean: control characters and bidi controls show as
    escapes (``\\x1b``), line breaks become spaces, so no value can add a line, let alone a trailer.
    """
    fields = manifest.get("git") if isinstance(manifest.get("git"), Mapping) else {}
    agent = manifest.get("agent") if isinstance(manifest.get("agent"), Mapping) else {}
    task_id = _line(manifest.get("task_id"))
    title = _line(fields.get("title")) or task_id
    body = "".join(f"{_line(note)}\n\n" for note in notes if _line(note))
    return (f"{title}\n\n{body}Task-Id: {task_id}\nRun-Id: {_line(manifest.get('run_id'))}\n"
            f"Worker: {_line(worker)}\nAgent: {_line(agent.get('name'))}\n")


def _line(value: Any) -> str:
    """`value` as one inert line for the commit message: textsafe.clean, runs of spaces made one."""
    return " ".join(clean(str(value)).split()) if value is not None else ""


def _expected(manifest: Mapping[str, Any]) -> Expected | None:
    """This Run's section as the manifest names it (Task id, run number, preset), or None when it names
    no Task (then no block is taken for taskrun's)."""
    task_id = manifest.get("task_id")
    return Expected(task_id, run_number(manifest), _preset(manifest)) if isinstance(task_id, str) and task_id \
        else None


def _preset(manifest: Mapping[str, Any]) -> str | None:
    agent = manifest.get("agent")
    preset = agent.get("preset") if isinstance(agent, Mapping) else None
    return preset if isinstance(preset, str) else None


def _excluded(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """Work-tree paths never part of the change: METADATA_DIRS and the Run's `.task/<task-id>/run-<n>`."""
    task_id = manifest.get("task_id")
    try:
        task_dir = task_dir_rel(task_id, run_number(manifest)) if isinstance(task_id, str) and task_id else None
    except TaskDirError:
        task_dir = None  # no such directory was written
    return (*METADATA_DIRS, *([task_dir] if task_dir else []))


def _strip_index(run: Any, base: str, path: str, entry: tuple[str, str, str],
                 expected: Expected | None) -> tuple[bool, bool]:
    """Take taskrun's section out of the staged index file `path` (see the module doc): (whether the
    index changed, whether the Agent edited inside the section so that it stays). `entry`: (status,
    new mode, new object) from `diff-index`; `expected`: the Run's section (None: nothing is taken)."""
    _, mode, sha = entry
    if expected is None or sha == _ZERO or mode not in ("100644", "100755"):
        return False, False  # deleted, or a link: nothing of taskrun's is in it
    if _blob_sizes(run, {path: entry})[sha] > MAX_INDEX_STRIP_BYTES:
        return False, False
    text = run("cat-file", "blob", sha)
    listed = run("ls-tree", "-z", base, "--", path).split(b"\0")[0].split()
    old = run("cat-file", "blob", listed[2].decode()) if len(listed) >= 3 and listed[0] in (b"100644", b"100755") \
        else None
    kept = strip_section(text, old, expected)
    if kept == text:
        return False, section_edited(text, old, expected)
    if kept is None:
        run("update-index", "--force-remove", "--", path)
    elif kept == old:
        run("reset", "--quiet", base, "--", path)
    else:
        made = run("hash-object", "-w", "--no-filters", "--stdin", stdin=kept).decode().strip()
        run("update-index", "--cacheinfo", f"{mode},{made},{path}")
    return True, False


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


def _check_size(size: int, cap: int, what: str) -> None:
    """ChangeRefused when the change's `size` (bytes, `what`: on disk, uncompressed, packed) is over `cap`."""
    if size > cap:
        raise ChangeRefused(f"the change is {size} bytes {what}, over git.max_result_bytes ({cap} bytes): "
                            "nothing was returned")


def _disk_size(listed: bytes, workspace: Path, laid: Mapping[str, Mapping[str, Any]]) -> int:
    """The sizes on disk (`lstat`, nothing read) of the regular files `ls-files -z --others --modified`
    names, summed (a laid-over file left as it was laid counts nothing): what the change would hold
    uncompressed, known before git hashes any of them. A path that cannot be looked at counts nothing
    here (the blobs' sizes are checked again after `git add`)."""
    total = 0
    for raw in set(listed.split(b"\0")):
        if not raw:
            continue
        path = os.fsdecode(raw)
        try:
            info = os.lstat(workspace / path)
        except (OSError, ValueError):
            continue  # deleted
        if not stat.S_ISREG(info.st_mode) or (path in laid and _unchanged(workspace, laid[path])):
            continue
        total += info.st_size
    return total


def _blob_sizes(run: Any, changes: Mapping[str, tuple[str, str, str]]) -> dict[str, int]:
    """The size of each new object of `changes` (blob -> bytes), from `git cat-file --batch-check`:
    object headers only, no content read."""
    blobs = sorted({sha for _, mode, sha in changes.values() if sha != _ZERO and mode != "160000"})
    if not blobs:
        return {}
    out = run("cat-file", "--batch-check=%(objectname) %(objectsize)",
              stdin="".join(f"{sha}\n" for sha in blobs).encode())
    sizes: dict[str, int] = {}
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise GitError(f"git cat-file cannot tell the size of {parts[0] if parts else 'an object'}")
        sizes[parts[0]] = int(parts[1])
    if set(sizes) != set(blobs):
        raise GitError("git cat-file did not tell the size of every new object")
    return sizes


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


def _check_secrets(run: Any, changes: Mapping[str, tuple[str, str, str]], sizes: Mapping[str, int],
                   secrets: Sequence[bytes]) -> None:
    """ChangeRefused when a secret value is in a changed path (as it is, or with its `/` separators
    removed: `d/change-secret-/0123` holds `change-secret-0123`) or in a new object's contents.

    Exact values only, best effort: an encoded value (base64, reversed) is not caught. Blobs are read
    after the size check (`sizes`: blob -> bytes), in batches of about SCAN_BATCH_BYTES.
    """
    secrets = [secret for secret in secrets if secret]
    if not secrets:
        return
    for path in changes:
        raw = os.fsencode(path)
        joined = raw.replace(b"/", b"")
        if any(secret in raw or secret in joined for secret in secrets):
            raise ChangeRefused("the change holds the value of one of the Agent's secrets (in a file name): "
                                "nothing was committed")
    batch: list[str] = []
    held = 0
    for sha in sorted(sizes):
        if batch and held + sizes[sha] > SCAN_BATCH_BYTES:
            _scan(run, changes, batch, secrets)
            batch, held = [], 0
        batch.append(sha)
        held += sizes[sha]
    if batch:
        _scan(run, changes, batch, secrets)


def _scan(run: Any, changes: Mapping[str, tuple[str, str, str]], blobs: Sequence[str],
          secrets: Sequence[bytes]) -> None:
    """ChangeRefused when one of `blobs` (read with one `cat-file --batch`) holds a secret value."""
    out = run("cat-file", "--batch", stdin="".join(f"{sha}\n" for sha in blobs).encode())
    at = 0
    while at < len(out):
        end = out.index(b"\n", at)
        header = out[at:end].split()
        size = int(header[2]) if len(header) == 3 else 0
        start, stop = end + 1, end + 1 + size
        if any(out.find(secret, start, stop) >= 0 for secret in secrets):  # no copy of the body
            paths = sorted(p for p, (_, _, sha) in changes.items() if sha.encode() == header[0])
            raise ChangeRefused(f"the change holds the value of one of the Agent's secrets (in "
                                f"{', '.join(paths[:3]) or 'a file'}): nothing was committed")
        at = stop + 1


__all__ = ["CHANGE_PACK", "ChangeRefused", "GitError", "collect", "message", "read_pack"]
