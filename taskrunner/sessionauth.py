"""Session authentication: once per session, the control plane proves it holds a key the Worker trusts.

A Worker's `hello` carries a fresh random `challenge` and no Runs. The control
plane answers with an `auth` record whose `envelope` is a DSSE envelope
(signing.py, payload type SESSION_TYPE) over

    {"format": 1, "challenge": C, "audience": WORKER_KEY_ID, "issued_at": T}

signed by every live key of its keyring (so a Worker that knows only one of
them, during a rotation overlap, still verifies it). The Worker checks that a
key it trusts signed it, that the challenge is the one it sent in this
session, that it is the audience (an `auth` made for another Worker cannot be
relayed here) and that `issued_at` is within CLOCK_SKEW_SECONDS of its clock.
Only then does it list the Runs it holds and accept `assign`, `resume`,
`cancel`, `ack` and `trust`. One signature per key per session: nothing per Run.

Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any, Iterable, Mapping

from taskrunner.errors import WorkerError
from taskrunner.signing import SESSION_TYPE, SignatureRejected, SigningKey, outside_validity, sign, verify_json

AUTH_FORMAT = 1
#: Random hex digits in a challenge.
CHALLENGE_HEX = 32


class AuthRefused(WorkerError):
    """Raised when a session's `auth` record does not prove a trusted key; the session ends."""


def new_challenge() -> str:
    return secrets.token_hex(CHALLENGE_HEX // 2)


def auth_envelope(signers: Iterable[SigningKey], challenge: str, audience: str, now: float) -> dict[str, Any]:
    """The `auth` record's envelope answering `challenge` for the Worker whose result key id is `audience`."""
    body = {"format": AUTH_FORMAT, "challenge": challenge, "audience": audience, "issued_at": now}
    return sign(SESSION_TYPE, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), list(signers))


def verify_auth(envelope: Any, challenge: str, audience: str, trusted: Mapping[str, bytes],
                refused: Mapping[str, str], now: float) -> str:
    """The id of the trusted key that answered `challenge`; AuthRefused naming what is wrong."""
    if not trusted and not refused:
        raise AuthRefused("session refused: this Worker trusts no control plane key yet (enroll it with "
                          "`taskrun worker add`)")
    try:
        body, signer = verify_json(envelope, SESSION_TYPE, trusted, refused, what="session proof")
    except SignatureRejected as exc:
        raise AuthRefused(f"session refused: {exc}") from None
    issued_at = body.get("issued_at")
    if body.get("format") != AUTH_FORMAT or not isinstance(issued_at, (int, float)) \
            or isinstance(issued_at, bool) or not math.isfinite(issued_at):
        raise AuthRefused("session refused: the session proof is malformed")
    if body.get("challenge") != challenge:
        raise AuthRefused("session refused: the proof answers another session's challenge")
    if body.get("audience") != audience:
        raise AuthRefused(f"session refused: the proof is addressed to {body.get('audience')!r}, "
                          f"this Worker is {audience}")
    problem = outside_validity(issued_at, issued_at, now, expired="the session proof is stale")
    if problem is not None:
        raise AuthRefused(f"session refused: {problem}")
    return signer
