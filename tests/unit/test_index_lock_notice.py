"""An index.lock nobody released: `taskrun doctor` names it, and so does the daemon while it keeps the
committed records out of git's index (once per lock, then again when it is gone)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from taskrunner import doctor
from taskrunner.gitops import Git
from taskrunner.recorder import INDEX_LOCK_STALE_SECONDS, CommitItem, Recorder
from tests.conftest import wait_until


def run_git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_repo(root: Path, *init: str) -> Path:
    root.mkdir()
    run_git(root, "init", "--quiet", *init)
    run_git(root, "config", "user.name", "T")
    run_git(root, "config", "user.email", "t@example.com")
    (root / "README.md").write_text("x\n")
    run_git(root, "add", "README.md")
    run_git(root, "commit", "--quiet", "-m", "initial")
    return root


@pytest.fixture()
def repo(tmp_path: Path, isolated_git: Path) -> Path:
    return make_repo(tmp_path / "repo")


def age(path: Path, seconds: float) -> None:
    """Make `path` (itself, never a link's target) look `seconds` old."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


# ---------------------------------------------------------------- taskrun doctor


def test_doctor_names_an_index_lock_left_for_ten_minutes_with_how_to_remove_it(repo: Path) -> None:
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    age(lock, 600)
    [finding] = doctor.record_findings(repo)  # what `taskrun doctor` runs, with or without a configuration
    assert finding.level == "warning"
    assert f"{lock} has been there for 10 minutes" in finding.what
    assert "staged deletions" in finding.what
    assert finding.fix == f"if no git command is running in this clone, remove it: rm {shlex.quote(str(lock))}"
    assert lock.exists()  # named, never removed


def test_doctor_leaves_a_fresh_index_lock_alone_until_it_is_older_than_the_threshold(repo: Path) -> None:
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # a git command at work
    assert doctor.index_lock_findings(repo) == []
    age(lock, INDEX_LOCK_STALE_SECONDS - 10)
    assert doctor.index_lock_findings(repo) == []
    age(lock, INDEX_LOCK_STALE_SECONDS + 30)
    [finding] = doctor.index_lock_findings(repo)
    assert f"for {int(INDEX_LOCK_STALE_SECONDS + 30)} seconds" in finding.what


def test_doctor_finds_nothing_without_an_index_lock(repo: Path, tmp_path: Path) -> None:
    assert doctor.index_lock_findings(repo) == []
    plain = tmp_path / "plain"
    plain.mkdir()
    assert doctor.index_lock_findings(plain) == []  # not a repository at all


def test_doctor_finds_the_lock_in_a_git_directory_kept_elsewhere(tmp_path: Path, isolated_git: Path) -> None:
    git_dir = tmp_path / "elsewhere.git"
    root = make_repo(tmp_path / "clone", f"--separate-git-dir={git_dir}")
    lock = git_dir / "index.lock"
    lock.write_text("")
    age(lock, 3 * 3600)
    [finding] = doctor.index_lock_findings(root)
    assert f"{lock} has been there for 3 hours" in finding.what
    assert finding.fix.endswith(f"rm {shlex.quote(str(lock))}")


def test_doctor_finds_the_lock_of_a_linked_worktree_in_its_own_git_directory(repo: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    run_git(repo, "worktree", "add", "--quiet", "-b", "side", str(tree))
    main_lock = repo / ".git" / "index.lock"
    main_lock.write_text("")
    age(main_lock, 600)
    assert doctor.index_lock_findings(tree) == []  # the main work tree's index, not this clone's
    lock = Path(run_git(tree, "rev-parse", "--absolute-git-dir").strip()) / "index.lock"
    lock.write_text("")
    age(lock, 3 * 86400)
    [finding] = doctor.index_lock_findings(tree)
    assert f"{lock} has been there for 3 days" in finding.what


def test_doctor_judges_a_linked_index_lock_by_the_link_never_its_target(repo: Path, tmp_path: Path) -> None:
    target = tmp_path / "old-file"
    target.write_text("mine\n")
    age(target, 86400 * 30)
    lock = repo / ".git" / "index.lock"
    lock.symlink_to(target)
    assert doctor.index_lock_findings(repo) == []  # the link itself is new
    age(lock, 600)
    [finding] = doctor.index_lock_findings(repo)
    assert f"{lock} has been there for 10 minutes" in finding.what
    assert target.read_text() == "mine\n" and time.time() - target.stat().st_mtime > 86400 * 29


# ---------------------------------------------------------------- the daemon's notice


def record(repo: Path, task_id: str) -> CommitItem:
    path = repo / "runs" / task_id / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"status": "COMPLETED"}\n')
    return CommitItem(paths=(f"runs/{task_id}/status.json",), task_id=task_id, run_id=None, run_number=None,
                      worker=None, agent=None, status="COMPLETED", title=task_id)


def counting_refreshes(repo: Git, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The answers of every index refresh the recorder tries (so a test can wait for several retries)."""
    real = repo.refresh_index
    answers: list[bool] = []

    def refresh(wait: float | None = None) -> bool:
        answers.append(real(wait))
        return answers[-1]

    monkeypatch.setattr(repo, "refresh_index", refresh)
    return answers


def in_head(repo: Path, path: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"HEAD:{path}"], cwd=repo, capture_output=True).returncode == 0


def test_a_stale_index_lock_is_named_once_while_the_index_waits_and_its_removal_is_announced(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # left behind by a git that was killed
    age(lock, 300)
    git = Git(repo)
    refreshes = counting_refreshes(git, monkeypatch)
    notices: list[str] = []
    recorder = Recorder(git, on_error=notices.append, window=0.01)
    recorder.start()
    try:
        first = record(repo, "t1")
        recorder.submit(first)
        wait_until(lambda: in_head(repo, first.paths[0]), what="the record committed despite the lock")
        wait_until(lambda: refreshes.count(False) >= 4, what="several refreshes kept pending by the lock")
        second = record(repo, "t2")  # a later commit while the same lock is there: no second notice
        recorder.submit(second)
        wait_until(lambda: in_head(repo, second.paths[0]), what="the second record committed")
        count = refreshes.count(False)
        wait_until(lambda: refreshes.count(False) >= count + 2, what="more refreshes kept pending")
        named = [n for n in notices if str(lock) in n]
        assert len(named) == 1, notices
        assert "has been there for 5 minutes" in named[0] and "staged deletions" in named[0]
        assert named[0].endswith(f"if no git command is running in this clone, remove it: rm "
                                 f"{shlex.quote(str(lock))}")
        lock.unlink()
        gone = f"{lock} is gone: git's index lists the committed records again"
        wait_until(lambda: gone in notices, what="the notice that the lock is gone")
    finally:
        if lock.exists():
            lock.unlink()  # stop() would otherwise wait for the index
        recorder.stop()
    assert notices == [named[0], gone]
    assert run_git(repo, "status", "--porcelain", "runs/") == ""


def test_a_fresh_index_lock_gets_no_notice_until_it_has_been_there_past_the_threshold(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # a person's git at work
    git = Git(repo)
    refreshes = counting_refreshes(git, monkeypatch)
    notices: list[str] = []
    recorder = Recorder(git, on_error=notices.append, window=0.01)
    recorder.start()
    try:
        item = record(repo, "t1")
        recorder.submit(item)
        wait_until(lambda: refreshes.count(False) >= 4, what="refreshes kept pending by the lock")
        assert notices == []
        age(lock, INDEX_LOCK_STALE_SECONDS + 5)  # the same lock, now left there
        wait_until(lambda: any(str(lock) in n for n in notices), what="the notice naming the lock")
        assert f"has been there for {int(INDEX_LOCK_STALE_SECONDS + 5)} seconds" in notices[0]
        lock.unlink()
        wait_until(lambda: run_git(repo, "status", "--porcelain", "runs/") == "", what="the index refreshed")
    finally:
        if lock.exists():
            lock.unlink()
        recorder.stop()


def test_a_lock_that_is_a_directory_or_dated_in_the_future_is_reported_with_the_right_advice(tmp_path: Path) -> None:
    import time as clock

    from taskrunner import doctor

    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    lock = root / ".git" / "index.lock"
    lock.mkdir()
    old = clock.time() - 3600
    os.utime(lock, (old, old))
    (found,) = doctor.index_lock_findings(root)
    assert f"rm -r {lock}" in found.fix
    lock.rmdir()
    lock.write_bytes(b"")
    future = clock.time() + 86400
    os.utime(lock, (future, future))  # the clock was set back after it was left
    (found,) = doctor.index_lock_findings(root)
    assert "an unknown time" in found.what and f"rm {lock}" in found.fix
