"""Records that always land (issue 11, findings 1-3): a held index.lock, HEAD that keeps moving, worktrees.

Real git, the real daemon, real user git processes running beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, git, status_of, taskrun, wait_status, wait_until, write_task


def head_files(root: Path) -> set[str]:
    return set(git(root, "ls-tree", "-r", "--name-only", "HEAD").splitlines())


def records_committed(root: Path, task_ids: list[str]) -> bool:
    files = head_files(root)
    return all(f"runs/{t}/status.json" in files and f"runs/{t}/run-1/status.json" in files for t in task_ids)


def set_git_option(root: Path, key: str, value: str) -> None:
    config = root / ".taskrun.yaml"
    text = config.read_text()
    assert f"  {key}: " in text
    lines = [f"  {key}: {value}" if line.startswith(f"  {key}: ") else line for line in text.splitlines()]
    config.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- finding 1: the user's index.lock


@pytest.mark.slow
def test_records_stay_in_head_and_the_index_when_an_ide_holds_the_index_lock_while_runs_finish(
        daemon: Daemon, repo: Path) -> None:
    daemon.start()
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # what an IDE does for a few seconds
    held_since = time.monotonic()
    ids = [f"lock-{n}" for n in range(4)]
    for task_id in ids:
        write_task(repo, task_id, "echo done")
    for task_id in ids:
        wait_status(repo, task_id, "COMPLETED")
    wait_until(lambda: records_committed(repo, ids), 20, "the records to be committed while the lock is held")
    wait_until(lambda: time.monotonic() - held_since >= 3.0, 10, "3 s of lock")
    lock.unlink()
    wait_until(lambda: git(repo, "status", "--porcelain", "--", "runs/") == "", 20,
               f"runs/ to be clean in git status (now {git(repo, 'status', '--porcelain', '--', 'runs/')!r})")
    # The user's next commit of an unrelated file keeps every record.
    (repo / "notes.txt").write_text("mine\n")
    git(repo, "add", "notes.txt")
    git(repo, "commit", "--quiet", "-m", "user: notes")
    assert records_committed(repo, ids)
    assert "could not commit records" not in daemon.output()


# ---------------------------------------------------------------- finding 2: HEAD keeps moving


USER_LOOP = r"""
import subprocess, sys, time
root, count = sys.argv[1], int(sys.argv[2])
for n in range(count):
    with open(f"{root}/user.txt", "w") as handle:
        handle.write(f"{n}\n")
    for args in (["add", "user.txt"], ["commit", "--quiet", "-m", f"user {n}"]):
        while (done := subprocess.run(["git", "-C", root, *args], capture_output=True)).returncode != 0:
            if b"lock" not in done.stderr:
                sys.exit(f"git {args[0]} failed: {done.stderr.decode()}")
            time.sleep(0.01)  # the daemon held the index or HEAD a moment: a person would try again too
"""


@pytest.mark.slow
def test_every_record_lands_while_a_user_commits_in_a_loop(daemon: Daemon, repo: Path) -> None:
    daemon.start()
    user = subprocess.Popen([sys.executable, "-c", USER_LOOP, str(repo), "150"])
    try:
        ids = [f"quick-{n:03d}" for n in range(100)]
        for task_id in ids:
            write_task(repo, task_id, "true")
        for task_id in ids:
            wait_status(repo, task_id, "COMPLETED", timeout=120)
        assert user.wait(timeout=180) == 0
    finally:
        if user.poll() is None:
            user.kill()
            user.wait()
    wait_until(lambda: records_committed(repo, ids), 60, "every record to be in HEAD")
    wait_until(lambda: git(repo, "status", "--porcelain", "--", "runs/") == "", 20, "runs/ clean in git status")
    subjects = git(repo, "log", "--format=%s").splitlines()
    assert sum(s.startswith("user ") for s in subjects) == 150  # no user commit lost either
    assert git(repo, "show", "HEAD:user.txt") == "149\n"


def test_a_starting_daemon_commits_the_sealed_records_head_lacks(repo: Path) -> None:
    set_git_option(repo, "commit", "false")
    git(repo, "commit", "--quiet", "-am", "records off")
    write_task(repo, "left", "echo left behind")
    assert taskrun(repo, "up", "--once").returncode == 0
    assert "runs/left/status.json" not in head_files(repo)
    foreign = repo / "runs" / "other" / "status.json"  # a record this daemon did not write (no seal)
    foreign.parent.mkdir(parents=True)
    foreign.write_text('{"task_id": "other", "status": "COMPLETED"}\n')
    set_git_option(repo, "commit", "true")
    git(repo, "commit", "--quiet", "-m", "records on", "--", ".taskrun.yaml")
    handle = Daemon(repo)
    try:
        handle.start()
        wait_until(lambda: records_committed(repo, ["left"]), 20, "the left-behind records to be committed")
    finally:
        handle.stop()
    assert "runs/other/status.json" not in head_files(repo)
    assert "left" in git(repo, "log", "-1", "--format=%B", "--", "runs/left/status.json")


# ---------------------------------------------------------------- finding 3: where git keeps its directory


def user_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "config", "user.name", "Test User")
    git(path, "config", "user.email", "test@example.com")
    (path / "README.md").write_text("a project\n")
    git(path, "add", "README.md")
    git(path, "commit", "--quiet", "-m", "initial")
    return path


def assert_usable(root: Path, state: Path) -> None:
    """init, worker key, doctor and up --once work in `root`, with the daemon's state in `state`."""
    result = taskrun(root, "init")
    assert result.returncode == 0, result.stderr
    assert (state / "keys").is_dir()
    for args in (["worker", "key"], ["doctor"]):
        result = taskrun(root, *args)
        assert "Traceback" not in result.stderr and "NotADirectoryError" not in result.stderr, result.stderr
    assert taskrun(root, "worker", "key").returncode == 0
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "taskrun init")
    write_task(root, "hello", "echo hello")
    result = taskrun(root, "up", "--once")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runs/hello/status.json" in head_files(root)
    assert git(root, "status", "--porcelain", "--", "runs/") == ""
    assert (state / "record.key").exists()


def test_a_git_worktree_checkout_works_with_its_own_state(tmp_path: Path, isolated_git: Path) -> None:
    main = user_repo(tmp_path / "main")
    git(main, "worktree", "add", "--quiet", "-b", "work", str(tmp_path / "wt"))
    wt = tmp_path / "wt"
    assert (wt / ".git").is_file()
    assert_usable(wt, main / ".git" / "worktrees" / "wt" / "taskrun")
    assert not (main / ".git" / "taskrun").exists()  # per work tree, not in the common directory


def test_a_submodule_work_tree_keeps_its_state_in_the_submodules_git_directory(
        tmp_path: Path, isolated_git: Path) -> None:
    library = user_repo(tmp_path / "library")
    top = user_repo(tmp_path / "top")
    git(top, "-c", "protocol.file.allow=always", "submodule", "add", "--quiet", str(library), "lib")
    git(top, "commit", "--quiet", "-m", "add lib")
    sub = top / "lib"
    git(sub, "config", "user.name", "Test User")
    git(sub, "config", "user.email", "test@example.com")
    assert (sub / ".git").is_file()
    assert_usable(sub, top / ".git" / "modules" / "lib" / "taskrun")
    assert_usable(top, top / ".git" / "taskrun")


def test_git_dir_and_work_tree_from_the_environment_are_where_the_state_goes(
        tmp_path: Path, isolated_git: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    separate = user_repo(tmp_path / "origin-layout")
    git_dir = tmp_path / "store.git"
    os.rename(separate / ".git", git_dir)
    monkeypatch.setenv("GIT_DIR", str(git_dir))
    monkeypatch.setenv("GIT_WORK_TREE", str(separate))
    assert_usable(separate, git_dir / "taskrun")


def test_init_that_fails_leaves_nothing_half_made(tmp_path: Path, isolated_git: Path) -> None:
    root = user_repo(tmp_path / "repo")
    (root / "hooks").write_text("a file where taskrun wants a directory\n")
    result = taskrun(root, "init")
    assert result.returncode != 0
    assert "hooks is not a directory" in result.stderr
    assert sorted(p.name for p in root.iterdir()) == [".git", "README.md", "hooks"]
    assert not (root / ".git" / "taskrun").exists()
    (root / "hooks").unlink()
    assert taskrun(root, "init").returncode == 0
    assert (root / ".taskrun.yaml").exists() and (root / ".git" / "taskrun" / "keys").is_dir()


# ---------------------------------------------------------------- a person's reset drops the daemon's commits


RESTORED = "records a reset dropped, committed again"


def record_bytes(root: Path, task_id: str) -> dict[str, bytes]:
    names = [f"runs/{task_id}/status.json", f"runs/{task_id}/run-1/status.json", f"runs/{task_id}/run-1/output.log"]
    return {name: (root / name).read_bytes() for name in names}


def in_head(root: Path, path: str) -> bytes | None:
    done = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{path}"], capture_output=True)
    return done.stdout if done.returncode == 0 else None


def person_commits(root: Path, name: str) -> None:
    (root / name).write_text(f"{name}\n")
    git(root, "add", name)
    git(root, "commit", "--quiet", "-m", f"user: {name}")


def complete_and_commit(root: Path, task_id: str) -> dict[str, bytes]:
    write_task(root, task_id, f"echo output of {task_id}")
    wait_status(root, task_id, "COMPLETED")
    wait_until(lambda: records_committed(root, [task_id]), 20, f"the records of {task_id} to be committed")
    wait_until(lambda: git(root, "status", "--porcelain", "--", "runs/") == "", 20, "runs/ clean in git status")
    return record_bytes(root, task_id)


def test_records_a_persons_reset_dropped_are_written_and_committed_again(daemon: Daemon, repo: Path) -> None:
    daemon.start()
    person_commits(repo, "mine.txt")
    before = complete_and_commit(repo, "kept")
    assert b"output of kept" in before["runs/kept/run-1/output.log"]
    # The person drops "their" last commit; the daemon's record commit had landed on top of it.
    assert in_head(repo, "runs/kept/status.json") is not None
    assert subprocess.run(["git", "-C", str(repo), "cat-file", "-e", "HEAD~1:runs/kept/status.json"],
                          capture_output=True).returncode != 0
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")
    assert not (repo / "runs" / "kept" / "status.json").exists()

    def restored() -> bool:
        return all((repo / name).is_file() and (repo / name).read_bytes() == data and in_head(repo, name) == data
                   for name, data in before.items())

    wait_until(restored, 20, "the dropped records back in the work tree and in HEAD, byte for byte")
    wait_until(lambda: git(repo, "status", "--porcelain", "--", "runs/") == "", 20, "runs/ clean in git status")
    assert RESTORED in git(repo, "log", "-1", "--format=%s")
    wait_until(lambda: "HEAD moved past 1 record commit(s) of the daemon (a reset?)" in daemon.output(), 10,
               "the notice in the daemon's log")
    assert daemon.stop() == 0
    # A new daemon finds the records: the Task does not run again.
    assert taskrun(repo, "up", "--once").returncode == 0
    assert sorted(p.name for p in (repo / "runs" / "kept").iterdir() if p.is_dir()) == ["run-1"]
    assert status_of(repo, "kept") == "COMPLETED"


def test_a_reset_that_drops_only_the_persons_own_commit_restores_nothing(daemon: Daemon, repo: Path) -> None:
    daemon.start()
    complete_and_commit(repo, "first")
    person_commits(repo, "mine.txt")
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")  # only their own commit goes
    assert in_head(repo, "runs/first/status.json") is not None
    # Then a reset that does drop a record commit: its restore is the only one, and holds only that Task's files.
    second = complete_and_commit(repo, "second")
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")
    wait_until(lambda: all(in_head(repo, name) == data for name, data in second.items()), 20,
               "the second Task's records committed again")
    restores = git(repo, "log", "--format=%H %s").splitlines()
    restores = [line.split()[0] for line in restores if RESTORED in line]
    assert len(restores) == 1
    touched = git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", restores[0]).split()
    assert touched and all(path.startswith("runs/second/") for path in touched)
    assert "HEAD moved past 1 record commit(s)" in daemon.output()
    assert daemon.output().count("HEAD moved past") == 1
