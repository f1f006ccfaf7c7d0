"""`taskrun worker add` reading a Worker's host key: what answers there, said with what to check next
(sshkeys.scan_host_key), never the SSH library's own words alone."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from taskrunner.errors import WorkerError
from taskrunner.sshkeys import scan_host_key


def _server(reply: bytes) -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            if reply:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_a_port_that_is_no_ssh_server_is_said_with_what_to_check(reply: bytes) -> None:
    listener, port = _server(reply)
    try:
        with pytest.raises(WorkerError) as caught:
            scan_host_key("127.0.0.1", port, timeout=10)
    finally:
        listener.close()
    message = str(caught.value)
    assert f"cannot read the host key of 127.0.0.1:{port}" in message and "is it an SSH server?" in message
    assert f"ssh-keyscan -p {port} 127.0.0.1" in message and "No existing session" not in message


def test_a_closed_port_says_to_check_that_sshd_listens_there() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # bound once, never listened on: nothing answers there
    with pytest.raises(WorkerError, match=rf"cannot connect to 127.0.0.1:{port}: .*check that sshd runs"):
        scan_host_key("127.0.0.1", port, timeout=10)


def test_paramikos_own_log_of_a_failed_negotiation_is_not_printed() -> None:
    """In a process of its own: under pytest a handler of its own would swallow the log either way."""
    listener, port = _server(b"")
    try:
        done = subprocess.run([sys.executable, "-c", "from taskrunner.sshkeys import scan_host_key\n"
                               f"try:\n    scan_host_key('127.0.0.1', {port}, timeout=10)\nexcept Exception:\n    pass"],
                              capture_output=True, text=True, timeout=60)
    finally:
        listener.close()
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Exception (client)" not in done.stderr, \
        done.stderr
