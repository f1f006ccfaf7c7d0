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


def test_the_identity_is_made_from_the_bytes_read_once_and_no_file_beside_it_is_opened(tmp_path: Path) -> None:
    """paramiko's own loader opens the path again and `<path>-cert.pub` (or the key beside a `-cert.pub`)
    unbounded, following links and waiting on a FIFO: none of that may happen."""
    key = tmp_path / "id-cert.pub"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "made")], check=True)
    (tmp_path / "made").rename(key)
    os.mkfifo(tmp_path / "id")  # what paramiko would open for a path ending in -cert.pub
    (tmp_path / "other").write_bytes(b"")
    (tmp_path / "other-cert.pub").symlink_to("/dev/zero")
    assert isinstance(load_identity("w1", key), paramiko.Ed25519Key)
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-N", "", "-f", str(tmp_path / "rsa")], check=True)
    (tmp_path / "rsa-cert.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI not a cert\n")
    assert isinstance(load_identity("w1", tmp_path / "rsa"), paramiko.RSAKey)  # not judged by its neighbour


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ed25519", "rsa-pem"])
def test_every_key_type_ssh_uses_loads(tmp_path: Path, kind: str) -> None:
    extra = ["-m", "PEM"] if kind.endswith("-pem") else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind.split("-")[0], *extra, "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    assert isinstance(load_identity("w1", tmp_path / "k"), paramiko.PKey)


def test_a_link_loop_is_said_to_lead_nowhere(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(WorkerError, match="a symbolic link that leads nowhere"):
        load_identity("w1", tmp_path / "a")


def test_an_identity_ending_in_a_slash_names_no_file_and_a_resolved_one_is_named_as_written(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")], check=True)
    with pytest.raises(WorkerError, match="ends in '/', so it names no file"):
        load_identity("w1", f"{tmp_path / 'hk'}/")  # `ssh -i hk/` refuses it too
    with pytest.raises(WorkerError, match=r"SSH identity: /dev/stdin \(that is, .*\), not a key file"):
        load_identity("w1", "/dev/stdin")
