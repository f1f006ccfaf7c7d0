"""Committed blobs put back into the work tree, work-tree files read as blobs (never through a link), and
the blob ids a commit holds.

For gitflow/dropped.py. Every path is opened beneath the work tree (safefs.Beneath): a link or special file
on the way raises UnsafePath, and nothing is followed. A blob is streamed by `git cat-file` into a temp
file in its path's directory (`.<name>.<pid>.<thread>.tmp`, as safefs.write_in names them, so a killed
writer's is swept), then renamed over the path: a GiB output.log is never held in memory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path

from taskrunner.errors import GitError, UnsafePath
from taskrunner.gitops import command, error_text, tree_entries
from taskrunner.safefs import Beneath, split

#: A work-tree file that is not a regular file of its own (a link, a FIFO, unreadable): equal to no blob id.
CHANGED = "changed"
_READ_CHUNK = 1024 * 1024


def git_bytes(root: Path, args: list[str], stdin: bytes | None = None) -> bytes:
    """The output of `git <args>` in `root` (SAFE_CONFIG); GitError when git fails."""
    done = subprocess.run(command(*args), cwd=root, input=stdin, capture_output=True)
    if done.returncode != 0:
        raise GitError(f"git {args[0]} failed: {error_text(done.stderr.decode(errors='replace'))}")
    return done.stdout


def entries(root: Path, commit: str, paths: list[str]) -> dict[str, str | None]:
    """path -> its blob id in `commit` (`<mode> <blob>` for another mode than 100644), None where absent."""
    held = tree_entries(root, commit, paths)
    return {path: None if (entry := held.get(path)) is None else entry[1] if entry[0] == "100644"
            else f"{entry[0]} {entry[1]}" for path in paths}


def blob_of(tree: Beneath, path: str, algo: str) -> str | None:
    """The blob id (`algo`: "sha1" or "sha256") of the work tree's file at `path`, read in chunks; None when
    absent, CHANGED when it is no regular file of its own."""
    try:
        fd = tree.open_file(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnsafePath):
        return CHANGED
    with os.fdopen(fd, "rb") as handle:
        digest = hashlib.new(algo, b"blob %d\0" % os.fstat(handle.fileno()).st_size)
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stream_blob(tree: Beneath, path: str, blob: str) -> None:
    """Replace `path` with the blob `blob` (`git cat-file blob` into a temp file beside it, then a rename).

    Missing directories are made. OSError, UnsafePath (a link or file on the way), GitError (git failed:
    the temp file is removed and `path` is as it was).
    """
    parts = split(path)
    parent = tree.open_dir(parts[:-1], create=True)
    tmp = f".{parts[-1]}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        try:
            os.unlink(tmp, dir_fd=parent)  # one a killed writer of our pid and thread left
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
        try:
            done = subprocess.run(command("cat-file", "blob", blob), cwd=tree.root, stdout=fd, stderr=subprocess.PIPE)
        finally:
            os.close(fd)
        if done.returncode != 0:
            raise GitError(f"git cat-file failed: {error_text(done.stderr.decode(errors='replace'))}")
        os.replace(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(parent)


def unlink(tree: Beneath, path: str) -> None:
    """Remove the file `path` (gone already: nothing), then each directory above it up to the top one
    (runs/ stays) while it is empty. OSError, UnsafePath for a link on the way."""
    parts = split(path)
    for depth in range(len(parts), 1, -1):
        try:
            parent = tree.open_dir(parts[:depth - 1])
        except FileNotFoundError:
            return
        try:
            (os.unlink if depth == len(parts) else os.rmdir)(parts[depth - 1], dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError:
            if depth == len(parts):
                raise
            return  # a directory with other files in it stays
        finally:
            os.close(parent)
