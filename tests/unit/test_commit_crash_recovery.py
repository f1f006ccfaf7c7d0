"""A daemon SIGKILLed inside a records commit (gitops.Git.commit_paths, at its crash points): the next daemon
knows the commit on HEAD for its own, and puts HEAD's records back into the user's index (gitflow/landing.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from taskrunner.gitflow import landing
from taskrunner.gitops import Git
from taskrunner.records import Records
from tests.conftest import git

_COMMIT = """
import sys
from pathlib import Path
from taskrunner.gitops import Git
Git(Path(sys.argv[1])).commit_paths(["runs/t/status.json"], "taskrun: t COMPLETED\\n")
"""


def _task_record(root: Path) -> None:
    Records(root).save_task({"version": 1, "task_id": "t", "file": "tasks/t.md", "title": "t", "status": "COMPLETED",
                             "revision": "r", "runs": []})


def _commit_killed_at(root: Path, point: str, tmp_path: Path) -> None:
    env = dict(os.environ, TASKRUN_CRASH_AT=point, TASKRUN_CRASH_MARK=str(tmp_path / "mark"))
    done = subprocess.run([sys.executable, "-c", _COMMIT, str(root)], env=env, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / "mark").read_text().startswith(point)


def test_a_commit_killed_right_after_head_moved_is_known_as_the_daemons_own(repo: Path, tmp_path: Path) -> None:
    _task_record(repo)
    before = git(repo, "rev-parse", "HEAD").strip()

    _commit_killed_at(repo, "daemon.head_moved", tmp_path)

    head = git(repo, "rev-parse", "HEAD").strip()
    assert head != before and head in Git(repo).own_commits()


def test_records_head_holds_but_the_index_lacks_are_put_back_into_the_index(repo: Path, tmp_path: Path) -> None:
    _task_record(repo)
    _commit_killed_at(repo, "daemon.head_moved", tmp_path)
    assert git(repo, "status", "--porcelain", "--", "runs").startswith("D  runs/t/status.json")
    restarted = Git(repo)

    items = landing.unrecorded(restarted, Records(repo))

    assert items == []  # nothing to commit: HEAD holds the record
    assert restarted.refresh_index()
    assert git(repo, "status", "--porcelain", "--", "runs") == ""


def test_a_users_staged_change_elsewhere_is_not_touched(repo: Path, tmp_path: Path) -> None:
    _task_record(repo)
    (repo / "README.md").write_text("staged by the user\n")
    git(repo, "add", "README.md")
    _commit_killed_at(repo, "daemon.head_moved", tmp_path)
    restarted = Git(repo)

    landing.unrecorded(restarted, Records(repo))
    restarted.refresh_index()

    assert git(repo, "diff", "--cached", "--name-only") == "README.md\n"
