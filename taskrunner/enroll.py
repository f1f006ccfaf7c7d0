"""Trust statements the control plane signs for its Workers (the rules are in worker/trust.py).

`trust_request` is what `taskrun worker add` sends through the gate's `trust`
request, and what the daemon sends over a session when a Worker's trusted
keys differ from the keyring's (after `taskrun keys rotate`, and when a
rotated key's overlap ends). It lists every live key of the keyring with its
`retire_at`, and is signed by all of them, so a Worker that knows only the
old key takes it. A Worker's first enrollment also needs what its admin
named (worker/enrollment.py): the statement is signed by the pinned key, or
`token` (what `taskrun-worker init` printed) is bound into it as
`enrollment_mac`; the token itself is never sent. The embedded local Worker
is enrolled directly (`enroll_local`): its home is the daemon's own state, so
the daemon pins its own keys there.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from taskrunner.defaults import TRUST_TTL_SECONDS
from taskrunner.errors import WorkerError
from taskrunner.keys import Keyring
from taskrunner.signing import TRUST_TYPE, sign
from taskrunner.worker.enrollment import enrollment_mac, token_key
from taskrunner.worker.trust import TRUST_FORMAT, TrustStore, worker_key


def trust_request(keyring: Keyring, audience: str | None, now: float, token: str | None = None) -> dict[str, Any]:
    """`{keys, envelope}`: a statement listing the keyring's live keys, signed by all of them."""
    body: dict[str, Any] = {"format": TRUST_FORMAT, "audience": audience, "keys": keyring.trust_entries(now),
                            "issued_at": now, "expires_at": now + TRUST_TTL_SECONDS, "nonce": secrets.token_hex(16)}
    if token is not None:
        body["enrollment_mac"] = enrollment_mac(token_key(token), audience, [k["key_id"] for k in body["keys"]],
                                                body["nonce"], now)
    signers = keyring.signers(now)
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {"keys": [k.public_line for k in signers], "envelope": sign(TRUST_TYPE, encoded, signers)}


def wanted_keys(keyring: Keyring, now: float) -> list[str]:
    """The key ids a Worker should trust now, to compare with what its hello says."""
    return sorted(entry["key_id"] for entry in keyring.trust_entries(now))


def enroll_local(home: Path, keyring: Keyring, now: float) -> bytes:
    """Make a local Worker home trust the keyring; the Worker's raw result public key."""
    key = worker_key(home)
    store = TrustStore(home)
    try:
        held = sorted(k["key_id"] for k in store.state()["keys"])
    except (WorkerError, KeyError, TypeError):
        held = []  # unreadable: apply refuses it, and it is started over below
    if held != wanted_keys(keyring, now):
        try:
            store.apply(trust_request(keyring, key.key_id, now), key.key_id, now)
        except WorkerError:
            # Our own state (a keyring made anew, a key retired while stopped, a store changed
            # behind our back): start it over, naming our own current key as the enroller.
            store.reset(now, pinned=[keyring.current.key_id])
            store.apply(trust_request(keyring, key.key_id, now), key.key_id, now)
    return key.public
