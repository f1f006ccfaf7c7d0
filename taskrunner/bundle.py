"""Bundles: the package that carries one Run to a Worker.

A bundle is an uncompressed tar archive of the files the Run needs (the Task
file and its `context` files, at their repository paths) plus a manifest that
names every file with its sha256 and size. The Worker extracts it into a fresh
directory, accepting regular files and directories only.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from taskrunner.errors import WorkerError

BUNDLE_FORMAT = 1
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_TOTAL_BYTES = 1024 * 1024 * 1024


class BundleRejected(WorkerError):
    """Raised when a bundle is malformed or breaks a rule; nothing of it runs."""


@dataclass(frozen=True)
class Bundle:
    manifest: dict[str, Any]
    archive: bytes


def build(files: Mapping[str, bytes], **fields: Any) -> Bundle:
    """Pack `files` (repository path -> bytes) with a manifest carrying `fields`."""
    buffer = io.BytesIO()
    entries = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(files):
            data = files[path]
            _check_path(path)
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
            entries.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    manifest = {"format": BUNDLE_FORMAT, **fields, "files": entries}
    return Bundle(manifest, buffer.getvalue())


def extract(bundle: Bundle, dest: Path) -> list[str]:
    """Extract into `dest` (which must not exist yet); returns the paths written."""
    expected = _manifest_entries(bundle.manifest)
    try:
        dest.mkdir(parents=True)
    except FileExistsError:
        raise BundleRejected(f"bundle rejected: the extraction directory {dest} already exists") from None
    try:
        archive = tarfile.open(fileobj=io.BytesIO(bundle.archive), mode="r:")
    except tarfile.TarError as exc:
        raise BundleRejected(f"bundle rejected: archive is not a tar file ({exc})") from exc
    with archive:
        members = archive.getmembers()
        if len(members) > MAX_MEMBERS:
            raise BundleRejected(f"bundle rejected: {len(members)} members, over the limit of {MAX_MEMBERS}")
        written = _extract_members(archive, members, expected, dest)
    if expected:
        raise BundleRejected(f"bundle rejected: {sorted(expected)[0]} is in the manifest but not the archive")
    return written


def _manifest_entries(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    files = manifest.get("files")
    if not isinstance(files, list):
        raise BundleRejected("bundle rejected: the manifest has no list of files")
    for entry in files:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int) and not isinstance(entry.get("size"), bool)):
            what = entry.get("path") if isinstance(entry, dict) else entry
            raise BundleRejected(f"bundle rejected: manifest entry {what!r} lacks a path, sha256 or size")
        if entry["path"] in entries:
            raise BundleRejected(f"bundle rejected: {entry['path']} is named twice in the manifest")
        entries[entry["path"]] = entry
    return entries


def _extract_members(archive: tarfile.TarFile, members: list[tarfile.TarInfo],
                     expected: dict[str, dict[str, Any]], dest: Path) -> list[str]:
    written: list[str] = []
    seen: set[str] = set()
    total = 0
    for member in members:
        _check_path(member.name)
        name = member.name.rstrip("/")
        if name in seen:
            raise BundleRejected(f"bundle rejected: {name} is named twice in the archive")
        seen.add(name)
        target = dest / name
        try:
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                raise BundleRejected(f"bundle rejected: {name} is not a regular file or directory")
            if member.size > MAX_MEMBER_BYTES:
                raise BundleRejected(f"bundle rejected: {name} is {member.size} bytes, over the limit")
            total += member.size
            if total > MAX_TOTAL_BYTES:
                raise BundleRejected("bundle rejected: contents exceed the total size limit")
            entry = expected.pop(name, None)
            if entry is None:
                raise BundleRejected(f"bundle rejected: {name} is not in the manifest")
            source = archive.extractfile(member)
            data = source.read() if source else b""
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise BundleRejected(f"bundle rejected: {name} does not match its manifest hash")
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: nothing already there is ever overwritten.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise BundleRejected(f"bundle rejected: {name} is both a file and a directory") from exc
        written.append(name)
    return written


def _check_path(path: str) -> None:
    normal = posixpath.normpath(path)
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or normal != path.rstrip("/")
        or normal == ".."
        or normal.startswith("../")
        or any(part in ("", ".", "..") for part in path.rstrip("/").split("/"))
    ):
        raise BundleRejected(f"bundle rejected: unsafe path {path!r}")
