"""Bundles: build, verify, extract; and the hostile corpus a Worker must refuse.

Every refusal is checked for its specific reason and for leaving the
filesystem outside the destination directory untouched. Hostile archives are
signed correctly (a helper builds the tar by hand and signs a manifest that
matches it): the point is that even a bundle from a trusted key is refused by
`extract` when it holds something other than regular files and directories.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import string
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from taskrunner import bundle
from taskrunner.bundle import Bundle, BundleRejected, Limits
from taskrunner.defaults import BUNDLE_TTL_SECONDS, CLOCK_SKEW_SECONDS
from taskrunner.errors import WorkerError
from taskrunner.signing import BUNDLE_TYPE, RESULT_TYPE, TRUST_TYPE, SigningKey, sign
from taskrunner.worker.enrollment import Enrollment
from taskrunner.worker.trust import TrustStore

NOW = 1_700_000_000.0
CONTROL = SigningKey.generate()  # the control plane's bundle key
STRANGER = SigningKey.generate()  # a key no Worker trusts
WORKER = SigningKey.generate()  # the Worker's result key: its id is the audience
TRUSTED = {CONTROL.key_id: CONTROL.public}
FILES = {
    "tasks/t.md": b"---\n---\n# T\n\n```sh\necho hi\n```\n",
    "docs/deep/nested/ctx.txt": b"context\n",
    "bin.dat": bytes(range(256)) * 3,
    "empty": b"",
}
FIELDS: dict[str, Any] = {
    "run_id": "t-1", "task_id": "t", "revision": "rev1", "attempt": 1, "task_file": "tasks/t.md",
    "timeout": 60, "worker": "w1", "audience": WORKER.key_id,
    "agent": {"name": "sh", "preset": "shell", "command": ["sh", "-c"], "env": ["API_TOKEN"]},
    "seq": 1, "base_commit": "0" * 40,
}
SETTINGS = settings(max_examples=40, deadline=None, database=None)


# ---------------------------------------------------------------- helpers


def make(files: dict[str, bytes] | None = None, *, signer: SigningKey = CONTROL, now: float = NOW,
         **over: Any) -> Bundle:
    return bundle.build(FILES if files is None else files, signer, now=now, **{**FIELDS, **over})


def verify(hostile: Bundle, *, now: float = NOW, trusted: dict[str, bytes] | None = None,
           refused: dict[str, str] | None = None, audience: str = WORKER.key_id) -> dict[str, Any]:
    return bundle.verified_manifest(hostile.envelope, hostile.archive, trusted=TRUSTED if trusted is None else trusted,
                                    refused=refused or {}, audience=audience, now=now)


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


def directory(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def entry(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def manifest_body(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed(tar: bytes, *entries: dict[str, Any], signer: SigningKey = CONTROL, **over: Any) -> Bundle:
    """A bundle whose signature, archive hash and size are all correct for `tar`, whatever it holds."""
    manifest = {
        "format": bundle.BUNDLE_FORMAT, **FIELDS, "key_id": signer.key_id, "nonce": secrets.token_hex(16),
        "issued_at": NOW, "expires_at": NOW + BUNDLE_TTL_SECONDS,
        "archive": {"sha256": hashlib.sha256(tar).hexdigest(), "size": len(tar)}, "files": list(entries),
        **over,
    }
    return Bundle(manifest, tar, sign(BUNDLE_TYPE, manifest_body(manifest), [signer]))


def payload(envelope: dict[str, Any]) -> bytes:
    return base64.b64decode(envelope["payload"])


def with_payload(envelope: dict[str, Any], body: bytes) -> dict[str, Any]:
    return {**envelope, "payload": base64.b64encode(body).decode()}


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def snapshot(root: Path, exclude: Path) -> dict[str, bytes | None]:
    """Every path under root (file contents, None for the rest), except those under `exclude`."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == exclude or exclude in path.parents:
                continue
            is_file = path.is_file() and not path.is_symlink()
            found[path.relative_to(root).as_posix()] = path.read_bytes() if is_file else None
    return found


@pytest.fixture()
def area(tmp_path: Path) -> Path:
    """A directory whose contents hostile bundles must not touch; the destination is area/dest."""
    (tmp_path / "area").mkdir()
    (tmp_path / "area" / "keep.txt").write_bytes(b"mine\n")
    return tmp_path / "area"


def assert_refused(area: Path, hostile: Bundle, reason: str, *, at: Literal["verify", "extract"],
                   limits: Limits = Limits(), **verify_args: Any) -> BundleRejected:
    """The Worker's path for one bundle: verify, then extract into area/dest; refused with `reason`."""
    dest = area / "dest"
    before = snapshot(area.parent, dest)
    if at == "verify":
        with pytest.raises(BundleRejected, match=re.escape(reason)) as caught:
            verify(hostile, **verify_args)
        assert not dest.exists()
    else:
        manifest = verify(hostile, **verify_args)  # correctly signed: the refusal must come from extract
        with pytest.raises(BundleRejected, match=re.escape(reason)) as caught:
            bundle.extract(manifest, hostile.archive, dest, limits)
    assert str(caught.value).startswith("bundle rejected: ")
    assert snapshot(area.parent, dest) == before, "the bundle wrote outside its destination"
    assert (area / "keep.txt").read_bytes() == b"mine\n"
    return caught.value


def retiring_trust(home: Path) -> TrustStore:
    """A Worker's trust store holding CONTROL, retiring at NOW + 10, and a current successor."""
    successor = SigningKey.generate()
    keys = [{"key_id": CONTROL.key_id, "public": CONTROL.public_line, "retire_at": NOW + 10},
            {"key_id": successor.key_id, "public": successor.public_line, "retire_at": None}]
    body = json.dumps({"format": 1, "audience": WORKER.key_id, "keys": keys, "issued_at": NOW,
                       "expires_at": NOW + 600, "nonce": secrets.token_hex(16)}).encode()
    store = TrustStore(home)
    Enrollment(home).pin([successor.key_id], NOW)  # as its admin did with `taskrun-worker init --trust-key`
    store.apply({"keys": [successor.public_line], "envelope": sign(TRUST_TYPE, body, [successor])},
                WORKER.key_id, NOW)
    return store


# ---------------------------------------------------------------- round trip


def test_build_verify_extract_reproduces_every_file_in_a_fresh_directory(tmp_path: Path) -> None:
    built = make()
    manifest = verify(built)
    dest = tmp_path / "fresh" / "workspace"
    written = bundle.extract(manifest, built.archive, dest)
    assert sorted(written) == sorted(FILES)
    for path, data in FILES.items():
        assert (dest / path).read_bytes() == data
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == set(FILES)


def test_the_verified_manifest_is_the_one_that_was_built() -> None:
    built = make()
    assert verify(built) == built.manifest
    assert payload(built.envelope) == manifest_body(built.manifest)


def test_the_manifest_carries_the_fields_the_times_the_signer_and_every_files_hash() -> None:
    built = make(nonce="ab" * 16)
    manifest = built.manifest
    assert manifest["format"] == bundle.BUNDLE_FORMAT
    assert {k: manifest[k] for k in FIELDS} == FIELDS
    assert manifest["key_id"] == CONTROL.key_id
    assert manifest["nonce"] == "ab" * 16
    assert (manifest["issued_at"], manifest["expires_at"]) == (NOW, NOW + BUNDLE_TTL_SECONDS)
    assert manifest["archive"] == {"sha256": hashlib.sha256(built.archive).hexdigest(), "size": len(built.archive)}
    assert sorted(manifest["files"], key=lambda e: e["path"]) == sorted(
        (entry(p, d) for p, d in FILES.items()), key=lambda e: e["path"])


def test_every_bundle_gets_a_fresh_random_nonce() -> None:
    nonces = {make().manifest["nonce"] for _ in range(5)}
    assert len(nonces) == 5
    assert all(re.fullmatch(r"[0-9a-f]{32}", n) for n in nonces)


def test_the_archive_is_an_uncompressed_tar_holding_only_regular_files() -> None:
    with tarfile.open(fileobj=io.BytesIO(make().archive), mode="r:") as tar:
        members = tar.getmembers()
    assert sorted(m.name for m in members) == sorted(FILES)
    assert all(m.isreg() for m in members)


def test_extract_refuses_a_destination_that_already_exists(tmp_path: Path) -> None:
    built = make()
    dest = tmp_path / "dest"
    (dest / "tasks").mkdir(parents=True)
    (dest / "tasks" / "t.md").write_bytes(b"old\n")
    with pytest.raises(BundleRejected, match="the extraction directory .* already exists"):
        bundle.extract(verify(built), built.archive, dest)
    assert (dest / "tasks" / "t.md").read_bytes() == b"old\n"
    assert sorted(p.name for p in dest.iterdir()) == ["tasks"]


@pytest.mark.parametrize("path", ["/abs/t.md", "../up.md", "a/../../up.md", "a/./b", "a//b", "", "a\\b", ".", "a/.."])
def test_build_refuses_an_unsafe_path(path: str) -> None:
    with pytest.raises(BundleRejected, match="unsafe path"):
        make({path: b"x"})


def test_bundle_rejected_is_a_worker_error() -> None:
    assert issubclass(BundleRejected, WorkerError)


@pytest.mark.parametrize(("limits", "files"), [
    (Limits(members=2), {"a": b"1", "b": b"2"}),
    (Limits(member_bytes=10), {"a": b"x" * 10}),
    (Limits(total_bytes=20), {"a": b"x" * 10, "b": b"y" * 10}),
])
def test_a_bundle_exactly_at_a_limit_is_taken(tmp_path: Path, limits: Limits, files: dict[str, bytes]) -> None:
    built = make(files)
    assert sorted(bundle.extract(verify(built), built.archive, tmp_path / "dest", limits)) == sorted(files)


def test_directories_in_the_archive_are_created_without_a_manifest_entry(tmp_path: Path) -> None:
    tar = archive(directory("docs/"), directory("docs/empty"), regular("docs/a.txt", b"a"))
    hostile = signed(tar, entry("docs/a.txt", b"a"))
    dest = tmp_path / "dest"
    assert bundle.extract(verify(hostile), tar, dest) == ["docs/a.txt"]
    assert (dest / "docs" / "empty").is_dir()


def test_extracted_files_are_plain_and_private_whatever_mode_the_archive_claims(tmp_path: Path) -> None:
    info, data = regular("tools/run.sh", b"#!/bin/sh\n")
    info.mode = 0o6777  # setuid, setgid, world-writable
    hostile = signed(archive((info, data)), entry("tools/run.sh", b"#!/bin/sh\n"))
    bundle.extract(verify(hostile), hostile.archive, tmp_path / "dest")
    # The workspace is the Run's alone (DESIGN.md §5.10): 0600 files in 0700 directories.
    assert (tmp_path / "dest" / "tools" / "run.sh").stat().st_mode & 0o7777 == 0o600 & ~_umask()
    assert (tmp_path / "dest").stat().st_mode & 0o7777 == 0o700 & ~_umask()
    assert (tmp_path / "dest" / "tools").stat().st_mode & 0o7777 == 0o700 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- tampering with the signed parts


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_bit_flipped_in_the_archive_is_refused(area: Path, where: str) -> None:
    built = make()
    bit = {"first": 0, "middle": len(built.archive) * 4 + 1, "last": len(built.archive) * 8 - 1}[where]
    hostile = Bundle(built.manifest, flip_bit(built.archive, bit), built.envelope)
    assert_refused(area, hostile, "bundle rejected: the archive does not match the manifest's hash", at="verify")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_bit_flipped_in_the_signed_manifest_is_refused(area: Path, where: str) -> None:
    built = make()
    body = payload(built.envelope)
    bit = {"first": 0, "middle": len(body) * 4 + 1, "last": len(body) * 8 - 1}[where]
    hostile = Bundle(built.manifest, built.archive, with_payload(built.envelope, flip_bit(body, bit)))
    assert_refused(area, hostile, "bundle rejected: signature does not verify", at="verify")


@SETTINGS
@given(data=st.data())
def test_any_one_bit_flip_in_manifest_or_signature_is_refused(data: st.DataObject) -> None:
    built = make()
    body = payload(built.envelope)
    sig = base64.b64decode(built.envelope["signatures"][0]["sig"])
    if data.draw(st.booleans(), label="flip in the signature"):
        forged = flip_bit(sig, data.draw(st.integers(0, len(sig) * 8 - 1), label="bit"))
        envelope = {**built.envelope, "signatures": [{"keyid": CONTROL.key_id,
                                                      "sig": base64.b64encode(forged).decode()}]}
    else:
        envelope = with_payload(built.envelope, flip_bit(body, data.draw(st.integers(0, len(body) * 8 - 1))))
    with pytest.raises(BundleRejected, match="^bundle rejected: signature does not verify$"):
        verify(Bundle(built.manifest, built.archive, envelope))


@pytest.mark.parametrize("bit", [0, 255, 511])
def test_one_bit_flipped_in_the_signature_is_refused(area: Path, bit: int) -> None:
    built = make()
    sig = base64.b64decode(built.envelope["signatures"][0]["sig"])
    envelope = {**built.envelope, "signatures": [{"keyid": CONTROL.key_id,
                                                  "sig": base64.b64encode(flip_bit(sig, bit)).decode()}]}
    assert_refused(area, Bundle(built.manifest, built.archive, envelope),
                   "bundle rejected: signature does not verify", at="verify")


def test_a_bundle_signed_by_an_unknown_key_is_refused(area: Path) -> None:
    assert_refused(area, make(signer=STRANGER), f"bundle rejected: signed by unknown key id {STRANGER.key_id}",
                   at="verify")


def test_a_bundle_signed_by_a_retired_key_is_refused(area: Path, tmp_path: Path) -> None:
    store = retiring_trust(tmp_path / "worker-home")
    # During the overlap the old key still signs bundles the Worker takes...
    trusted, refused = store.trusted(NOW + 5)
    assert verify(make(now=NOW + 5), now=NOW + 5, trusted=trusted, refused=refused)["run_id"] == "t-1"
    # ...after its retire_at it does not.
    later = NOW + 20
    trusted, refused = store.trusted(later)
    assert CONTROL.key_id not in trusted
    assert_refused(area, make(now=later), f"bundle rejected: key {CONTROL.key_id} was retired", at="verify",
                   now=later, trusted=trusted, refused=refused)


def test_a_bundle_past_its_expiry_and_the_clock_skew_is_refused(area: Path) -> None:
    built = make()
    deadline = NOW + BUNDLE_TTL_SECONDS + CLOCK_SKEW_SECONDS
    assert verify(built, now=deadline) == built.manifest
    assert_refused(area, built, "bundle rejected: expired", at="verify", now=deadline + 1)


def test_a_bundle_issued_in_the_future_beyond_the_clock_skew_is_refused(area: Path) -> None:
    built = make()
    assert verify(built, now=NOW - CLOCK_SKEW_SECONDS) == built.manifest
    assert_refused(area, built, "bundle rejected: issued in the future", at="verify",
                   now=NOW - CLOCK_SKEW_SECONDS - 1)


def test_a_bundle_addressed_to_another_worker_is_refused(area: Path) -> None:
    other = SigningKey.generate()
    assert_refused(area, make(worker="w2", audience=other.key_id),
                   f"bundle rejected: addressed to another Worker (w2, {other.key_id})", at="verify")


def test_the_manifest_of_one_bundle_with_the_archive_of_another_is_refused(area: Path) -> None:
    first, second = make({"tasks/t.md": b"echo A\n"}), make({"tasks/t.md": b"echo B\n"})
    hostile = Bundle(first.manifest, second.archive, first.envelope)
    assert_refused(area, hostile, "bundle rejected: the archive does not match the manifest's hash", at="verify")


def test_a_manifest_naming_another_key_than_its_signer_is_refused(area: Path) -> None:
    hostile = signed(archive(), key_id=STRANGER.key_id)
    assert_refused(area, hostile, "bundle rejected: the manifest names another key than the one that signed it",
                   at="verify")


@pytest.mark.parametrize(("field", "value"), [
    ("seq", None), ("seq", "1"), ("seq", True), ("seq", 1.5), ("run_id", 7), ("audience", None),
    ("agent", []), ("files", {}), ("archive", None), ("expires_at", "later"), ("issued_at", False),
    ("nonce", 1), ("base_commit", 0), ("format", "1"),
])
def test_a_manifest_field_of_the_wrong_type_is_refused(area: Path, field: str, value: Any) -> None:
    assert_refused(area, signed(archive(), **{field: value}),
                   f"bundle rejected: manifest field {field!r} is missing or malformed", at="verify")


def test_a_manifest_missing_a_field_is_refused(area: Path) -> None:
    hostile = signed(archive())
    del hostile.manifest["nonce"]
    hostile = Bundle(hostile.manifest, hostile.archive,
                     sign(BUNDLE_TYPE, manifest_body(hostile.manifest), [CONTROL]))
    assert_refused(area, hostile, "bundle rejected: manifest field 'nonce' is missing or malformed", at="verify")


def test_a_manifest_of_another_format_is_refused(area: Path) -> None:
    assert_refused(area, signed(archive(), format=2), "bundle rejected: format 2, this Worker reads 1", at="verify")


@pytest.mark.parametrize(("body", "reason"), [
    (b"not json", "the signed manifest is not JSON"),
    (b"[1, 2]", "the signed manifest is not an object"),
    (b"\xff\xfe", "the signed manifest is not JSON"),
])
def test_a_signed_body_that_is_not_a_manifest_is_refused(area: Path, body: bytes, reason: str) -> None:
    hostile = Bundle({}, b"", sign(BUNDLE_TYPE, body, [CONTROL]))
    assert_refused(area, hostile, f"bundle rejected: {reason}", at="verify")


@pytest.mark.parametrize("signed_as", [RESULT_TYPE, TRUST_TYPE])
def test_a_manifest_signed_as_another_payload_type_is_refused(area: Path, signed_as: str) -> None:
    built = make()
    envelope = sign(signed_as, payload(built.envelope), [CONTROL])
    assert_refused(area, Bundle(built.manifest, built.archive, envelope),
                   f"bundle rejected: payload type '{signed_as}', expected '{BUNDLE_TYPE}'", at="verify")
    relabelled = {**envelope, "payloadType": BUNDLE_TYPE}
    assert_refused(area, Bundle(built.manifest, built.archive, relabelled),
                   "bundle rejected: signature does not verify", at="verify")


# ---------------------------------------------------------------- hostile archives, correctly signed


def test_an_absolute_member_path_is_refused(area: Path) -> None:
    evil = str(area.parent / "escaped-abs.txt")
    hostile = signed(archive(regular(evil, b"pwn")), entry(evil, b"pwn"))
    assert_refused(area, hostile, "unsafe path", at="extract")
    assert not Path(evil).exists()


@pytest.mark.parametrize("name", ["../escaped.txt", "sub/../../escaped.txt", "..", "./../escaped.txt"])
def test_a_member_path_that_climbs_out_with_dot_dot_is_refused(area: Path, name: str) -> None:
    hostile = signed(archive(regular(name, b"pwn")), entry(name, b"pwn"))
    assert_refused(area, hostile, f"bundle rejected: unsafe path {name!r}", at="extract")
    assert not (area / "escaped.txt").exists()


def test_a_directory_member_that_climbs_out_is_refused(area: Path) -> None:
    hostile = signed(archive(directory("../evil-dir/")))
    assert_refused(area, hostile, "bundle rejected: unsafe path '../evil-dir'", at="extract")
    assert not (area / "evil-dir").exists()


def test_a_pax_header_that_renames_a_member_out_of_the_destination_is_refused(area: Path) -> None:
    info, data = regular("innocent.txt", b"pwn")
    info.pax_headers = {"path": "../escaped.txt"}
    hostile = signed(archive((info, data)), entry("innocent.txt", b"pwn"))
    assert_refused(area, hostile, "bundle rejected: unsafe path '../escaped.txt'", at="extract")
    assert not (area / "escaped.txt").exists()


@pytest.mark.parametrize("target", ["../..", "/etc"])
def test_a_symlink_member_is_refused_and_nothing_is_written_through_it(area: Path, target: str) -> None:
    hostile = signed(archive(special("link", tarfile.SYMTYPE, target), regular("link/evil.txt", b"pwn")),
                     entry("link/evil.txt", b"pwn"))
    assert_refused(area, hostile, "bundle rejected: link is not a regular file or directory", at="extract")
    assert not os.path.lexists(area / "dest" / "link")
    assert not (area.parent / "evil.txt").exists()


@pytest.mark.parametrize("target", ["a.txt", "/etc/passwd", "../keep.txt"])
def test_a_hard_link_member_is_refused(area: Path, target: str) -> None:
    hostile = signed(archive(regular("a.txt", b"data"), special("hard", tarfile.LNKTYPE, target)),
                     entry("a.txt", b"data"))
    assert_refused(area, hostile, "bundle rejected: hard is not a regular file or directory", at="extract")
    assert not os.path.lexists(area / "dest" / "hard")
    assert os.stat(area / "keep.txt").st_nlink == 1


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE], ids=["chr", "blk", "fifo"])
def test_a_device_or_fifo_member_is_refused(area: Path, kind: bytes) -> None:
    hostile = signed(archive(special("dev", kind)))
    assert_refused(area, hostile, "bundle rejected: dev is not a regular file or directory", at="extract")
    assert not os.path.lexists(area / "dest" / "dev")


def test_too_many_members_are_refused_before_anything_is_written(area: Path) -> None:
    files = {f"f{i}": b"x" for i in range(3)}
    assert_refused(area, make(files), "bundle rejected: more than 2 members, over the limit", at="extract",
                   limits=Limits(members=2))
    assert list((area / "dest").iterdir()) == []


def test_an_oversized_member_is_refused(area: Path) -> None:
    hostile = make({"big.bin": b"x" * 11})
    assert_refused(area, hostile, "bundle rejected: big.bin is 11 bytes, over the limit of 10", at="extract",
                   limits=Limits(member_bytes=10))
    assert not (area / "dest" / "big.bin").exists()


def test_contents_over_the_total_size_limit_are_refused(area: Path) -> None:
    hostile = make({"a": b"x" * 10, "b": b"y" * 10, "c": b"z" * 10})
    assert_refused(area, hostile, "bundle rejected: contents exceed the total size limit", at="extract",
                   limits=Limits(member_bytes=10, total_bytes=25))
    assert not (area / "dest" / "c").exists()


def test_a_member_not_named_in_the_manifest_is_refused(area: Path) -> None:
    hostile = signed(archive(regular("tasks/t.md", b"task"), regular("extra.sh", b"rm -rf /")),
                     entry("tasks/t.md", b"task"))
    assert_refused(area, hostile, "bundle rejected: extra.sh is not in the manifest", at="extract")
    assert not (area / "dest" / "extra.sh").exists()


def test_a_manifest_file_missing_from_the_archive_is_refused(area: Path) -> None:
    hostile = signed(archive(regular("tasks/t.md", b"task")), entry("tasks/t.md", b"task"),
                     entry("docs/ctx.md", b"ctx"))
    assert_refused(area, hostile, "bundle rejected: docs/ctx.md is in the manifest but not the archive",
                   at="extract")


def test_a_file_whose_bytes_do_not_match_its_manifest_hash_is_refused(area: Path) -> None:
    original = b"echo safe\n"
    tar = archive(regular("tasks/t.md", b"echo evil\n"))  # same size, other bytes
    hostile = signed(tar, entry("tasks/t.md", original))
    assert_refused(area, hostile, "bundle rejected: tasks/t.md does not match its manifest hash", at="extract")
    assert not (area / "dest" / "tasks" / "t.md").exists()


def test_a_file_whose_size_differs_from_the_manifest_is_refused(area: Path) -> None:
    hostile = signed(archive(regular("a.txt", b"shorter")), entry("a.txt", b"short"))
    assert_refused(area, hostile, "bundle rejected: a.txt does not match its manifest hash", at="extract")


@pytest.mark.parametrize("second", [b"first", b"second"])
def test_a_duplicate_member_is_refused_and_the_first_copy_is_not_overwritten(area: Path, second: bytes) -> None:
    hostile = signed(archive(regular("tasks/t.md", b"first"), regular("tasks/t.md", second)),
                     entry("tasks/t.md", b"first"))
    assert_refused(area, hostile, "bundle rejected: tasks/t.md is named twice in the archive", at="extract")
    dest_file = area / "dest" / "tasks" / "t.md"
    assert not dest_file.exists() or dest_file.read_bytes() == b"first"


def test_a_duplicate_directory_member_is_refused(area: Path) -> None:
    hostile = signed(archive(directory("d/"), directory("d")))
    assert_refused(area, hostile, "bundle rejected: d is named twice in the archive", at="extract")


def test_a_file_named_twice_in_the_manifest_is_refused(area: Path) -> None:
    hostile = signed(archive(regular("a.txt", b"a")), entry("a.txt", b"a"), entry("a.txt", b"a"))
    assert_refused(area, hostile, "bundle rejected: a.txt is named twice in the manifest", at="extract")
    assert not (area / "dest").exists()


@pytest.mark.parametrize("order", ["dir-then-file", "file-then-dir"])
def test_a_name_that_is_both_a_directory_and_a_file_is_refused(area: Path, order: str) -> None:
    members = [directory("tasks"), regular("tasks", b"file")]
    if order == "file-then-dir":
        members.reverse()
    hostile = signed(archive(*members), entry("tasks", b"file"))
    assert_refused(area, hostile, "bundle rejected: tasks is named twice in the archive", at="extract")


def test_a_file_used_as_the_parent_directory_of_another_member_is_refused(area: Path) -> None:
    hostile = signed(archive(regular("a", b"file"), regular("a/b", b"child")),
                     entry("a", b"file"), entry("a/b", b"child"))
    assert_refused(area, hostile, "bundle rejected: a/b is both a file and a directory", at="extract")


@pytest.mark.parametrize("bad", [{"path": "a.txt"}, {"path": "a.txt", "sha256": "00", "size": "1"},
                                 {"path": "a.txt", "sha256": "00", "size": True}, "a.txt"])
def test_a_manifest_entry_without_a_proper_hash_or_size_is_refused(area: Path, bad: Any) -> None:
    hostile = signed(archive(regular("a.txt", b"data")), bad)
    assert_refused(area, hostile, "bundle rejected: manifest entry 'a.txt' lacks a path, sha256 or size",
                   at="extract")
    assert not (area / "dest").exists()


def test_bytes_that_are_not_a_tar_archive_are_refused(area: Path) -> None:
    hostile = signed(b"this is not a tar archive at all" * 40)
    assert_refused(area, hostile, "bundle rejected: archive is not a tar file", at="extract")


@pytest.mark.parametrize(("cut", "reason"), [
    (512 + 100, "bundle rejected: the archive is damaged (unexpected end of data)"),  # inside a.bin's data
    (512 + 2048 + 100, "bundle rejected: b.bin is in the manifest but not the archive"),  # inside b.bin's header
])
def test_a_truncated_archive_is_refused_as_a_bundle_rejection(area: Path, cut: int, reason: str) -> None:
    whole = archive(regular("a.bin", b"a" * 2000), regular("b.bin", b"b" * 2000))
    tar = whole[:cut]
    hostile = signed(tar, entry("a.bin", b"a" * 2000), entry("b.bin", b"b" * 2000))
    assert_refused(area, hostile, reason, at="extract")


# ---------------------------------------------------------------- properties

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
NUMBER = st.one_of(st.integers(-(2**53), 2**53), FINITE)
SEGMENT = st.text(string.ascii_letters + string.digits + "-_.é", min_size=1, max_size=6).filter(
    lambda s: s not in (".", ".."))
PATH = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)


def _no_file_is_a_parent(files: dict[str, bytes]) -> bool:
    return not any(other.startswith(path + "/") for path in files for other in files)


RANDOM_FIELDS = st.fixed_dictionaries({
    "run_id": TEXT, "task_id": TEXT, "revision": TEXT, "attempt": st.integers(0, 2**31), "task_file": TEXT,
    "timeout": NUMBER, "worker": TEXT, "audience": TEXT,
    "agent": st.fixed_dictionaries({"name": TEXT, "preset": TEXT, "command": st.lists(TEXT, max_size=3),
                                    "env": st.lists(TEXT, max_size=3)}),
    "seq": st.integers(0, 2**63), "base_commit": st.one_of(st.none(), st.text("0123456789abcdef", min_size=40,
                                                                               max_size=40)),
})
RANDOM_FILES = st.dictionaries(PATH, st.binary(max_size=64), max_size=4).filter(_no_file_is_a_parent)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | FINITE | TEXT,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                          max_leaves=6)


@SETTINGS
@given(fields=RANDOM_FIELDS, files=RANDOM_FILES, now=st.floats(0, 4e9), ttl=st.floats(1, 1e6))
def test_any_manifest_round_trips_through_sign_verify_and_extract(fields: dict[str, Any], files: dict[str, bytes],
                                                                 now: float, ttl: float) -> None:
    built = bundle.build(files, CONTROL, now=now, ttl=ttl, **fields)
    manifest = bundle.verified_manifest(built.envelope, built.archive, trusted=TRUSTED, refused={},
                                        audience=fields["audience"], now=now)
    assert manifest == built.manifest
    assert {k: manifest[k] for k in fields} == fields
    with tempfile.TemporaryDirectory() as scratch:
        dest = Path(scratch) / "dest"
        assert sorted(bundle.extract(manifest, built.archive, dest)) == sorted(files)
        for path, data in files.items():
            assert (dest / path).read_bytes() == data


REENCODINGS = ["spaced", "indented", "reversed-keys", "ascii", "trailing-newline", "leading-space",
               "added-field", "changed-seq"]


@SETTINGS
@given(fields=RANDOM_FIELDS, how=st.sampled_from(REENCODINGS), extra_key=TEXT, extra=JSON_VALUE)
def test_any_re_encoding_of_the_signed_manifest_does_not_verify(fields: dict[str, Any], how: str, extra_key: str,
                                                                extra: Any) -> None:
    built = bundle.build({"tasks/t.md": b"x"}, CONTROL, now=NOW, **fields)
    body = payload(built.envelope)
    parsed = json.loads(body)
    if how == "spaced":
        again = json.dumps(parsed, sort_keys=True, ensure_ascii=False).encode()
    elif how == "indented":
        again = json.dumps(parsed, sort_keys=True, indent=1, ensure_ascii=False).encode()
    elif how == "reversed-keys":
        again = json.dumps(dict(reversed(parsed.items())), separators=(",", ":"), ensure_ascii=False).encode()
    elif how == "ascii":
        again = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    elif how == "trailing-newline":
        again = body + b"\n"
    elif how == "leading-space":
        again = b" " + body
    elif how == "added-field":
        assume(extra_key not in parsed)
        again = manifest_body({**parsed, extra_key: extra})
    else:
        again = manifest_body({**parsed, "seq": parsed["seq"] + 1})
    assume(again != body)
    assert json.loads(again) is not None  # still a well-formed manifest: only the signature can catch it
    forged = Bundle(built.manifest, built.archive, with_payload(built.envelope, again))
    with pytest.raises(BundleRejected, match="^bundle rejected: signature does not verify$"):
        bundle.verified_manifest(forged.envelope, forged.archive, trusted=TRUSTED, refused={},
                                 audience=fields["audience"], now=NOW)


@SETTINGS
@given(fields=RANDOM_FIELDS, signed_as=st.sampled_from([RESULT_TYPE, TRUST_TYPE]))
def test_any_manifest_signed_as_another_payload_type_is_refused(fields: dict[str, Any], signed_as: str) -> None:
    built = bundle.build({}, CONTROL, now=NOW, **fields)
    envelope = sign(signed_as, payload(built.envelope), [CONTROL])
    for forged, reason in ((envelope, f"payload type '{signed_as}', expected '{BUNDLE_TYPE}'"),
                           ({**envelope, "payloadType": BUNDLE_TYPE}, "signature does not verify")):
        with pytest.raises(BundleRejected, match=re.escape(f"bundle rejected: {reason}")):
            bundle.verified_manifest(forged, built.archive, trusted=TRUSTED, refused={},
                                     audience=fields["audience"], now=NOW)
