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
    assert "Traceback" not in done.stderr and "during shutdown" not in done.stdout + done.stderr


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


@pytest.mark.parametrize("kind", [*KINDS, "garbage", "sparse giant"])
def test_a_repo_id_that_is_no_file_of_ours_is_replaced_and_never_fails_a_run(tmp_path: Path, victim: Path,
                                                                             kind: str) -> None:
    # It only names the repository in Workers' caches: before, every Run failed until someone removed it.
    path = tmp_path / "state" / "repo-id"
    if kind == "garbage":
        path.parent.mkdir(parents=True)
        path.write_text("not an id\n")
    elif kind == "sparse giant":
        path.parent.mkdir(parents=True)
        with open(path, "wb") as handle:
            handle.truncate(1 << 30)
    else:
        make(path, kind, victim)
    made = repo_id(tmp_path / "state")
    assert len(made) == 32 and int(made, 16) >= 0
    if kind != "directory":  # replaced on disk: the next start finds the same id
        assert path.is_file() and not path.is_symlink() and repo_id(tmp_path / "state") == made
    assert victim.read_text() == "precious\n"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".repo-id")] == []


def test_a_repo_id_that_cannot_be_written_serves_from_memory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o500)  # as a full disk would: no file can be made there
    try:
        if os.access(state, os.W_OK):  # root ignores the mode: a file in the way of its temp file instead
            state.chmod(0o700)
            (state / f".repo-id.{os.getpid()}").mkdir()
        made = repo_id(state)
        assert len(made) == 32 and not (state / "repo-id").exists()
    finally:
        state.chmod(0o700)


def test_a_directory_as_the_record_key_is_a_damaged_key_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / RECORD_KEY_FILE).mkdir()
    with pytest.raises(KeyringError, match="damaged"):
        record_key(tmp_path, create=False)


@pytest.mark.parametrize("kind", [*KINDS, "sparse giant", "short"])
def test_a_daemon_with_an_unusable_record_key_refuses_to_start_and_says_what_to_do(
        repo: Path, victim: Path, kind: str) -> None:
    # Without the key no record can be written: before, `up --once` ran the Task and then waited for good.
    key = repo / ".git" / "taskrun" / RECORD_KEY_FILE
    key.unlink(missing_ok=True)
    if kind == "sparse giant":
        with open(key, "wb") as handle:
            handle.truncate(1 << 30)
    elif kind == "short":
        key.write_bytes(b"x" * 31)
    else:
        make(key, kind, victim)
    (repo / "tasks" / "t.md").write_text("# t\n\n```sh\necho ran > ran.txt\n```\n")
    done = taskrun(repo, "up", "--once", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "record key" in done.stderr and ("restore" in done.stderr or "remove it" in done.stderr), done.stderr
    assert "Traceback" not in done.stderr and "during shutdown" not in done.stderr + done.stdout
    assert not (repo / "runs" / "t").exists()  # nothing ran
    assert victim.read_text() == "precious\n"
    doctor = taskrun(repo, "doctor", timeout=60)
    if kind in ("link", "fifo", "directory", "link to /dev/zero"):
        assert f"private key {key} is not a regular file" in doctor.stdout + doctor.stderr


@pytest.mark.parametrize("what", ["keyring.json", "1.pem"])
@pytest.mark.parametrize("kind", [*KINDS, "sparse giant"])
def test_signing_keys_that_are_no_files_of_ours_are_refused_clearly_and_never_followed(
        tmp_path: Path, victim: Path, what: str, kind: str) -> None:
    from taskrunner.keys import KEYS_DIR, Keyring

    Keyring.ensure(tmp_path, 0.0)
    path = tmp_path / KEYS_DIR / what
    path.unlink()
    if kind == "sparse giant":
        with open(path, "wb") as handle:
            handle.truncate(1 << 30)
    else:
        make(path, kind, victim)
    victim.chmod(0o644)
    with pytest.raises(KeyringError) as raised:
        Keyring.load(tmp_path)
    assert "OSError(" not in str(raised.value) and str(path) in str(raised.value), raised.value
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o644  # not chmodded


def test_a_keyring_naming_a_file_outside_the_keys_directory_is_refused(tmp_path: Path, victim: Path) -> None:
    import json

    from taskrunner.keys import KEYRING_FILE, KEYS_DIR, Keyring

    Keyring.ensure(tmp_path, 0.0)
    ring = tmp_path / KEYS_DIR / KEYRING_FILE
    data = json.loads(ring.read_text())
    data["keys"][0]["file"] = os.path.relpath(victim, ring.parent)
    ring.write_text(json.dumps(data))
    victim.chmod(0o644)
    with pytest.raises(KeyringError, match="is not a key file name of ours"):
        Keyring.load(tmp_path)
    assert victim.stat().st_mode & 0o777 == 0o644


def test_json_nested_too_deeply_is_a_damaged_file_not_a_traceback(tmp_path: Path, repo: Path) -> None:
    # `[[[…]]]` past Python's recursion limit: a record anyone can push, and the keyring, raised RecursionError.
    from taskrunner.errors import RecordError
    from taskrunner.keys import KEYRING_FILE, KEYS_DIR, Keyring
    from taskrunner.records import Records

    nested = "[" * 100_000 + "]" * 100_000
    Keyring.ensure(tmp_path, 0.0)
    (tmp_path / KEYS_DIR / KEYRING_FILE).write_text(nested)
    with pytest.raises(KeyringError, match="nested too deeply"):
        Keyring.load(tmp_path)
    record = repo / "runs" / "t" / "status.json"
    record.parent.mkdir(parents=True)
    record.write_text(nested)
    with pytest.raises(RecordError, match="nested too deeply"):
        Records(repo).load_task("t")
    (repo / "tasks" / "t.md").write_text("# t\n\n```sh\ntrue\n```\n")
    done = taskrun(repo, "status", timeout=60)
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stdout + done.stderr, done.stderr
