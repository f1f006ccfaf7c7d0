"""An ssh Worker's identity that is no usable private key is said in words: what the file holds and what to do
(links/ssh.py load_identity), never a library's own text, never waiting on a FIFO."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import paramiko
import pytest

from taskrunner.errors import WorkerError
from taskrunner.links.ssh import load_identity


def _make(path: Path, kind: str) -> None:
    if kind == "public":
        path.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample w\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 2)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        path.write_bytes(b"A" * (2 << 20))
    elif kind == "passphrase":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret words", "-f", str(path)], check=True)


@pytest.mark.parametrize(("kind", "said"), [
    ("public", "holds an OpenSSH public key line, not a private key"),
    ("empty", "holds nothing (the file is empty)"),
    ("binary", "holds 512 bytes of binary data"),
    ("passphrase", "protected by a passphrase"),
    ("fifo", "is a FIFO, not a regular file"),
    ("directory", "is a directory, not a regular file"),
    ("huge", "is larger than a key file can be"),
    ("missing", "No such file or directory"),
])
def test_an_identity_that_is_no_private_key_is_said_in_words_with_the_fix(tmp_path: Path, kind: str,
                                                                         said: str) -> None:
    identity = tmp_path / "id_w1"
    _make(identity, kind)
    with pytest.raises(WorkerError) as caught:
        load_identity("w1", identity)
    message = str(caught.value)
    assert said in message and "Worker 'w1'" in message
    assert "point workers.w1.identity in .taskrun.yaml at an SSH private key" in message
    assert "paramiko" not in message.lower() and "expected" not in message


def test_the_daemons_own_key_gets_its_own_fix_and_a_link_to_a_key_is_followed_as_ssh_does(tmp_path: Path) -> None:
    own = tmp_path / "ssh_key"
    own.write_bytes(b"")
    with pytest.raises(WorkerError, match="run `taskrun worker key`"):
        load_identity("w1", own, configured=False)
    key = tmp_path / "real_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "id_link").symlink_to(key)
    assert isinstance(load_identity("w1", tmp_path / "id_link"), paramiko.Ed25519Key)
