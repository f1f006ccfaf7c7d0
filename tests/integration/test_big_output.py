"""Outputs of any size with the real daemon: the committed output.log is capped, the full log stays
available to `taskrun logs`, is pruned by its retention, and a kill between the two steps loses nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon, git, wait_status, wait_until, write_task

LINE = b"a line of the output of the Agent 0123456789\n"
SIZE = 20 * 1024 * 1024
CAP = 1024 * 1024


def printing(size: int) -> str:
    """A shell step printing `size` bytes of LINE (pipefail: `yes` ends on SIGPIPE)."""
    return f"(yes '{LINE.decode().rstrip()}' || true) | head -c {size}"


def expected(size: int) -> bytes:
    return (LINE * (size // len(LINE) + 1))[:size]


def configure(repo: Path, records: str) -> None:
    config = repo / ".taskrun.yaml"
    text = config.read_text()
    start = text.index("records:\n")
    end = text.index("\n\n", start)
    config.write_text(text[:start] + f"records: {{{records}}}" + text[end:])
    git(repo, "commit", "--quiet", "-am", "records settings")


def committed_log(repo: Path, task_id: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), "cat-file", "blob", f"HEAD:runs/{task_id}/run-1/output.log"],
                          capture_output=True, check=True).stdout


def wait_committed(repo: Path, task_id: str) -> None:
    def done() -> bool:
        listed = git(repo, "ls-tree", "-r", "--name-only", "HEAD", "--", f"runs/{task_id}/run-1/output.log")
        return bool(listed.strip()) and git(repo, "status", "--porcelain", "--", "runs/") == ""
    wait_until(done, 60, f"the records of '{task_id}' to be committed, runs/ clean")


def logs(repo: Path, task_id: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "taskrunner", "-C", str(repo), "logs", task_id],
                          capture_output=True, timeout=120)


def assert_capped(log: bytes, task_id: str) -> None:
    full = expected(SIZE)
    head, _, rest = log.partition(b"[taskrun: ")
    marker, _, tail = rest.partition(b"\n")
    assert len(log) <= CAP
    assert full.startswith(head) and full.endswith(tail) and len(head) > CAP // 4 and len(tail) > CAP // 4
    left = SIZE - len(head) - len(tail)
    assert marker.decode() == (f"{left} bytes left out here; the full log: taskrun logs {task_id} --run 1, "
                               f"or .git/taskrun/logs/{task_id}/run-1.log]")


@pytest.mark.slow
def test_a_big_output_is_committed_capped_kept_in_full_and_pruned_past_the_size_cap(
        daemon: Daemon, repo: Path) -> None:
    configure(repo, f"max_log_bytes: {CAP}, full_logs_max_bytes: {SIZE + SIZE // 2}")
    daemon.start()
    write_task(repo, "big-1", printing(SIZE))
    wait_status(repo, "big-1", "COMPLETED", timeout=120)
    wait_committed(repo, "big-1")
    assert_capped(committed_log(repo, "big-1"), "big-1")
    full = repo / ".git" / "taskrun" / "logs" / "big-1" / "run-1.log"
    assert full.stat().st_size == SIZE
    shown = logs(repo, "big-1")
    assert shown.returncode == 0 and shown.stdout == expected(SIZE) and shown.stderr == b""

    # A second one: both full logs are more than full_logs_max_bytes, so the older goes.
    write_task(repo, "big-2", printing(SIZE))
    wait_status(repo, "big-2", "COMPLETED", timeout=120)
    wait_committed(repo, "big-2")
    wait_until(lambda: not full.exists(), 20, "the older full log to be pruned")
    assert (repo / ".git" / "taskrun" / "logs" / "big-2" / "run-1.log").stat().st_size == SIZE
    shown = logs(repo, "big-1")
    assert shown.returncode == 0 and shown.stdout == committed_log(repo, "big-1")
    assert f"its full log ({SIZE} bytes) was removed".encode() in shown.stderr
    assert logs(repo, "big-2").stdout == expected(SIZE)


@pytest.mark.slow
def test_a_daemon_killed_after_moving_the_full_log_caps_and_commits_it_on_restart(
        daemon: Daemon, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(repo, f"max_log_bytes: {CAP}")
    mark = tmp_path / "crashed"
    monkeypatch.setenv("TASKRUN_CRASH_AT", "daemon.full_log_moved")
    monkeypatch.setenv("TASKRUN_CRASH_MARK", str(mark))
    daemon.start()
    write_task(repo, "big", printing(SIZE))
    wait_until(mark.exists, 120, "the daemon to kill itself after moving the full log")
    daemon.wait(30)
    assert not (repo / "runs" / "big" / "run-1" / "output.log").exists()
    monkeypatch.delenv("TASKRUN_CRASH_AT")
    daemon.start()
    wait_committed(repo, "big")
    assert_capped(committed_log(repo, "big"), "big")
    assert logs(repo, "big").stdout == expected(SIZE)
