"""The control plane's keys, kept under .git/taskrun/ (never in a tracked file).

    .git/taskrun/keys/            mode 0700
        keyring.json              every signing key's id, public line, created_at, retire_at
        <n>.pem                   one Ed25519 private key each, mode 0600
    .git/taskrun/ssh_key          the daemon's own SSH key (OpenSSH format, 0600)
    .git/taskrun/record.key       this clone's key sealing its records (records.py), 0600

Exactly one signing key is current (`retire_at` null): new bundles and trust
changes are signed with it. `rotate` makes a new current key and gives the old
one a `retire_at` (now + the overlap): until then it still signs trust changes,
so Workers that only know the old key learn the new one; after it, the key is
pruned here and every Worker stops trusting it (the trust statement carries
`retire_at`, and Workers enforce it themselves).
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from taskrunner.atomic import open_regular, parse_json, read_file, write_bytes, write_json
from taskrunner.errors import KeyringError, TaskrunError  # noqa: F401 (KeyringError: named here too)
from taskrunner.recordkey import RECORD_KEY_FILE, KeyFileError, record_key  # noqa: F401 (named here too)
from taskrunner.safefs import kind_of
from taskrunner.signing import SignatureRejected, SigningKey

KEYS_DIR = "keys"
KEYRING_FILE = "keyring.json"
#: The most of keyring.json, and of one key file, that is read: a few keys' worth is a few KiB.
MAX_KEYRING_BYTES = 1024 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
#: What to do when the signing keys cannot be loaded (docs/bundles.md, "Rotation"): `taskrun keys rotate`
#: needs every key loaded, so without a backup the control plane starts over with a new key.
SIGNING_FIX = ("restore {path} from a backup of {keys}/; without one, move {keys}/ aside, run `taskrun init` for "
               "a new signing key, and enroll each ssh Worker again (on the Worker `taskrun-worker trust --reset`, "
               "then `taskrun worker add NAME --host HOST --token TOKEN`)")
#: What to do when the daemon's SSH key cannot be loaded.
SSH_KEY_FIX = ("restore {path} from a backup; without one, delete it and run `taskrun worker key`: it makes a new "
               "key and prints the line to put in each Worker's ~/.ssh/authorized_keys instead of the old one")


@dataclass(frozen=True)
class KeyEntry:
    key: SigningKey
    file: str
    created_at: float
    retire_at: float | None

    def as_record(self) -> dict[str, Any]:
        return {"key_id": self.key.key_id, "public": self.key.public_line, "file": self.file,
                "created_at": self.created_at, "retire_at": self.retire_at}


#: The name of a signing key's file in the keys directory (Keyring._add).
_KEY_FILE = re.compile(r"[0-9]{1,9}\.pem")


class Keyring:
    """The signing keys of one control plane; `current` signs, the others are in their overlap."""

    def __init__(self, directory: Path, entries: list[KeyEntry]) -> None:
        self.directory = directory
        self.entries = entries

    @classmethod
    def ensure(cls, state_dir: Path, now: float) -> tuple[Keyring, bool]:
        """The keyring, and whether it was created now (with a first key)."""
        directory = _keys_dir(state_dir)
        if os.path.lexists(directory / KEYRING_FILE):
            return cls.load(state_dir), False
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        ring = cls(directory, [])
        ring._add(SigningKey.generate(), now)
        ring.save()
        return ring, True

    @classmethod
    def load(cls, state_dir: Path) -> Keyring:
        """The keyring under `state_dir`; KeyFileError saying which file holds what instead, and what to do."""
        directory = _keys_dir(state_dir)
        path = directory / KEYRING_FILE
        fix = SIGNING_FIX.format(path=path, keys=directory)
        try:
            items = _keyring_items(path, fix)
            entries = []
            for number, item in enumerate(items, 1):
                name, key_id, created_at, retire_at = _entry_fields(path, number, item, fix)
                pem_path = directory / name
                fd = open_regular(pem_path, os.O_RDONLY)  # no link followed: a key is a file of its own
                try:
                    if os.fstat(fd).st_mode & 0o077:
                        os.fchmod(fd, 0o600)  # tighten a key someone loosened
                finally:
                    os.close(fd)
                pem_fix = SIGNING_FIX.format(path=pem_path, keys=directory)
                key = _signing_key(pem_path, read_file(pem_path, MAX_KEY_FILE_BYTES), pem_fix)
                if key.key_id != key_id:
                    raise KeyFileError(f"{pem_path} holds key {key.key_id}, but {path} says {key_id}", pem_fix)
                entries.append(KeyEntry(key, name, created_at, retire_at))
        except FileNotFoundError as exc:
            if exc.filename == str(path):
                raise KeyFileError(f"the control plane has no signing key ({path} is missing)",
                                   "run `taskrun init`") from None
            raise KeyFileError(f"{exc.filename}, a signing key {path} lists, is missing",
                               SIGNING_FIX.format(path=exc.filename, keys=directory)) from None
        except OSError as exc:  # a link, a FIFO, a directory, a giant: never followed, waited on or read whole
            where = Path(exc.filename) if exc.filename else path
            raise KeyFileError(f"cannot load the signing keys: {unreadable(where, exc)}",
                               SIGNING_FIX.format(path=where, keys=directory)) from None
        current = sum(1 for e in entries if e.retire_at is None)
        if current != 1:
            raise KeyFileError(f"{path} lists {current} current keys (retire_at null); exactly one must be", fix)
        return cls(directory, entries)

    @property
    def current(self) -> SigningKey:
        return next(e.key for e in self.entries if e.retire_at is None)

    def signers(self, now: float) -> list[SigningKey]:
        """Keys that may sign a trust change: the current one first, then those in their overlap."""
        live = [e for e in self.entries if e.retire_at is None or e.retire_at > now]
        live.sort(key=lambda e: e.retire_at is not None)
        return [e.key for e in live]

    def trust_entries(self, now: float) -> list[dict[str, Any]]:
        """What a Worker should trust now: key id, public line and retire_at of each live key."""
        return [{"key_id": e.key.key_id, "public": e.key.public_line, "retire_at": e.retire_at}
                for e in self.entries if e.retire_at is None or e.retire_at > now]

    def rotate(self, overlap: float, now: float) -> SigningKey:
        """A new current key; the old one stays trusted for `overlap` seconds."""
        self.entries = [KeyEntry(e.key, e.file, e.created_at, now + overlap) if e.retire_at is None else e
                        for e in self.entries]
        key = SigningKey.generate()
        self._add(key, now)
        self.save()
        return key

    def prune(self, now: float) -> list[str]:
        """Forget keys whose overlap has ended (deleting their private key); their ids."""
        gone = [e for e in self.entries if e.retire_at is not None and e.retire_at <= now]
        if not gone:
            return []
        self.entries = [e for e in self.entries if e not in gone]
        self.save()
        for entry in gone:
            (self.directory / entry.file).unlink(missing_ok=True)
        return [e.key.key_id for e in gone]

    def next_retirement(self) -> float | None:
        times = [e.retire_at for e in self.entries if e.retire_at is not None]
        return min(times) if times else None

    def save(self) -> None:
        write_json(self.directory / KEYRING_FILE, {"keys": [e.as_record() for e in self.entries]})

    def _add(self, key: SigningKey, now: float) -> None:
        number = 1 + max((int(e.file.split(".")[0]) for e in self.entries), default=0)
        name = f"{number}.pem"
        write_bytes(self.directory / name, key.pem(), mode=0o600)
        self.entries.append(KeyEntry(key, name, now, None))


SSH_KEY_FILE = "ssh_key"
def ensure_ssh_key(state_dir: Path) -> tuple[Path, str]:
    """The daemon's own SSH key (OpenSSH format, 0600) and its public line."""
    path = state_dir / SSH_KEY_FILE
    if not os.path.lexists(path):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        state_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(path, pem, mode=0o600)
    fix = SSH_KEY_FIX.format(path=path)
    try:
        data = read_file(path, MAX_KEY_FILE_BYTES)  # no link followed, no FIFO waited on
    except OSError as exc:
        raise KeyFileError(f"cannot load the daemon's SSH key: {unreadable(path, exc)}", fix) from None
    try:
        loaded = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} should hold the daemon's SSH private key (OpenSSH format), but holds "
                           f"{holds(data)}", fix) from None
    public = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, f"{public.decode()} taskrun-control-plane"


# --------------------------------------------------------------------------- what a key file holds


def _keys_dir(state_dir: Path) -> Path:
    """state_dir/keys; KeyFileError when something other than a directory is there (a link is never followed,
    a file never written through)."""
    directory = state_dir / KEYS_DIR
    try:
        found = os.lstat(directory)
    except FileNotFoundError:
        return directory
    if not stat.S_ISDIR(found.st_mode):
        raise KeyFileError(f"{directory} should be the directory of the signing keys, but is "
                           f"{kind_of(found.st_mode)}", SIGNING_FIX.format(path=directory, keys=directory))
    return directory


def _keyring_items(path: Path, fix: str) -> list[Any]:
    """The `keys` list of keyring.json; KeyFileError saying what the file holds instead."""
    data = read_file(path, MAX_KEYRING_BYTES)
    try:
        document = parse_json(data)
    except ValueError as exc:
        what = holds(data)
        if data.lstrip()[:1] in (b"{", b"[") and what.startswith("text"):
            what = f"JSON that cannot be read ({exc})"
        elif what.startswith("text"):
            what = "text that is not JSON"
        raise KeyFileError(f"{path} should hold the keyring (JSON with a 'keys' list), but holds {what}", fix) from None
    items = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(items, list):
        what = ("a JSON object without a 'keys' list" if isinstance(document, dict) else
                f"JSON that is {_json_kind(document)}, not an object")
        raise KeyFileError(f"{path} should hold the keyring (JSON with a 'keys' list), but holds {what}", fix)
    return items


def _entry_fields(path: Path, number: int, item: object, fix: str) -> tuple[str, str, float, float | None]:
    """(file, key_id, created_at, retire_at) of the keyring's `number`th entry; KeyFileError naming what is wrong."""
    where = f"{path}: key {number} of the 'keys' list"
    if not isinstance(item, dict):
        raise KeyFileError(f"{where} is {_json_kind(item)}, not an object with file, key_id and created_at", fix)
    name, key_id = item.get("file"), item.get("key_id")
    if not isinstance(name, str) or not _KEY_FILE.fullmatch(name):
        raise KeyFileError(f"{where}: {_json_text(name)} is not a key file name of ours (<n>.pem)", fix)
    if not isinstance(key_id, str) or not key_id:
        raise KeyFileError(f"{where} has {_json_text(key_id)} as its key_id, not a key id", fix)
    created_at, retire_at = item.get("created_at"), item.get("retire_at")
    if not _is_number(created_at):
        raise KeyFileError(f"{where} has {_json_text(created_at)} as its created_at, not a time", fix)
    if retire_at is not None and not _is_number(retire_at):
        raise KeyFileError(f"{where} has {_json_text(retire_at)} as its retire_at, not a time or null", fix)
    return name, key_id, float(created_at), None if retire_at is None else float(retire_at)


def _signing_key(path: Path, data: bytes, fix: str) -> SigningKey:
    try:
        return SigningKey.from_pem(data)
    except (ValueError, TypeError, UnsupportedAlgorithm, SignatureRejected):
        raise KeyFileError(f"{path} should hold an Ed25519 private key (PEM), but holds {holds(data)}",
                           fix) from None


def _is_number(value: object) -> bool:
    """A JSON number that is a time: not a boolean, not NaN or infinite, not an integer too large for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits
        return False


def _json_kind(value: object) -> str:
    kinds = ((dict, "an object"), (list, "a list"), (str, "a string"), (bool, "a boolean"), (int, "a number"),
             (float, "a number"))
    return "null" if value is None else next(words for kind, words in kinds if isinstance(value, kind))


def _json_text(value: object) -> str:
    """A JSON value as a message quotes it: short strings and numbers as they are, the rest by kind."""
    if isinstance(value, str) and len(value) <= 40 and value.isprintable():
        return repr(value)
    if _is_number(value):
        return str(value)
    return _json_kind(value) if not isinstance(value, str) else "a long string"


#: The PEM blocks a key file may hold by mistake, in words.
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
_PEM_WORDS = {
    "ENCRYPTED PRIVATE KEY": "a private key protected by a passphrase",
    "CERTIFICATE": "an X.509 certificate, not a key",
    "TRUSTED CERTIFICATE": "an X.509 certificate, not a key",
    "CERTIFICATE REQUEST": "a certificate signing request, not a key",
    "X509 CRL": "a certificate revocation list, not a key",
    "PGP PRIVATE KEY BLOCK": "an OpenPGP private key",
    "PGP PUBLIC KEY BLOCK": "an OpenPGP public key",
    "SSH2 PUBLIC KEY": "an SSH public key (RFC 4716), not a private key",
}
#: OpenSSH public key lines start with one of these.
_SSH_PUBLIC = re.compile(rb"^\s*(ssh-(ed25519|rsa|dss)|ecdsa-sha2-|sk-)[a-z0-9@.-]*\s+AAAA")


def holds(data: bytes) -> str:
    """What the bytes of a key file hold, in words: 'an RSA private key', 'an X.509 certificate, not a key',
    'JSON text', 'nothing (the file is empty)', '120 bytes of binary data'."""
    if not data.strip():
        return "nothing (the file is empty)" if not data else "only blank space"
    block = _PEM_BLOCK.search(data)
    if block is not None:
        label = block.group(1).decode()
        if label in _PEM_WORDS:
            return _PEM_WORDS[label]
        if label == "OPENSSH PRIVATE KEY":
            return _openssh_private(data)
        if label.endswith("PRIVATE KEY"):
            return _pem_private(data, label)
        if label.endswith("PUBLIC KEY"):
            return _pem_public(data)
        return f"a PEM block labelled '{label}', not a private key"
    if b"\0" in data or not _is_text(data):
        return f"{len(data)} bytes of binary data, not a PEM key"
    if _SSH_PUBLIC.match(data):
        return "an OpenSSH public key line, not a private key"
    if re.match(rb"^\s*ed25519 [A-Za-z0-9+/=]+\s*$", data):
        return "a taskrun public key line (ed25519 BASE64), not a private key"
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            parse_json(data)
        except ValueError:
            return "text that is not a key"
        return "JSON text, not a key"
    return "text that is not a key"


def _is_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _pem_private(data: bytes, label: str) -> str:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # the password it needs was not given
        return "a private key protected by a passphrase"
    except (ValueError, UnsupportedAlgorithm):
        return f"a damaged or unsupported private key (a '{label}' PEM block that cannot be read)"
    return f"{_private_words(key)} in PEM form"


def _openssh_private(data: bytes) -> str:
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        return "an OpenSSH private key protected by a passphrase"
    except (ValueError, UnsupportedAlgorithm):
        return "a damaged or unsupported OpenSSH private key"
    return f"{_private_words(key)} in OpenSSH's format"


def _private_words(key: object) -> str:
    kinds = ((Ed25519PrivateKey, "an Ed25519 private key"),
             (rsa.RSAPrivateKey, "an RSA private key"), (ec.EllipticCurvePrivateKey, "an EC (ECDSA) private key"),
             (ed448.Ed448PrivateKey, "an Ed448 private key"), (dsa.DSAPrivateKey, "a DSA private key"),
             (x25519.X25519PrivateKey, "an X25519 key (for key exchange; it cannot sign)"),
             (x448.X448PrivateKey, "an X448 key (for key exchange; it cannot sign)"))
    return next((words for kind, words in kinds if isinstance(key, kind)), "a private key of another kind")


def _pem_public(data: bytes) -> str:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return "a public key, not a private key"
    kinds = ((Ed25519PublicKey, "an Ed25519 public key"), (rsa.RSAPublicKey, "an RSA public key"),
             (ec.EllipticCurvePublicKey, "an EC public key"))
    kind = next((words for cls, words in kinds if isinstance(key, cls)), "a public key")
    return f"{kind}: the public half only, not the private key"


def unreadable(path: Path, exc: OSError) -> str:
    """Why the key file `path` could not be read, in words: what is there instead, or the system's reason."""
    if exc.errno == errno.EFBIG:
        return f"{path} is larger than a key file can be ({exc.strerror})"
    try:
        found = os.lstat(path)
    except OSError:
        found = None
    if found is not None and not stat.S_ISREG(found.st_mode):
        return f"{path} is {kind_of(found.st_mode)}, not a regular file (taskrun never follows a link there)"
    return f"{path}: {exc.strerror or exc}"
