"""`taskrun doctor` reports a key file others may write (or read) or that another user owns, with the fix.

Whoever can write `.git/taskrun/record.key` (or read it) can seal records
the daemon believes it wrote; whoever can write a signing key can replace it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from taskrunner import doctor
from taskrunner.keys import KEYS_DIR, RECORD_KEY_FILE, Keyring
from taskrunner.recordkey import KeyFileError, record_key


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clone's .git/taskrun/ with its keys, as `taskrun init` and a first Run leave it."""
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    monkeypatch.setattr(doctor, "_tracked_keys", lambda _root: [])  # no git needed: the modes are the subject
    monkeypatch.setattr(doctor.gitops, "state_dir", lambda _root: root / ".git" / "taskrun")
    path = root / ".git" / "taskrun"
    path.mkdir(mode=0o755)
    Keyring.ensure(path, 0.0)
    record_key(path, create=True)
    return path


def _findings(state: Path) -> list[doctor.Finding]:
    return doctor.key_findings(state.parent.parent, None)


def test_keys_as_made_give_no_finding(state: Path) -> None:
    assert _findings(state) == []


@pytest.mark.parametrize(("mode", "access", "why"), [
    (0o666, "read and written by its group and every user", "whoever can write it can seal records"),
    (0o602, "written by every user", "whoever can write it can seal records"),
    (0o620, "written by its group", "whoever can write it can seal records"),
    (0o640, "read by its group", "whoever can read it can seal records"),
    (0o604, "read by every user", "whoever can read it can seal records"),
])
def test_a_record_key_others_may_write_or_read_is_reported_with_the_fix(state: Path, mode: int, access: str,
                                                                       why: str) -> None:
    key = state / RECORD_KEY_FILE
    key.chmod(mode)
    [finding] = _findings(state)
    assert finding.level == "error"
    assert finding.what == (f"private key {key} can be {access} (mode {mode:04o}): {why} that this daemon takes "
                            "for its own")
    assert finding.fix == f"chmod 600 {key}"


@pytest.mark.parametrize(("mode", "what"), [
    (0o622, "can be written by its group and every user (mode 0622): whoever can write it can replace the key"),
    (0o644, "can be read by its group and every user (mode 0644): it is no longer private to the user taskrun "
            "runs as"),
])
def test_a_signing_key_others_may_write_or_read_is_reported_with_the_fix(state: Path, mode: int, what: str) -> None:
    pem = state / KEYS_DIR / "1.pem"
    pem.chmod(mode)
    [finding] = _findings(state)
    assert finding.what == f"private key {pem} {what}"
    assert finding.fix == f"chmod 600 {pem}"


def test_a_record_key_another_user_owns_is_reported(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon's user is made another one than the files' owner: the same as the files being someone else's.
    owner = (state / RECORD_KEY_FILE).stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    found = {f.what.split(" belongs to ")[0]: f for f in _findings(state)}
    key = state / RECORD_KEY_FILE
    finding = found[f"private key {key}"]
    assert finding.what.endswith("the user taskrun runs as: that user can seal records that this daemon takes "
                                 "for its own")
    assert f"chown {owner + 4242} {key} && chmod 600 {key}" in finding.fix
    assert str(state) in found and str(state / KEYS_DIR) in found  # the directories too
    assert f"private key {state / KEYS_DIR / '1.pem'}" in found


def test_a_key_directory_every_user_may_write_in_is_reported(state: Path) -> None:
    (state / KEYS_DIR).chmod(0o777)
    state.chmod(0o775)  # group write alone (umask 002, a group of one's own) is no finding
    [finding] = _findings(state)
    assert finding.what == (f"{state / KEYS_DIR} can be written by its group and every user (mode 0777): whoever "
                            "can write in it can replace the keys it holds (the record key, the signing keys)")
    assert finding.fix == f"chmod go-w {state / KEYS_DIR}"


def test_a_hard_link_under_runs_to_a_key_is_reported(tmp_path: Path, state: Path) -> None:
    """`ln .git/taskrun/record.key runs/x/run-1/output.log`: a person's `git add -A` would commit the key."""
    root = state.parent.parent
    subprocess.run(["git", "init", "-q", str(root)], check=True, capture_output=True)
    run = root / "runs" / "x" / "run-1"
    run.mkdir(parents=True)
    os.link(state / RECORD_KEY_FILE, run / "output.log")
    (run / "status.json").write_text("{}\n")  # a file of its own: no finding
    found = doctor.record_findings(root)
    assert [f.what.split(" is ")[0] for f in found] == ["runs/x/run-1/output.log"]
    assert "a hard link" in found[0].what and "rm -f -- runs/x/run-1/output.log" in found[0].fix


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_keys_path_that_is_no_directory_is_named_when_loaded_or_made(tmp_path: Path, kind: str) -> None:
    """.git/taskrun/keys as a regular file or a link to a directory elsewhere: never written through or
    followed; both the start (`ensure`) and `load` say what is there and what to do (no traceback)."""
    state = tmp_path / ".git" / "taskrun"
    state.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    Keyring.ensure(elsewhere, 0.0)
    if kind == "file":
        (state / KEYS_DIR).write_text("x\n")
    else:
        (state / KEYS_DIR).symlink_to(elsewhere / KEYS_DIR)
    what = "a regular file" if kind == "file" else "a symbolic link"
    for attempt in (lambda: Keyring.ensure(state, 0.0), lambda: Keyring.load(state)):
        with pytest.raises(KeyFileError, match=f"should be the directory of the signing keys, but is {what}"):
            attempt()
    assert sorted(os.listdir(elsewhere / KEYS_DIR)) == ["1.pem", "keyring.json"]  # nothing written there


def test_an_identity_that_is_a_public_key_is_named_as_such_not_given_chmod_advice(state: Path, tmp_path: Path) -> None:
    from taskrunner.config import parse_config

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    (tmp_path / "k.pub").chmod(0o644)
    pin = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    config = parse_config(f"workers: {{w1: {{transport: ssh, host: 127.0.0.1, identity: {tmp_path / 'k.pub'}, "
                          f'host_key: "{pin}"}}}}\n', ".taskrun.yaml")
    (found,) = [f for f in doctor.key_findings(state.parent.parent, config) if "k.pub" in f.what]
    assert found.level == "error" and "holds an OpenSSH public key line, not a private key" in found.what
    assert "chmod" not in found.fix and "point workers.w1.identity" in found.fix
