"""Records from the control plane, screened on a session's reader thread before the serve loop sees them.

Nothing the control plane sends is acted on, listed or buffered before it is allowed:

- Until the session is authenticated (an `auth` record that verifies,
  sessionauth.py) every other record is refused with an `error` naming it
  (`request`), and the Worker lists no Run. A refused `auth` ends the session.
- An `assign` is screened from its header alone: the run id, then the envelope
  (signature, manifest, audience, times: bundle.verified_envelope), then the
  announced payload length against the signed archive size and this Worker's
  limits. Only then is the archive read, hashed as it arrives. A refused
  assignment gets `error {run_id, request: "assign", message}` and leaves
  nothing on disk. Its payload is skipped a chunk at a time when it is within
  the Worker's limits, so the session goes on; a larger one ends the session
  unread.
- A `trust` statement (key rotation) is taken here too, so an `assign` read
  right after it is judged by the keys it installs.
- Any other record that announces a payload ends the session unread.
- A `resume`, `cancel` or `ack` whose run_id is not a string, or a `resume`
  whose offset is not a whole number >= 0, is answered with an `error`
  naming it and goes no further (`malformed`).

Each refusal is also appended to the Worker's audit log (audit.py): a failed
`auth`, records before authentication (at most audit.MAX_SESSION_ENTRIES a
session), refused assignments, and a session that ends before it is
authenticated. Refused trust statements are logged by TrustStore.apply.

What passes reaches the loop as `Authenticated`, `Assignment` (the verified
manifest and its archive) or the Message itself. Verifying here, on the reader
thread, means an `assign` pipelined right behind `auth` is judged by the
session's real state, and a bundle is verified once, not once per thread.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from taskrunner import bundle
from taskrunner.errors import ProtocolError, WorkerError
from taskrunner.protocol import Header, Message, Reader
from taskrunner.sessionauth import verify_auth
from taskrunner.worker import audit
from taskrunner.worker.rundir import RunDir
from taskrunner.worker.trust import TrustStore


@dataclass(frozen=True)
class Authenticated:
    """The session proved it holds a trusted control plane key (`signer`)."""

    signer: str


@dataclass(frozen=True)
class Assignment:
    """An `assign` whose envelope verified and whose archive matches its signed hash and size."""

    run_id: str
    manifest: dict[str, Any]
    archive: bytes
    pack: bytes = b""  # the git pack the manifest's `repo` signs (gitflow/transfer.py), after the archive


def malformed(header: Header) -> str | None:
    """Why a `resume`, `cancel` or `ack` cannot be acted on (its fields' types), or None.

    The serve loop looks Runs up by `run_id` and seeks to `offset`: a list there, or an offset of
    -1 or 1.5, is answered with an error here rather than reaching it.
    """
    run_id = header.get("run_id")
    if header.type in ("resume", "cancel", "ack") and not isinstance(run_id, str):
        return f"{header.type} refused: its run_id is not a string"
    offset = header.get("offset")
    if header.type == "resume" and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        return f"resume refused: its offset is not a whole number >= 0 (run {str(run_id)[:80]})"
    return None


class Inbound:
    """The screen between a session's stream and its serve loop (see the module doc)."""

    def __init__(self, reader: Reader, send: Callable[..., None], home: Path, trust: TrustStore, own_key_id: str,
                 challenge: str, limits: bundle.Limits, clock: Callable[[], float] = time.time) -> None:
        self._reader = reader
        self._send = send
        self._home = home
        self._trust = trust
        self._own_key_id = own_key_id
        self._challenge = challenge
        self._limits = limits
        self._clock = clock
        self.authenticated = False
        self._audited = 0  # entries this session wrote to the audit log

    def run(self, put: Callable[[object], None]) -> None:
        """Pass allowed records to `put` until the stream ends or the session must end.

        Raises ProtocolError (a malformed record, or a payload where none may be)
        and OSError as the stream does.
        """
        try:
            while (header := self._reader.read_header()) is not None:
                if header.type != "assign" and header.size:
                    raise ProtocolError(f"a {header.type} record carries no payload, this one announces "
                                        f"{header.size} bytes")
                if header.type == "auth":
                    if not self._auth(header, put):
                        return
                elif not self.authenticated:
                    if not self._refuse(header, f"{header.type} refused: this session is not authenticated (the "
                                                "control plane answers hello's challenge with `auth` first)"):
                        return
                elif header.type == "assign":
                    if not self._assign(header, put):
                        return
                elif header.type == "trust":
                    self._take_trust(header)
                elif (problem := malformed(header)) is not None:
                    self._send("error", request=header.type, message=problem)
                else:
                    put(Message(header.type, header.fields))
        except (ProtocolError, OSError, ValueError) as exc:
            if not self.authenticated:
                audit.record(self._home, audit.SESSION_UNAUTHENTICATED, f"session closed: {exc}")
            raise
        if not self.authenticated:
            audit.record(self._home, audit.SESSION_UNAUTHENTICATED,
                         "the peer ended the session before it was authenticated")

    def _auth(self, header: Header, put: Callable[[object], None]) -> bool:
        if self.authenticated:
            self._send("error", request="auth", message="this session is already authenticated")
            return True
        try:
            trusted, refused = self._trust.trusted(self._clock())
            signer = verify_auth(header.get("envelope"), self._challenge, self._own_key_id, trusted, refused,
                                 self._clock())
        except WorkerError as exc:
            self._send("error", request="auth", message=str(exc))
            audit.record(self._home, audit.AUTH_REFUSED, str(exc), signers=audit.signers(header.get("envelope")))
            return False
        self.authenticated = True
        put(Authenticated(signer))
        return True

    def _assign(self, header: Header, put: Callable[[object], None]) -> bool:
        run_id = header.get("run_id")
        now = self._clock()
        try:
            if not isinstance(run_id, str):
                raise WorkerError(f"invalid run id {run_id!r}")
            RunDir.at(self._home, run_id)  # a well-formed id, or WorkerError
            trusted, refused = self._trust.trusted(now)
            if not trusted and not refused:
                raise bundle.BundleRejected("bundle rejected: this Worker trusts no control plane key yet; enroll "
                                            "it with `taskrun worker add`", untrusted=True)
            manifest = bundle.verified_envelope(header.get("envelope"), trusted=trusted, refused=refused,
                                                audience=self._own_key_id, now=now)
            if manifest["run_id"] != run_id:
                raise bundle.BundleRejected(f"bundle rejected: signed for Run {manifest['run_id']}, assigned as "
                                            f"Run {run_id}")
            signed = manifest["archive"]["size"]
            if signed > self._limits.archive_bytes:
                raise bundle.BundleRejected(f"bundle rejected: the archive is {signed} bytes, over this Worker's "
                                            f"limit of {self._limits.archive_bytes}")
            repo = bundle.repo_of(manifest)
            if repo is not None and repo["size"] > self._limits.pack_bytes:
                raise bundle.BundleRejected(f"bundle rejected: the repository pack is {repo['size']} bytes, over "
                                            f"this Worker's limit of {self._limits.pack_bytes}")
            whole = bundle.payload_size(manifest)
            if header.size != whole:
                what = "payload" if repo else "archive"
                raise bundle.BundleRejected(f"bundle rejected: {header.size} {what} bytes sent, the signed "
                                            f"manifest says {whole}")
        except WorkerError as exc:
            self._audit(audit.BUNDLE_REFUSED, str(exc), run_id=run_id, signers=audit.signers(header.get("envelope")))
            return self._refuse(header, str(exc), untrusted=getattr(exc, "untrusted", False))
        payload = self._reader.read_payload(header)
        archive, pack = payload[:signed], payload[signed:]
        try:
            bundle.check_archive(manifest, len(archive), hashlib.sha256(archive).hexdigest())
            if repo is not None and hashlib.sha256(pack).hexdigest() != repo["sha256"]:
                raise bundle.BundleRejected("bundle rejected: the repository pack does not match the manifest's hash")
        except bundle.BundleRejected as exc:
            self._send("error", run_id=run_id, request="assign", message=str(exc))
            self._audit(audit.BUNDLE_REFUSED, str(exc), run_id=run_id, signers=audit.signers(header.get("envelope")))
            return True
        put(Assignment(run_id, manifest, archive, pack))
        return True

    def _take_trust(self, header: Header) -> None:
        # Here rather than on the loop: an `assign` read right after it is then judged by the new keys.
        try:
            keys = self._trust.apply(header.get("request"), self._own_key_id, self._clock())
        except WorkerError as exc:
            self._send("error", request="trust", message=str(exc))
        else:
            self._send("trusted", keys=[k["key_id"] for k in keys])

    def _refuse(self, header: Header, message: str, untrusted: bool = False) -> bool:
        """Answer a refused request; skip its payload if that is bounded, else end the session (False).

        `untrusted`: the refusal is because this Worker no longer trusts the
        key that signed it (its trust store was reset or changed since the
        session was authenticated): the control plane then stops sending it
        Runs and places the refused one elsewhere.
        """
        fields: dict[str, Any] = {"request": header.type}
        if header.get("run_id") is not None:
            fields["run_id"] = header.get("run_id")
        if not self.authenticated:
            self._audit(audit.UNAUTHENTICATED_REQUEST, message, **fields)
        if untrusted:
            fields["untrusted"] = True
        most = self._limits.archive_bytes + self._limits.pack_bytes
        if header.size > most:
            self._send("error", **fields, message=f"{message}; the session ends: its {header.size} payload bytes "
                                                  f"are over this Worker's limit of {most}")
            return False
        self._send("error", **fields, message=message)
        self._reader.skip_payload(header)
        return True

    def _audit(self, event: str, reason: str, **detail: Any) -> None:
        """An audit entry, unless this session wrote MAX_SESSION_ENTRIES already (then one saying so)."""
        self._audited += 1
        if self._audited <= audit.MAX_SESSION_ENTRIES:
            audit.record(self._home, event, reason, **detail)
        elif self._audited == audit.MAX_SESSION_ENTRIES + 1:
            audit.record(self._home, event, f"{audit.MAX_SESSION_ENTRIES} entries written for this session; "
                                            "its later refusals are not logged one by one")
