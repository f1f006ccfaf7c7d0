"""The daemon's control socket: one JSON request line in, one JSON reply line out.

The socket lives in .git/taskrun/. When that path is too long for a Unix
socket, it lives in a private directory made for this daemon with
`tempfile.mkdtemp` (mode 0700, a random name) under $XDG_RUNTIME_DIR or the
temp directory, never at a name another user could predict and take first.
`daemon.json` beside the lock says where, so clients never guess; both sides
refuse a socket whose directory is not a real directory owned by this user
with mode 0700 (the daemon makes .git/taskrun so).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from taskrunner import clock, diskspace
from taskrunner.atomic import read_json, write_json
from taskrunner.daemonlock import held as lock_held
from taskrunner.errors import DaemonNotRunning, TaskrunError

#: sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 100
REPLY_TIMEOUT = 30.0
#: How often, and how long at most, a request polls for the socket of a daemon that holds its lock but is
#: still starting (from the lock to the socket takes well under a second, unless a prune is resumed).
START_POLL_SECONDS = 0.05
START_WAIT_SECONDS = 10.0
SOCKET_NAME = "daemon.sock"
#: Prefix of the private directories made for sockets of long repository paths.
PRIVATE_PREFIX = "taskrun-"


def socket_path(state_dir: Path) -> Path | None:
    """The socket's path in the state directory, or None when it is too long for a Unix socket."""
    path = state_dir / SOCKET_NAME
    return path if len(str(path)) <= MAX_SOCKET_PATH else None


def private_dir_problem(directory: Path) -> str | None:
    """Why `directory` may not hold the control socket (None: it may): it must be a real directory,
    owned by this user, that nobody else can enter or write."""
    try:
        info = os.lstat(directory)
    except OSError as exc:
        return f"cannot inspect it ({exc.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by you"
    if info.st_mode & 0o077:
        return f"its mode is {stat.S_IMODE(info.st_mode):04o}, not 0700"
    return None


def _runtime_dir() -> str | None:
    """$XDG_RUNTIME_DIR when it is private and short enough, else None (the temp directory)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and len(runtime) < MAX_SOCKET_PATH - 40 and private_dir_problem(Path(runtime)) is None:
        return runtime
    return None


class ControlServer:
    def __init__(self, state_dir: Path, handle: Callable[[dict[str, Any]], dict[str, Any]],
                 notice: Callable[[str], None] = lambda message: None) -> None:
        self._state_dir = state_dir
        self._notice = notice
        self._stopped = threading.Event()
        self.path: Path | None = None  # set by start()
        self._private: Path | None = None  # the mkdtemp directory holding the socket, if any
        self._info = state_dir / "daemon.json"
        self._handle = handle
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._remove_stale_private_dir()
        path = socket_path(self._state_dir)
        if path is None:
            self._private = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=_runtime_dir()))  # 0700, ours
            path = self._private / SOCKET_NAME
        else:
            try:
                os.chmod(self._state_dir, 0o700)  # the daemon's own state: nobody else's business
            except OSError:
                pass  # not ours: refused just below, with the reason
        problem = private_dir_problem(path.parent)
        if problem is not None:
            raise DaemonNotRunning(f"refusing to put the control socket in {path.parent}: {problem}")
        self.path = path
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._thread.start()
        try:
            self._write_info()
        except OSError as exc:
            if not diskspace.is_full(exc):  # a directory in its place: said, not a traceback
                self.stop()
                raise TaskrunError(f"cannot write {self._info}: {exc.strerror or exc}; remove it (the daemon "
                                   "writes it again)") from None
            # Serving all the same; commands find the daemon once the file is written (when there is room).
            self._notice(f"cannot write {self._info} yet, so commands do not find this daemon: "
                         f"{diskspace.reason('the git directory', self._state_dir, exc)}; it is written by itself "
                         "once there is room")
            threading.Thread(target=self._write_info_later, name="control-info", daemon=True).start()

    def _write_info(self) -> None:
        assert self.path is not None
        write_json(self._info, {"pid": os.getpid(), "socket": str(self.path)}, mode=0o600)

    def _write_info_later(self) -> None:
        while not self._stopped.wait(diskspace.RETRY_SECONDS):
            try:
                self._write_info()
            except OSError:
                continue
            self._notice(f"{self._info} written: commands find this daemon")
            return

    def _remove_stale_private_dir(self) -> None:
        """The private socket directory a killed daemon left behind (we hold the lock: it is gone)."""
        try:
            old = Path(read_json(self._info)["socket"]).parent
        except (OSError, ValueError, KeyError, TypeError):
            return
        if old != self._state_dir and old.name.startswith(PRIVATE_PREFIX) and private_dir_problem(old) is None:
            shutil.rmtree(old, ignore_errors=True)

    def stop(self) -> None:
        self._stopped.set()
        for path in (self._info, self.path):
            if path is not None:
                try:
                    path.unlink()
                except OSError:  # gone already, or not ours to remove (a directory in its place)
                    pass
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(REPLY_TIMEOUT)
                line = conn.makefile("rb").readline()
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request is not an object")
                reply = self._handle(request)
            except (OSError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass


def request(state_dir: Path, payload: dict[str, Any], timeout: float = REPLY_TIMEOUT,
            wait_start: bool = True) -> dict[str, Any]:
    """Ask the running daemon; DaemonNotRunning when there is none.

    A daemon that holds its lock (daemon.lock) but has no socket yet is starting (its record key checked,
    old temp files cleared, the socket next): with `wait_start` the request waits for the socket, polling
    every START_POLL_SECONDS for up to START_WAIT_SECONDS (at most `timeout`), instead of saying that no daemon runs (`taskrun prune`
    without a daemon holds the lock too: then it waits in vain). Callers with an answer of their own when
    no daemon runs (`status` reads the records, a git hook's `trigger --quiet` has nothing to do) pass
    False. Nothing is sent twice: only a request that never reached a socket is tried again.
    """
    deadline = clock.monotonic() + min(timeout, START_WAIT_SECONDS)
    while True:
        try:
            sock = _connect(state_dir, timeout)
            break
        except DaemonNotRunning as exc:
            if not wait_start or not lock_held(state_dir):
                raise
            if clock.monotonic() >= deadline:
                raise DaemonNotRunning(f"a taskrun daemon holds this repository's lock (it is starting, or "
                                       f"`taskrun prune` runs) but its control socket did not answer in "
                                       f"{min(timeout, START_WAIT_SECONDS):.0f} s ({exc}); try again, or see "
                                       "its log") from None
            time.sleep(START_POLL_SECONDS)
    try:
        with sock:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            line = sock.makefile("rb").readline()
    except OSError as exc:
        raise DaemonNotRunning(
            f"the taskrun daemon is not answering ({exc}); start one with `taskrun up`"
        ) from exc
    reply = json.loads(line) if line else {"ok": False, "error": "the daemon closed the connection"}
    return reply if isinstance(reply, dict) else {"ok": False, "error": "malformed reply"}


def _connect(state_dir: Path, timeout: float) -> socket.socket:
    """A socket connected to the daemon daemon.json names; DaemonNotRunning when there is none to reach."""
    try:
        info = read_json(state_dir / "daemon.json")
        path = info["socket"]
        if not isinstance(path, str):
            raise TypeError("socket")
    except (OSError, ValueError, KeyError, TypeError):
        raise DaemonNotRunning("no taskrun daemon is running in this repository; start one with `taskrun up`")
    problem = private_dir_problem(Path(path).parent)
    if problem is not None:
        # Someone else's socket there would get our requests, and answer them.
        raise DaemonNotRunning(f"refusing the control socket {path}: its directory {Path(path).parent} is not "
                               f"private ({problem}); restart the daemon with `taskrun up`")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise DaemonNotRunning(
            f"the taskrun daemon is not answering ({exc}); start one with `taskrun up`"
        ) from exc
    return sock
