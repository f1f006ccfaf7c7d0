"""The daemon's control socket is private: in .git/taskrun (0700), or for a long repository path in a
fresh 0700 directory made for it, never at a name another user could predict and take first."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from taskrunner import control
from taskrunner.control import MAX_SOCKET_PATH, ControlServer, request
from taskrunner.errors import DaemonNotRunning


def _echo(message: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "echo": message}


@pytest.fixture()
def long_state(tmp_path: Path) -> Path:
    state = tmp_path / ("a-rather-long-repository-name-" * 4) / ".git" / "taskrun"
    state.mkdir(parents=True)
    assert len(str(state / "daemon.sock")) > MAX_SOCKET_PATH
    return state


@pytest.fixture()
def servers() -> Iterator[list[ControlServer]]:
    started: list[ControlServer] = []
    yield started
    for server in started:
        server.stop()


def test_a_short_state_dir_holds_the_socket_and_is_made_private(tmp_path: Path, servers: list[ControlServer]) -> None:
    state = tmp_path / ".git" / "taskrun"
    state.mkdir(parents=True, mode=0o755)
    server = ControlServer(state, _echo)
    server.start()
    servers.append(server)
    assert server.path == state / "daemon.sock"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert request(state, {"command": "ping"}) == {"ok": True, "echo": {"command": "ping"}}


def test_a_long_path_gets_a_fresh_private_directory_recorded_in_daemon_json(
        long_state: Path, servers: list[ControlServer]) -> None:
    server = ControlServer(long_state, _echo)
    server.start()
    servers.append(server)
    assert server.path is not None
    directory = server.path.parent
    info = os.lstat(directory)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o700
    # Not the name the old code derived from the path, which anyone could take first.
    digest = hashlib.sha256(str(long_state).encode()).hexdigest()[:16]
    assert server.path != Path(tempfile.gettempdir()) / f"taskrun-{os.getuid()}-{digest}.sock"
    assert json.loads((long_state / "daemon.json").read_text())["socket"] == str(server.path)
    assert request(long_state, {"command": "ping"})["ok"] is True

    server.stop()
    servers.remove(server)
    assert not directory.exists()


def test_a_second_start_gets_another_directory_and_removes_the_one_a_killed_daemon_left(
        long_state: Path, servers: list[ControlServer]) -> None:
    first = ControlServer(long_state, _echo)
    first.start()
    assert first.path is not None
    left = first.path.parent
    first._sock.close()  # killed: nothing cleaned up, daemon.json still points there
    second = ControlServer(long_state, _echo)
    second.start()
    servers.append(second)
    assert second.path is not None and second.path.parent != left
    assert not left.exists()


@pytest.mark.parametrize("mode", [0o755, 0o711, 0o770])
def test_a_client_refuses_a_socket_whose_directory_others_can_enter(
        tmp_path: Path, servers: list[ControlServer], mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    (state / "daemon.json").write_text(json.dumps({"pid": 1, "socket": str(shared / "daemon.sock")}))
    with pytest.raises(DaemonNotRunning, match=f"not private .*mode is {mode:04o}, not 0700"):
        request(state, {"command": "ping"})


def test_a_client_refuses_a_socket_in_a_directory_reached_through_a_link(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    (state / "daemon.json").write_text(json.dumps({"pid": 1, "socket": str(tmp_path / "link" / "daemon.sock")}))
    with pytest.raises(DaemonNotRunning, match="it is not a directory"):
        request(state, {"command": "ping"})


def _hold_lock(state: Path) -> int:
    """The daemon's lock, taken as a starting daemon takes it (daemon.py _acquire_lock)."""
    fd = os.open(state / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_request_to_a_daemon_that_holds_its_lock_but_is_still_starting_waits_for_its_socket(
        tmp_path: Path, servers: list[ControlServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """`taskrun cancel` a moment after `taskrun up`: the daemon has its lock, no socket yet; the request is
    answered once the socket is there, not refused with "no daemon"."""
    state = tmp_path / ".git" / "taskrun"
    state.mkdir(parents=True, mode=0o700)
    lock = _hold_lock(state)
    polling = threading.Event()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        polling.set()  # the client found no socket and waits for one
        real_sleep(seconds)

    monkeypatch.setattr(control.time, "sleep", sleep)
    answers: list[dict[str, Any]] = []
    asking = threading.Thread(target=lambda: answers.append(request(state, {"command": "cancel"})), daemon=True)
    asking.start()
    try:
        assert polling.wait(timeout=30) and not answers
        server = ControlServer(state, _echo)
        server.start()
        servers.append(server)
        asking.join(timeout=30)
    finally:
        os.close(lock)
    assert answers == [{"ok": True, "echo": {"command": "cancel"}}]


def test_without_a_held_lock_no_daemon_is_said_at_once_and_a_lock_held_too_long_is_named(tmp_path: Path) -> None:
    state = tmp_path / ".git" / "taskrun"
    state.mkdir(parents=True, mode=0o700)
    with pytest.raises(DaemonNotRunning, match="no taskrun daemon is running"):
        request(state, {"command": "ping"}, timeout=30)  # no lock held: no wait (a wait would pass too, slowly)
    (state / "daemon.lock").write_bytes(b"")  # a lock file nobody holds: a daemon that stopped
    started = time.monotonic()
    with pytest.raises(DaemonNotRunning, match="no taskrun daemon is running"):
        request(state, {"command": "ping"}, timeout=30)
    assert time.monotonic() - started < 10
    lock = _hold_lock(state)
    try:
        with pytest.raises(DaemonNotRunning, match="holds this repository's lock .* did not answer in 1 s"):
            request(state, {"command": "ping"}, timeout=1)
        # However long the reply may take, the wait for a socket is START_WAIT_SECONDS at most.
        started = time.monotonic()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(control, "START_WAIT_SECONDS", 0.5)
            with pytest.raises(DaemonNotRunning, match="did not answer in 0 s"):
                request(state, {"command": "ping"}, timeout=60)
        assert time.monotonic() - started < 10
        # A caller with an answer of its own (`status` reads the records) does not wait.
        started = time.monotonic()
        with pytest.raises(DaemonNotRunning, match="no taskrun daemon is running"):
            request(state, {"command": "status"}, timeout=30, wait_start=False)
        assert time.monotonic() - started < 10
    finally:
        os.close(lock)
    (state / "daemon.lock").unlink()
    os.symlink(state / "elsewhere", state / "daemon.lock")  # not a regular file: held by none
    with pytest.raises(DaemonNotRunning, match="no taskrun daemon is running"):
        request(state, {"command": "ping"}, timeout=30)
