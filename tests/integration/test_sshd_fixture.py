"""A real sshd with the gate as forced command: the key can run the Worker and nothing else.

The sshd of tests/sshd.py leaves forwarding and the sftp subsystem at their
defaults, so what refuses them here is `restrict` and the gate in
authorized_keys, exactly as `taskrun-worker init` writes it.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterator

import pytest

from tests.sshd import ClientKey, SshdHost, client_key, free_port, start_sshd

pytestmark = pytest.mark.sshd

TIMEOUT = 30.0
ONLY = 'only "taskrun-worker serve", "taskrun-worker status" and "taskrun-worker trust" are allowed'


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    return client_key(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, key: ClientKey) -> Iterator[SshdHost]:
    with start_sshd(tmp_path_factory.mktemp("worker"), key.public_line) as running:
        yield running


def ssh(host: SshdHost, key: ClientKey, *remote: str, options: tuple[str, ...] = (),
        known_hosts: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.ssh_argv(key.path, *remote, options=options, known_hosts=known_hosts),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)


def test_the_authorized_keys_line_is_the_one_init_prints(host: SshdHost, key: ClientKey) -> None:
    line = host.authorized_keys.read_text().strip()
    assert line.startswith('restrict,command="/')
    assert line.endswith(f' gate --home {host.home}" {key.public_line}')


def test_status_runs_through_the_gate_in_the_gates_home(host: SshdHost, key: ClientKey) -> None:
    result = ssh(host, key, "taskrun-worker status --json")
    assert result.returncode == 0, result.stderr + host.log_text()
    status = json.loads(result.stdout)
    # Through the gate no Run is listed: only an authenticated session does that.
    assert (status["home"], status["trusted"], "runs" in status) == (str(host.home), [], False)
    assert status["worker_key_id"].startswith("SHA256:")


def test_the_program_word_may_be_left_out(host: SshdHost, key: ClientKey) -> None:
    result = ssh(host, key, "status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["home"] == str(host.home)


@pytest.mark.parametrize(("remote", "shown"), [
    (("bash",), '"bash"'),
    (("sh -c id",), '"sh -c id"'),
    (("id",), '"id"'),
    (("taskrun-worker status --json; id",), '"taskrun-worker status --json; id"'),
    (("taskrun-worker status --home /",), '"taskrun-worker status --home /"'),
    (("taskrun-worker gate",), '"taskrun-worker gate"'),
    ((), None),
])
def test_anything_else_is_refused_without_reaching_a_shell(host: SshdHost, key: ClientKey,
                                                            remote: tuple[str, ...], shown: str | None) -> None:
    result = ssh(host, key, *remote)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # no `id` output, no shell prompt, no JSON
    assert "uid=" not in result.stdout + result.stderr
    gate_lines = [line for line in result.stderr.splitlines() if line.startswith("taskrun-worker gate: ")]
    assert len(gate_lines) == 1, result.stderr
    if shown is None:
        assert gate_lines[0] == f"taskrun-worker gate: refused an interactive login: {ONLY}"
    else:
        assert gate_lines[0].startswith(f"taskrun-worker gate: refused {shown}: ")


def test_local_port_forwarding_is_refused(host: SshdHost, key: ClientKey, tmp_path: Path) -> None:
    local = free_port()
    stderr_path = tmp_path / "ssh.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            host.ssh_argv(key.path, options=("-N", "-L", f"{local}:127.0.0.1:{host.port}",
                                             "-o", "ExitOnForwardFailure=yes")),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        received = _through_forward(proc, local)
        # Had the forward worked, the far end (this very sshd) would greet us with its banner.
        assert not received.startswith(b"SSH-"), "a local forward reached the sshd through the Worker"
        assert received == b""
        _wait_for(lambda: "administratively prohibited" in stderr_path.read_text(), "ssh to report the refusal")
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    assert "refused local port forward" in host.log_text()


def test_remote_port_forwarding_is_refused(host: SshdHost, key: ClientKey) -> None:
    remote = free_port()
    result = ssh(host, key, options=("-N", "-R", f"{remote}:127.0.0.1:{host.port}",
                                     "-o", "ExitOnForwardFailure=yes"))
    assert result.returncode != 0
    assert "remote port forwarding failed" in result.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", remote)) != 0


def test_the_sftp_subsystem_is_refused(host: SshdHost, key: ClientKey) -> None:
    (host.home / "visible-to-sftp").write_text("x")
    result = subprocess.run(
        ["sftp", *host.ssh_options(key.path), "-b", "-", "-P", str(host.port), f"{host.user}@127.0.0.1"],
        input=f"cd {host.home}\nls\n", capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    assert "sftp>" not in result.stdout  # not one batch command ran
    assert "visible-to-sftp" not in result.stdout + result.stderr
    # sshd discards a subsystem's stderr, so the gate's message is not seen; its exit code is.
    subsystem = ssh(host, key, "sftp", options=("-s",))
    assert (subsystem.returncode, subsystem.stdout) == (2, "")


def test_serve_speaks_the_protocol_through_ssh(host: SshdHost, key: ClientKey, tmp_path: Path) -> None:
    stderr_path = tmp_path / "ssh.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(host.ssh_argv(key.path, "taskrun-worker serve --name ssh-w1 --slots 3"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdin is not None and proc.stdout is not None
    lines = _line_reader(proc.stdout)
    try:
        first = lines.get(timeout=TIMEOUT)
        assert first, f"ssh closed stdout before hello: {stderr_path.read_text()}"
        hello = json.loads(first)
        assert hello["type"] == "hello"
        assert hello["worker"] == "ssh-w1"
        assert hello["slots"] == 3
        assert "runs" not in hello and len(hello["challenge"]) == 32
        proc.stdin.close()  # end of the session: the Worker's serve loop ends and ssh exits
        assert proc.wait(timeout=TIMEOUT) == 0, stderr_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        proc.stdout.close()
    assert (host.home / "runs").is_dir()


def test_a_changed_host_key_is_refused_and_restart_keeps_the_port(key: ClientKey, tmp_path: Path) -> None:
    with start_sshd(tmp_path / "worker", key.public_line) as host:
        pinned = tmp_path / "pinned_known_hosts"
        pinned.write_text(host.known_hosts_line + "\n")
        port, old_line = host.port, host.host_key_line
        host.kill()
        host.restart()
        assert host.port == port
        assert ssh(host, key, "status", known_hosts=pinned).returncode == 0
        assert host.regenerate_host_key() != old_line
        assert host.port == port
        refused = ssh(host, key, "status", known_hosts=pinned)
        assert refused.returncode == 255
        assert "Host key verification failed" in refused.stderr
        assert refused.stdout == ""
        assert ssh(host, key, "status").returncode == 0  # host.known_hosts follows the new key


# ---------------------------------------------------------------- helpers


def _through_forward(proc: subprocess.Popen[bytes], port: int) -> bytes:
    """Connect to the local end of a forward and return what arrives before it closes."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return b""  # ssh gave up on the forward: refused just as well
        with socket.socket() as conn:
            conn.settimeout(TIMEOUT)
            if conn.connect_ex(("127.0.0.1", port)) != 0:
                time.sleep(0.05)
                continue
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)
    raise AssertionError(f"ssh -L never listened on port {port}")


def _line_reader(stream: IO[bytes]) -> queue.Queue[bytes]:
    """Lines of `stream` on a queue (b"" at end of file), so reads can time out."""
    lines: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=pump, name="ssh-stdout", daemon=True).start()
    return lines


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
