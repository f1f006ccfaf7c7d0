"""Files beneath a root directory, opened component by component, never through a link.

The daemon's own files (runs/) and the files it reads for a Task (tasks/,
`context`) live in a work tree whose content anyone who can push controls.
A path string handed to open() follows every symbolic link on the way, so a
committed `runs/x/run-1/output.log -> ../../../.git/config` would make the
daemon append to its git configuration. Here every path is walked from a
directory fd, one name at a time:

    directories  O_DIRECTORY | O_NOFOLLOW, then the next name relative to that fd
    files        O_NOFOLLOW | O_NONBLOCK (a FIFO cannot block), then fstat: S_ISREG
    creating     os.mkdir(name, dir_fd=...), never following what is there
    replacing    a temp name in the same directory fd, then os.replace(..., src_dir_fd, dst_dir_fd)

What is found where a directory or file should be decides what happens:

- reading: a link, a special file (FIFO, socket, device) or a directory
  raises UnsafePath naming the path and what it is; nothing is followed.
  So does a regular file with other hard links (st_nlink > 1): it is the
  same file as one elsewhere (`ln .git/config docs/cfg`), and reading it
  or appending to it would read or write that one.
- writing with `repair=True` (the daemon's own runs/ paths): a link, a
  special file or a file with other hard links is removed (unlinked through its directory fd, never
  followed) and replaced by the daemon's own directory or file, and
  `notice` names it. A regular file where a directory must be, or a
  directory where a file must be, is not removed (it may hold someone's
  data): UnsafePath.
- writing without repair: as reading.

Paths are relative, '/'-separated, with no empty, '.' or '..' part; anything
else is refused before any system call. Only the root is opened by its path
(the caller chose it); it is opened once and its fd kept.

Speed: walking name by name costs two system calls per directory, and the
daemon opens `runs/<id>/run-<n>/` for every record it writes. On Linux 5.6+
each open first tries openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS:
the kernel walks the whole path in one call under the same rules (no link
anywhere, nothing outside the root). Any error sends it down the walk above,
which makes what is missing, says what is in the way, and repairs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from taskrunner.errors import UnsafePath

#: The most one read of a file that grew while `Beneath.read_capped` read it asks for.
_READ_CHUNK = 1024 * 1024

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Creating and replacing race with whoever else writes the tree: give up after this many rounds.
_ROUNDS = 4
#: The sentence every refusal ends with.
REFUSAL = "taskrun reads only regular files and follows no links"
#: What a regular file with other hard links is, as a message says it, and why it is refused.
HARDLINKED = "a hard link (the file has other names too)"
HARDLINK_REFUSAL = "taskrun reads only files that are nowhere else"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


#: openat2's system call number: the same on every Linux architecture (it came after they were unified).
_SYS_OPENAT2 = 437
#: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS (linux/openat2.h).
_RESOLVE = 0x08 | 0x04 | 0x02
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.syscall.restype = ctypes.c_long
#: False once the kernel said it has no openat2 (ENOSYS, or a smaller struct: E2BIG).
_openat2_works = _libc is not None


def _openat2(dir_fd: int, rel: str, flags: int, mode: int = 0) -> int | None:
    """openat2(dir_fd, rel) refusing any link and anything outside dir_fd; None on any failure."""
    global _openat2_works
    if not _openat2_works:
        return None
    assert _libc is not None
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE)
    # syscall(2) reads each argument as a long: pass them as such.
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dir_fd), ctypes.c_char_p(os.fsencode(rel)),
                       ctypes.byref(how), ctypes.c_long(ctypes.sizeof(how)))
    if fd >= 0:
        return int(fd)
    if ctypes.get_errno() in (errno.ENOSYS, errno.E2BIG):
        _openat2_works = False
    return None


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, as a message says it: 'a symbolic link', 'a FIFO', …"""
    for test, what in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "a special file"


def refused(found: os.stat_result) -> tuple[str, str] | None:
    """(what, reason) when this entry is not a regular file of its own (st_nlink 1), else None."""
    if not stat.S_ISREG(found.st_mode):
        return kind_of(found.st_mode), REFUSAL
    if found.st_nlink > 1:
        return HARDLINKED, HARDLINK_REFUSAL
    return None


def split(rel: str) -> list[str]:
    """The names of a relative path; UnsafePath unless every one is a plain name."""
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\0" in part:
            raise UnsafePath(rel, "not a plain relative path", "expected names joined by '/', without '.' or '..'")
    return parts


#: The temp files this project's writers make beside the file they replace (`write_in`, recordkey.record_key,
#: fulllogs.py): `.<name>.<pid>[.<thread id>].tmp`. One is left only when its writer was killed mid-write.
TEMP_RE = re.compile(r"^\.(?P<name>.+?)\.(?P<pid>[0-9]{1,10})(?:\.[0-9]+)?\.tmp$")


def drop_stale_temps(dir_fd: int) -> list[str]:
    """Remove from the directory `dir_fd` the temp files (TEMP_RE) whose writer process is gone; their names.

    A temp file of a live process (its pid may have been reused by another: then
    it stays until that one ends) and of this process is kept. Never raises
    for a file that went away meanwhile.
    """
    removed: list[str] = []
    for name in os.listdir(dir_fd):
        found = TEMP_RE.match(name)
        if found is None or int(found["pid"]) == os.getpid() or _alive(int(found["pid"])):
            continue
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's (alive), or a number no process can have: leave it
    return True


def write_in(dir_fd: int, name: str, data: bytes, mode: int = 0o644, durable: bool = False) -> None:
    """Replace `name` in the directory `dir_fd` with `data`: temp file, (fsync,) rename.

    Readers see the old file or the new one, never half. The temp file is
    created exclusively without following links; `name` itself is replaced,
    never followed (a link there is replaced by the file). Raises OSError.
    """
    # One writer per process and thread at a time, so this name is ours alone;
    # cheaper than mkstemp's random names, which showed in profiles.
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(tmp, dir_fd=dir_fd)  # left by a killed writer that had our pid and thread id
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class Beneath:
    """One directory tree, opened beneath its root's fd. Safe to share between threads."""

    def __init__(self, root: Path, notice: Callable[[str], None] | None = None) -> None:
        self.root = root
        self._notice = notice or (lambda message: None)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the fd goes with the process
            pass

    def _root(self) -> int:
        fd = self._fd
        if fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fd = self._fd
        return fd

    # -- directories -----------------------------------------------------------

    def open_dir(self, rel: str | Sequence[str], create: bool = False, repair: bool = False) -> int:
        """An fd of the directory `rel` ('' is the root itself); the caller closes it.

        FileNotFoundError when a part is missing and not `create`;
        UnsafePath when a part is a link, a special file or a regular file
        (links and special files are replaced instead when `repair`).
        """
        if isinstance(rel, str):
            parts = split(rel) if rel else []
        else:
            parts = list(rel)
            if any("/" in part for part in parts):
                raise UnsafePath("/".join(parts), "not a plain relative path", "a name holds '/'")
            if parts:
                split("/".join(parts))  # the checks a string path gets
        fd, owned = self._root(), False
        if parts:
            fast = _openat2(fd, "/".join(parts), DIR_FLAGS)
            if fast is not None:
                return fast
        try:
            for i, name in enumerate(parts):
                following = self._step(fd, name, parts[: i + 1], create, repair)
                if owned:
                    os.close(fd)
                fd, owned = following, True
        except BaseException:
            if owned:
                os.close(fd)
            raise
        return fd if owned else os.dup(fd)

    def _step(self, fd: int, name: str, shown: Sequence[str], create: bool, repair: bool) -> int:
        for _ in range(_ROUNDS):
            try:
                return os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # someone made it first: open what is there, whatever it is
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                found = _lstat(name, fd)
                if found is None or stat.S_ISDIR(found.st_mode):
                    continue  # it changed under us: look again
                what = kind_of(found.st_mode)
                path = "/".join(shown)
                if stat.S_ISREG(found.st_mode):
                    raise UnsafePath(path, what, "a directory must be there") from None
                if not repair:
                    raise UnsafePath(path, what, REFUSAL) from None
                self._remove(fd, name, path, what, "a directory")
        raise UnsafePath("/".join(shown), "changing while it is opened", "try again")

    def _remove(self, dir_fd: int, name: str, path: str, what: str, instead: str) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)  # a hard link: only this name goes, the file stays wherever else it is
        except FileNotFoundError:
            return
        never = "writes through" if what == HARDLINKED else "follows"
        self._notice(f"{path} was {what}, which taskrun never {never}: removed it and put {instead} "
                     f"of its own there")

    def make_dir(self, rel: str) -> bool:
        """Make the directory `rel` (and its parents), repairing links; True if this call made `rel`.

        False means it was there already, as a directory.
        """
        parts = split(rel)
        parent = self.open_dir(parts[:-1], create=True, repair=True)
        try:
            for _ in range(_ROUNDS):
                try:
                    os.mkdir(parts[-1], 0o755, dir_fd=parent)
                    return True
                except FileExistsError:
                    found = _lstat(parts[-1], parent)
                    if found is None:
                        continue
                    if stat.S_ISDIR(found.st_mode):
                        return False
                    if stat.S_ISREG(found.st_mode):
                        raise UnsafePath(rel, "a regular file", "a directory must be there") from None
                    self._remove(parent, parts[-1], rel, kind_of(found.st_mode), "a directory")
            raise UnsafePath(rel, "changing while it is made", "try again")
        finally:
            os.close(parent)

    def clear_dir(self, rel: str) -> list[str]:
        """Remove everything inside the directory `rel`, following nothing; the names removed."""
        fd = self.open_dir(rel)
        try:
            return _clear(fd, rel)
        finally:
            os.close(fd)

    # -- files -------------------------------------------------------------------

    def open_file(self, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644, repair: bool = False) -> int:
        """An fd of the regular file `rel`, opened with `flags` plus FILE_FLAGS; the caller closes it.

        With O_CREAT in `flags`, missing directories are made. FileNotFoundError
        when it (or a directory) is missing; UnsafePath when something on the
        way or the file itself is not what it must be (see the module doc).
        """
        parts = split(rel)
        fd = _openat2(self._root(), rel, flags | FILE_FLAGS, mode)
        if fd is not None:
            if refused(os.fstat(fd)) is None:
                return fd
            os.close(fd)  # a FIFO, a device, a hard link: the walk below says so (or repairs it)
        creating = bool(flags & os.O_CREAT)
        parent = self.open_dir(parts[:-1], create=creating, repair=repair)
        try:
            return self._open_in(parent, parts[-1], rel, flags, mode, repair)
        finally:
            os.close(parent)

    def _open_in(self, parent: int, name: str, rel: str, flags: int, mode: int, repair: bool) -> int:
        for _ in range(_ROUNDS):
            try:
                fd = os.open(name, flags | FILE_FLAGS, mode, dir_fd=parent)
            except OSError as exc:
                # ELOOP: a link (O_NOFOLLOW); ENXIO: a FIFO with no reader opened for writing;
                # EISDIR: a directory opened for writing. The rest is a plain I/O error.
                if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EOPNOTSUPP):
                    raise
                found = _lstat(name, parent)
                if found is None:
                    continue
                what, why = refused(found) or (kind_of(found.st_mode), REFUSAL)
            else:
                found = os.fstat(fd)
                problem = refused(found)
                if problem is None:
                    return fd
                os.close(fd)
                what, why = problem
            if not repair or stat.S_ISDIR(found.st_mode) or not flags & os.O_CREAT:
                raise UnsafePath(rel, what, why)
            self._remove(parent, name, rel, what, "a regular file")
        raise UnsafePath(rel, "changing while it is opened", "try again")

    def read_bytes(self, rel: str) -> bytes:
        """The content of the regular file `rel`. FileNotFoundError, UnsafePath, OSError."""
        fd = self.open_file(rel)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def read_capped(self, rel: str, limit: int) -> tuple[bytes | None, int]:
        """(the bytes of the regular file `rel`, their count), or (None, its size) when it holds more than
        `limit` bytes. FileNotFoundError, UnsafePath, OSError as `open_file` raises them.

        A file whose size is over the limit is not read at all; otherwise the
        first read asks for its size plus one byte (a read of `limit` would
        allocate all of it) and later ones only for what a file that grew may
        still add, so nothing past `limit` + 1 bytes is ever read.
        """
        fd = self.open_file(rel)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                return None, size
            parts: list[bytes] = []
            got = 0
            want = size + 1
            while chunk := os.read(fd, want):
                parts.append(chunk)
                got += len(chunk)
                if got > limit:
                    return None, max(size, got)
                want = min(_READ_CHUNK, limit - got + 1)
            return b"".join(parts), got
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry `rel` itself (a link is not followed); None when it or a directory on the way is missing.

        UnsafePath when a directory on the way is not a plain directory.
        """
        parts = split(rel)
        try:
            parent = self.open_dir(parts[:-1])
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return _lstat(parts[-1], parent)
        finally:
            os.close(parent)

    def write_atomic(self, rel: str, data: bytes, mode: int = 0o644, durable: bool = False,
                     repair: bool = False, look: bool = True) -> None:
        """Replace the file `rel` with `data` (see write_in), making missing directories.

        With `repair` and `look`, a link or special file at `rel` is reported
        before it is replaced (the rename would replace a link silently, never
        following it); `look=False` saves that system call where the caller
        knows the directory is its own.
        """
        parts = split(rel)
        parent = self.open_dir(parts[:-1], create=True, repair=repair)
        try:
            if repair and look:
                found = _lstat(parts[-1], parent)
                problem = None if found is None else refused(found)
                if found is not None and problem is not None:
                    if stat.S_ISDIR(found.st_mode):
                        raise UnsafePath(rel, "a directory", "a regular file must be there")
                    self._remove(parent, parts[-1], rel, problem[0], "a regular file")
            write_in(parent, parts[-1], data, mode, durable)
        finally:
            os.close(parent)


def open_given(path: str, work_tree: Path) -> int:
    """An fd of the regular file at `path`, a path a person typed (`taskrun submit FILE`), read-only.

    The file's own name is never followed (O_NOFOLLOW), and a FIFO, socket
    or device is refused without being opened. Directories on the way may
    be links, as the person typed them (`/tmp` may be one), until the walk
    is inside `work_tree`: from there on, as everywhere the daemon reads,
    none is followed, since a pushed `ci -> /home/me/notes` would otherwise
    choose the file. The path is made absolute as a shell does (`..` drops
    the name before it), then walked from `/` one name at a time.

    FileNotFoundError; UnsafePath naming the part refused; OSError.
    """
    absolute = os.path.abspath(path)
    names = [name for name in absolute.split("/") if name]

    def shown(count: int) -> str:
        prefix = "/" + "/".join(names[:count])
        return prefix if os.path.isabs(path) else os.path.relpath(prefix)

    top = os.stat(work_tree)
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    inside = False
    try:
        for count, name in enumerate(names, 1):
            here = os.fstat(fd)
            inside = inside or (here.st_dev, here.st_ino) == (top.st_dev, top.st_ino)
            last = count == len(names)
            found = _lstat(name, fd) if last else None
            if found is not None and not stat.S_ISREG(found.st_mode):
                raise UnsafePath(shown(count), kind_of(found.st_mode), REFUSAL)
            flags = FILE_FLAGS | os.O_RDONLY if last else DIR_FLAGS if inside else DIR_FLAGS & ~os.O_NOFOLLOW
            try:
                following = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                found = _lstat(name, fd) if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO) else None
                if found is None or stat.S_ISDIR(found.st_mode) or stat.S_ISREG(found.st_mode):
                    raise
                raise UnsafePath(shown(count), kind_of(found.st_mode), REFUSAL) from None
            os.close(fd)
            fd = following
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):  # `/`, or it changed between the look and the open
            raise UnsafePath(shown(len(names)) if names else "/", kind_of(found.st_mode), REFUSAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear(fd: int, shown: str) -> list[str]:
    removed: list[str] = []
    with os.scandir(fd) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        found = _lstat(name, fd)
        if found is None:
            continue
        if stat.S_ISDIR(found.st_mode):
            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                _clear(sub, f"{shown}/{name}")
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
        removed.append(name)
    return sorted(removed)
