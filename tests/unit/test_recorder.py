"""The recorder: commit messages, and batching commits on a real repository."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from taskrunner.defaults import TRAILER_KEYS
from taskrunner.errors import GitError
from taskrunner.gitops import Git
from taskrunner.recorder import CommitItem, Recorder, commit_message


def item(n: int, status: str = "COMPLETED", **kw: object) -> CommitItem:
    fields: dict[str, object] = dict(
        paths=(f"runs/t{n}/status.json", f"runs/t{n}/run-1/status.json"), task_id=f"t{n}", run_id=f"run-id-{n}",
        run_number=1, worker=f"w{n}", agent="shell", status=status, title=f"Title of t{n}")
    fields.update(kw)
    return CommitItem(**fields)  # type: ignore[arg-type]


def trailer_block(message: str) -> list[str]:
    return message.rstrip("\n").split("\n\n")[-1].splitlines()


# ---------------------------------------------------------------- commit_message


def test_a_single_item_message_has_subject_title_body_and_trailers() -> None:
    message = commit_message([item(1, "FAILED")])
    subject, body, trailers = message.rstrip("\n").split("\n\n")
    assert subject == "taskrun: t1 FAILED on w1 (run 1)"
    assert body == "Title of t1"
    assert trailers.splitlines() == [
        "Task-Id: t1", "Run-Id: run-id-1", "Worker: w1", "Agent: shell", "Status: FAILED"]
    assert message.endswith("\n")


def test_a_message_for_several_items_counts_statuses_and_lists_every_item() -> None:
    items = [item(1), item(2, "FAILED"), item(3), item(4, "CANCELLED")]
    message = commit_message(items)
    subject, body, _ = message.rstrip("\n").split("\n\n")
    assert subject == "taskrun: record 4 results (1 CANCELLED, 2 COMPLETED, 1 FAILED)"
    assert body.splitlines() == [
        "- t1 COMPLETED on w1 (run 1)", "- t2 FAILED on w2 (run 1)",
        "- t3 COMPLETED on w3 (run 1)", "- t4 CANCELLED on w4 (run 1)"]


def test_every_items_trailers_are_present_in_a_shared_message() -> None:
    items = [item(1), item(2, "FAILED"), item(3, "CANCELLED")]
    trailers = trailer_block(commit_message(items))
    for it in items:
        for key, value in zip(TRAILER_KEYS, (it.task_id, it.run_id, it.worker, it.agent, it.status)):
            assert f"{key}: {value}" in trailers
    assert len(trailers) == len(items) * len(TRAILER_KEYS)


def test_trailers_without_a_value_are_left_out() -> None:
    bare = CommitItem(paths=("runs/x/status.json",), task_id="x", run_id=None, run_number=None,
                      worker=None, agent=None, status="INVALID", title="x")
    message = commit_message([bare])
    assert message.splitlines()[0] == "taskrun: x INVALID"
    assert trailer_block(message) == ["Task-Id: x", "Status: INVALID"]


def test_git_parses_the_trailers_of_a_commit_message(tmp_path: Path) -> None:
    message = commit_message([item(1), item(2)])
    done = subprocess.run(["git", "interpret-trailers", "--parse"], input=message, capture_output=True,
                          text=True, check=True, cwd=tmp_path)
    assert "Task-Id: t1" in done.stdout.splitlines()
    assert "Run-Id: run-id-2" in done.stdout.splitlines()


# ---------------------------------------------------------------- the Recorder thread


@pytest.fixture()
def repo(tmp_path: Path, isolated_git: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for args in (["init", "--quiet"], ["config", "user.name", "T"], ["config", "user.email", "t@example.com"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    (root / "README.md").write_text("x\n")
    subprocess.run(["git", "add", "README.md"], cwd=root, check=True)
    subprocess.run(["git", "commit", "--quiet", "-m", "initial"], cwd=root, check=True)
    return root


def write_records(repo: Path, items: list[CommitItem]) -> None:
    for it in items:
        for rel in it.paths:
            path = repo / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f'{{"status": "{it.status}"}}\n')


def commits_since_initial(repo: Path) -> list[str]:
    shas = subprocess.run(["git", "rev-list", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.split()
    return shas[:-1]  # all but the initial commit


def message_of(repo: Path, sha: str) -> str:
    return subprocess.run(["git", "log", "-1", "--format=%B", sha], cwd=repo, capture_output=True, text=True,
                          check=True).stdout


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is a bounded poll interval
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        pause.wait(0.01)


def test_items_submitted_together_share_one_commit(repo: Path) -> None:
    items = [item(n) for n in range(5)]
    write_records(repo, items)
    committed: list[tuple[str, list[CommitItem]]] = []
    recorder = Recorder(Git(repo), on_commit=lambda sha, batch: committed.append((sha, list(batch))), window=0.5)
    recorder.start()
    try:
        for it in items:
            recorder.submit(it)
        wait_for(lambda: committed)
    finally:
        recorder.stop()
    shas = commits_since_initial(repo)
    assert len(shas) == 1
    assert committed == [(shas[0], items)]
    message = message_of(repo, shas[0])
    for it in items:
        assert f"Task-Id: {it.task_id}" in message
    files = subprocess.run(["git", "diff-tree", "-r", "--name-only", "--no-commit-id", shas[0]], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.split()
    assert sorted(files) == sorted(p for it in items for p in it.paths)


def test_submitting_five_items_then_stopping_makes_exactly_one_commit(repo: Path) -> None:
    items = [item(n) for n in range(5)]
    write_records(repo, items)
    recorder = Recorder(Git(repo))
    recorder.start()
    for it in items:
        recorder.submit(it)
    recorder.stop()
    shas = commits_since_initial(repo)
    assert len(shas) == 1
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout == ""


def test_stop_commits_what_was_submitted_without_waiting_for_the_window(repo: Path) -> None:
    items = [item(1), item(2, "FAILED")]
    write_records(repo, items)
    recorder = Recorder(Git(repo), window=60.0)
    recorder.start()
    for it in items:
        recorder.submit(it)
    recorder.stop()  # a 60 s window would make this test time out if stop() waited for it
    [sha] = commits_since_initial(repo)
    assert "Run-Id: run-id-2" in message_of(repo, sha)
    assert "Status: FAILED" in message_of(repo, sha)


def test_kick_commits_at_once_instead_of_at_the_end_of_the_window(repo: Path) -> None:
    items = [item(1), item(2)]
    write_records(repo, items)
    committed: list[list[CommitItem]] = []
    recorder = Recorder(Git(repo), on_commit=lambda sha, batch: committed.append(list(batch)), window=60.0)
    recorder.start()
    try:
        for it in items:
            recorder.submit(it)
        recorder.kick()
        wait_for(lambda: committed)  # a 60 s window without the kick: the deadline fails first
    finally:
        recorder.stop()
    assert committed == [items]


def test_items_arriving_after_a_commit_go_into_a_later_commit(repo: Path) -> None:
    first, second = item(1), item(2)
    write_records(repo, [first, second])
    committed: list[str] = []
    recorder = Recorder(Git(repo), on_commit=lambda sha, batch: committed.append(sha), window=0.05)
    recorder.start()
    try:
        recorder.submit(first)
        wait_for(lambda: len(committed) == 1)
        recorder.submit(second)
        wait_for(lambda: len(committed) == 2)
    finally:
        recorder.stop()
    assert commits_since_initial(repo) == list(reversed(committed))


def test_a_disabled_recorder_commits_nothing(repo: Path) -> None:
    items = [item(1)]
    write_records(repo, items)
    recorder = Recorder(Git(repo), enabled=False)
    recorder.start()
    recorder.submit(items[0])
    recorder.stop()
    assert commits_since_initial(repo) == []


def test_a_failing_commit_is_reported_and_the_recorder_keeps_running(repo: Path, tmp_path: Path) -> None:
    errors: list[str] = []
    broken = tmp_path / "not-a-repo"
    broken.mkdir()
    (broken / "runs").mkdir()
    recorder = Recorder(Git(broken), on_error=errors.append, window=0.01, stop_grace=0.3)
    recorder.start()
    recorder.submit(item(1))
    recorder.stop()
    assert errors and errors[0].startswith("could not commit records (attempt 1, 1 kept")
    assert "not committed: they are on disk and the next daemon commits them" in errors[-1]


# ---------------------------------------------------------------- records always land (issue 11, findings 1 and 2)


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def in_head(repo: Path, rel: str) -> bool:
    return rel in git_out(repo, "ls-tree", "-r", "--name-only", "HEAD").splitlines()


def test_a_batch_whose_commit_keeps_failing_is_kept_and_lands_once_git_lets_it(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = Git(repo)
    original = g.commit_paths
    failures = {"left": 6}

    def flaky(paths: list[str], message: str, refresh: bool = True) -> str | None:
        if failures["left"]:
            failures["left"] -= 1
            raise GitError("HEAD kept moving while committing records")
        return original(paths, message, refresh)

    monkeypatch.setattr(g, "commit_paths", flaky)
    monkeypatch.setattr("taskrunner.recorder.RETRY_MAX_SECONDS", 0.05)
    errors: list[str] = []
    recorder = Recorder(g, on_error=errors.append, window=0.01)
    items = [item(n) for n in range(3)]
    write_records(repo, items)
    recorder.start()
    recorder.submit(items[0])
    wait_for(lambda: failures["left"] < 4)
    recorder.submit(items[1])  # joins the kept batch
    recorder.submit(items[2])
    wait_for(lambda: all(in_head(repo, p) for it in items for p in it.paths))
    recorder.stop()
    assert failures["left"] == 0
    assert any("records committed after" in e for e in errors)


def test_an_index_refresh_blocked_by_a_held_lock_is_retried_without_a_new_batch(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("taskrunner.gitops.INDEX_LOCK_WAIT_SECONDS", 0.02)
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    recorder = Recorder(Git(repo), window=0.01)
    items = [item(1)]
    write_records(repo, items)
    recorder.start()
    recorder.submit(items[0])
    wait_for(lambda: in_head(repo, items[0].paths[0]))
    assert git_out(repo, "ls-files", "runs/") == ""  # the index lacks them while the lock is held
    lock.unlink()
    wait_for(lambda: git_out(repo, "status", "--porcelain", "runs/") == "")
    recorder.stop()


def test_records_a_user_commit_removed_are_committed_again(repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setattr("taskrunner.gitops.INDEX_LOCK_WAIT_SECONDS", 0.02)
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    recorder = Recorder(Git(repo), window=0.01)
    items = [item(1)]
    write_records(repo, items)
    recorder.start()
    recorder.submit(items[0])
    wait_for(lambda: in_head(repo, items[0].paths[0]))
    # The user's commit, from their index as it was while the daemon could not update it (no records in it),
    # made while the lock is still held, so it surely comes before the daemon's refresh.
    users_index = tmp_path / "users-index"
    users_index.write_bytes((repo / ".git" / "index").read_bytes())
    (repo / "notes.txt").write_text("mine\n")
    env = {**os.environ, "GIT_INDEX_FILE": str(users_index)}
    for args in (["add", "notes.txt"], ["commit", "--quiet", "-m", "user commit"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    assert not in_head(repo, items[0].paths[0])
    lock.unlink()
    wait_for(lambda: all(in_head(repo, p) for p in items[0].paths) and in_head(repo, "notes.txt"))
    recorder.stop()
    assert "record file(s) that a later commit removed" in git_out(repo, "log", "-1", "--format=%B")
    assert git_out(repo, "status", "--porcelain", "runs/") == ""


def test_records_left_uncommitted_are_committed_first_on_start(repo: Path) -> None:
    items = [item(1), item(2)]
    write_records(repo, items)
    committed: list[list[CommitItem]] = []
    recorder = Recorder(Git(repo), on_commit=lambda sha, batch: committed.append(batch), recover=lambda: items)
    recorder.start()
    wait_for(lambda: committed)
    recorder.stop()
    assert all(in_head(repo, p) for it in items for p in it.paths)


def test_a_search_for_uncommitted_records_that_failed_is_tried_again_until_it_succeeds(repo: Path) -> None:
    # A full disk at start: the search failed once and was never tried again, so those records stayed
    # uncommitted until the next daemon.
    import errno

    items = [item(1)]
    write_records(repo, items)
    calls: list[int] = []

    def recover() -> list[CommitItem]:
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return items

    committed: list[list[CommitItem]] = []
    errors: list[str] = []
    recorder = Recorder(Git(repo), on_commit=lambda sha, batch: committed.append(batch), recover=recover,
                        on_error=errors.append)
    recorder.start()
    wait_for(lambda: committed)
    recorder.stop()
    assert len(calls) == 3 and all(in_head(repo, p) for p in items[0].paths)
    assert "trying again" in errors[0]
    assert any("after 2 failed attempt(s)" in e for e in errors), errors


def test_a_sync_asked_for_repeatedly_runs_once_per_turn_and_on_the_recorder_thread(repo: Path) -> None:
    ran: list[tuple[str, str]] = []
    gate = threading.Event()
    recorder = Recorder(Git(repo), window=0.01)

    def sync(reason: str) -> None:
        gate.wait(5)
        ran.append((reason, threading.current_thread().name))

    recorder.set_sync(sync)
    recorder.start()
    recorder.sync("trigger")
    wait_for(lambda: not recorder._sync_reasons)  # taken by the thread, which now waits on the gate
    for reason in ("poll", "poll", "webhook"):
        recorder.sync(reason)
    gate.set()
    wait_for(lambda: len(ran) == 2)
    recorder.stop()
    assert ran == [("trigger", "recorder"), ("poll, webhook", "recorder")]


# ---------------------------------------------------------------- the cost of a commit grows with the repository


def test_while_more_records_wait_one_index_refresh_covers_several_commits(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # git rewrites the whole index for any change: with 10,000 Tasks' records, a refresh per commit was a third
    # of the daemon's git time. While the next batch is already queued, the refresh waits (INDEX_REFRESH_SECONDS).
    monkeypatch.setattr("taskrunner.recorder.INDEX_REFRESH_SECONDS", 600.0)
    monkeypatch.setattr("taskrunner.recorder.COMMIT_COST_RATIO", 0.0)
    items = [item(n) for n in range(4)]
    write_records(repo, items)
    g = Git(repo)
    commit, refresh = g.commit_paths, g.refresh_index
    later = list(items[1:])
    refreshed: list[list[str]] = []
    recorder = Recorder(g, window=0.01)

    def committing(paths: list[str], message: str, refresh: bool = True) -> str | None:
        sha = commit(paths, message, refresh)
        if later:  # the next Run's records arrive while this commit is made
            recorder.submit(later.pop(0))
        return sha

    def refreshing(wait: float | None = None) -> bool:
        pending = sorted(g.index_pending)
        done = refresh(wait)
        if done and pending:
            refreshed.append(pending)
        return done

    monkeypatch.setattr(g, "commit_paths", committing)
    monkeypatch.setattr(g, "refresh_index", refreshing)
    recorder.start()
    try:
        recorder.submit(items[0])
        wait_for(lambda: len(refreshed) == 2)
    finally:
        recorder.stop()
    assert len(commits_since_initial(repo)) == 4
    # The first commit's at once (none before it); then one for the next three commits.
    assert refreshed == [sorted(items[0].paths), sorted(p for it in items[1:] for p in it.paths)]
    assert git_out(repo, "status", "--porcelain") == ""


def test_a_slower_commit_makes_the_next_batch_collect_for_longer(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A commit's cost grows with the runs/ tree; the window grows with it, so a commit holds more Runs.
    monkeypatch.setattr("taskrunner.recorder.COMMIT_COST_RATIO", 1e6)
    monkeypatch.setattr("taskrunner.recorder.COMMIT_WINDOW_MAX_SECONDS", 600.0)
    items = [item(n) for n in range(3)]
    write_records(repo, items)
    committed: list[list[CommitItem]] = []
    recorder = Recorder(Git(repo), on_commit=lambda sha, batch: committed.append(list(batch)), window=0.0)
    recorder.start()
    try:
        recorder.submit(items[0])  # nothing committed yet: the window is the configured one
        wait_for(lambda: committed)
        recorder.submit(items[1])  # a window of 0 s would commit it alone; this one lasts 1e6 x the last commit
        recorder.submit(items[2])
        recorder.kick()
        wait_for(lambda: len(committed) == 2)
    finally:
        recorder.stop()
    assert committed == [[items[0]], items[1:]]
    assert len(commits_since_initial(repo)) == 2
