"""Whom a Worker that trusts no control plane key yet lets enroll it: only whom its admin named (DESIGN.md §5.8).

    <home>/enrollment.json   (0600) one of
        {"pinned": [KEY_ID, ...], "created_at": T}
            `taskrun-worker init --trust-key KEY` (or `trust --reset --trust-key KEY`):
            only a statement signed by one of these control plane keys enrolls the Worker.
        {"token_sha256": HEX, "expires_at": T, "created_at": T}
            otherwise `init` (and `trust --reset`) prints a one-time enrollment token
            and keeps only its sha256. The first enrollment must carry `enrollment_mac`
            in its signed body: HMAC-SHA256, keyed with sha256(token), over the
            statement's audience, key ids, nonce and issued_at (`enrollment_mac`).

The token itself never travels: `taskrun worker add --token T` puts only the
MAC into the statement it signs, so a statement captured from a record or a
log neither reveals the token nor enrolls any key but those it lists, and it
is refused once the token is used. The file goes away with the first
enrollment it lets through (single use); an expired token enrolls nothing.
Without the file, a Worker that trusts no key refuses every enrollment: the
holder of the daemon's SSH key cannot enroll a key of its own through the gate.

The rules are applied by TrustStore.apply (trust.py), under its lock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

from taskrunner.atomic import read_json, write_json
from taskrunner.defaults import ENROLL_TOKEN_TTL_SECONDS
from taskrunner.errors import WorkerError
from taskrunner.signing import SignatureRejected, key_id, parse_public_line

ENROLLMENT_FILE = "enrollment.json"
KEY_ID_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
#: What a refusal tells the Worker's admin to do.
HOW_TO_NAME = ("its admin runs `taskrun-worker trust --reset` on it, which prints a one-time enrollment token "
               "for `taskrun worker add --token`, or pins the control plane's key with `taskrun-worker trust "
               "--reset --trust-key KEY_ID` (`taskrun keys show` prints it)")


def pinned_key_id(text: str) -> str:
    """A control plane key id from `SHA256:...` or an `ed25519 BASE64` public line; WorkerError otherwise."""
    text = text.strip()
    if KEY_ID_RE.match(text):
        return text
    try:
        return key_id(parse_public_line(text))
    except SignatureRejected:
        raise WorkerError(f"--trust-key {text!r} is neither a key id (SHA256: and 43 base64 characters) nor an "
                          "'ed25519 BASE64' public line, as `taskrun keys show` prints them") from None


def new_token() -> str:
    """A one-time enrollment token: 32 hex digits (128 random bits)."""
    return secrets.token_hex(16)


def token_key(token: str) -> bytes:
    """The HMAC key a token stands for: its sha256, which is also all the Worker keeps of it."""
    return hashlib.sha256(token.strip().encode()).digest()


def enrollment_mac(key: bytes, audience: str | None, key_ids: list[str], nonce: Any, issued_at: Any) -> str:
    """HMAC-SHA256 binding a token to one statement: its audience, the keys it lists, its nonce and time."""
    bound = json.dumps({"audience": audience, "keys": sorted(key_ids), "nonce": nonce, "issued_at": issued_at},
                       sort_keys=True, separators=(",", ":"))
    return hmac.new(key, b"taskrun enrollment v1\n" + bound.encode(), hashlib.sha256).hexdigest()


class EnrollmentRefused(WorkerError):
    """Raised when a first enrollment is not by whom the Worker's admin named; trust.py reports it."""


class Enrollment:
    """The pin or token of one Worker home (see the module doc)."""

    def __init__(self, home: Path) -> None:
        self.path = home / ENROLLMENT_FILE

    def issue_token(self, now: float, ttl: float = ENROLL_TOKEN_TTL_SECONDS) -> str:
        """A new token, replacing any earlier pin or token; only its sha256 is written."""
        token = new_token()
        self._write({"token_sha256": token_key(token).hex(), "expires_at": now + ttl, "created_at": now})
        return token

    def pin(self, key_ids: list[str], now: float) -> None:
        """Let only statements signed by one of `key_ids` enroll this Worker, replacing any token."""
        self._write({"pinned": sorted(set(key_ids)), "created_at": now})

    def state(self) -> dict[str, Any] | None:
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # damaged: names nobody, so refuses every enrollment
        return data if isinstance(data, dict) else None

    def signers(self, offered: Mapping[str, bytes]) -> dict[str, bytes]:
        """Of the keys a first enrollment offers, those whose signature may enroll this Worker."""
        state = self.state()
        if state is None:
            raise EnrollmentRefused(f"this Worker trusts no control plane key and its admin named none: {HOW_TO_NAME}")
        pinned = state.get("pinned")
        if pinned is None:
            return dict(offered)  # a token: any key the statement lists, if the MAC checks out
        allowed = {kid: raw for kid, raw in offered.items() if kid in pinned}
        if not allowed:
            raise EnrollmentRefused(f"not signed by the control plane key its admin pinned ({', '.join(pinned)})")
        return allowed

    def check(self, statement: Mapping[str, Any], now: float) -> None:
        """For a token: the statement's MAC is the token's and the token has not expired."""
        state = self.state() or {}
        if state.get("pinned") is not None:
            return
        digest, expires_at = state.get("token_sha256"), state.get("expires_at")
        if not isinstance(digest, str) or not isinstance(expires_at, (int, float)):
            raise EnrollmentRefused(f"this Worker's enrollment token is damaged: {HOW_TO_NAME}")
        if now > expires_at:
            raise EnrollmentRefused(f"this Worker's enrollment token has expired: {HOW_TO_NAME}")
        given = statement.get("enrollment_mac")
        if not isinstance(given, str):
            raise EnrollmentRefused("a first enrollment of this Worker needs its one-time enrollment token "
                                    "(`taskrun worker add --token TOKEN`, as printed on the Worker)")
        try:
            key = bytes.fromhex(digest)
        except ValueError:
            raise EnrollmentRefused(f"this Worker's enrollment token is damaged: {HOW_TO_NAME}") from None
        ids = [k["key_id"] for k in statement["keys"]]
        expected = enrollment_mac(key, statement.get("audience"), ids, statement.get("nonce"), statement["issued_at"])
        if not hmac.compare_digest(given, expected):
            raise EnrollmentRefused("the enrollment token does not match the one this Worker issued (or the "
                                    "statement was altered)")

    def consume(self) -> None:
        """The pin or token has let an enrollment through: it lets no other."""
        self.path.unlink(missing_ok=True)

    def describe(self, now: float) -> str:
        """For `taskrun-worker status`: who may enroll this Worker while it trusts no key."""
        state = self.state()
        if state is None:
            return "nobody (run `taskrun-worker trust --reset`)"
        if state.get("pinned") is not None:
            return f"the pinned key {', '.join(state['pinned'])}"
        expires_at = state.get("expires_at")
        if not isinstance(expires_at, (int, float)) or now > expires_at:
            return "nobody: the enrollment token has expired (run `taskrun-worker trust --reset`)"
        return f"the holder of the enrollment token (valid for {(expires_at - now) / 3600:.1f} more hours)"

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, data, mode=0o600)
