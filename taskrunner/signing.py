"""Ed25519 signatures in DSSE envelopes: what every bundle, result and trust change travels in.

An envelope is JSON: `{"payloadType": T, "payload": base64(BODY), "signatures":
[{"keyid": K, "sig": base64(SIG)}]}`. Each signature is Ed25519 over the
pre-authentication encoding

    PAE(T, BODY) = "DSSEv1" SP len(T) SP T SP len(BODY) SP BODY

(lengths in ASCII decimal), so a signature binds the payload type and the exact
body bytes: a body signed as a result cannot pass as a bundle, and nothing is
ever re-serialised before it is checked. `verify` returns the body only after a
signature by a trusted key checks out; callers parse nothing before that.

A key is named by its key id, `SHA256:` and the unpadded base64 of the sha256
of its 32 raw public bytes, and written as a public line `ed25519 BASE64`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from taskrunner.defaults import CLOCK_SKEW_SECONDS
from taskrunner.errors import TaskrunError

BUNDLE_TYPE = "application/vnd.taskrun.bundle+json"
RESULT_TYPE = "application/vnd.taskrun.result+json"
TRUST_TYPE = "application/vnd.taskrun.trust+json"
SESSION_TYPE = "application/vnd.taskrun.session+json"
#: Envelopes larger than this are refused unread (a manifest of MAX_MEMBERS files fits easily).
MAX_ENVELOPE_BYTES = 8 * 1024 * 1024


class SignatureRejected(TaskrunError):
    """Raised when an envelope is malformed or no trusted signature on it verifies.

    `untrusted` is True when the envelope is well formed but signed only by
    keys the verifier does not trust (unknown or retired): a matter of trust,
    not of a damaged or forged envelope.
    """

    def __init__(self, message: str, untrusted: bool = False) -> None:
        super().__init__(message)
        self.untrusted = untrusted


@dataclass(frozen=True)
class SigningKey:
    """A private key and its id; `public` is the 32 raw public bytes."""

    key_id: str
    private: Ed25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private(Ed25519PrivateKey.generate())

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey) -> SigningKey:
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key_id(raw), private, raw)

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise SignatureRejected("the key file does not hold an Ed25519 private key")
        return cls.from_private(private)

    def pem(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    @property
    def public_line(self) -> str:
        return public_line(self.public)


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @classmethod
    def parse(cls, line: str) -> PublicKey:
        return cls(parse_public_line(line))

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    @property
    def public_line(self) -> str:
        return public_line(self.raw)


def key_id(raw_public: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw_public).digest()).decode().rstrip("=")


def public_line(raw_public: bytes) -> str:
    return f"ed25519 {base64.b64encode(raw_public).decode()}"


def parse_public_line(line: str) -> bytes:
    """The raw public bytes of `ed25519 BASE64`; raises SignatureRejected with what is wrong."""
    parts = line.split() if isinstance(line, str) else []
    if len(parts) != 2 or parts[0] != "ed25519":
        raise SignatureRejected(f"not an Ed25519 public key line: {line!r} (expected 'ed25519 BASE64')")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRejected(f"the public key {parts[1]!r} is not valid base64") from None
    if len(raw) != 32:
        raise SignatureRejected(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return raw


def outside_validity(issued_at: float, expires_at: float, now: float, expired: str = "expired") -> str | None:
    """Why a signed statement is not valid at `now` (CLOCK_SKEW_SECONDS either way); None if it is."""
    if issued_at > now + CLOCK_SKEW_SECONDS:
        return f"issued in the future (are the clocks more than {CLOCK_SKEW_SECONDS:.0f}s apart?)"
    if now > expires_at + CLOCK_SKEW_SECONDS:
        return expired
    return None


def pae(payload_type: str, body: bytes) -> bytes:
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def sign(payload_type: str, body: bytes, signers: Iterable[SigningKey]) -> dict[str, Any]:
    message = pae(payload_type, body)
    signatures = [{"keyid": key.key_id, "sig": base64.b64encode(key.private.sign(message)).decode()}
                  for key in signers]
    if not signatures:
        raise SignatureRejected("nothing to sign with: no signing key")
    return {"payloadType": payload_type, "payload": base64.b64encode(body).decode(), "signatures": signatures}


def verify_json(envelope: Any, payload_type: str, trusted: Mapping[str, bytes],
                refused: Mapping[str, str] | None = None, what: str = "body") -> tuple[dict[str, Any], str]:
    """`verify`, then the body parsed, which must be a JSON object (`what` names it in errors)."""
    body, signer = verify(envelope, payload_type, trusted, refused)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser recurses
        raise SignatureRejected(f"the signed {what} is not JSON") from None
    if not isinstance(data, dict):
        raise SignatureRejected(f"the signed {what} is not an object")
    return data, signer


def verify(envelope: Any, payload_type: str, trusted: Mapping[str, bytes],
           refused: Mapping[str, str] | None = None) -> tuple[bytes, str]:
    """The body of `envelope` and the id of the trusted key whose signature verified.

    `trusted` maps key ids to raw public keys; `refused` maps key ids the caller
    knows but will not accept (retired keys) to the reason. Raises
    SignatureRejected naming the first thing wrong.
    """
    if not isinstance(envelope, dict):
        raise SignatureRejected("not a signed envelope")
    kind, encoded, signatures = envelope.get("payloadType"), envelope.get("payload"), envelope.get("signatures")
    if not isinstance(kind, str) or not isinstance(encoded, str) or not isinstance(signatures, list):
        raise SignatureRejected("the envelope lacks payloadType, payload or signatures")
    if kind != payload_type:
        raise SignatureRejected(f"payload type {kind!r}, expected {payload_type!r}")
    if len(encoded) > MAX_ENVELOPE_BYTES:
        raise SignatureRejected("the signed payload is over the size limit")
    try:
        body = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRejected("the payload is not valid base64") from None
    message = pae(kind, body)
    problems: list[str] = []
    signed_by_trusted = False
    for entry in signatures:
        keyid = entry.get("keyid") if isinstance(entry, dict) else None
        sig = entry.get("sig") if isinstance(entry, dict) else None
        if not isinstance(keyid, str) or not isinstance(sig, str):
            problems.append("a signature entry lacks keyid or sig")
            continue
        if keyid not in trusted:
            reason = (refused or {}).get(keyid)
            problems.append(reason or f"signed by unknown key id {keyid}")
            continue
        signed_by_trusted = True
        try:
            Ed25519PublicKey.from_public_bytes(trusted[keyid]).verify(base64.b64decode(sig, validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError):
            problems.append("signature does not verify")
            continue
        return body, keyid
    # The most telling reason first: a bad signature by a trusted key beats an unknown key.
    order = ("signature does not verify",)
    problems.sort(key=lambda p: (p not in order,))
    only_untrusted = bool(problems) and not signed_by_trusted and "a signature entry lacks keyid or sig" not in problems
    raise SignatureRejected(problems[0] if problems else "the envelope carries no signature", untrusted=only_untrusted)
