"""SSH Workers through faults: sshd killed mid-Run, a Worker gone for good, a host that never answers,
cancel, a daemon killed mid-Run.

Every Worker is a real OpenSSH sshd on 127.0.0.1 and the daemon is the real
`taskrun up` process. The Agents wait on gates the test opens (loopback
ports: a confined Agent sees no file of the test's), so "before the cut" and
"after the cut" are facts, not timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Callable, Iterator

import pytest

from taskrunner import keys
from tests.agentprobes import Counter, Gate, marker, processes_named
from tests.conftest import (
    Daemon,
    process_gone,
    run_record,
    task_record,
    taskrun,
    wait_status,
    wait_until,
    write_task,
)
from tests.sshd import SshdHost, enroll, start_sshd

pytestmark = pytest.mark.sshd

#: An Agent that prints numbered lines until the gate (`{check}`) opens, then five more and "done".
STREAM = """\
i=0
until {check}; do i=$((i + 1)); echo "line $i"; sleep 0.05; done
for _ in 1 2 3 4 5; do i=$((i + 1)); echo "line $i"; done
echo done"""


@pytest.fixture
def ssh_hosts(daemon: Daemon, tmp_path: Path) -> Iterator[Callable[..., list[SshdHost]]]:
    """Start sshd Worker hosts and make them the repository's only Workers.

    Teardown stops the daemon first, then the hosts, then whatever Agents are
    still running in the hosts' Worker homes (Agents outlive sessions by design).
    """
    started: list[SshdHost] = []

    def start(count: int, scheduler: str = "") -> list[SshdHost]:
        _, public = keys.ensure_ssh_key(daemon.root / ".git" / "taskrun")
        hosts = [start_sshd(tmp_path / f"host{i}", public) for i in range(1, count + 1)]
        started.extend(hosts)
        _configure(daemon.root, hosts, scheduler)
        return hosts

    yield start
    daemon.stop()
    for host in started:
        host.stop()
        for pid_file in (host.home / "runs").glob("*/pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _configure(root: Path, hosts: list[SshdHost], scheduler: str) -> None:
    """Workers w1, w2, ... one per host, pinned to its host and result keys, reached with the daemon's own SSH key."""
    workers = "".join(
        f'  w{n}: {{transport: ssh, host: 127.0.0.1, port: {host.port}, host_key: "{host.host_key_line}", '
        f'worker_key: "{enroll(host.home, root / ".git" / "taskrun")}"}}\n'
        for n, host in enumerate(hosts, 1)
    )
    (root / ".taskrun.yaml").write_text(f"workers:\n{workers}scheduler: {{{scheduler}}}\n")


def _output(root: Path, task_id: str, number: int = 1) -> str:
    path = root / "runs" / task_id / f"run-{number}" / "output.log"
    return path.read_text() if path.exists() else ""


def _numbered(text: str) -> int:
    """How many lines `text` holds, asserting they are "line 1", "line 2", ... none missing or repeated."""
    lines = text.splitlines()
    assert lines == [f"line {i}" for i in range(1, len(lines) + 1)], text
    return len(lines)


def _lines_past(root: Path, task_id: str, count: int) -> bool:
    return _numbered(_output(root, task_id).rpartition("line ")[0] or "") > count


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def _crash_sshd(host: SshdHost) -> None:
    """SIGKILL the host's sshd: the listener and every per-connection sshd process under it.

    Killing the listener alone would leave the open session running. The Worker
    side under the session (taskrun-worker serve, the Agents) is not sshd and is
    left alone, as after a real crash: serve sees its session end, Agents keep going.
    """
    assert host.proc is not None
    sessions = [pid for pid in _descendants(host.proc.pid) if _comm(pid) == "sshd"]
    assert sessions, "the daemon should have a session open on this host"
    host.kill()
    for pid in sessions:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: all(process_gone(pid) for pid in sessions), 10, "the sshd session processes to die")



def _assert_stream_completes_in_one_run(root: Path, gate: Gate, before: int) -> None:
    """Output flows again past the cut, then the one Run completes on w1 with every line once."""
    wait_until(lambda: _lines_past(root, "stream", before + 5), 20, "output streamed after the restart")
    gate.open()
    wait_status(root, "stream", "COMPLETED")

    output = _output(root, "stream")
    assert output.endswith("done\n")
    assert _numbered(output.removesuffix("done\n")) > before + 5
    run = run_record(root, "stream", 1)
    assert run and run["worker"] == "w1" and run["status"] == "COMPLETED"
    assert run["output_bytes"] == len(output.encode())
    assert len((task_record(root, "stream") or {})["runs"]) == 1

def test_sshd_killed_and_restarted_mid_run_resumes_on_the_same_worker_with_every_line_once(
        daemon: Daemon, ssh_hosts: Callable[..., list[SshdHost]], gate: Gate) -> None:
    (host,) = ssh_hosts(1, "worker_grace: 30s")
    daemon.start()
    write_task(daemon.root, "stream", STREAM.format(check=gate.check))
    wait_until(lambda: "line 3\n" in _output(daemon.root, "stream"), 20, "output before the cut")

    _crash_sshd(host)
    before = _numbered(_output(daemon.root, "stream").rpartition("line ")[0])
    wait_until(lambda: "Worker 'w1' offline" in daemon.output(), 10, "the daemon to notice the cut")
    host.start()  # the same port, the same host key

    _assert_stream_completes_in_one_run(daemon.root, gate, before)


def test_worker_gone_for_good_has_its_run_retried_on_another_worker_after_the_grace(
        daemon: Daemon, ssh_hosts: Callable[..., list[SshdHost]], counter: Counter) -> None:
    # retries stays 0: a Run lost with its Worker is run again without spending one.
    hosts = ssh_hosts(2, "worker_grace: 1s")
    daemon.start()
    write_task(daemon.root, "survivor",
               f'{counter.read}\nif [ "$n" -gt 1 ]; then echo second; else echo first; sleep 300; fi')
    wait_until(lambda: _output(daemon.root, "survivor") == "first\n", 20, "the first Run to start")
    first = run_record(daemon.root, "survivor", 1)
    assert first
    lost = int(first["worker"].removeprefix("w"))

    _crash_sshd(hosts[lost - 1])

    wait_status(daemon.root, "survivor", "COMPLETED", timeout=20)
    first = run_record(daemon.root, "survivor", 1)
    assert first and first["status"] == "FAILED" and first["lost"] is True
    assert f"Worker 'w{lost}'" in first["error"] and "grace period" in first["error"]
    second = run_record(daemon.root, "survivor", 2)
    assert second and second["status"] == "COMPLETED" and second["worker"] == f"w{3 - lost}"
    assert _output(daemon.root, "survivor", 2) == "second\n"


def test_cancel_kills_the_agents_process_group_on_the_remote_worker(
        daemon: Daemon, ssh_hosts: Callable[..., list[SshdHost]]) -> None:
    ssh_hosts(1)
    name = marker()  # $$ and $! are no host pids inside the Run's PID namespace: found by argv[0]
    daemon.start()
    write_task(daemon.root, "remote-doomed", f"(exec -a {name} sleep 300) &\necho ready\nexec -a {name} sleep 301")
    wait_until(lambda: _output(daemon.root, "remote-doomed") == "ready\n" and len(processes_named(name)) == 2, 20,
               "the Agent and its child to start")

    cancel = taskrun(daemon.root, "cancel", "remote-doomed")

    assert cancel.returncode == 0, cancel.stderr
    wait_until(lambda: not processes_named(name), 10, "the Agent and its child to be killed")
    record = wait_status(daemon.root, "remote-doomed", "CANCELLED")
    assert "cancel" in record["error"]
    run = run_record(daemon.root, "remote-doomed", 1)
    assert run and run["worker"] == "w1" and run["status"] == "CANCELLED"


def test_daemon_killed_mid_run_on_an_ssh_worker_reattaches_with_every_line_once(
        daemon: Daemon, ssh_hosts: Callable[..., list[SshdHost]], gate: Gate) -> None:
    ssh_hosts(1)
    daemon.start()
    write_task(daemon.root, "stream", STREAM.format(check=gate.check))
    wait_until(lambda: "line 3\n" in _output(daemon.root, "stream"), 20, "output before the kill")

    daemon.signal(signal.SIGKILL)
    daemon.wait()
    before = _numbered(_output(daemon.root, "stream").rpartition("line ")[0])
    daemon.start()

    _assert_stream_completes_in_one_run(daemon.root, gate, before)


def test_a_worker_host_that_accepts_but_never_answers_does_not_stall_the_daemon(daemon: Daemon) -> None:
    _, public = keys.ensure_ssh_key(daemon.root / ".git" / "taskrun")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # a frozen host: TCP accepted, no SSH banner ever
        silent.settimeout(20)
        daemon.start()
        (daemon.root / ".taskrun.yaml").write_text(
            "workers:\n"
            "  local: {transport: local, slots: 2}\n"
            f"  frozen: {{transport: ssh, host: 127.0.0.1, port: {silent.getsockname()[1]}, "
            f'host_key: "{public}"}}\n')
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(20)
            banner = b""
            while not banner.endswith(b"\n") and (chunk := conn.recv(256)):
                banner += chunk
            assert banner.startswith(b"SSH-2.0-")  # the daemon is inside its handshake with the frozen host

            write_task(daemon.root, "meanwhile", "echo still serving")
            wait_status(daemon.root, "meanwhile", "COMPLETED")
            workers = json.loads(taskrun(daemon.root, "workers", "--json").stdout)["workers"]

            assert {w["name"]: w["reachable"] for w in workers} == {"local": True, "frozen": False}
            # The handshake is still waiting for the banner (b"" would mean the daemon
            # gave up on it first): all of the above happened while it waited.
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)
