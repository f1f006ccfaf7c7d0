"""`taskrun worker add` reading a Worker's host key: what answers there, said with what to check next
(sshkeys.scan_host_key), never the SSH library's own words alone."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

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


def test_a_known_hosts_file_that_holds_something_else_is_refused_without_quoting_it(tmp_path: Path) -> None:
    """A pushed configuration pointing known_hosts at ~/.netrc showed its password in `taskrun workers`
    (paramiko's InvalidHostKey carries the line)."""
    from taskrunner.sshkeys import HostKeyError, pinned_keys

    netrc = tmp_path / "netrc"
    netrc.write_text("machine github.com login bot password ghp_NETRCSECRET\n")
    with pytest.raises(HostKeyError) as caught:
        pinned_keys("127.0.0.1", 22, None, str(netrc))
    assert "ghp_NETRCSECRET" not in str(caught.value) and f"{netrc}:1 is not a known_hosts line" in str(caught.value)
    marker = tmp_path / "marked"
    marker.write_text("@secret-word host ssh-ed25519 AAAA\n")
    with pytest.raises(HostKeyError) as caught:
        pinned_keys("127.0.0.1", 22, None, str(marker))
    assert "secret-word" not in str(caught.value) and "a line with a marker" in str(caught.value)


def test_hashed_and_plain_known_hosts_entries_are_found(tmp_path: Path) -> None:
    from taskrunner.sshkeys import pinned_keys

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host")], check=True)
    public = (tmp_path / "host.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"# comment\n\n[127.0.0.1]:2222 {public[0]} {public[1]}\nother.example {public[0]} {public[1]}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)  # hash them
    assert [k.get_base64() for k in pinned_keys("127.0.0.1", 2222, None, str(known))] == [public[1]]
    assert pinned_keys("other.example", 22, None, str(known))[0].get_base64() == public[1]
