"""`taskrun up --once` with SSH Workers: it exits once its last record is committed, whatever a Worker
still opening its session is doing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner import keys
from tests.conftest import git, run_record, status_of, taskrun, wait_until, write_task
from tests.sshd import SshdHost, start_sshd

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

#: How long `up --once` may take to exit after its last record commit: far below the silent Worker's
#: read timeout (scheduler.worker_offline_after below, plus the link's margin), which it waited out.
EXIT_DEADLINE = 10.0
OFFLINE_AFTER = "60s"


@pytest.fixture
def hosts(repo: Path, tmp_path: Path) -> Iterator[list[SshdHost]]:
    """Two sshd Worker hosts that authorize the control plane's own SSH key."""
    _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
    started = [start_sshd(tmp_path / f"host{i}", public) for i in range(2)]
    yield started
    for host in started:
        host.stop()


def _add(repo: Path, name: str, host: SshdHost) -> None:
    token = ("--token", host.token) if host.token else ()
    result = taskrun(repo, "worker", "add", name, "--host", "127.0.0.1", "--port", str(host.port),
                     "--fingerprint", host.fingerprint, *token, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _silence(host: SshdHost) -> None:
    """The host's forced command becomes one that reads and never writes: its sessions open and say no hello
    (a hung taskrun-worker); the end of the session ends it."""
    line = host.authorized_keys.read_text()
    silent, count = re.subn(r'command="[^"]*"', 'command="exec cat >/dev/null"', line)
    assert count == 1, line
    host.authorized_keys.write_text(silent)


def _record_committed(repo: Path, task_id: str) -> bool:
    return f"taskrun: {task_id} COMPLETED" in git(repo, "log", "--format=%s")


def test_up_once_exits_soon_after_its_last_commit_while_a_worker_has_not_said_hello(
        repo: Path, hosts: list[SshdHost], tmp_path: Path) -> None:
    _add(repo, "w1", hosts[0])
    _add(repo, "w2", hosts[1])
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    config = repo / ".taskrun.yaml"
    text = config.read_text()
    assert re.search(r"(?m)^  worker_offline_after: \S+$", text), text
    config.write_text(re.sub(r"(?m)^  worker_offline_after: \S+$", f"  worker_offline_after: {OFFLINE_AFTER}",
                             text))
    _silence(hosts[1])
    write_task(repo, "quick", "echo done")

    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(repo), "up", "--once"],
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _record_committed(repo, "quick") or up.poll() is not None, 120,
                   "the record commit of Task 'quick'")
        wait_until(lambda: up.poll() is not None, EXIT_DEADLINE,
                   f"`up --once` to exit after its last record commit (log: {log})")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()

    assert up.returncode == 0, log.read_text()
    assert status_of(repo, "quick") == "COMPLETED"
    assert (run_record(repo, "quick", 1) or {})["worker"] == "w1"
    # Nothing was left behind: every record is in HEAD, and the Worker's Run was acknowledged (its
    # directory goes with the ack).
    assert git(repo, "status", "--porcelain", "--", "runs").strip() == ""
    assert (repo / "runs/quick/run-1/output.log").read_text() == "done\n"
    wait_until(lambda: not any((hosts[0].home / "runs").glob("*")), 20, "w1 to drop the acknowledged Run")
