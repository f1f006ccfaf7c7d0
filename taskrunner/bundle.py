"""Bundles: the signed package that carries one Run to a Worker.

A bundle is two things sent together in one `assign` record:

- the archive: an uncompressed tar of the files the Run needs (the Task file
  and its `context` files, at their repository paths), regular files only;
- a DSSE envelope (see signing.py, payload type BUNDLE_TYPE) whose body is the
  manifest, compact JSON:

    format       1
    key_id       the control plane key that signed it
    run_id, task_id, revision, attempt, task_file, timeout
    worker       the Worker's name, for people
    audience     the Worker's result key id: only that Worker takes it
    agent        {name, preset, command, env, sandbox}: env holds variable names only;
                 sandbox "none" accepts an unconfined Agent on this Worker (else "bwrap")
    nonce        32 random hex digits
    seq          per-Worker sequence number; only goes up (microseconds since
                 the epoch, raised to stay above the last one sent)
    issued_at, expires_at   seconds since the epoch
    base_commit  the repository commit the Run was assigned at
    archive      {sha256, size} of the archive bytes
    files        [{path, sha256, size}] of every file in the archive
    repo         {id, base, sha256, size, prerequisites} of the git pack that follows the
                 archive in the payload, or null (no commit yet): see gitflow/transfer.py
    git          {author_name, author_email, max_result_bytes, branch, title}: how the Worker
                 commits the Agent's change (gitflow/change.py)

The Worker checks, before anything runs (`admit`): a trusted key id and a
signature that verifies over the exact manifest bytes; only then does it parse
them. Then: the manifest's run id is the one assigned, its key_id is the
signer's, the audience is this Worker, it is not expired or issued in the
future (allowing CLOCK_SKEW_SECONDS), the archive's hash and size match, and
the replay ledger has never seen the nonce or run id and holds no higher
sequence number (the entry is written then). Extraction goes into a fresh
directory and takes regular files and directories only, within the Worker's
limits, each file checked against its manifest hash and size.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import secrets
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from taskrunner.defaults import BUNDLE_TTL_SECONDS
from taskrunner.errors import WorkerError
from taskrunner.signing import BUNDLE_TYPE, SignatureRejected, SigningKey, outside_validity, sign, verify_json

BUNDLE_FORMAT = 1
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_TOTAL_BYTES = 1024 * 1024 * 1024
#: The largest git pack of repository state an assignment may carry.
MAX_PACK_BYTES = 512 * 1024 * 1024
#: Archive bytes per member besides its contents: header, PAX header and padding (5 tar blocks).
ARCHIVE_OVERHEAD_PER_MEMBER = 5 * tarfile.BLOCKSIZE
#: Manifest fields and the types they must have.
FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,), "key_id": (str,), "run_id": (str,), "task_id": (str,), "revision": (str,),
    "attempt": (int,), "task_file": (str,), "timeout": (int, float), "worker": (str,), "audience": (str,),
    "agent": (dict,), "nonce": (str,), "seq": (int,), "issued_at": (int, float), "expires_at": (int, float),
    "base_commit": (str, type(None)), "archive": (dict,), "files": (list,),
}


class BundleRejected(WorkerError):
    """Raised when a bundle is malformed or breaks a rule; nothing of it runs.

    `untrusted`: refused because the Worker trusts none of the keys that signed
    it (or none at all), as SignatureRejected.untrusted.
    """

    def __init__(self, message: str, untrusted: bool = False) -> None:
        super().__init__(message)
        self.untrusted = untrusted


@dataclass(frozen=True)
class Limits:
    """What one bundle may hold on this Worker (`taskrun-worker serve --max-*`)."""

    members: int = MAX_MEMBERS
    member_bytes: int = MAX_MEMBER_BYTES
    total_bytes: int = MAX_TOTAL_BYTES
    pack_bytes: int = MAX_PACK_BYTES  # the git pack of the repository state (gitflow/transfer.py)

    @property
    def archive_bytes(self) -> int:
        """The largest archive that could hold no more than these limits: contents plus, per member,
        a tar header, a PAX header for long names and padding. A larger `assign` is refused unread."""
        return self.total_bytes + (self.members + 1) * ARCHIVE_OVERHEAD_PER_MEMBER


@dataclass(frozen=True)
class Bundle:
    manifest: dict[str, Any]
    archive: bytes
    envelope: dict[str, Any]


def pack(files: Mapping[str, bytes]) -> tuple[bytes, list[dict[str, Any]]]:
    """The archive of `files` (repository path -> bytes) and its manifest entries; the same files
    always give the same bytes."""
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
        end = archive.offset
    # tarfile pads an archive to 10 KiB records; the two end-of-archive blocks are enough.
    return buffer.getvalue()[:end + 2 * tarfile.BLOCKSIZE], entries


def build(files: Mapping[str, bytes], signer: SigningKey, *, now: float, nonce: str | None = None,
          ttl: float = BUNDLE_TTL_SECONDS, **fields: Any) -> Bundle:
    """Pack `files` and sign a manifest carrying `fields`."""
    data, entries = pack(files)
    manifest = {
        "format": BUNDLE_FORMAT, **fields, "key_id": signer.key_id, "nonce": nonce or secrets.token_hex(16),
        "issued_at": now, "expires_at": now + ttl,
        "archive": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, "files": entries,
    }
    return Bundle(manifest, data, sign(BUNDLE_TYPE, manifest_bytes(manifest), [signer]))


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes signed: compact JSON, keys sorted."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def verified_manifest(envelope: Any, archive: bytes, *, trusted: Mapping[str, bytes],
                      refused: Mapping[str, str], audience: str, now: float) -> dict[str, Any]:
    """The manifest, once its signature, fields, audience, times and archive hash check out."""
    manifest = verified_envelope(envelope, trusted=trusted, refused=refused, audience=audience, now=now)
    check_archive(manifest, len(archive), hashlib.sha256(archive).hexdigest())
    return manifest


def verified_envelope(envelope: Any, *, trusted: Mapping[str, bytes], refused: Mapping[str, str], audience: str,
                      now: float) -> dict[str, Any]:
    """The manifest, once its signature, fields, audience and times check out: all a Worker needs
    before it reads the archive (the `assign` header carries the envelope, the payload the archive)."""
    try:
        manifest, signer = verify_json(envelope, BUNDLE_TYPE, trusted, refused, what="manifest")
    except SignatureRejected as exc:
        raise BundleRejected(f"bundle rejected: {exc}", untrusted=exc.untrusted) from None
    for name, types in FIELDS.items():
        value = manifest.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) \
                or (isinstance(value, float) and not math.isfinite(value)):
            raise BundleRejected(f"bundle rejected: manifest field {name!r} is missing or malformed")
    if manifest["format"] != BUNDLE_FORMAT:
        raise BundleRejected(f"bundle rejected: format {manifest['format']}, this Worker reads {BUNDLE_FORMAT}")
    if manifest["key_id"] != signer:
        raise BundleRejected("bundle rejected: the manifest names another key than the one that signed it")
    if manifest["audience"] != audience:
        raise BundleRejected(f"bundle rejected: addressed to another Worker ({manifest['worker']}, "
                             f"{manifest['audience']})")
    if (problem := outside_validity(manifest["issued_at"], manifest["expires_at"], now)) is not None:
        raise BundleRejected(f"bundle rejected: {problem}")
    size = manifest["archive"].get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BundleRejected("bundle rejected: manifest field 'archive' has no size")
    return manifest


def repo_of(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest's `repo` object, checked for form; None when the Run has no repository state."""
    repo = manifest.get("repo")
    if repo is None:
        return None
    if not isinstance(repo, dict):
        raise BundleRejected("bundle rejected: manifest field 'repo' is malformed")
    size, prerequisites = repo.get("size"), repo.get("prerequisites")
    if not (isinstance(repo.get("id"), str) and isinstance(repo.get("base"), str) and _is_sha(repo["base"])
            and repo["base"] == manifest.get("base_commit")
            and isinstance(repo.get("sha256"), str) and isinstance(size, int) and not isinstance(size, bool)
            and size >= 0 and isinstance(prerequisites, list) and all(_is_sha(p) for p in prerequisites)):
        raise BundleRejected("bundle rejected: manifest field 'repo' is malformed")
    return repo


def payload_size(manifest: Mapping[str, Any]) -> int:
    """The `assign` payload's signed length: the archive, then the git pack (if any)."""
    repo = repo_of(manifest)
    return int(manifest["archive"]["size"]) + (repo["size"] if repo else 0)


def _is_sha(value: object) -> bool:
    return isinstance(value, str) and len(value) == 40 and all(c in "0123456789abcdef" for c in value)


def check_archive(manifest: Mapping[str, Any], size: int, sha256: str) -> None:
    """BundleRejected unless an archive of `size` bytes with digest `sha256` is the one the manifest signs."""
    whole = manifest["archive"]
    if size != whole.get("size") or sha256 != whole.get("sha256"):
        raise BundleRejected("bundle rejected: the archive does not match the manifest's hash")


def extract(manifest: Mapping[str, Any], archive_bytes: bytes, dest: Path, limits: Limits = Limits(),
            overlay: bool = False) -> list[str]:
    """Extract into `dest` (which must not exist yet); returns the paths written.

    `overlay`: `dest` is a fresh checkout the Worker just made (nothing else
    writes there yet); a file of the archive replaces the checkout's file at
    its path. A path that lies under a link of the checkout, or is a
    directory there, is refused: nothing is written through a link.
    """
    expected = _manifest_entries(manifest)
    try:
        dest.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        if not overlay:
            raise BundleRejected(f"bundle rejected: the extraction directory {dest} already exists") from None
    try:
        archive = tarfile.open(fileobj=io.BytesIO(archive_bytes), mode="r:")
    except tarfile.TarError as exc:
        raise BundleRejected(f"bundle rejected: archive is not a tar file ({exc})") from exc
    with archive:
        try:
            members = []
            for member in archive:
                members.append(member)
                if len(members) > limits.members:
                    raise BundleRejected(f"bundle rejected: more than {limits.members} members, over the limit")
            written = _extract_members(archive, members, expected, dest, limits, overlay)
        except tarfile.TarError as exc:
            # A damaged header past the first, or data cut short, surfaces only while reading.
            raise BundleRejected(f"bundle rejected: the archive is damaged ({exc})") from exc
    if expected:
        raise BundleRejected(f"bundle rejected: {sorted(expected)[0]} is in the manifest but not the archive")
    return written


def _manifest_entries(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
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
                     expected: dict[str, dict[str, Any]], dest: Path, limits: Limits,
                     overlay: bool = False) -> list[str]:
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
            if overlay:
                _clear_overlay(dest, name, member.isdir())
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True, mode=0o700)
                continue
            if not member.isreg():
                raise BundleRejected(f"bundle rejected: {name} is not a regular file or directory")
            if member.size > limits.member_bytes:
                raise BundleRejected(f"bundle rejected: {name} is {member.size} bytes, over the limit "
                                     f"of {limits.member_bytes}")
            total += member.size
            if total > limits.total_bytes:
                raise BundleRejected("bundle rejected: contents exceed the total size limit")
            entry = expected.pop(name, None)
            if entry is None:
                raise BundleRejected(f"bundle rejected: {name} is not in the manifest")
            source = archive.extractfile(member)
            data = source.read() if source else b""
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise BundleRejected(f"bundle rejected: {name} does not match its manifest hash")
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # O_EXCL: nothing already there is ever overwritten. Private: the workspace is the Run's.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise BundleRejected(f"bundle rejected: {name} is both a file and a directory") from exc
        written.append(name)
    return written


def _clear_overlay(dest: Path, name: str, directory: bool) -> None:
    """Make way for `name` in a checkout: refuse a link or a file on the way, remove a file or link there."""
    parts = name.split("/")
    here = dest
    for part in parts[:-1]:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(mode):
            raise BundleRejected(f"bundle rejected: {name} lies under {here.relative_to(dest)}, which is not a "
                                 "directory in the checkout")
    target = dest / name
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        if directory:
            return
        raise BundleRejected(f"bundle rejected: {name} is a directory in the checkout")
    os.unlink(target)


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
