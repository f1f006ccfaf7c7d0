"""Outputs of any size: capped output.log with its full log kept (fulllogs.py), streamed commits (gitops.py),
the running output digest (records.py), `taskrun logs` and the `records` configuration."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from taskrunner import gitops
from taskrunner.cli.main import main
from taskrunner.config import RecordsConfig, parse_config
from taskrunner.errors import ConfigError
from taskrunner.fulllogs import FullLogs, Pruner
from taskrunner.gitops import Git
from taskrunner.model import RunStatus
from taskrunner.recorder import CommitItem
from taskrunner.records import Records
from taskrunner.safefs import Beneath
from taskrunner.state import RunState, TaskState

KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture(autouse=True)
def isolated_git_config(isolated_git: Path) -> Path:
    return isolated_git


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "--quiet", "--initial-branch=main"], cwd=root, check=True)
    return root


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True).stdout


def lines(count: int, start: int = 0) -> bytes:
    return b"".join(b"line %08d of the output\n" % i for i in range(start, start + count))


def final_run(records: Records, task_id: str, number: int, data: bytes) -> None:
    records.write_output(task_id, number, 0, data)
    records.save_run({"task_id": task_id, "run": number, "run_id": f"r{number}", "status": "COMPLETED",
                      "output_bytes": len(data)})


def finished_task(size: int, status: RunStatus) -> TaskState:
    run = RunState(run_id="r1", task_id="t", number=1, revision="x", attempt=1, worker="local", agent="shell",
                   status=status, output_size=size)
    return TaskState(id="t", file="tasks/t.md", seq=1, runs=[run])


# ------------------------------------------------------------------ streamed commits


def test_a_file_larger_than_a_chunk_is_committed_byte_for_byte_without_reading_it_whole(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "STREAM_CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(Beneath, "read_bytes", lambda self, rel: pytest.fail(f"{rel} was read whole"))
    data = lines(30_000)  # about 750 KiB: a dozen chunks
    (repo / "big.log").write_bytes(data)
    repository = Git(repo)
    commit = repository.commit_paths(["big.log"], "big")
    assert commit is not None
    assert git(repo, "cat-file", "blob", "HEAD:big.log") == data
    # The user's index got the blob id computed while streaming: the file shows as unchanged.
    assert git(repo, "status", "--porcelain", "--", "big.log") == b""


def test_a_private_key_across_two_chunks_keeps_the_file_out_of_the_commit(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "STREAM_CHUNK_BYTES", 64 * 1024)
    data = b"x" * (64 * 1024 - 10) + KEY + lines(10_000)
    (repo / "big.log").write_bytes(data)
    (repo / "small.txt").write_bytes(b"kept\n")
    notices: list[str] = []
    Git(repo, notice=notices.append).commit_paths(["big.log", "small.txt"], "two")
    assert git(repo, "ls-tree", "--name-only", "HEAD").split() == [b"small.txt"]
    assert any("big.log holds a private key block" in notice for notice in notices)


def test_a_file_that_changes_while_it_is_committed_fails_the_commit_and_nothing_moves(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "STREAM_CHUNK_BYTES", 64 * 1024)
    (repo / "big.log").write_bytes(lines(10_000))
    repository = Git(repo)
    real = repository._scan
    calls = []

    def scan_then_change(handle, size, out):  # type: ignore[no-untyped-def]
        calls.append(out)
        if out is not None:  # between the check and the copy: the file is rewritten in place
            (repo / "big.log").write_bytes(lines(10_000, start=1))
        return real(handle, size, out)

    monkeypatch.setattr(repository, "_scan", scan_then_change)
    with pytest.raises(gitops.GitError, match="fast-import failed"):
        repository.commit_paths(["big.log"], "changing")
    assert repository.head() is None


# ------------------------------------------------------------------ the running digest


def test_the_digest_kept_while_appending_is_the_digest_of_the_file(repo: Path) -> None:
    records = Records(repo)
    data = lines(5000)
    for start in range(0, len(data), 7000):
        records.write_output("t", 1, start, data[start:start + 7000])
    records.write_output("t", 1, 0, data[:100])  # a resend: nothing written, the digest goes on
    assert records.output_digest("t", 1) == (len(data), hashlib.sha256(data).hexdigest())
    assert ("t", 1) in records._digests
    records.output("t", 1).write_bytes(b"edited")  # another inode: read again, not believed
    assert records.output_digest("t", 1) == (6, hashlib.sha256(b"edited").hexdigest())


def test_read_output_with_a_limit_reads_no_more(repo: Path) -> None:
    records = Records(repo)
    records.write_output("t", 1, 0, lines(100))
    assert records.read_output("t", 1, 10, limit=20) == lines(100)[10:30]


# ------------------------------------------------------------------ capping


def test_a_final_output_over_the_cap_is_committed_as_head_marker_tail_and_kept_in_full(repo: Path) -> None:
    records = Records(repo)
    data = lines(100_000)  # 2.5 MB
    final_run(records, "t", 1, data)
    logs = FullLogs(records, gitops.state_dir(repo))
    left = logs.settle("t", 1, 64 * 1024)
    capped = records.output("t", 1).read_bytes()
    full = gitops.state_dir(repo) / "logs" / "t" / "run-1.log"
    assert full.read_bytes() == data
    assert len(capped) <= 64 * 1024
    head, marker, tail = capped.split(b"\n[taskrun:", 1)[0] + b"\n", *capped.split(b"\n[taskrun:", 1)[1].split(b"\n", 1)
    assert data.startswith(head) and data.endswith(tail)
    assert tail.startswith(b"line ") and head.endswith(b" output\n")  # cut at line ends
    assert left == len(data) - len(head) - len(tail)
    assert f" {left} bytes left out here; the full log: taskrun logs t --run 1, or .git/taskrun/logs/t/run-1.log]" \
        == marker.decode()
    assert logs.settle("t", 1, 64 * 1024) is None  # done: nothing more to do
    assert full.read_bytes() == data


def test_an_output_within_the_cap_is_left_as_it_is(repo: Path) -> None:
    records = Records(repo)
    final_run(records, "t", 1, lines(10))
    assert FullLogs(records, gitops.state_dir(repo)).settle("t", 1, 64 * 1024) is None
    assert records.output("t", 1).read_bytes() == lines(10)
    assert not (gitops.state_dir(repo) / "logs").exists()


def test_a_kill_after_the_move_is_finished_on_restart(repo: Path) -> None:
    records = Records(repo)
    data = lines(20_000)
    final_run(records, "t", 1, data)
    full = gitops.state_dir(repo) / "logs" / "t" / "run-1.log"
    full.parent.mkdir(parents=True)
    os.rename(records.output("t", 1), full)  # step 1 done, then killed
    task = finished_task(len(data), RunStatus.COMPLETED)
    committed: list[CommitItem] = []
    FullLogs(records, gitops.state_dir(repo)).settle_restored([task], RecordsConfig(max_log_bytes=8192),
                                                               committed.append)
    capped = records.output("t", 1).read_bytes()
    assert b"bytes left out here" in capped and len(capped) <= 8192
    assert full.read_bytes() == data
    assert [item.paths for item in committed] == [tuple(records.run_paths("t", 1))]


def test_a_kill_before_the_move_is_finished_on_restart(repo: Path) -> None:
    records = Records(repo)
    data = lines(20_000)
    final_run(records, "t", 1, data)
    task = finished_task(len(data), RunStatus.FAILED)
    committed: list[CommitItem] = []
    FullLogs(records, gitops.state_dir(repo)).settle_restored([task], RecordsConfig(max_log_bytes=8192),
                                                               committed.append)
    assert len(records.output("t", 1).read_bytes()) <= 8192
    assert (gitops.state_dir(repo) / "logs" / "t" / "run-1.log").read_bytes() == data
    assert [item.run_number for item in committed] == [1]


def test_a_full_log_of_another_length_is_not_taken_for_a_missing_output(repo: Path) -> None:
    records = Records(repo)
    final_run(records, "t", 1, b"")
    os.unlink(records.output("t", 1))
    full = gitops.state_dir(repo) / "logs" / "t" / "run-1.log"
    full.parent.mkdir(parents=True)
    full.write_bytes(lines(20_000))  # an earlier Run 1's (runs/ was removed since)
    assert FullLogs(records, gitops.state_dir(repo)).settle("t", 1, 8192, size=0) is None
    assert not records.output("t", 1).exists()


def test_across_file_systems_the_full_log_is_copied_and_output_log_stays_until_replaced(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = Records(repo)
    data = lines(50_000)
    final_run(records, "t", 1, data)

    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", cross_device)
    FullLogs(records, gitops.state_dir(repo)).settle("t", 1, 8192)
    assert (gitops.state_dir(repo) / "logs" / "t" / "run-1.log").read_bytes() == data
    assert len(records.output("t", 1).read_bytes()) <= 8192
    assert not [p for p in (gitops.state_dir(repo) / "logs" / "t").iterdir() if p.name.startswith(".")]


def test_a_link_in_the_state_dir_is_not_followed(repo: Path, tmp_path: Path) -> None:
    records = Records(repo)
    data = lines(20_000)
    final_run(records, "t", 1, data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    logs_dir = gitops.state_dir(repo) / "logs"
    logs_dir.mkdir(parents=True)
    (logs_dir / "t").symlink_to(elsewhere)
    FullLogs(records, gitops.state_dir(repo)).settle("t", 1, 8192)
    assert list(elsewhere.iterdir()) == []
    assert (logs_dir / "t").is_dir() and not (logs_dir / "t").is_symlink()
    assert (logs_dir / "t" / "run-1.log").read_bytes() == data


# ------------------------------------------------------------------ pruning


def test_prune_removes_old_full_logs_then_the_oldest_over_the_size_cap(repo: Path) -> None:
    logs = FullLogs(Records(repo), gitops.state_dir(repo))
    now = time.time()
    for number, age in ((1, 40 * 86400), (2, 3 * 86400), (3, 2 * 86400), (4, 86400)):
        path = gitops.state_dir(repo) / "logs" / "a" / "b" / f"run-{number}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - age, now - age))
    removed = logs.prune(keep_seconds=30 * 86400, max_bytes=2500, now=now)
    assert sorted(removed) == ["logs/a/b/run-1.log", "logs/a/b/run-2.log"]
    assert sorted(p.name for p in (gitops.state_dir(repo) / "logs" / "a" / "b").iterdir()) == \
        ["run-3.log", "run-4.log"]
    assert logs.prune(keep_seconds=1, max_bytes=10**9, now=now) and not (gitops.state_dir(repo) / "logs" / "a").exists()


def test_the_pruner_is_due_at_once_then_every_interval(repo: Path) -> None:
    logs = FullLogs(Records(repo), gitops.state_dir(repo))
    old = gitops.state_dir(repo) / "logs" / "t" / "run-1.log"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    os.utime(old, (1, 1))
    ticks = [100.0]
    notices: list[str] = []
    pruner = Pruner(logs, lambda: RecordsConfig(), notices.append, clock=lambda: ticks[0])
    assert pruner.due(100.0) == 100.0
    pruner.run()
    assert not old.exists() and notices
    assert pruner.due(100.0) == 100.0 + 3600.0


# ------------------------------------------------------------------ taskrun logs


def cli_run(repo: Path, data: bytes, cap: int, capsys: pytest.CaptureFixture[bytes]) -> Records:
    records = Records(repo)
    records.save_task({"task_id": "t", "status": "COMPLETED", "runs": [{"run": 1}]})
    final_run(records, "t", 1, data)
    FullLogs(records, gitops.state_dir(repo)).settle("t", 1, cap)
    capsys.readouterr()
    return records


def test_logs_prints_the_full_log_while_it_is_kept(repo: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    data = lines(200_000)  # 5 MB: several chunks of `taskrun logs`
    cli_run(repo, data, 8192, capsysbinary)
    assert main(["-C", str(repo), "logs", "t"]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == data
    assert b"removed" not in captured.err


def test_logs_prints_the_capped_log_and_says_so_once_the_full_one_is_pruned(
        repo: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    data = lines(20_000)
    records = cli_run(repo, data, 8192, capsysbinary)
    FullLogs(records, gitops.state_dir(repo)).prune(keep_seconds=1, max_bytes=0)
    assert main(["-C", str(repo), "logs", "t", "--run", "1"]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == records.output("t", 1).read_bytes()
    assert f"its full log ({len(data)} bytes) was removed".encode() in captured.err


# ------------------------------------------------------------------ configuration


def test_records_settings_are_validated_with_file_and_key() -> None:
    config = parse_config("records: {max_log_bytes: 1048576, keep_full_logs: 7d, full_logs_max_bytes: 0}\n", "f.yaml")
    assert config.records == RecordsConfig(max_log_bytes=1048576, keep_full_logs=7 * 86400.0, full_logs_max_bytes=0)
    assert parse_config("", "f.yaml").records == RecordsConfig()
    for text, key in (("records: {max_log_bytes: 100}", "records.max_log_bytes"),
                      ("records: {keep_full_logs: forever}", "records.keep_full_logs"),
                      ("records: {full_logs_max_bytes: -1}", "records.full_logs_max_bytes"),
                      ("records: {max_logs: 1}", "records.max_logs")):
        with pytest.raises(ConfigError) as caught:
            parse_config(text + "\n", "f.yaml")
        assert caught.value.key == key
