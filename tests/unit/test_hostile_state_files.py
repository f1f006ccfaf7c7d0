"""Files under .git/taskrun/ that a local user made into links, FIFOs, directories or giants: never read or
written through, never waited on, never read whole; a clear message, or the file made again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from taskrunner import prune_journal
from taskrunner.cli.main import UsageError
from taskrunner.cli.prune import _daemon_lock
from taskrunner.errors import GitError, KeyringError
from taskrunner.gitflow.transfer import repo_id
from taskrunner.gitops import OWN_COMMITS, OWN_COMMITS_MAX_BYTES, Git
from taskrunner.recordkey import RECORD_KEY_FILE, record_key
from tests.conftest import taskrun

KINDS = ["link", "fifo", "directory", "link to /dev/zero"]


def make(path: Path, kind: str, victim: Path) -> None:
    """Put `kind` at `path`; a link points at `victim` (a file that must stay as it is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "link":
        path.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")


@pytest.fixture()
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_the_daemon_lock_is_never_written_through(repo: Path, victim: Path, kind: str) -> None:
    lock = repo / ".git" / "taskrun" / "daemon.lock"
    lock.unlink(missing_ok=True)
    make(lock, kind, victim)
    done = taskrun(repo, "up", "--once", timeout=60)
    assert done.returncode != 0 and "cannot take the daemon's lock" in done.stderr and "remove it" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(UsageError, match="cannot take the daemon's lock"):
        with _daemon_lock(lock.parent, repo):
            pass
    assert victim.read_text() == "precious\n"


def test_a_directory_as_daemon_json_is_said_not_a_traceback(repo: Path) -> None:
    info = repo / ".git" / "taskrun" / "daemon.json"
    info.unlink(missing_ok=True)
    info.mkdir(parents=True)
    done = taskrun(repo, "up", "--once", timeout=60)
    assert done.returncode != 0 and "cannot write" in done.stderr and "remove it" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kind", [*KINDS, "giant"])
def test_a_prune_journal_that_is_no_file_of_ours_is_ignored_with_a_notice(tmp_path: Path, victim: Path,
                                                                         kind: str) -> None:
    journal = tmp_path / "state" / "prune-1.json"
    if kind == "giant":
        journal.parent.mkdir()
        with open(journal, "wb") as handle:
            handle.truncate(20 << 30)  # sparse: 20 GiB that nothing may read whole
    else:
        make(journal, kind, victim)
    said: list[str] = []
    assert prune_journal.pending(journal.parent, said.append) == []
    assert len(said) == 1 and "remove it" in said[0]


@pytest.mark.parametrize("kind", [*KINDS, "giant"])
def test_own_commits_in_any_form_is_never_read_whole_nor_kills_the_commit(repo: Path, victim: Path,
                                                                         kind: str) -> None:
    path = repo / ".git" / "taskrun" / OWN_COMMITS
    if kind == "giant":
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(20 << 30)
    else:
        make(path, kind, victim)
    repository = Git(repo)
    assert repository.own_commits() == set()
    if kind == "directory":
        with pytest.raises(GitError, match="remove it"):
            repository.remember_own(["a" * 40])
        return
    repository.remember_own(["a" * 40])
    assert "a" * 40 in repository.own_commits() and path.stat().st_size <= OWN_COMMITS_MAX_BYTES
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", KINDS)
def test_a_repo_id_that_is_no_file_of_ours_is_refused_with_the_fix(tmp_path: Path, victim: Path, kind: str) -> None:
    make(tmp_path / "state" / "repo-id", kind, victim)
    with pytest.raises(GitError, match="remove it"):
        repo_id(tmp_path / "state")
    assert victim.read_text() == "precious\n"


def test_a_directory_as_the_record_key_is_a_damaged_key_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / RECORD_KEY_FILE).mkdir()
    with pytest.raises(KeyringError, match="damaged"):
        record_key(tmp_path, create=False)
