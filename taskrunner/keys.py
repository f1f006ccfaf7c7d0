"""The control plane's Ed25519 signing key, kept under .git/taskrun/ (mode 0600)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from taskrunner.atomic import write_bytes

KEY_FILE = "signing_key"


def ensure_signing_key(state_dir: Path) -> tuple[Path, bool]:
    """The key's path, and whether it was created now."""
    path = state_dir / KEY_FILE
    if path.exists():
        os.chmod(path, 0o600)  # tighten a key someone loosened
        return path, False
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    state_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(path, pem, mode=0o600)
    return path, True


def public_key_line(state_dir: Path) -> str:
    """`ed25519 <base64 raw public key> <key id>`: what a Worker's trust store holds."""
    pem = (state_dir / KEY_FILE).read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"ed25519 {base64.b64encode(raw).decode()} {key_id(raw)}"


def key_id(raw_public: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw_public).digest()).decode().rstrip("=")


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
