"""What a Worker trusts, and the key it signs its results with.

    <home>/keys/worker.pem   the Worker's own Ed25519 result key (0600; dir 0700)
    <home>/trust.json        the control plane keys it trusts: [{key_id, public, retire_at}]
                             and the issued_at of the last trust statement it took

A control plane changes this set only with a trust statement: a DSSE envelope
(payload type signing.TRUST_TYPE) whose body is

    {"format": 1, "audience": WORKER_KEY_ID | null, "keys": [{key_id, public, retire_at}],
     "issued_at": T, "expires_at": T, "nonce": HEX}

sent with the public lines it is signed by: `{"keys": [LINE...], "envelope": ENV}`.
The rules:

- While the Worker trusts no key, it takes the statement only if its admin
  named the enroller (enrollment.py): signed by the control plane key pinned
  with `taskrun-worker init --trust-key`, or carrying the MAC of the one-time
  token `init` printed; and signed by a key the statement itself lists (the
  control plane proves it holds the key). That is enrollment: `taskrun worker
  add` through the gate's `trust` request. The pin or token is then used up.
- Once it trusts a key, a statement must be signed by a key it still trusts,
  be addressed to this Worker's key id, and be newer (`issued_at`) than the
  last one taken: a stolen SSH key, or a captured enrollment replayed, cannot
  plant a key.
- A key past its `retire_at` is no longer trusted, whatever the statement says.

- A statement issued in the future (beyond CLOCK_SKEW_SECONDS) is refused: it
  would shut out every later statement.

The Worker's admin can always start over with `taskrun-worker trust --reset`
on the Worker itself (the gate does not allow it): needed when every key the
Worker trusts was retired while it was away, or when its trust store was
changed behind the control plane's back. A reset names the next enroller: a
new one-time token, or a pinned key.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from taskrunner.atomic import read_json, write_json
from taskrunner.defaults import CLOCK_SKEW_SECONDS, ENROLL_TOKEN_TTL_SECONDS
from taskrunner.errors import WorkerError
from taskrunner.signing import (TRUST_TYPE, SignatureRejected, SigningKey, key_id, outside_validity,
                                parse_public_line, verify_json)
from taskrunner.worker import audit
from taskrunner.worker.enrollment import Enrollment, EnrollmentRefused

TRUST_FORMAT = 1
WORKER_KEY_FILE = "keys/worker.pem"
TRUST_FILE = "trust.json"


class TrustRefused(WorkerError):
    """Raised when a trust statement is refused; the trust store is unchanged."""


def worker_key(home: Path) -> SigningKey:
    """The Worker's result key, created on first use."""
    path = home / WORKER_KEY_FILE
    try:
        return SigningKey.from_pem(path.read_bytes())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = SigningKey.generate()
    # Two sessions starting at once must end up with one key, and neither may
    # read the other's half-written file: write a private temporary file whole,
    # then link it into place, which fails if another session got there first.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.pem())
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return SigningKey.from_pem(path.read_bytes())
    finally:
        os.unlink(tmp)
    return key


class TrustStore:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / TRUST_FILE

    def state(self) -> dict[str, Any]:
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return {"keys": [], "issued_at": None}
        except (OSError, ValueError) as exc:
            raise WorkerError(f"{self.path} is unreadable ({exc}); fix it or run `taskrun-worker trust --reset`") \
                from None
        return data if isinstance(data, dict) else {"keys": [], "issued_at": None}

    def trusted(self, now: float) -> tuple[dict[str, bytes], dict[str, str]]:
        """(key id -> public key of live keys, key id -> why it is refused for retired ones)."""
        live: dict[str, bytes] = {}
        retired: dict[str, str] = {}
        try:
            for entry in self.state()["keys"]:
                retire_at = entry.get("retire_at")
                if retire_at is not None and retire_at <= now:
                    retired[entry["key_id"]] = f"key {entry['key_id']} was retired"
                else:
                    live[entry["key_id"]] = parse_public_line(entry["public"])
        except (SignatureRejected, KeyError, TypeError, AttributeError) as exc:
            raise WorkerError(f"{self.path} is damaged ({exc!r}); run `taskrun-worker trust --reset` on the "
                              "Worker and enroll it again") from None
        return live, retired

    def apply(self, request: Any, own_key_id: str, now: float) -> list[dict[str, Any]]:
        """Take a trust statement (see the module doc) or raise TrustRefused; returns the new set.

        A refusal is appended to the audit log (audit.py) as `enrollment_refused`
        while the Worker trusts no key, else `trust_refused`.
        """
        try:
            return self._apply(request, own_key_id, now)
        except TrustRefused as exc:
            try:
                enrolled = bool(self.state()["keys"])
            except (WorkerError, KeyError, TypeError):
                enrolled = True
            envelope = request.get("envelope") if isinstance(request, dict) else None
            audit.record(self.home, audit.TRUST_REFUSED if enrolled else audit.ENROLLMENT_REFUSED, str(exc),
                         signers=audit.signers(envelope))
            raise

    def _apply(self, request: Any, own_key_id: str, now: float) -> list[dict[str, Any]]:
        if not isinstance(request, dict) or not isinstance(request.get("keys"), list):
            raise TrustRefused("trust refused: the request is not {keys, envelope}")
        with self._locked():
            current = self.state()
            live, retired = self.trusted(now)
            first = not current["keys"]
            enrollment = Enrollment(self.home)
            if first:
                try:
                    offered = [parse_public_line(line) for line in request["keys"]]
                    live = enrollment.signers({key_id(raw): raw for raw in offered})
                except SignatureRejected as exc:
                    raise TrustRefused(f"trust refused: {exc}") from None
                except EnrollmentRefused as exc:
                    raise TrustRefused(f"trust refused: {exc}") from None
            try:
                data, signer = verify_json(request.get("envelope"), TRUST_TYPE, live, retired, what="statement")
            except SignatureRejected as exc:
                hint = "" if first else " (this Worker already trusts a control plane; a change must be " \
                                        "signed by a key it trusts)"
                raise TrustRefused(f"trust refused: {exc}{hint}") from None
            statement = _statement(data)
            if statement["audience"] is None and not first:
                raise TrustRefused("trust refused: an enrollment (a statement with no audience) is taken only "
                                   "by a Worker that trusts no key yet, and this one is enrolled")
            if statement["audience"] not in (own_key_id, None):
                raise TrustRefused(f"trust refused: addressed to {statement['audience']}, this Worker is "
                                   f"{own_key_id}")
            problem = outside_validity(statement["issued_at"], statement["expires_at"], now,
                                       expired="the statement has expired")
            if problem is not None:
                raise TrustRefused(f"trust refused: {problem}")
            last = current.get("issued_at")
            if isinstance(last, (int, float)) and last > now + CLOCK_SKEW_SECONDS:
                # Only a write behind the statements' back dates the store in the future.
                raise TrustRefused(f"trust refused: this Worker's trust store is dated in the future (issued_at "
                                   f"{last:.0f}), so it was changed behind the control plane's back; its admin "
                                   "runs `taskrun-worker trust --reset` and enrolls it again")
            if last is not None and statement["issued_at"] <= last:
                raise TrustRefused("trust refused: replayed or out-of-date statement (not newer than the "
                                   "last one this Worker took)")
            keys = statement["keys"]
            if first and signer not in {k["key_id"] for k in keys}:
                raise TrustRefused("trust refused: an enrollment must be signed by a key it lists")
            if first:
                try:
                    enrollment.check(statement, now)
                except EnrollmentRefused as exc:
                    raise TrustRefused(f"trust refused: {exc}") from None
            write_json(self.path, {"keys": keys, "issued_at": statement["issued_at"], "updated_at": now})
            if first:
                enrollment.consume()  # single use: the next enrollment needs a new pin or token
            return keys

    def reset(self, now: float, pinned: list[str] | None = None,
              token_ttl: float = ENROLL_TOKEN_TTL_SECONDS) -> str | None:
        """Forget every trusted key and name the next enroller: pin `pinned` key ids, else issue a
        one-time token, which is returned (only its hash is kept)."""
        with self._locked():
            self.path.unlink(missing_ok=True)
            enrollment = Enrollment(self.home)
            if pinned:
                enrollment.pin(pinned, now)
                return None
            return enrollment.issue_token(now, token_ttl)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "trust.lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _statement(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("format") != TRUST_FORMAT:
        raise TrustRefused(f"trust refused: not a format {TRUST_FORMAT} trust statement")
    for name in ("issued_at", "expires_at"):
        value = data.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise TrustRefused(f"trust refused: {name} is not a time")
    if data.get("audience") is not None and not isinstance(data["audience"], str):
        raise TrustRefused("trust refused: audience is not a key id")
    keys = data.get("keys")
    if not isinstance(keys, list) or not keys:
        raise TrustRefused("trust refused: the statement lists no keys")
    clean = []
    for entry in keys:
        try:
            raw = parse_public_line(entry["public"])
            retire_at = entry.get("retire_at")
            if retire_at is not None and not isinstance(retire_at, (int, float)):
                raise TypeError("retire_at")
        except (SignatureRejected, KeyError, TypeError) as exc:
            raise TrustRefused(f"trust refused: a listed key is malformed ({exc})") from None
        if entry.get("key_id") != key_id(raw):
            raise TrustRefused(f"trust refused: key id {entry.get('key_id')!r} does not match its public key")
        clean.append({"key_id": key_id(raw), "public": entry["public"], "retire_at": retire_at})
    if all(k["retire_at"] is not None for k in clean):
        raise TrustRefused("trust refused: every listed key is being retired; one must be current")
    return {**data, "keys": clean}


def reply(home: Path, keys: list[dict[str, Any]]) -> bytes:
    """What the gate's `trust` request prints: the Worker's result key and what it now trusts."""
    key = worker_key(home)
    return json.dumps({"worker_key": key.public_line, "worker_key_id": key.key_id,
                       "trusted": [k["key_id"] for k in keys]}).encode()

