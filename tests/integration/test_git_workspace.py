"""The repository to the Worker and changes back as commits: the real daemon, over the local Worker and over
real sshd Workers (README "The repository on the Worker", "Changes come back as commits")."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner import keys
from tests.conftest import Daemon, git, run_record, taskrun, wait_status, wait_until, write_task, local_worker_home
from tests.sshd import SshdHost, start_sshd

pytestmark = pytest.mark.slow

SECRET = "change-secret-0123456789"


@dataclass
class Worker:
    """The repository's only Worker: its name in .taskrun.yaml and its home on this machine."""

    name: str
    home: Path
    host: SshdHost | None = None


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.sshd)])
def worker(request: pytest.FixtureRequest, repo: Path, tmp_path: Path) -> Iterator[Worker]:
    """The embedded local Worker, or one real sshd host (then the only Worker); its Agent knows API_TOKEN."""
    if request.param == "local":
        made = Worker("local", local_worker_home(repo))
        made.home.mkdir(parents=True, exist_ok=True)
    else:
        _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
        host = start_sshd(tmp_path / "host", public)
        token = ("--token", host.token) if host.token else ()
        added = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", str(host.port),
                        "--fingerprint", host.fingerprint, "--slots", "2", *token)
        assert added.returncode == 0, added.stdout + added.stderr
        assert taskrun(repo, "worker", "remove", "local").returncode == 0
        made = Worker("w1", host.home, host)
    (made.home / "secrets.env").write_text(f"API_TOKEN={SECRET}\n")
    config = repo / ".taskrun.yaml"
    text = config.read_text()
    assert "  shell:\n    preset: shell\n" in text
    config.write_text(text.replace("  shell:\n    preset: shell\n",
                                   "  shell:\n    preset: shell\n    env: [API_TOKEN]\n", 1))
    git(repo, "commit", "--quiet", "-am", "the Worker")
    yield made
    if made.host is not None:
        made.host.stop()
    for pid_file in made.home.glob("runs/*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), 9)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def _summary(root: Path, task_id: str, number: int = 1) -> str:
    return (root / "runs" / task_id / f"run-{number}" / "summary.md").read_text()


def _output(root: Path, task_id: str, number: int = 1) -> str:
    return (root / "runs" / task_id / f"run-{number}" / "output.log").read_text()


def _commit_file(root: Path, rel: str, text: str, message: str = "change") -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    git(root, "add", rel)
    git(root, "commit", "--quiet", "-m", message)
    return git(root, "rev-parse", "HEAD").strip()


def test_an_agents_change_comes_back_as_a_commit_on_its_result_branch(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    _commit_file(root, ".gitignore", "*.tmp\n")
    base = _commit_file(root, "src/app.txt", "version 1\n", "app")
    daemon.start()
    write_task(root, "edit-app", 'sed -i s/1/2/ src/app.txt\necho new > src/added.txt\necho junk > x.tmp\n'
               'git status --short > ../git-status.txt || true\ngit log --format=%H -1\ngit diff --stat',
               title="Bump the app version")

    wait_status(root, "edit-app", "COMPLETED")
    record = run_record(root, "edit-app", 1)
    assert record is not None
    commit = record["result_commit"]
    assert record["result_branch"] == "taskrun/edit-app" and record["base_commit"] == base
    assert git(root, "rev-parse", "refs/heads/taskrun/edit-app").strip() == commit
    assert git(root, "rev-parse", f"refs/taskrun/runs/{record['run_id']}").strip() == commit
    assert git(root, "rev-parse", f"{commit}^").strip() == base
    assert git(root, "show", f"{commit}:src/app.txt") == "version 2\n"
    assert git(root, "show", f"{commit}:src/added.txt") == "new\n"
    changed = set(git(root, "diff", "--name-only", base, commit).split())
    assert changed == {"src/app.txt", "src/added.txt"}  # no ignored file, no Task file, no records
    message = git(root, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%B", commit)
    assert message.startswith("taskrun <taskrun@localhost>|taskrun <taskrun@localhost>|Bump the app version\n")
    for trailer in ("Task-Id: edit-app", f"Run-Id: {record['run_id']}", f"Worker: {worker.name}", "Agent: shell"):
        assert trailer in message
    # The Agent saw a normal git working tree: its log names the base, its diff the change.
    output = _output(root, "edit-app")
    assert base in output and "src/app.txt" in output
    summary = _summary(root, "edit-app")
    assert record["summary"] == "runs/edit-app/run-1/summary.md"
    assert "# Bump the app version" in summary and "COMPLETED" in summary and "src/app.txt" in summary
    assert "runs/edit-app/run-1/output.log" in summary
    wait_until(lambda: "runs/edit-app/run-1/summary.md" in git(root, "ls-tree", "-r", "--name-only", "HEAD", "runs"),
               what="summary.md to be committed with the records")
    assert git(root, "fsck", "--no-progress", "--no-dangling").strip() == ""


def test_a_run_that_changes_nothing_makes_no_branch(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    daemon.start()
    write_task(root, "look", "git status --porcelain\ncat README.md\n"
               'objects=$(cat .git/objects/info/alternates)\n'
               '{ touch "$objects/planted" 2>/dev/null && echo WROTE-CACHE; } || true')

    wait_status(root, "look", "COMPLETED")
    record = run_record(root, "look", 1)
    assert record is not None and record["result_commit"] is None and record["result_branch"] is None
    # A clean checkout: git status shows only the Task file, laid over it (it was never committed).
    # ... and the Worker's cache, which its .git borrows objects from, is read-only to it.
    assert _output(root, "look") == "?? tasks/look.md\na project\n"
    assert not list(worker.home.glob("repos/*.git/objects/planted"))
    assert git(root, "branch", "--list", "taskrun/*").strip() == ""
    assert "none (the workspace did not differ" in _summary(root, "look")


def test_a_second_run_after_a_one_file_change_sends_only_the_change(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    for i in range(200):
        (root / "data" / f"f{i}.txt").parent.mkdir(exist_ok=True)
        (root / "data" / f"f{i}.txt").write_text(os.urandom(2048).hex())  # incompressible
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "data")
    daemon.start()
    write_task(root, "first", "cat data/f7.txt | wc -l")
    wait_status(root, "first", "COMPLETED")
    daemon.stop()  # a commit of our own now would race the daemon's record commits (index.lock)
    _commit_file(root, "data/f7.txt", "changed\n", "one file")
    daemon.start()
    write_task(root, "second", "cat data/f7.txt")
    wait_status(root, "second", "COMPLETED")

    first = json.loads((root / "runs/first/run-1/manifest.json").read_text())["repo"]
    second = json.loads((root / "runs/second/run-1/manifest.json").read_text())["repo"]
    assert first["prerequisites"] == [] and first["size"] > 400_000
    # The change, and the commits of the first Run's records: a few kilobytes.
    assert second["prerequisites"] == [first["base"]] and 0 < second["size"] < first["size"] / 20
    assert _output(root, "second") == "changed\n"


def test_a_wiped_worker_cache_gets_a_full_transfer_and_the_run_completes(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    daemon.start()
    write_task(root, "one", "true")
    wait_status(root, "one", "COMPLETED")
    caches = list(worker.home.glob("repos/*.git"))
    assert len(caches) == 1
    shutil.rmtree(caches[0])
    # The control plane believes the Worker holds the base: it sends no git data, the Worker says it lacks it.
    write_task(root, "two", "cat README.md")

    wait_status(root, "two", "COMPLETED", "FAILED")
    assert _output(root, "two") == "a project\n"
    record = run_record(root, "two", 1)
    assert record is not None and record["status"] == "COMPLETED"
    manifest = json.loads((root / "runs/two/run-1/manifest.json").read_text())["repo"]
    assert manifest["prerequisites"] == []  # the resent, whole history
    assert "sent again with the whole history" in daemon.output()


def test_a_persons_commit_on_the_result_branch_is_not_overwritten(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    daemon.start()
    git(root, "branch", "taskrun/mine")
    person = git(root, "rev-parse", "taskrun/mine").strip()
    write_task(root, "mine", "echo agent > agent.txt")

    wait_status(root, "mine", "COMPLETED")
    record = run_record(root, "mine", 1)
    assert record is not None and record["result_branch"] is None
    assert "someone pushed to it" in record["result_note"]
    assert git(root, "rev-parse", "taskrun/mine").strip() == person
    assert git(root, "rev-parse", f"refs/taskrun/runs/{record['run_id']}").strip() == record["result_commit"]


def test_a_second_run_of_the_task_moves_its_own_result_branch(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    daemon.start()
    write_task(root, "again", "echo one > out.txt")
    wait_status(root, "again", "COMPLETED")
    write_task(root, "again", "echo two > out.txt")
    record = wait_until(lambda: (r := run_record(root, "again", 2)) and r["status"] == "COMPLETED" and r,
                        what="the second Run to complete")
    assert record["result_branch"] == "taskrun/again" and record["result_note"] is None
    assert git(root, "show", "taskrun/again:out.txt") == "two\n"


def test_a_change_holding_a_secret_value_is_refused_and_never_committed(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    daemon.start()
    write_task(root, "leak", 'echo "token=$API_TOKEN" > leaked.txt', front="retries: 0\n")

    wait_status(root, "leak", "FAILED")
    record = run_record(root, "leak", 1)
    assert record is not None and record["status"] == "FAILED" and "secrets" in record["error"]
    assert record["result_commit"] is None and record["result_branch"] is None
    assert git(root, "branch", "--list", "taskrun/*").strip() == ""
    everything = git(root, "log", "--all", "-p", "--format=%B")
    assert SECRET not in everything


def test_runs_after_record_commits_keep_their_base_and_a_users_commit_moves_it(daemon: Daemon, worker: Worker) -> None:
    root = daemon.root
    daemon.start()
    write_task(root, "one", "true")
    wait_status(root, "one", "COMPLETED")
    wait_until(lambda: "runs/one/run-1/status.json" in git(root, "ls-tree", "-r", "--name-only", "HEAD"),
               what="the first Run's records committed")
    write_task(root, "two", "true")
    wait_status(root, "two", "COMPLETED")
    first, second = run_record(root, "one", 1), run_record(root, "two", 1)
    # Only records were committed in between: the workspace would be the same, so the Worker gets nothing new.
    assert second["base_commit"] == first["base_commit"]
    second_repo = json.loads((root / "runs/two/run-1/manifest.json").read_text())["repo"]
    assert second_repo["size"] == 0
    daemon.stop()
    moved = _commit_file(root, "notes.txt", "a user's change\n")
    daemon.start()
    write_task(root, "three", "cat notes.txt")
    wait_status(root, "three", "COMPLETED")
    assert run_record(root, "three", 1)["base_commit"] == moved
    assert _output(root, "three") == "a user's change\n"
