"""Pushing records and result branches, syncing the daemon's clone (issue 11, items 4 and 5).

A local bare origin, the daemon's clone, a user's clone: real git everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from taskrunner.errors import GitError
from taskrunner.gitflow.gitstate import GitState
from taskrunner.gitflow.push import Pusher
from taskrunner.gitflow.sync import Syncer
from taskrunner.gitops import Git, state_dir
from tests.conftest import Daemon, git, run_record, taskrun, wait_status, wait_until, write_task


def configure(root: Path) -> None:
    git(root, "config", "user.name", "Test User")
    git(root, "config", "user.email", "test@example.com")


def set_git_option(root: Path, key: str, value: str) -> None:
    config = root / ".taskrun.yaml"
    lines = [f"  {key}: {value}" if line.startswith(f"  {key}: ") else line for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.origin = tmp_path / "origin.git"
        git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(self.origin))
        self.clone = tmp_path / "clone"
        git(tmp_path, "clone", "--quiet", str(self.origin), str(self.clone))
        configure(self.clone)
        git(self.clone, "checkout", "--quiet", "-b", "main")
        assert taskrun(self.clone, "init").returncode == 0
        set_git_option(self.clone, "push", "true")
        (self.clone / "README.md").write_text("a project\n")
        git(self.clone, "add", "-A")
        git(self.clone, "commit", "--quiet", "-m", "initial")
        git(self.clone, "push", "--quiet", "-u", "origin", "main")
        self.user = tmp_path / "user"
        git(tmp_path, "clone", "--quiet", str(self.origin), str(self.user))
        configure(self.user)
        self.state = GitState(state_dir(self.clone))  # where `taskrun status` reads it
        self.notices: list[str] = []

    def record(self, name: str, text: str = "{}\n") -> str:
        """A record commit of the daemon in its clone, as the recorder makes it."""
        path = self.clone / "runs" / name / "status.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        sha = Git(self.clone).commit_paths([f"runs/{name}/status.json"], f"taskrun: {name} COMPLETED\n\nTask-Id: {name}\n")
        assert sha
        return sha

    def user_commit(self, name: str, text: str = "x\n", push: bool = True) -> str:
        (self.user / name).parent.mkdir(parents=True, exist_ok=True)
        (self.user / name).write_text(text)
        git(self.user, "add", "--", name)
        git(self.user, "commit", "--quiet", "-m", f"user: {name}")
        if push:
            git(self.user, "push", "--quiet", "origin", "HEAD:main")
        return git(self.user, "rev-parse", "HEAD").strip()

    def pusher(self) -> Pusher:
        return Pusher(Git(self.clone), "origin", "taskrun/", self.state, self.notices.append)

    def syncer(self, done: list[str | None] | None = None) -> Syncer:
        sink = done if done is not None else []
        return Syncer(Git(self.clone), "origin", self.state, self.notices.append, sink.append)

    def origin_files(self, ref: str = "main") -> set[str]:
        return set(git(self.origin, "ls-tree", "-r", "--name-only", ref).splitlines())


@pytest.fixture
def setup(tmp_path: Path, isolated_git: Path) -> Setup:
    return Setup(tmp_path)


# ---------------------------------------------------------------- pushing


def test_records_and_result_branches_are_pushed_with_explicit_refspecs(setup: Setup) -> None:
    setup.record("a")
    git(setup.clone, "branch", "taskrun/a")
    pusher = setup.pusher()
    pusher.run()
    assert "runs/a/status.json" in setup.origin_files()
    assert git(setup.origin, "rev-parse", "taskrun/a") == git(setup.clone, "rev-parse", "taskrun/a")
    assert setup.state.get("push")["ok"] is True
    assert pusher.due(0.0) is None  # nothing left to push


def test_a_rejected_push_takes_the_remote_commits_rebases_only_the_records_and_pushes_again(setup: Setup) -> None:
    setup.record("a")
    setup.record("b")
    user_sha = setup.user_commit("src/app.py", "print(1)\n")
    (setup.clone / "scratch.txt").write_text("the clone's own uncommitted work\n")
    setup.pusher().run()
    assert setup.state.get("push")["ok"] is True, setup.notices
    log = git(setup.origin, "log", "--format=%s", "main").splitlines()
    assert log[:3] == ["taskrun: b COMPLETED", "taskrun: a COMPLETED", "user: src/app.py"]
    assert git(setup.origin, "merge-base", "--is-ancestor", user_sha, "main") == ""
    # The clone has the user's change in its work tree and index, and its own work untouched.
    assert (setup.clone / "src" / "app.py").read_text() == "print(1)\n"
    assert git(setup.clone, "status", "--porcelain") == "?? scratch.txt\n"
    assert git(setup.clone, "rev-parse", "HEAD") == git(setup.origin, "rev-parse", "main")
    git(setup.origin, "fsck", "--strict")


def test_a_result_branch_a_person_pushed_to_is_never_overwritten(setup: Setup) -> None:
    git(setup.clone, "branch", "taskrun/fix", "HEAD")
    setup.pusher().run()
    git(setup.user, "fetch", "--quiet", "origin")
    git(setup.user, "checkout", "--quiet", "-b", "fix", "origin/taskrun/fix")
    setup.user_commit("review.txt", "a reviewer's change\n", push=False)
    git(setup.user, "push", "--quiet", "origin", "HEAD:taskrun/fix")
    person = git(setup.user, "rev-parse", "HEAD").strip()
    setup.record("fix")
    git(setup.clone, "branch", "-f", "taskrun/fix", "HEAD")  # a new result for the same Task
    pusher = setup.pusher()
    pusher.run()
    assert git(setup.origin, "rev-parse", "taskrun/fix").strip() == person
    assert "taskrun/fix" in setup.state.get("push")["refused"]
    assert "runs/fix/status.json" in setup.origin_files()  # the branch's records went all the same
    assert any("not overwritten" in n for n in setup.notices)


def test_a_push_that_keeps_failing_is_reported_and_retried_and_the_records_stay(setup: Setup) -> None:
    git(setup.clone, "remote", "set-url", "origin", str(setup.origin.parent / "missing.git"))
    setup.record("a")
    pusher = setup.pusher()
    pusher.run()
    state = setup.state.get("push")
    assert state["ok"] is False and state["failures"] == 1 and "missing.git" in state["error"]
    assert pusher.due(0.0) is not None  # retried later
    human = taskrun(setup.clone, "status")
    assert "push failing (1 attempt(s), retried later)" in human.stdout, human.stdout + human.stderr
    assert json.loads(taskrun(setup.clone, "status", "--json").stdout)["git"]["push"]["ok"] is False
    assert "runs/a/status.json" in git(setup.clone, "ls-tree", "-r", "--name-only", "HEAD")
    git(setup.clone, "remote", "set-url", "origin", str(setup.origin))
    pusher.run()
    assert setup.state.get("push")["ok"] is True
    assert "runs/a/status.json" in setup.origin_files()


def test_a_clone_with_a_persons_unpushed_commit_is_diverged_and_not_pushed_over(setup: Setup) -> None:
    (setup.clone / "local.txt").write_text("local\n")
    git(setup.clone, "add", "local.txt")
    git(setup.clone, "commit", "--quiet", "-m", "a person's commit in the daemon's clone")
    setup.record("a")
    user_sha = setup.user_commit("other.txt")
    setup.pusher().run()
    state = setup.state.get("push")
    assert state["ok"] is False and "diverged" in state["error"]
    assert git(setup.origin, "rev-parse", "main").strip() == user_sha


# ---------------------------------------------------------------- syncing


def test_sync_fast_forwards_the_clone_work_tree_and_index(setup: Setup) -> None:
    setup.user_commit("tasks/new.md", "---\n---\n# new\n\n```sh\ntrue\n```\n")
    done: list[str | None] = []
    setup.syncer(done).sync("test")
    assert (setup.clone / "tasks" / "new.md").exists()
    assert git(setup.clone, "status", "--porcelain") == ""
    assert done == [git(setup.clone, "rev-parse", "HEAD").strip()]
    assert setup.state.get("sync")["state"] == "ok"


def test_a_pull_by_hand_racing_the_sync_keeps_the_files_it_brought(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # A person's `git pull` moves HEAD between the sync's work-tree update and its compare-and-swap: the
    # sync gives up, and the index and work tree follow HEAD as the pull left it (not the commit before).
    setup.user_commit("lib.txt", "the library\n")
    repo = Git(setup.clone)
    original = Git.run

    def pulled_first(self: Git, *args: str, **kwargs: object) -> str:
        if args[:1] == ("update-ref",) and "taskrun: sync" in args:
            git(setup.clone, "pull", "--quiet", "--ff-only", "origin", "main")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Git, "run", pulled_first)
    Syncer(repo, "origin", setup.state, setup.notices.append, lambda head: None).sync("test")
    monkeypatch.undo()
    assert setup.state.get("sync")["state"] == "failed"
    assert (setup.clone / "lib.txt").read_text() == "the library\n"
    assert git(setup.clone, "status", "--porcelain") == ""
    assert git(setup.clone, "rev-parse", "HEAD") == git(setup.origin, "rev-parse", "main")


def test_a_persons_rebase_half_way_through_in_the_clone_is_left_alone_until_it_ends(setup: Setup) -> None:
    setup.record("a")
    setup.user_commit("lib.txt", "the library\n")
    git(setup.clone, "-c", "sequence.editor=sed -i 1ibreak", "rebase", "--quiet", "-i", "HEAD~1")  # stops at once
    assert (Git(setup.clone).git_dir() / "rebase-merge").is_dir()
    stopped_at = git(setup.clone, "rev-parse", "HEAD")
    setup.syncer().sync("test")
    assert setup.state.get("sync")["state"] == "refused"
    assert "a rebase is in progress" in setup.state.get("sync")["message"]
    setup.pusher().run()
    assert "a rebase is in progress" in setup.state.get("push")["error"]
    (setup.clone / "runs" / "b").mkdir(parents=True)
    (setup.clone / "runs" / "b" / "status.json").write_text("{}\n")
    with pytest.raises(GitError, match="a rebase is in progress in this clone"):
        Git(setup.clone).commit_paths(["runs/b/status.json"], "taskrun: b COMPLETED\n")
    assert git(setup.clone, "rev-parse", "HEAD") == stopped_at  # HEAD is the person's until the rebase ends
    git(setup.clone, "rebase", "--continue")
    assert Git(setup.clone).commit_paths(["runs/b/status.json"], "taskrun: b COMPLETED\n")
    setup.syncer().sync("test")
    assert setup.state.get("sync")["state"] == "ok" and (setup.clone / "lib.txt").exists()


def test_sync_rebases_the_daemons_own_record_commits_onto_the_remote(setup: Setup) -> None:
    setup.record("a")
    setup.user_commit("x.txt")
    setup.syncer().sync("test")
    assert git(setup.clone, "log", "--format=%s", "-2").splitlines() == ["taskrun: a COMPLETED", "user: x.txt"]
    assert git(setup.clone, "status", "--porcelain") == ""


def test_a_pushed_commit_dressed_as_taskruns_is_never_rebuilt_after_the_remote_dropped_it(setup: Setup) -> None:
    good = git(setup.origin, "rev-parse", "main").strip()
    for subject, path in (("taskrun: submit evil", "tasks/evil.md"), ("taskrun: evil COMPLETED", "runs/evil/x")):
        (setup.user / path).parent.mkdir(parents=True, exist_ok=True)
        (setup.user / path).write_text("mallory\n")
        git(setup.user, "add", "--", path)
        git(setup.user, "commit", "--quiet", "-m", subject)
    git(setup.user, "push", "--quiet", "origin", "HEAD:main")
    setup.syncer().sync("test")  # fast-forwarded onto the pusher's commits
    assert (setup.clone / "tasks" / "evil.md").exists()
    # An admin removes them from the origin (force-push) and adds a commit of theirs.
    git(setup.user, "reset", "--quiet", "--hard", good)
    setup.user_commit("admin.txt", "removed mallory's commits\n", push=False)
    git(setup.user, "push", "--quiet", "--force", "origin", "HEAD:main")
    setup.record("mine")  # the daemon's own record commit, made on top of them meanwhile
    before = git(setup.clone, "rev-parse", "HEAD")
    syncer = setup.syncer()
    syncer.sync("test")
    # Not taskrun's: the clone is reported diverged, nothing is rebuilt or pushed back.
    assert setup.state.get("sync")["state"] == "diverged" and syncer.stale
    assert git(setup.clone, "rev-parse", "HEAD") == before
    assert "tasks/evil.md" not in setup.origin_files()


def test_sync_refuses_rather_than_overwrite_uncommitted_work(setup: Setup) -> None:
    setup.user_commit("notes.txt", "from the remote\n")
    (setup.clone / "notes.txt").write_text("uncommitted, in the daemon's clone\n")
    before = git(setup.clone, "rev-parse", "HEAD")
    setup.syncer().sync("test")
    assert setup.state.get("sync")["state"] == "refused"
    assert (setup.clone / "notes.txt").read_text() == "uncommitted, in the daemon's clone\n"
    assert git(setup.clone, "rev-parse", "HEAD") == before


def test_a_diverged_clone_is_reported_not_reset(setup: Setup) -> None:
    (setup.clone / "local.txt").write_text("local\n")
    git(setup.clone, "add", "local.txt")
    git(setup.clone, "commit", "--quiet", "-m", "a person's local commit")
    before = git(setup.clone, "rev-parse", "HEAD")
    setup.user_commit("other.txt")
    syncer = setup.syncer()
    syncer.sync("test")
    assert syncer.stale and setup.state.get("sync")["state"] == "diverged"
    assert git(setup.clone, "rev-parse", "HEAD") == before
    restarted = Syncer(Git(setup.clone), "origin", GitState(state_dir(setup.clone)), setup.notices.append, print)
    assert restarted.stale  # a new daemon starts nothing stale either, until a sync says otherwise


# ---------------------------------------------------------------- the daemon


USER_PUSHES = r"""
import subprocess, sys
root, count = sys.argv[1], int(sys.argv[2])
def git(*args):
    return subprocess.run(["git", "-C", root, *args], capture_output=True).returncode
for n in range(count):
    with open(f"{root}/user-{n}.txt", "w") as handle:
        handle.write(f"{n}\n")
    assert git("add", f"user-{n}.txt") == 0
    assert git("commit", "--quiet", "-m", f"user {n}") == 0
    while git("push", "--quiet", "origin", "HEAD:main") != 0:
        assert git("pull", "--quiet", "--rebase", "origin", "main") == 0
"""


@pytest.mark.slow
def test_user_pushes_and_daemon_pushes_interleave_and_nothing_is_lost(setup: Setup) -> None:
    daemon = Daemon(setup.clone)
    user = None
    try:
        daemon.start()
        user = subprocess.Popen([sys.executable, "-c", USER_PUSHES, str(setup.user), "50"])
        ids: list[str] = []
        # Tasks keep finishing (and the daemon keeps committing and pushing) for as long as the user pushes.
        while user.poll() is None or len(ids) < 30:
            ids.append(f"t{len(ids):03d}")
            write_task(setup.clone, ids[-1], "true")
            wait_status(setup.clone, ids[-1], "COMPLETED", timeout=60)
        assert user.wait(timeout=180) == 0
        wait_until(lambda: all(f"runs/{t}/status.json" in setup.origin_files() for t in ids), 60,
                   "every record on origin's main")
    finally:
        if user is not None and user.poll() is None:
            user.kill()
            user.wait()
        daemon.stop()
    files = setup.origin_files()
    assert all(f"user-{n}.txt" in files for n in range(50))
    subjects = git(setup.origin, "log", "--format=%s", "main").splitlines()
    assert sum(s.startswith("user ") for s in subjects) == 50
    git(setup.origin, "fsck", "--strict")
    status = json.loads(taskrun(setup.clone, "status", "--json").stdout)
    assert status["git"]["push"]["ok"] is True


@pytest.mark.slow
def test_trigger_syncs_tasks_pushed_to_origin_run_and_deleted_ones_are_cancelled(setup: Setup) -> None:
    gate = setup.user / "gate"
    daemon = Daemon(setup.clone)
    try:
        daemon.start()
        setup.user_commit("tasks/pushed.md", "---\n---\n# pushed\n\n```sh\necho from origin\n```\n")
        setup.user_commit("tasks/long.md", f"---\n---\n# long\n\n```sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n```\n")
        assert taskrun(setup.clone, "trigger").returncode == 0
        wait_status(setup.clone, "pushed", "COMPLETED")
        wait_status(setup.clone, "long", "RUNNING")
        git(setup.user, "rm", "--quiet", "tasks/long.md")
        git(setup.user, "commit", "--quiet", "-m", "drop long")
        git(setup.user, "pull", "--quiet", "--rebase", "origin", "main")
        git(setup.user, "push", "--quiet", "origin", "HEAD:main")
        assert taskrun(setup.clone, "trigger").returncode == 0
        wait_status(setup.clone, "long", "CANCELLED")
        wait_until(lambda: "runs/pushed/status.json" in setup.origin_files(), 30, "the records on origin")
    finally:
        gate.touch()
        daemon.stop()


@pytest.mark.slow
def test_a_diverged_clone_is_shown_in_status_and_starts_no_new_run(setup: Setup) -> None:
    (setup.clone / "local.txt").write_text("local\n")
    git(setup.clone, "add", "-A")
    git(setup.clone, "commit", "--quiet", "-m", "a person's local commit")
    setup.user_commit("other.txt")
    daemon = Daemon(setup.clone)
    try:
        daemon.start()
        assert taskrun(setup.clone, "trigger").returncode == 0
        wait_until(lambda: json.loads(taskrun(setup.clone, "status", "--json").stdout)["git"].get("sync", {})
                   .get("state") == "diverged", 30, "the diverged state in status")
        human = taskrun(setup.clone, "status").stdout
        assert "sync diverged" in human and "no new Run starts" in human
        write_task(setup.clone, "stale", "true")
        wait_status(setup.clone, "stale", "PENDING")
        threading.Event().wait(1.5)  # a bounded look: the Task must stay PENDING, nothing to poll for
        assert json.loads((setup.clone / "runs" / "stale" / "status.json").read_text())["status"] == "PENDING"
    finally:
        daemon.stop()


def test_doctor_says_when_git_push_has_no_remote_to_push_to(repo: Path) -> None:
    set_git_option(repo, "push", "true")
    result = taskrun(repo, "doctor", "--json")
    whats = [f["what"] for f in json.loads(result.stdout)["findings"]]
    assert any("no remote 'origin'" in what for what in whats), whats


def test_remote_commands_run_without_a_terminal_prompt_or_the_callers_git_variables(
        setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = tmp_path / "ssh-env"
    ssh = tmp_path / "fake-ssh"
    ssh.write_text(f"#!/bin/sh\nenv > {seen}\n[ -t 0 ] && echo stdin-is-a-tty >> {seen}\n"
                   f"(exec 3</dev/tty) 2>/dev/null && echo has-a-terminal >> {seen}\nexit 1\n")
    ssh.chmod(0o755)
    git(setup.clone, "remote", "set-url", "origin", "ssh://git.example.invalid/repo.git")
    monkeypatch.setenv("GIT_SSH_COMMAND", str(ssh))
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "some-other-index"))
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "1")
    pusher = setup.pusher()
    pusher.run()
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert "GIT_INDEX_FILE" not in env
    assert "stdin-is-a-tty" not in seen.read_text() and "has-a-terminal" not in seen.read_text()
    assert setup.state.get("push")["ok"] is False


def test_a_submit_commit_in_the_clone_is_rebased_like_a_record_commit(setup: Setup) -> None:
    task = setup.clone / "tasks" / "ci-1.md"
    task.write_text("---\n---\n# ci\n\n```sh\ntrue\n```\n")
    assert Git(setup.clone).commit_paths(["tasks/ci-1.md"], "taskrun: submit ci-1\n\nTask-Id: ci-1\n")
    setup.record("ci-1")
    setup.user_commit("other.txt")
    setup.pusher().run()
    assert setup.state.get("push")["ok"] is True, setup.notices
    assert {"tasks/ci-1.md", "runs/ci-1/status.json", "other.txt"} <= setup.origin_files()


@pytest.mark.slow
def test_a_task_pushed_with_the_files_it_needs_runs_on_the_pushed_commit(setup: Setup) -> None:
    daemon = Daemon(setup.clone)
    try:
        daemon.start()
        for round in range(3):  # the watcher sees the Task file before HEAD moves: each time, not by luck
            (setup.user / f"lib{round}.txt").write_text(f"library {round}\n")
            (setup.user / "tasks" / f"uses{round}.md").write_text(
                f"---\n---\n# uses lib{round}\n\n```sh\ncat lib{round}.txt\ngit status --porcelain\n```\n")
            git(setup.user, "add", "-A")
            git(setup.user, "commit", "--quiet", "-m", f"lib {round} and the Task that needs it")

            def pushed_over_the_daemons_records() -> bool:
                git(setup.user, "pull", "--quiet", "--rebase", "origin", "main")
                return subprocess.run(["git", "-C", str(setup.user), "push", "--quiet", "origin", "HEAD:main"],
                                      capture_output=True).returncode == 0

            wait_until(pushed_over_the_daemons_records, 30, "the user's push")
            pushed = git(setup.user, "rev-parse", "HEAD").strip()
            assert taskrun(setup.clone, "trigger").returncode == 0
            wait_status(setup.clone, f"uses{round}", "COMPLETED")
            base = run_record(setup.clone, f"uses{round}", 1)["base_commit"]
            # The pushed commit, or the daemon's own record commits rebased onto it.
            assert subprocess.run(["git", "-C", str(setup.clone), "merge-base", "--is-ancestor", pushed, base]
                                  ).returncode == 0
            # The Task file is committed in the checkout: the Agent's git sees nothing untracked.
            output = (setup.clone / "runs" / f"uses{round}" / "run-1" / "output.log").read_text()
            assert output == f"library {round}\n"
    finally:
        daemon.stop()


@pytest.mark.slow
def test_a_task_pulled_into_the_daemons_clone_with_its_files_runs_on_the_pulled_commit(setup: Setup) -> None:
    daemon = Daemon(setup.clone)
    try:
        daemon.start()
        write_task(setup.clone, "first", "true")
        wait_status(setup.clone, "first", "COMPLETED")
        # The daemon's records are pushed before the person's commit exists: it has nothing of its own to
        # integrate, so only the person's git moves HEAD (two gits moving one HEAD at once can leave the
        # loser's index half done; the README says so).
        wait_until(lambda: "runs/first/status.json" in setup.origin_files()
                   and git(setup.origin, "rev-parse", "main") == git(setup.clone, "rev-parse", "HEAD"),
                   30, "the daemon's push of the first records")
        git(setup.user, "pull", "--quiet", "origin", "main")
        (setup.user / "lib.txt").write_text("the library\n")
        (setup.user / "tasks" / "uses.md").write_text("---\n---\n# uses lib\n\n```sh\ncat lib.txt\n```\n")
        git(setup.user, "add", "lib.txt", "tasks/uses.md")
        git(setup.user, "commit", "--quiet", "-m", "lib and the Task that needs it")
        git(setup.user, "push", "--quiet", "origin", "HEAD:main")

        refused: list[str] = []

        def pulled_by_hand() -> bool:  # a person's `git pull` in the daemon's clone (no hook installed)
            pull = subprocess.run(["git", "-C", str(setup.clone), "pull", "--quiet", "--rebase", "origin", "main"],
                                  capture_output=True, text=True)
            refused[:] = [pull.stderr]
            return pull.returncode == 0

        try:
            wait_until(pulled_by_hand, 30, "the pull in the daemon's clone")
        except AssertionError as error:
            status = git(setup.clone, "status", "--porcelain", "--untracked-files=all") + git(setup.clone, "reflog", "-n", "12") + daemon.output()[-3000:]
            raise AssertionError(f"{error}; git said: {refused}; status: {status}") from None
        wait_status(setup.clone, "uses", "COMPLETED")
        base = run_record(setup.clone, "uses", 1)["base_commit"]
        assert git(setup.clone, "show", f"{base}:lib.txt") == "the library\n"  # the pull's HEAD, lib and all
        assert (setup.clone / "runs/uses/run-1/output.log").read_text() == "the library\n"
    finally:
        daemon.stop()


def test_pushing_from_a_clone_without_a_commit_says_what_to_do(tmp_path: Path, isolated_git: Path) -> None:
    git(tmp_path, "init", "--quiet", "--bare", str(tmp_path / "origin.git"))
    git(tmp_path, "clone", "--quiet", str(tmp_path / "origin.git"), str(tmp_path / "clone"))
    state = GitState(tmp_path / "state")
    notices: list[str] = []
    Pusher(Git(tmp_path / "clone"), "origin", "taskrun/", state, notices.append).run()
    assert "the clone has no commit yet: commit .taskrun.yaml and tasks/, then `git push origin HEAD`" in notices[-1]
    assert state.get("push")["ok"] is False
