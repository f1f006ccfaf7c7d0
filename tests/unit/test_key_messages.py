"""A key file of the wrong shape is refused in words: the file, what it holds instead, and what to do.

Before, a signing key that was an RSA key, a certificate or JSON gave
`cannot load the signing keys: SignatureRejected('…')` or `ValueError('Could
not deserialize…')`, and a damaged SSH key a traceback.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
from pathlib import Path
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from taskrunner.errors import KeyringError
from taskrunner.keys import KEYRING_FILE, KEYS_DIR, SSH_KEY_FILE, KeyFileError, Keyring, ensure_ssh_key
from taskrunner.recordkey import RECORD_KEY_FILE, record_key
from tests.conftest import taskrun

#: What a message must not show: exception reprs and class names, bytes reprs, library internals.
INTERNALS = re.compile(r"\w+(Error|Exception|Rejected)\(|<class |Traceback|\bb'|\\x[0-9a-f]{2}|cryptography|"
                       r"deserialize|Unable to load|MalformedFraming|KeyError|TypeError|ValueError")
NONE = ser.NoEncryption()


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taskrun test")])
    start = datetime.datetime(2024, 1, 1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(ser.Encoding.PEM)


def _ed25519() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


#: name -> (the file's bytes, words the message must say about them).
SHAPES: dict[str, tuple[Callable[[], bytes], str]] = {
    "rsa pkcs8": (lambda: rsa.generate_private_key(65537, 2048).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, NONE), "an RSA private key"),
    "rsa traditional": (lambda: rsa.generate_private_key(65537, 2048).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, NONE), "an RSA private key"),
    "ec": (lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, NONE), "an EC (ECDSA) private key"),
    "certificate": (_certificate, "an X.509 certificate, not a key"),
    "json": (lambda: json.dumps({"keys": []}).encode(), "JSON text, not a key"),
    "empty": (lambda: b"", "nothing (the file is empty)"),
    "binary garbage": (lambda: bytes(range(256)) * 2, "512 bytes of binary data"),
    "public key pem": (lambda: _ed25519().public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo), "an Ed25519 public key: the public half only"),
    "ssh public line": (lambda: _ed25519().public_key().public_bytes(
        ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH), "an OpenSSH public key line, not a private key"),
    "passphrase": (lambda: _ed25519().private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw")),
        "a private key protected by a passphrase"),
    "damaged pem": (lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                    "a damaged or unsupported private key"),
}


def _plain(message: str) -> None:
    assert not INTERNALS.search(message), message


@pytest.mark.parametrize("shape", [*SHAPES, "openssh private key"])
def test_a_signing_key_of_the_wrong_shape_says_what_it_holds_and_what_to_do(tmp_path: Path, shape: str) -> None:
    Keyring.ensure(tmp_path, 0.0)
    pem = tmp_path / KEYS_DIR / "1.pem"
    if shape == "openssh private key":
        data, words = (_ed25519().private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, NONE),
                       "an Ed25519 private key in OpenSSH's format")
    else:
        make, words = SHAPES[shape]
        data = make()
    pem.write_bytes(data)
    with pytest.raises(KeyFileError) as raised:
        Keyring.load(tmp_path)
    message = str(raised.value)
    _plain(message)
    assert message.startswith(f"{pem} should hold an Ed25519 private key (PEM), but holds {words}"), message
    assert raised.value.what in message and raised.value.fix in message
    assert f"restore {pem} from a backup" in raised.value.fix and "`taskrun init`" in raised.value.fix
    assert "`taskrun-worker trust --reset`" in raised.value.fix


KEYRINGS: dict[str, tuple[bytes, str]] = {
    "a json list": (b"[1, 2]", "holds JSON that is a list, not an object"),
    "no keys list": (b'{"keys": 5}', "holds a JSON object without a 'keys' list"),
    "an entry that is no object": (b'{"keys": ["1.pem"]}', "key 1 of the 'keys' list is a string, not an object"),
    "no file name": (b'{"keys": [{"key_id": "k", "created_at": 1}]}', "null is not a key file name of ours"),
    "no key id": (b'{"keys": [{"file": "1.pem", "created_at": 1}]}', "has null as its key_id, not a key id"),
    "created_at a string": (b'{"keys": [{"file": "1.pem", "key_id": "k", "created_at": "yesterday"}]}',
                            "has 'yesterday' as its created_at, not a time"),
    "created_at too large": (b'{"keys": [{"file": "1.pem", "key_id": "k", "created_at": 1' + b"0" * 400 + b"}]}",
                             "has a number as its created_at, not a time"),
    "retire_at a list": (b'{"keys": [{"file": "1.pem", "key_id": "k", "created_at": 1, "retire_at": []}]}',
                         "has a list as its retire_at, not a time or null"),
    "not json": (b"keys: [1.pem]\n", "holds text that is not JSON"),
    "broken json": (b'{"keys": [', "holds JSON that cannot be read (Expecting value: line 1 column 11"),
    "empty": (b"", "holds nothing (the file is empty)"),
    "binary garbage": (bytes(range(256)), "holds 256 bytes of binary data"),
}


@pytest.mark.parametrize("shape", KEYRINGS)
def test_a_keyring_of_the_wrong_shape_says_what_it_holds_and_what_to_do(tmp_path: Path, shape: str) -> None:
    Keyring.ensure(tmp_path, 0.0)
    path = tmp_path / KEYS_DIR / KEYRING_FILE
    data, words = KEYRINGS[shape]
    path.write_bytes(data)
    with pytest.raises(KeyFileError) as raised:
        Keyring.load(tmp_path)
    message = str(raised.value)
    _plain(message)
    assert message.startswith(str(path)) and words in message, message
    assert f"restore {path} from a backup" in message


def test_a_keyring_holding_a_private_key_says_so(tmp_path: Path) -> None:
    Keyring.ensure(tmp_path, 0.0)
    path = tmp_path / KEYS_DIR / KEYRING_FILE
    path.write_bytes((tmp_path / KEYS_DIR / "1.pem").read_bytes())
    with pytest.raises(KeyFileError, match="should hold the keyring .*, but holds an Ed25519 private key in PEM form"):
        Keyring.load(tmp_path)


def test_a_keyring_with_two_current_keys_says_how_many_and_what_to_do(tmp_path: Path) -> None:
    ring, _ = Keyring.ensure(tmp_path, 0.0)
    ring.rotate(60.0, 0.0)
    path = tmp_path / KEYS_DIR / KEYRING_FILE
    data = json.loads(path.read_text())
    data["keys"][0]["retire_at"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(KeyFileError, match=r"lists 2 current keys \(retire_at null\); exactly one must be: restore"):
        Keyring.load(tmp_path)


def test_a_missing_key_file_the_keyring_lists_is_named_with_the_fix(tmp_path: Path) -> None:
    Keyring.ensure(tmp_path, 0.0)
    (tmp_path / KEYS_DIR / "1.pem").unlink()
    with pytest.raises(KeyFileError) as raised:
        Keyring.load(tmp_path)
    assert raised.value.what == f"{tmp_path / KEYS_DIR / '1.pem'}, a signing key " \
                                f"{tmp_path / KEYS_DIR / KEYRING_FILE} lists, is missing"
    assert "from a backup" in raised.value.fix


@pytest.mark.parametrize("shape", [*SHAPES, "pkcs8 ed25519"])
def test_an_ssh_key_of_the_wrong_shape_says_what_it_holds_and_what_to_do(tmp_path: Path, shape: str) -> None:
    if shape == "pkcs8 ed25519":
        data, words = (_ed25519().private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, NONE),
                       "an Ed25519 private key in PEM form")
    else:
        make, words = SHAPES[shape]
        data = make()
    path = tmp_path / SSH_KEY_FILE
    path.write_bytes(data)
    with pytest.raises(KeyFileError) as raised:
        ensure_ssh_key(tmp_path)
    message = str(raised.value)
    _plain(message)
    assert message.startswith(f"{path} should hold the daemon's SSH private key (OpenSSH format), but holds {words}")
    assert f"restore {path} from a backup" in message and "`taskrun worker key`" in message


@pytest.mark.parametrize("kind", ["link", "fifo", "directory"])
def test_an_ssh_key_that_is_no_regular_file_is_named_and_never_followed(tmp_path: Path, kind: str) -> None:
    path, victim = tmp_path / SSH_KEY_FILE, tmp_path / "victim"
    victim.write_bytes(_ed25519().private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, NONE))
    if kind == "link":
        path.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            ensure_ssh_key(tmp_path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # let the reader go, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading {path} blocked")
    [exc] = outcome
    assert isinstance(exc, KeyFileError), exc
    _plain(str(exc))
    what = {"link": "a symbolic link", "fifo": "a FIFO", "directory": "a directory"}[kind]
    assert f"{path} is {what}, not a regular file" in exc.what
    assert "`taskrun worker key`" in exc.fix


@pytest.mark.parametrize(("shape", "words"), [("empty", "it is empty"), ("short", "it holds 31 bytes"),
                                              ("long", "it holds 4096 bytes"), ("directory", "it is a directory"),
                                              ("fifo", "it is a FIFO")])
def test_a_record_key_of_the_wrong_shape_says_what_it_holds_and_what_to_do(tmp_path: Path, shape: str,
                                                                           words: str) -> None:
    path = tmp_path / RECORD_KEY_FILE
    if shape == "directory":
        path.mkdir()
    elif shape == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes({"empty": b"", "short": b"k" * 31, "long": b"k" * 4096}[shape])
    with pytest.raises(KeyringError) as raised:
        record_key(tmp_path, create=False)
    message = str(raised.value)
    _plain(message)
    assert message.startswith(f"the record key {path} is damaged: {words}, where a file of exactly 32 random "
                              "bytes belongs: restore it from a backup, or delete it"), message


def test_a_record_key_that_is_a_link_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_bytes(b"k" * 32)
    (tmp_path / RECORD_KEY_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyringError) as raised:
        record_key(tmp_path, create=False)
    assert str(raised.value).startswith(f"cannot read the record key {tmp_path / RECORD_KEY_FILE}: it is a symbolic "
                                        "link, which taskrun never follows: remove it if it is a link, and restore")


def test_the_cli_says_what_a_key_file_holds_and_doctor_gives_the_fix_apart(repo: Path) -> None:
    state = repo / ".git" / "taskrun"
    pem = state / KEYS_DIR / "1.pem"
    pem.write_bytes(_certificate())
    (state / SSH_KEY_FILE).write_bytes(b'{"not": "a key"}')
    shown = taskrun(repo, "keys", "show")
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
    assert "holds an X.509 certificate, not a key" in shown.stderr
    key = taskrun(repo, "worker", "key")
    assert key.returncode == 2 and "Traceback" not in key.stderr, key.stderr
    assert "holds JSON text, not a key" in key.stderr
    doctor = json.loads(taskrun(repo, "doctor", "--json").stdout)
    [finding] = [f for f in doctor["findings"] if str(pem) in f["what"]]
    assert finding["what"] == (f"{pem} should hold an Ed25519 private key (PEM), but holds an X.509 certificate, "
                               "not a key")
    assert finding["fix"].startswith(f"restore {pem} from a backup")
