"""safefs: paths opened beneath a root, never through a link; atomic.write_bytes' `beneath`."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from taskrunner import atomic, safefs
from taskrunner.errors import UnsafePath
from taskrunner.safefs import Beneath, split

T = TypeVar("T")


def finishes(action: Callable[[], T], timeout: float = 5.0) -> T:
    """Run `action` on a thread; fail (rather than hang the suite) if it blocks."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(action())
        except BaseException as exc:  # handed back to the test
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the call blocked"
    if error:
        raise error[0]
    return result[0]


@pytest.fixture(autouse=True, params=["openat2", "walk"])
def how(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: with the kernel's one-call openat2 path (where there is one) and the name-by-name walk."""
    if request.param == "walk":
        monkeypatch.setattr(safefs, "_openat2_works", False)
    return str(request.param)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    path = tmp_path / "tree"
    path.mkdir()
    return path


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A directory next to the tree with a secret in it: nothing may read or change it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_text("the secret\n")
    return path


@pytest.fixture()
def notices() -> list[str]:
    return []


@pytest.fixture()
def tree(root: Path, notices: list[str]) -> Iterator[Beneath]:
    handle = Beneath(root, notices.append)
    yield handle
    handle.close()


def unix_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


# ---------------------------------------------------------------- reading


def test_a_regular_file_is_read(tree: Beneath, root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"data")
    assert tree.read_bytes("a/b/f") == b"data"


@pytest.mark.parametrize("target", ["../outside/secret", "{outside}/secret", "nowhere", "{outside}"])
def test_a_link_as_the_file_is_refused_and_never_followed(tree: Beneath, root: Path, outside: Path,
                                                          target: str) -> None:
    (root / "f").symlink_to(target.format(outside=outside))
    with pytest.raises(UnsafePath) as caught:
        tree.read_bytes("f")
    assert (caught.value.path, caught.value.what) == ("f", "a symbolic link")


@pytest.mark.parametrize("depth", [1, 2])
def test_a_link_in_a_parent_directory_is_refused_naming_the_parent(tree: Beneath, root: Path, outside: Path,
                                                                   depth: int) -> None:
    parent = root / "a" if depth == 1 else root / "a" / "b"
    parent.parent.mkdir(parents=True, exist_ok=True)
    parent.symlink_to(outside)
    rel = parent.relative_to(root).as_posix()
    with pytest.raises(UnsafePath) as caught:
        tree.read_bytes(f"{rel}/secret")
    assert (caught.value.path, caught.value.what) == (rel, "a symbolic link")


def test_a_fifo_is_refused_without_blocking(tree: Beneath, root: Path) -> None:
    os.mkfifo(root / "fifo")
    with pytest.raises(UnsafePath, match="fifo is a FIFO"):
        finishes(lambda: tree.read_bytes("fifo"))


def test_a_socket_and_a_directory_are_refused(tree: Beneath, root: Path) -> None:
    with unix_socket(root / "sock"):
        with pytest.raises(UnsafePath, match="a socket"):
            tree.read_bytes("sock")
    (root / "dir").mkdir()
    with pytest.raises(UnsafePath, match="a directory"):
        tree.read_bytes("dir")


def test_a_device_is_refused(tree: Beneath, root: Path) -> None:
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        if os.environ.get("CI") == "true":
            raise  # CI runs as root: there the test must run, not skip
        pytest.skip("making a device node needs privileges")
    with pytest.raises(UnsafePath, match="a character device"):
        tree.read_bytes("null")


def test_a_missing_file_is_file_not_found(tree: Beneath) -> None:
    with pytest.raises(FileNotFoundError):
        tree.read_bytes("a/missing")


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/", "a\0b", ""])
def test_paths_that_are_not_plain_are_refused_before_anything_is_opened(tree: Beneath, rel: str) -> None:
    with pytest.raises(UnsafePath, match="not a plain relative path"):
        split(rel)
    with pytest.raises(UnsafePath):
        tree.read_bytes(rel)


def test_lstat_sees_a_link_itself_and_none_for_what_is_missing(tree: Beneath, root: Path, outside: Path) -> None:
    (root / "link").symlink_to(outside)
    found = tree.lstat("link")
    assert found is not None and stat.S_ISLNK(found.st_mode)
    assert tree.lstat("missing") is None and tree.lstat("missing/deeper") is None
    with pytest.raises(UnsafePath):
        tree.lstat("link/secret")


# ---------------------------------------------------------------- writing


def test_write_atomic_makes_directories_and_leaves_no_temp_file(tree: Beneath, root: Path) -> None:
    tree.write_atomic("a/b/f.json", b"one")
    tree.write_atomic("a/b/f.json", b"two")
    assert (root / "a/b/f.json").read_bytes() == b"two"
    assert os.listdir(root / "a/b") == ["f.json"]


@pytest.mark.parametrize("link", ["f", "a", "a/b"])
def test_with_repair_a_link_on_the_way_is_replaced_and_its_target_untouched(
        tree: Beneath, root: Path, outside: Path, notices: list[str], link: str) -> None:
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(outside / "secret" if link == "f" else outside)
    rel = "f" if link == "f" else f"{link}/secret"

    tree.write_atomic(rel, b"ours", repair=True)

    assert (root / rel).read_bytes() == b"ours" and not (root / link).is_symlink()
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "the secret\n"
    assert len(notices) == 1 and notices[0].startswith(f"{link} was a symbolic link")


def test_with_repair_a_fifo_or_socket_is_replaced(tree: Beneath, root: Path, notices: list[str]) -> None:
    os.mkfifo(root / "fifo")
    finishes(lambda: tree.write_atomic("fifo", b"x", repair=True))
    with unix_socket(root / "sock"):
        tree.write_atomic("sock", b"y", repair=True)
    assert (root / "fifo").read_bytes() == b"x" and (root / "sock").read_bytes() == b"y"
    assert [n.split(" was ")[0] for n in notices] == ["fifo", "sock"]


def test_a_regular_file_where_a_directory_must_be_is_not_removed(tree: Beneath, root: Path) -> None:
    (root / "a").write_text("someone's file\n")
    with pytest.raises(UnsafePath, match="a is a regular file"):
        tree.write_atomic("a/f", b"x", repair=True)
    assert (root / "a").read_text() == "someone's file\n"


def test_without_repair_a_link_on_the_way_is_refused(tree: Beneath, root: Path, outside: Path) -> None:
    (root / "a").symlink_to(outside)
    with pytest.raises(UnsafePath):
        tree.write_atomic("a/new", b"x")
    assert sorted(os.listdir(outside)) == ["secret"]


def test_appending_through_a_link_replaces_the_link(tree: Beneath, root: Path, outside: Path,
                                                    notices: list[str]) -> None:
    (root / "log").symlink_to(outside / "secret")
    fd = tree.open_file("log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, repair=True)
    os.write(fd, b"appended")
    os.close(fd)
    assert (root / "log").read_bytes() == b"appended"
    assert (outside / "secret").read_text() == "the secret\n" and notices


def test_appending_to_a_fifo_with_no_reader_neither_blocks_nor_writes_it(tree: Beneath, root: Path) -> None:
    os.mkfifo(root / "log")
    fd = finishes(lambda: tree.open_file("log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, repair=True))
    os.close(fd)
    assert stat.S_ISREG(os.lstat(root / "log").st_mode)


def test_make_dir_says_whether_it_made_the_directory(tree: Beneath, root: Path, outside: Path) -> None:
    assert tree.make_dir("a/b") is True
    assert tree.make_dir("a/b") is False
    (root / "c").symlink_to(outside)
    assert tree.make_dir("c") is True and not (root / "c").is_symlink()


def test_clear_dir_removes_everything_inside_and_follows_no_link(tree: Beneath, root: Path, outside: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    (root / "d" / "sub" / "g").write_text("y")
    (root / "d" / "link").symlink_to(outside)
    os.mkfifo(root / "d" / "fifo")

    assert tree.clear_dir("d") == ["f", "fifo", "link", "sub"]

    assert os.listdir(root / "d") == [] and sorted(os.listdir(outside)) == ["secret"]


def test_the_root_may_itself_be_reached_through_a_link(tmp_path: Path, root: Path) -> None:
    """The caller chose the root: only what is beneath it is content someone else controls."""
    (root / "f").write_text("x")
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert Beneath(alias).read_bytes("f") == b"x"


# ---------------------------------------------------------------- atomic.write_bytes


def test_atomic_write_never_writes_through_a_link_at_the_path(root: Path, outside: Path) -> None:
    (root / "f").symlink_to(outside / "secret")
    atomic.write_bytes(root / "f", b"new")
    assert (root / "f").read_bytes() == b"new" and not (root / "f").is_symlink()
    assert (outside / "secret").read_text() == "the secret\n"


def test_atomic_write_beneath_a_root_refuses_a_link_in_a_parent(root: Path, outside: Path) -> None:
    (root / "tasks").symlink_to(outside)
    with pytest.raises(UnsafePath, match="tasks is a symbolic link"):
        atomic.write_bytes(root / "tasks" / "x.md", b"x", beneath=root)
    assert sorted(os.listdir(outside)) == ["secret"]
    with pytest.raises(OSError):  # UnsafePath is an OSError for callers that handle those
        atomic.write_bytes(root / "tasks" / "x.md", b"x", beneath=root)


def test_atomic_write_beneath_a_root_makes_missing_directories(root: Path) -> None:
    atomic.write_bytes(root / "a" / "b" / "f", b"x", beneath=root, mode=0o600)
    assert (root / "a/b/f").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(root / "a/b/f").st_mode) == 0o600


def test_atomic_write_beneath_refuses_a_path_outside_the_root(root: Path, outside: Path) -> None:
    with pytest.raises(UnsafePath, match="outside"):
        atomic.write_bytes(outside / "f", b"x", beneath=root)


# ---------------------------------------------------------------- hard links


def test_a_file_with_other_hard_links_is_refused_for_reading(tree: Beneath, root: Path, outside: Path) -> None:
    os.link(outside / "secret", root / "f")  # `ln .git/config docs/cfg`: the same file under a second name
    with pytest.raises(UnsafePath) as caught:
        tree.read_bytes("f")
    assert (caught.value.path, caught.value.what, caught.value.reason) == (
        "f", safefs.HARDLINKED, "taskrun reads only files that are nowhere else")
    with pytest.raises(UnsafePath):
        tree.open_file("f", os.O_WRONLY | os.O_APPEND)  # without repair: refused, not written


def test_appending_to_a_file_with_other_hard_links_replaces_it_and_never_writes_the_other(
        tree: Beneath, root: Path, outside: Path, notices: list[str]) -> None:
    os.link(outside / "secret", root / "log")
    fd = tree.open_file("log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, repair=True)
    os.write(fd, b"appended")
    os.close(fd)
    assert (root / "log").read_bytes() == b"appended" and os.stat(root / "log").st_nlink == 1
    assert (outside / "secret").read_text() == "the secret\n" and os.stat(outside / "secret").st_nlink == 1
    assert notices == ["log was a hard link (the file has other names too), which taskrun never writes through: "
                       "removed it and put a regular file of its own there"]


def test_replacing_a_file_with_other_hard_links_leaves_the_other_name_as_it_was(
        tree: Beneath, root: Path, outside: Path, notices: list[str]) -> None:
    os.link(outside / "secret", root / "record")
    tree.write_atomic("record", b"mine", repair=True)
    assert (root / "record").read_bytes() == b"mine"
    assert (outside / "secret").read_text() == "the secret\n"
    assert len(notices) == 1 and notices[0].startswith("record was a hard link")


def test_a_file_whose_other_name_is_gone_is_its_own_again(tree: Beneath, root: Path, outside: Path) -> None:
    os.link(outside / "secret", root / "f")
    (outside / "secret").unlink()
    assert tree.read_bytes("f") == b"the secret\n"


def test_temp_files_of_writers_that_are_gone_are_dropped_and_others_kept(tmp_path: Path) -> None:
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    alive = subprocess.Popen(["sleep", "30"])
    try:
        names = [f".status.json.{gone.pid}.140213.tmp", f".record.key.{gone.pid}.tmp",
                 f".status.json.{alive.pid}.1.tmp", f".status.json.{os.getpid()}.7.tmp",
                 "status.json", ".gitkeep", f"notes.{gone.pid}.tmp"]
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            removed = safefs.drop_stale_temps(fd)
        finally:
            os.close(fd)
        assert sorted(removed) == sorted(names[:2])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    finally:
        alive.kill()
        alive.wait()
