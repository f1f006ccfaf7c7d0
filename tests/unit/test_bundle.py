"""Bundles: build/extract round trip, and hostile archives that must be refused."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from taskrunner import bundle
from taskrunner.bundle import Bundle, BundleRejected
from taskrunner.errors import WorkerError

FILES = {
    "tasks/t.md": b"---\n---\n# T\n\n```sh\necho hi\n```\n",
    "docs/deep/nested/ctx.txt": b"context\n",
    "bin.dat": bytes(range(256)) * 3,
    "empty": b"",
}


# ---------------------------------------------------------------- helpers


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


def manifest(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"format": bundle.BUNDLE_FORMAT, "run_id": "r1", "files": list(entries)}


def snapshot(root: Path, exclude: Path) -> set[str]:
    """Every path under root, except those under `exclude`."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path == exclude or exclude in path.parents:
                continue
            found.add(path.relative_to(root).as_posix())
    return found


@pytest.fixture()
def area(tmp_path: Path) -> Path:
    """A directory whose contents the hostile bundles must not touch; dest is area/dest."""
    (tmp_path / "area").mkdir()
    (tmp_path / "area" / "keep.txt").write_bytes(b"mine\n")
    return tmp_path / "area"


def assert_rejected(area: Path, hostile: Bundle, reason: str) -> BundleRejected:
    dest = area / "dest"
    before = snapshot(area.parent, dest)
    with pytest.raises(BundleRejected, match=reason) as caught:
        bundle.extract(hostile, dest)
    assert snapshot(area.parent, dest) == before, "the bundle wrote outside its destination"
    assert (area / "keep.txt").read_bytes() == b"mine\n"
    return caught.value


# ---------------------------------------------------------------- round trip


def test_build_then_extract_into_a_fresh_directory_reproduces_every_file(tmp_path: Path) -> None:
    built = bundle.build(FILES, run_id="r1", task_id="t")
    dest = tmp_path / "fresh" / "workspace"
    written = bundle.extract(built, dest)
    assert sorted(written) == sorted(FILES)
    for path, data in FILES.items():
        assert (dest / path).read_bytes() == data
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert on_disk == set(FILES)


def test_the_manifest_carries_the_given_fields_and_every_files_hash_and_size() -> None:
    built = bundle.build(FILES, run_id="r1", task_id="t")
    assert built.manifest["format"] == bundle.BUNDLE_FORMAT
    assert built.manifest["run_id"] == "r1"
    assert built.manifest["task_id"] == "t"
    assert sorted(built.manifest["files"], key=lambda e: e["path"]) == sorted(
        (entry(p, d) for p, d in FILES.items()), key=lambda e: e["path"])


def test_the_archive_is_an_uncompressed_tar_holding_only_regular_files() -> None:
    built = bundle.build(FILES, run_id="r1")
    with tarfile.open(fileobj=io.BytesIO(built.archive), mode="r:") as tar:
        members = tar.getmembers()
    assert sorted(m.name for m in members) == sorted(FILES)
    assert all(m.isreg() for m in members)


def test_extract_refuses_a_destination_that_already_exists(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tasks").mkdir()
    (dest / "tasks" / "t.md").write_bytes(b"old\n")
    with pytest.raises((BundleRejected, FileExistsError)):
        bundle.extract(bundle.build(FILES, run_id="r1"), dest)
    assert (dest / "tasks" / "t.md").read_bytes() == b"old\n"
    assert sorted(p.name for p in dest.iterdir()) == ["tasks"]


@pytest.mark.parametrize("path", ["/abs/t.md", "../up.md", "a/../../up.md", "a/./b", "a//b", "", "a\\b"])
def test_build_refuses_an_unsafe_path(path: str) -> None:
    with pytest.raises(BundleRejected, match="unsafe path"):
        bundle.build({path: b"x"}, run_id="r1")


def test_bundle_rejected_is_a_worker_error() -> None:
    assert issubclass(BundleRejected, WorkerError)


# ---------------------------------------------------------------- hostile archives


def test_an_absolute_member_path_is_rejected(area: Path) -> None:
    evil = str(area.parent / "escaped-abs.txt")
    hostile = Bundle(manifest(entry(evil, b"pwn")), archive(regular(evil, b"pwn")))
    assert_rejected(area, hostile, "unsafe path")
    assert not Path(evil).exists()


@pytest.mark.parametrize("name", ["../escaped.txt", "sub/../../escaped.txt", ".."])
def test_a_member_path_that_climbs_out_with_dot_dot_is_rejected(area: Path, name: str) -> None:
    hostile = Bundle(manifest(entry(name, b"pwn")), archive(regular(name, b"pwn")))
    assert_rejected(area, hostile, "unsafe path")
    assert not (area / "escaped.txt").exists()


def test_a_symlink_member_is_rejected_and_nothing_is_written_through_it(area: Path) -> None:
    hostile = Bundle(
        manifest(entry("link/evil.txt", b"pwn")),
        archive(special("link", tarfile.SYMTYPE, "../.."), regular("link/evil.txt", b"pwn")),
    )
    assert_rejected(area, hostile, "link is not a regular file or directory")
    assert not (area / "dest" / "link").exists()
    assert not (area.parent / "evil.txt").exists()


def test_a_hard_link_member_is_rejected(area: Path) -> None:
    hostile = Bundle(
        manifest(entry("a.txt", b"data")),
        archive(regular("a.txt", b"data"), special("hard", tarfile.LNKTYPE, "a.txt")),
    )
    assert_rejected(area, hostile, "hard is not a regular file or directory")
    assert not (area / "dest" / "hard").exists()


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE], ids=["fifo", "chr", "blk"])
def test_a_device_or_fifo_member_is_rejected(area: Path, kind: bytes) -> None:
    hostile = Bundle(manifest(), archive(special("dev", kind)))
    assert_rejected(area, hostile, "dev is not a regular file or directory")
    assert not (area / "dest" / "dev").exists()


def test_a_member_not_named_in_the_manifest_is_rejected(area: Path) -> None:
    hostile = Bundle(
        manifest(entry("tasks/t.md", b"task")),
        archive(regular("tasks/t.md", b"task"), regular("extra.sh", b"rm -rf /")),
    )
    assert_rejected(area, hostile, "extra.sh is not in the manifest")
    assert not (area / "dest" / "extra.sh").exists()


def test_a_manifest_file_missing_from_the_archive_is_rejected(area: Path) -> None:
    hostile = Bundle(
        manifest(entry("tasks/t.md", b"task"), entry("docs/ctx.md", b"ctx")),
        archive(regular("tasks/t.md", b"task")),
    )
    assert_rejected(area, hostile, "docs/ctx.md is in the manifest but not the archive")


def test_a_file_whose_bytes_do_not_match_the_manifest_hash_is_rejected(area: Path) -> None:
    built = bundle.build({"tasks/t.md": b"echo safe\n"}, run_id="r1")
    flipped = bytearray(built.archive)
    at = bytes(flipped).index(b"echo safe")
    flipped[at] ^= 0x01  # same size, different bytes
    hostile = Bundle(built.manifest, bytes(flipped))
    assert_rejected(area, hostile, "tasks/t.md does not match its manifest hash")
    assert not (area / "dest" / "tasks" / "t.md").exists()


def test_a_file_whose_size_differs_from_the_manifest_is_rejected(area: Path) -> None:
    hostile = Bundle(manifest(entry("a.txt", b"short")), archive(regular("a.txt", b"shorter")))
    assert_rejected(area, hostile, "a.txt does not match its manifest hash")


def duplicate_bundle() -> Bundle:
    return Bundle(
        manifest(entry("tasks/t.md", b"first")),
        archive(regular("tasks/t.md", b"first"), regular("tasks/t.md", b"second")),
    )


def test_a_duplicate_member_name_is_rejected_and_the_first_copy_is_not_overwritten(area: Path) -> None:
    assert_rejected(area, duplicate_bundle(), "tasks/t.md")
    dest_file = area / "dest" / "tasks" / "t.md"
    assert not dest_file.exists() or dest_file.read_bytes() == b"first"


def test_a_duplicate_member_name_is_rejected_with_a_reason_that_says_it_is_named_twice(area: Path) -> None:
    # The file *is* in the manifest; the reason must name the real fault.
    error = assert_rejected(area, duplicate_bundle(), "tasks/t.md")
    assert any(word in str(error) for word in ("duplicate", "twice", "more than once")), str(error)


@pytest.mark.parametrize("order", ["dir-then-file", "file-then-dir"])
def test_a_name_that_is_both_a_directory_and_a_file_is_rejected(area: Path, order: str) -> None:
    members = [directory("tasks"), regular("tasks", b"file")]
    if order == "file-then-dir":
        members.reverse()
    hostile = Bundle(manifest(entry("tasks", b"file")), archive(*members))
    assert_rejected(area, hostile, "tasks")


def test_a_file_used_as_the_parent_directory_of_another_member_is_rejected(area: Path) -> None:
    hostile = Bundle(
        manifest(entry("a", b"file"), entry("a/b", b"child")),
        archive(regular("a", b"file"), regular("a/b", b"child")),
    )
    assert_rejected(area, hostile, "a/b")


def test_a_manifest_entry_without_hash_or_size_is_rejected(area: Path) -> None:
    hostile = Bundle(manifest({"path": "a.txt"}), archive(regular("a.txt", b"data")))
    assert_rejected(area, hostile, "a.txt")


def test_bytes_that_are_not_a_tar_archive_are_rejected(area: Path) -> None:
    hostile = Bundle(manifest(), b"this is not a tar archive at all" * 40)
    assert_rejected(area, hostile, "not a tar file")


def test_too_many_members_are_rejected(area: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "MAX_MEMBERS", 2)
    files = {f"f{i}": b"x" for i in range(3)}
    hostile = bundle.build(files, run_id="r1")
    assert_rejected(area, hostile, "over the limit")
    assert not any((area / "dest" / name).exists() for name in files)
