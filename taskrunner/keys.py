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

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from taskrunner.atomic import open_regular, read_file, read_json, write_bytes, write_json
from taskrunner.errors import KeyringError, TaskrunError  # noqa: F401 (KeyringError: named here too)
from taskrunner.recordkey import RECORD_KEY_FILE, record_key  # noqa: F401 (named here too)
from taskrunner.signing import SignatureRejected, SigningKey

KEYS_DIR = "keys"
KEYRING_FILE = "keyring.json"


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
        directory = state_dir / KEYS_DIR
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
        directory = state_dir / KEYS_DIR
        path = directory / KEYRING_FILE
        try:
            data = read_json(path)
            entries = []
            for item in data["keys"]:
                name = item["file"]
                if not isinstance(name, str) or not _KEY_FILE.fullmatch(name):
                    raise KeyringError(f"{path}: {name!r} is not a key file name of ours (<n>.pem): restore "
                                       f"{path} from a backup")
                pem_path = directory / name
                fd = open_regular(pem_path, os.O_RDONLY)  # no link followed: a key is a file of its own
                try:
                    if os.fstat(fd).st_mode & 0o077:
                        os.fchmod(fd, 0o600)  # tighten a key someone loosened
                finally:
                    os.close(fd)
                key = SigningKey.from_pem(read_file(pem_path))
                if key.key_id != item["key_id"]:
                    raise KeyringError(f"{pem_path} holds key {key.key_id}, but {path} says {item['key_id']}")
                entries.append(KeyEntry(key, item["file"], float(item["created_at"]), item.get("retire_at")))
        except FileNotFoundError as exc:
            raise KeyringError(f"the control plane has no signing key ({exc.filename} is missing): "
                            "run `taskrun init`") from None
        except OSError as exc:  # a link, a FIFO, a directory, a giant: never followed, waited on or read whole
            raise KeyringError(f"cannot load the signing keys: {exc.filename or path}: {exc.strerror or exc}; "
                               "restore it from a backup (a link or special file there is never followed)") from None
        except (ValueError, KeyError, TypeError, SignatureRejected) as exc:
            raise KeyringError(f"{path}: cannot load the signing keys: {exc!r}") from None
        if sum(1 for e in entries if e.retire_at is None) != 1:
            raise KeyringError(f"{path}: exactly one key must be current (retire_at null)")
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
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        state_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(path, pem, mode=0o600)
    loaded = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    public = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, f"{public.decode()} taskrun-control-plane"
