"""Forges' push webhooks, checked: signature or token, delivery id, event, branches. Pure: no I/O.

`check(headers, body, secret, now)` answers one delivery with a `Verdict`
(an HTTP status, a reason safe to log and to send back, and the `Delivery`
when it is authentic). Deduplication and queueing are the receiver's
business (taskrunner/http.py); nothing here keeps state.

Which scheme authenticates a delivery is decided by the first of these
headers present (an empty value counts as present: it is unsigned, 401);
every scheme uses the one shared secret, and every comparison is
`hmac.compare_digest`:

    webhook-signature     Standard Webhooks, sent by GitLab when a signing token
                          is set: `v1,<base64>` entries, space-separated, each an
                          HMAC-SHA256 of `<webhook-id>.<webhook-timestamp>.<body>`;
                          a secret `whsec_<base64>` is used base64-decoded;
                          the timestamp must be within 5 minutes of now.
                          https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
    X-Hub-Signature-256   GitHub (Gitea and Forgejo send it too): `sha256=<hex>`
                          HMAC-SHA256 of the raw body.
                          https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
    X-Forgejo-Signature,  Forgejo, Gitea: bare hex HMAC-SHA256 of the raw body.
    X-Gitea-Signature     https://docs.gitea.com/usage/webhooks
    X-Hub-Signature       Bitbucket Cloud: `sha256=<hex>` (GitHub's legacy
                          `sha1=` is refused). https://support.atlassian.com/bitbucket-cloud/docs/manage-webhooks/
    X-Gitlab-Token        GitLab's secret token: the shared secret itself, sent in
                          clear (so only ever over TLS). https://docs.gitlab.com/user/project/integrations/webhooks/

The forge, its event and its delivery id come from the forge's own headers
(`X-Forgejo-*`, `X-Gitea-*`, `X-Gitlab-*`, Bitbucket's `X-Event-Key` /
`X-Request-UUID`, `X-GitHub-*`; Gitea and Forgejo also send GitHub's, so theirs
are looked at first). Only a push, or a forge's ping, triggers a sync. The
branches a push names are read from its JSON body for the log only: the
daemon fetches from its own remote and never acts on a payload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

#: Standard Webhooks: a delivery whose timestamp is further than this from now (seconds) is refused.
TIMESTAMP_TOLERANCE = 300.0
#: A delivery id longer than this, or with characters outside _DELIVERY_ID_RE, is refused (it is logged and kept).
MAX_DELIVERY_ID = 200
_DELIVERY_ID_RE = re.compile(r"[A-Za-z0-9._:{}@+=/-]{1,%d}" % MAX_DELIVERY_ID)
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
#: How many branch names a verdict keeps for the log.
MAX_BRANCHES = 10

#: (forge, its event header, its delivery id headers in order of preference)
_FORGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("forgejo", "x-forgejo-event", ("x-forgejo-delivery", "x-gitea-delivery")),
    ("gitea", "x-gitea-event", ("x-gitea-delivery",)),
    ("gitlab", "x-gitlab-event", ("webhook-id", "x-gitlab-event-uuid", "idempotency-key")),
    ("bitbucket", "x-event-key", ("x-request-uuid",)),
    ("github", "x-github-event", ("x-github-delivery",)),
)
#: Per forge, the events that trigger a sync: pushes, and the forge's ping (a test delivery from its settings page).
TRIGGERS: Mapping[str, frozenset[str]] = {
    "github": frozenset({"push", "ping"}),
    "gitea": frozenset({"push"}),
    "forgejo": frozenset({"push"}),
    "gitlab": frozenset({"Push Hook"}),
    "bitbucket": frozenset({"repo:push", "diagnostics:ping"}),
}


@dataclass(frozen=True)
class Delivery:
    """One authentic delivery.

    forge: "github" | "gitea" | "forgejo" | "gitlab" | "bitbucket"; event: the
    forge's event name as sent; delivery_id: the forge's id for this delivery
    (the same on a redelivery); triggers: a push or ping; branches: the
    branch names a push names (from its body; may be empty).
    """

    forge: str
    event: str
    delivery_id: str
    triggers: bool
    branches: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """What deduplication keeps: `forge:delivery_id`."""
        return f"{self.forge}:{self.delivery_id}"


@dataclass(frozen=True)
class Verdict:
    """The answer to one request: an HTTP status, a reason (no secret, no token: safe to log and send back)."""

    status: int
    reason: str
    delivery: Delivery | None = None


def check(headers: Mapping[str, str], body: bytes, secret: bytes, now: float) -> Verdict:
    """Authenticate and read one delivery.

    headers: lower-case names to values (a header sent twice joined with ", ");
    body: the raw body, exactly as received; secret: the shared secret (non-empty);
    now: Unix seconds. 401 when unsigned or wrongly signed, 400 when no forge
    or delivery id can be told, 202 for an authentic event that is not a push
    (a 2xx, so forges do not retry it), 200 for a push or ping.
    """
    if not secret:
        raise ValueError("the webhook secret is empty")
    failure = authenticate(headers, body, secret, now)
    if failure is not None:
        return Verdict(401, failure)
    for forge, event_header, id_headers in _FORGES:
        event = headers.get(event_header)
        if event is None:
            continue
        delivery_id = next((headers[h] for h in id_headers if headers.get(h)), "")
        if not _DELIVERY_ID_RE.fullmatch(delivery_id):
            return Verdict(400, f"no usable delivery id ({' or '.join(id_headers)}) on a {forge} delivery")
        event = event.strip()
        if not event.isprintable() or len(event) > 100:
            return Verdict(400, f"malformed {event_header} header")
        triggers = event in TRIGGERS[forge]
        delivery = Delivery(forge, event, delivery_id, triggers, branches_of(forge, body) if triggers else ())
        if not triggers:
            return Verdict(202, f"ignored: {forge} event {event!r} is not a push", delivery)
        return Verdict(200, f"{forge} {event}", delivery)
    return Verdict(400, "not a forge delivery: no X-GitHub-Event, X-Gitea-Event, X-Forgejo-Event, "
                        "X-Gitlab-Event or X-Event-Key header")


def authenticate(headers: Mapping[str, str], body: bytes, secret: bytes, now: float) -> str | None:
    """None when the delivery is authentic; otherwise why not (401). The scheme is chosen as the docstring says."""
    if "webhook-signature" in headers:
        return _standard_webhooks(headers, body, secret, now)
    if "x-hub-signature-256" in headers:
        return _prefixed_hex("X-Hub-Signature-256", headers["x-hub-signature-256"], body, secret)
    for name in ("x-forgejo-signature", "x-gitea-signature"):
        if name in headers:
            return _bare_hex(_title(name), headers[name], body, secret)
    if "x-hub-signature" in headers:
        return _prefixed_hex("X-Hub-Signature", headers["x-hub-signature"], body, secret)
    if "x-gitlab-token" in headers:
        given = headers["x-gitlab-token"].encode("utf-8", "surrogateescape")
        if not given:
            return "unsigned: X-Gitlab-Token is empty"
        return None if hmac.compare_digest(given, secret) else "bad X-Gitlab-Token"
    return ("unsigned: no X-Hub-Signature-256, X-Gitea-Signature, X-Forgejo-Signature, X-Hub-Signature, "
            "X-Gitlab-Token or webhook-signature header")


def sign(body: bytes, secret: bytes) -> str:
    """The hex HMAC-SHA256 of `body` (what GitHub, Gitea, Forgejo and Bitbucket send)."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def standard_signature(delivery_id: str, timestamp: str, body: bytes, secret: bytes) -> str:
    """A Standard Webhooks `v1,<base64>` signature; a secret `whsec_<base64>` is base64-decoded first."""
    digest = hmac.new(standard_key(secret), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def standard_key(secret: bytes) -> bytes:
    """The HMAC key of a Standard Webhooks secret: `whsec_<base64>` decoded, any other secret as it is."""
    if secret.startswith(b"whsec_"):
        try:
            return base64.b64decode(secret[len(b"whsec_"):], validate=True)
        except binascii.Error:
            pass
    return secret


def branches_of(forge: str, body: bytes) -> tuple[str, ...]:
    """The branches a push names: `ref` (GitHub, Gitea, Forgejo, GitLab), `push.changes[].new.name` (Bitbucket).

    For the log only; an unreadable body names none. Names are shown, never acted on.
    """
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: arrays nested thousands deep
        return ()
    if not isinstance(payload, dict):
        return ()
    names: list[str] = []
    if forge == "bitbucket":
        changes = payload.get("push", {}).get("changes") if isinstance(payload.get("push"), dict) else None
        for change in changes if isinstance(changes, list) else []:
            new = change.get("new") if isinstance(change, dict) else None
            if isinstance(new, dict) and new.get("type") == "branch" and isinstance(new.get("name"), str):
                names.append(new["name"])
    elif isinstance(payload.get("ref"), str) and payload["ref"].startswith("refs/heads/"):
        names.append(payload["ref"][len("refs/heads/"):])
    return tuple(n for n in names if n.isprintable() and len(n) <= 255)[:MAX_BRANCHES]


def _prefixed_hex(header: str, value: str, body: bytes, secret: bytes) -> str | None:
    value = value.strip()
    if not value:
        return f"unsigned: {header} is empty"
    algorithm, _, given = value.partition("=")
    if algorithm != "sha256":
        return f"{header}: only sha256=<hex> is accepted"
    return _bare_hex(header, given, body, secret)


def _bare_hex(header: str, value: str, body: bytes, secret: bytes) -> str | None:
    value = value.strip()
    if not value:
        return f"unsigned: {header} is empty"
    if not _HEX64_RE.fullmatch(value):
        return f"bad {header}: not a hex SHA-256"
    return None if hmac.compare_digest(value.lower(), sign(body, secret)) else f"bad {header}"


def _standard_webhooks(headers: Mapping[str, str], body: bytes, secret: bytes, now: float) -> str | None:
    signatures = headers["webhook-signature"].split()
    if not signatures:
        return "unsigned: webhook-signature is empty"
    delivery_id, timestamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not delivery_id or not timestamp:
        return "webhook-signature without webhook-id and webhook-timestamp"
    # isascii: str.isdigit takes '²' and other digits int() refuses; 20 digits: past int()'s digit limit is no time.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 20) \
            or abs(now - int(timestamp)) > TIMESTAMP_TOLERANCE:
        return f"webhook-timestamp is not within {TIMESTAMP_TOLERANCE:.0f} s of now"
    expected = standard_signature(delivery_id, timestamp, body, secret)
    # Compare every entry whatever the outcome, so the time taken says nothing about which matched.
    matched = False
    for entry in signatures:
        matched = hmac.compare_digest(entry.encode("utf-8", "surrogateescape"), expected.encode()) or matched
    return None if matched else "bad webhook-signature"


def _title(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))
