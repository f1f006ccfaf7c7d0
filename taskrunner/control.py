"""The daemon's control socket: one JSON request line in, one JSON reply line out.

The socket lives in .git/taskrun/ (or, when that path is too long for a Unix
socket, in the temp directory under a name derived from it); `daemon.json`
beside the lock says where, so clients never guess.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from taskrunner.atomic import read_json, write_json
from taskrunner.errors import DaemonNotRunning

#: sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 100
REPLY_TIMEOUT = 30.0


def socket_path(state_dir: Path) -> Path:
    path = state_dir / "daemon.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"taskrun-{os.getuid()}-{digest}.sock"


class ControlServer:
    def __init__(self, state_dir: Path, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = socket_path(state_dir)
        self._info = state_dir / "daemon.json"
        self._handle = handle
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        write_json(self._info, {"pid": os.getpid(), "socket": str(self.path)}, mode=0o600)
        self._thread.start()

    def stop(self) -> None:
        try:
            self._info.unlink()
            self.path.unlink()
        except FileNotFoundError:
            pass
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


def request(state_dir: Path, payload: dict[str, Any], timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
    """Ask the running daemon; DaemonNotRunning when there is none."""
    try:
        info = read_json(state_dir / "daemon.json")
        path = info["socket"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DaemonNotRunning("no taskrun daemon is running in this repository; start one with `taskrun up`")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(payload).encode() + b"\n")
            line = sock.makefile("rb").readline()
    except OSError as exc:
        raise DaemonNotRunning(
            f"the taskrun daemon is not answering ({exc}); start one with `taskrun up`"
        ) from exc
    reply = json.loads(line) if line else {"ok": False, "error": "the daemon closed the connection"}
    return reply if isinstance(reply, dict) else {"ok": False, "error": "malformed reply"}
