"""The Worker's trust store: enrollment, signed updates, retirement, reset; and its own result key."""

from __future__ import annotations

import base64
import json
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Iterable

import pytest

from taskrunner.defaults import CLOCK_SKEW_SECONDS
from taskrunner.errors import WorkerError
from taskrunner.signing import BUNDLE_TYPE, TRUST_TYPE, SigningKey, sign, verify
from taskrunner.worker.enrollment import Enrollment
from taskrunner.worker.trust import TRUST_FILE, WORKER_KEY_FILE, TrustRefused, TrustStore, reply, worker_key

NOW = 1_700_000_000.0
CONTROL = SigningKey.generate()  # the control plane's key
SUCCESSOR = SigningKey.generate()  # the key it rotates to
STRANGER = SigningKey.generate()  # someone holding the Worker's SSH key, but no control plane key
OVERLAP = 3600.0


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    """A Worker home whose admin pinned CONTROL (`taskrun-worker init --trust-key`); see
    test_enrollment_token.py for tokens and for Workers whose admin named nobody."""
    path = tmp_path / "worker-home"
    Enrollment(path).pin([CONTROL.key_id], NOW - 100)
    return path


@pytest.fixture()
def me(home: Path) -> SigningKey:
    """This Worker's own result key: trust statements are addressed to its id."""
    return worker_key(home)


def listed(key: SigningKey, retire_at: float | None = None) -> dict[str, Any]:
    return {"key_id": key.key_id, "public": key.public_line, "retire_at": retire_at}


def body_of(keys: list[dict[str, Any]], *, audience: str | None, issued_at: float = NOW,
            expires_at: float | None = None, **extra: Any) -> bytes:
    return json.dumps({"format": 1, "audience": audience, "keys": keys, "issued_at": issued_at,
                       "expires_at": issued_at + 600 if expires_at is None else expires_at,
                       "nonce": secrets.token_hex(16), **extra}).encode()


def statement(signers: Iterable[SigningKey], keys: list[dict[str, Any]], *, audience: str | None,
              offered: Iterable[SigningKey] | None = None, **body: Any) -> dict[str, Any]:
    """A trust request: the public lines it is signed by, and the signed statement."""
    signers = list(signers)
    return {"keys": [k.public_line for k in (signers if offered is None else offered)],
            "envelope": sign(TRUST_TYPE, body_of(keys, audience=audience, **body), signers)}


def enroll(store: TrustStore, me: SigningKey, issued_at: float = NOW) -> None:
    store.apply(statement([CONTROL], [listed(CONTROL)], audience=me.key_id, issued_at=issued_at),
                me.key_id, issued_at)


def on_disk(store: TrustStore) -> bytes | None:
    return store.path.read_bytes() if store.path.exists() else None


def assert_refused(store: TrustStore, request: Any, own: str, now: float, reason: str) -> None:
    before = on_disk(store)
    with pytest.raises(TrustRefused, match=re.escape(reason)) as caught:
        store.apply(request, own, now)
    assert str(caught.value).startswith("trust refused: ")
    assert on_disk(store) == before, "a refused statement changed the trust store"


# ---------------------------------------------------------------- enrollment


def test_a_fresh_worker_trusts_nothing(home: Path) -> None:
    assert TrustStore(home).trusted(NOW) == ({}, {})
    assert TrustStore(home).state() == {"keys": [], "issued_at": None}


def test_first_enrollment_signed_by_a_key_it_lists_is_accepted(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    keys = store.apply(statement([CONTROL], [listed(CONTROL)], audience=me.key_id), me.key_id, NOW)
    assert keys == [listed(CONTROL)]
    assert store.trusted(NOW) == ({CONTROL.key_id: CONTROL.public}, {})
    assert store.state()["issued_at"] == NOW


def test_first_enrollment_may_be_addressed_to_no_worker_in_particular(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    store.apply(statement([CONTROL], [listed(CONTROL)], audience=None), me.key_id, NOW)
    assert store.trusted(NOW)[0] == {CONTROL.key_id: CONTROL.public}


def test_first_enrollment_signed_by_an_offered_key_it_does_not_list_is_refused(home: Path, me: SigningKey) -> None:
    Enrollment(home).pin([STRANGER.key_id], NOW - 100)
    request = statement([STRANGER], [listed(CONTROL)], audience=me.key_id)
    assert_refused(TrustStore(home), request, me.key_id, NOW,
                   "trust refused: an enrollment must be signed by a key it lists")


def test_first_enrollment_signed_by_a_key_it_does_not_offer_is_refused(home: Path, me: SigningKey) -> None:
    request = statement([STRANGER], [listed(STRANGER)], audience=me.key_id, offered=[CONTROL])
    assert_refused(TrustStore(home), request, me.key_id, NOW,
                   f"trust refused: signed by unknown key id {STRANGER.key_id}")


def test_a_first_enrollment_addressed_to_another_worker_is_refused(home: Path, me: SigningKey) -> None:
    # An enrollment captured on its way to another Worker does not enroll this one.
    other = SigningKey.generate()
    store = TrustStore(home)
    assert_refused(store, statement([CONTROL], [listed(CONTROL)], audience=other.key_id), me.key_id, NOW,
                   f"trust refused: addressed to {other.key_id}")
    assert store.trusted(NOW) == ({}, {})


@pytest.mark.parametrize(("lines", "reason"), [
    (["ssh-ed25519 AAAA"], "not an Ed25519 public key line"),
    (["ed25519 " + base64.b64encode(b"short").decode()], "an Ed25519 public key is 32 bytes, this one is 5"),
])
def test_first_enrollment_offering_a_malformed_key_is_refused(home: Path, me: SigningKey, lines: list[str],
                                                              reason: str) -> None:
    request = {**statement([CONTROL], [listed(CONTROL)], audience=me.key_id), "keys": lines}
    assert_refused(TrustStore(home), request, me.key_id, NOW, f"trust refused: {reason}")


def test_a_tampered_enrollment_is_refused(home: Path, me: SigningKey) -> None:
    genuine = statement([CONTROL], [listed(CONTROL)], audience=me.key_id)
    planted = json.loads(base64.b64decode(genuine["envelope"]["payload"]))
    planted["keys"].append(listed(STRANGER))
    forged = {**genuine, "envelope": {**genuine["envelope"],
                                      "payload": base64.b64encode(json.dumps(planted).encode()).decode()}}
    assert_refused(TrustStore(home), forged, me.key_id, NOW, "trust refused: signature does not verify")


def test_an_enrollment_with_one_bit_flipped_is_refused(home: Path, me: SigningKey) -> None:
    genuine = statement([CONTROL], [listed(CONTROL)], audience=me.key_id)
    body = bytearray(base64.b64decode(genuine["envelope"]["payload"]))
    body[len(body) // 2] ^= 0x04
    forged = {**genuine, "envelope": {**genuine["envelope"], "payload": base64.b64encode(bytes(body)).decode()}}
    assert_refused(TrustStore(home), forged, me.key_id, NOW, "trust refused: signature does not verify")


def test_a_replayed_enrollment_on_an_enrolled_worker_is_refused(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    captured = statement([CONTROL], [listed(CONTROL)], audience=me.key_id)
    store.apply(captured, me.key_id, NOW)
    assert_refused(store, captured, me.key_id, NOW + 1,
                   "trust refused: replayed or out-of-date statement (not newer than the last one this Worker took)")


def test_a_replayed_unaddressed_enrollment_on_an_enrolled_worker_is_refused(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    captured = statement([CONTROL], [listed(CONTROL)], audience=None)
    store.apply(captured, me.key_id, NOW)
    assert_refused(store, captured, me.key_id, NOW + 1,
                   "trust refused: an enrollment (a statement with no audience) is taken only by a Worker that "
                   "trusts no key yet, and this one is enrolled")


def test_an_enrollment_by_someone_else_on_an_enrolled_worker_is_refused(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    # A fresh, self-signed "enrollment" by a stranger who can reach the gate.
    request = statement([STRANGER], [listed(STRANGER)], audience=me.key_id, issued_at=NOW + 10)
    assert_refused(store, request, me.key_id, NOW + 10,
                   f"trust refused: signed by unknown key id {STRANGER.key_id} (this Worker already trusts a "
                   "control plane; a change must be signed by a key it trusts)")
    assert store.trusted(NOW + 10)[0] == {CONTROL.key_id: CONTROL.public}


# ---------------------------------------------------------------- updates


def test_an_update_signed_by_a_trusted_key_newer_and_addressed_to_this_worker_is_accepted(
        home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    rotation = statement([CONTROL], [listed(CONTROL, NOW + OVERLAP), listed(SUCCESSOR)], audience=me.key_id,
                         issued_at=NOW + 10)
    keys = store.apply(rotation, me.key_id, NOW + 10)
    assert [k["key_id"] for k in keys] == [CONTROL.key_id, SUCCESSOR.key_id]
    assert store.trusted(NOW + 10) == ({CONTROL.key_id: CONTROL.public, SUCCESSOR.key_id: SUCCESSOR.public}, {})
    assert store.state()["issued_at"] == NOW + 10


def test_an_update_signed_by_an_untrusted_key_is_refused(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    request = statement([SUCCESSOR], [listed(SUCCESSOR)], audience=me.key_id, issued_at=NOW + 10)
    assert_refused(store, request, me.key_id, NOW + 10, f"trust refused: signed by unknown key id {SUCCESSOR.key_id}")


def test_an_update_addressed_to_another_worker_is_refused(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    other = SigningKey.generate()
    request = statement([CONTROL], [listed(CONTROL), listed(SUCCESSOR)], audience=other.key_id, issued_at=NOW + 10)
    assert_refused(store, request, me.key_id, NOW + 10,
                   f"trust refused: addressed to {other.key_id}, this Worker is {me.key_id}")


@pytest.mark.parametrize("issued_at", [NOW - 10, NOW])
def test_an_update_not_newer_than_the_last_one_taken_is_refused(home: Path, me: SigningKey, issued_at: float) -> None:
    store = TrustStore(home)
    enroll(store, me)
    request = statement([CONTROL], [listed(SUCCESSOR)], audience=me.key_id, issued_at=issued_at)
    assert_refused(store, request, me.key_id, NOW + 10, "trust refused: replayed or out-of-date statement")


def test_an_update_issued_in_the_future_is_refused(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    request = statement([CONTROL], [listed(SUCCESSOR)], audience=me.key_id, issued_at=NOW + CLOCK_SKEW_SECONDS + 11)
    assert_refused(store, request, me.key_id, NOW + 10, "trust refused: issued in the future")


def test_an_expired_statement_is_refused(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    request = statement([CONTROL], [listed(CONTROL)], audience=me.key_id, expires_at=NOW + 600)
    assert_refused(store, request, me.key_id, NOW + 600 + CLOCK_SKEW_SECONDS + 1,
                   "trust refused: the statement has expired")


def test_a_statement_signed_as_a_bundle_is_refused(home: Path, me: SigningKey) -> None:
    request = {"keys": [CONTROL.public_line],
               "envelope": sign(BUNDLE_TYPE, body_of([listed(CONTROL)], audience=me.key_id), [CONTROL])}
    assert_refused(TrustStore(home), request, me.key_id, NOW,
                   f"trust refused: payload type '{BUNDLE_TYPE}', expected '{TRUST_TYPE}'")


@pytest.mark.parametrize(("request_", "reason"), [
    (None, "the request is not {keys, envelope}"),
    ({"envelope": {}}, "the request is not {keys, envelope}"),
    ({"keys": "ed25519 AAAA", "envelope": {}}, "the request is not {keys, envelope}"),
    ({"keys": [CONTROL.public_line]}, "not a signed envelope"),
])
def test_a_malformed_request_is_refused(home: Path, me: SigningKey, request_: Any, reason: str) -> None:
    assert_refused(TrustStore(home), request_, me.key_id, NOW, f"trust refused: {reason}")


@pytest.mark.parametrize(("keys", "extra", "reason"), [
    ([], {}, "the statement lists no keys"),
    ([listed(CONTROL, NOW + 10)], {}, "every listed key is being retired; one must be current"),
    ([{**listed(CONTROL), "key_id": SUCCESSOR.key_id}], {},
     f"key id {SUCCESSOR.key_id!r} does not match its public key"),
    ([{"key_id": CONTROL.key_id}], {}, "a listed key is malformed"),
    ([{**listed(CONTROL), "retire_at": "soon"}], {}, "a listed key is malformed"),
    (["ed25519 AAAA"], {}, "a listed key is malformed"),
    ([listed(CONTROL)], {"format": 2}, "not a format 1 trust statement"),
    ([listed(CONTROL)], {"issued_at": "now"}, "issued_at is not a time"),
    ([listed(CONTROL)], {"expires_at": True}, "expires_at is not a time"),
    ([listed(CONTROL)], {"audience": 5}, "audience is not a key id"),
])
def test_a_malformed_statement_is_refused(home: Path, me: SigningKey, keys: list[Any], extra: dict[str, Any],
                                          reason: str) -> None:
    body = json.loads(body_of(keys, audience=me.key_id))
    request = {"keys": [CONTROL.public_line],
               "envelope": sign(TRUST_TYPE, json.dumps({**body, **extra}).encode(), [CONTROL])}
    assert_refused(TrustStore(home), request, me.key_id, NOW, f"trust refused: {reason}")


def test_a_signed_statement_that_is_not_json_is_refused(home: Path, me: SigningKey) -> None:
    request = {"keys": [CONTROL.public_line], "envelope": sign(TRUST_TYPE, b"{not json", [CONTROL])}
    assert_refused(TrustStore(home), request, me.key_id, NOW, "trust refused: the signed statement is not JSON")


# ---------------------------------------------------------------- retirement and reset


def test_a_key_past_its_retire_at_is_no_longer_trusted(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    store.apply(statement([CONTROL], [listed(CONTROL, NOW + OVERLAP), listed(SUCCESSOR)], audience=me.key_id,
                          issued_at=NOW + 10), me.key_id, NOW + 10)
    assert CONTROL.key_id in store.trusted(NOW + OVERLAP - 1)[0]
    live, retired = store.trusted(NOW + OVERLAP)
    assert live == {SUCCESSOR.key_id: SUCCESSOR.public}
    assert retired == {CONTROL.key_id: f"key {CONTROL.key_id} was retired"}
    # A retired key signs nothing the Worker takes: not a bundle...
    with pytest.raises(Exception, match=re.escape(f"key {CONTROL.key_id} was retired")):
        verify(sign(BUNDLE_TYPE, b"{}", [CONTROL]), BUNDLE_TYPE, live, retired)
    # ...nor a trust statement, whatever it says.
    later = NOW + OVERLAP + 10
    revive = statement([CONTROL], [listed(CONTROL)], audience=me.key_id, issued_at=later)
    assert_refused(store, revive, me.key_id, later, f"trust refused: key {CONTROL.key_id} was retired")
    # The successor still can.
    store.apply(statement([SUCCESSOR], [listed(SUCCESSOR)], audience=me.key_id, issued_at=later), me.key_id, later)
    assert store.trusted(later) == ({SUCCESSOR.key_id: SUCCESSOR.public}, {})


def test_a_worker_whose_every_key_retired_takes_nothing_until_reset(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    store.apply(statement([CONTROL], [listed(CONTROL, NOW + 100), listed(SUCCESSOR)], audience=me.key_id,
                          issued_at=NOW + 10), me.key_id, NOW + 10)
    # The control plane lost SUCCESSOR and the Worker only holds the retiring key (as if by hand).
    data = json.loads(store.path.read_text())
    data["keys"] = [k for k in data["keys"] if k["key_id"] == CONTROL.key_id]
    store.path.write_text(json.dumps(data))
    later = NOW + 1000
    assert store.trusted(later) == ({}, {CONTROL.key_id: f"key {CONTROL.key_id} was retired"})
    third = SigningKey.generate()
    request = statement([third], [listed(third)], audience=me.key_id, issued_at=later)
    assert_refused(store, request, me.key_id, later, f"trust refused: signed by unknown key id {third.key_id}")
    store.reset(later, pinned=[third.key_id])
    store.apply(request, me.key_id, later)
    assert store.trusted(later) == ({third.key_id: third.public}, {})


def test_reset_empties_the_store_and_allows_a_new_enrollment(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    store.reset(NOW)
    assert store.trusted(NOW) == ({}, {})
    assert store.state() == {"keys": [], "issued_at": None}
    assert not (home / TRUST_FILE).exists()
    store.reset(NOW, pinned=[SUCCESSOR.key_id])  # idempotent; names the next enroller
    # Starting over, even an older statement is an enrollment again.
    store.apply(statement([SUCCESSOR], [listed(SUCCESSOR)], audience=me.key_id, issued_at=NOW - 5), me.key_id, NOW)
    assert store.trusted(NOW) == ({SUCCESSOR.key_id: SUCCESSOR.public}, {})


def test_a_store_dated_in_the_future_takes_no_statement_and_says_it_was_changed_behind_our_back(
        home: Path, me: SigningKey) -> None:
    # What an Agent did: planted its own key and dated the store far ahead, so that every
    # statement from the control plane would be "not newer".
    store = TrustStore(home)
    enroll(store, me)
    planted = json.loads(store.path.read_text())
    planted["keys"].append(listed(STRANGER))
    planted["issued_at"] = NOW + 10 * 365 * 86400
    store.path.write_text(json.dumps(planted))
    correction = statement([CONTROL], [listed(CONTROL)], audience=me.key_id, issued_at=NOW + 10)
    assert_refused(store, correction, me.key_id, NOW + 10,
                   "trust refused: this Worker's trust store is dated in the future")


@pytest.mark.parametrize("issued_at", [NOW + CLOCK_SKEW_SECONDS + 60, float("inf"), float("nan")])
def test_a_statement_issued_beyond_the_clock_skew_or_at_no_real_time_is_refused(
        home: Path, me: SigningKey, issued_at: float) -> None:
    store = TrustStore(home)
    enroll(store, me)
    request = statement([CONTROL], [listed(CONTROL), listed(SUCCESSOR)], audience=me.key_id, issued_at=issued_at,
                        expires_at=NOW + 10_000)
    assert_refused(store, request, me.key_id, NOW + 1, "trust refused: ")
    assert store.state()["issued_at"] == NOW


def test_a_refused_statement_leaves_the_trust_file_byte_for_byte(home: Path, me: SigningKey) -> None:
    store = TrustStore(home)
    enroll(store, me)
    before = store.path.read_bytes()
    for request in (statement([STRANGER], [listed(STRANGER)], audience=me.key_id, issued_at=NOW + 5),
                    statement([CONTROL], [listed(STRANGER)], audience=me.key_id, issued_at=NOW - 5)):
        with pytest.raises(TrustRefused):
            store.apply(request, me.key_id, NOW + 5)
    assert store.path.read_bytes() == before


def test_an_unreadable_trust_file_is_reported_with_the_way_out(home: Path) -> None:
    home.mkdir(exist_ok=True)
    (home / TRUST_FILE).write_text("{torn")
    with pytest.raises(WorkerError, match=re.escape("taskrun-worker trust --reset")):
        TrustStore(home).trusted(NOW)


def test_trust_refused_is_a_worker_error() -> None:
    assert issubclass(TrustRefused, WorkerError)


# ---------------------------------------------------------------- the Worker's own key


def test_the_worker_key_is_created_once_owner_only(home: Path) -> None:
    key = worker_key(home)
    path = home / WORKER_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert worker_key(home).key_id == key.key_id
    assert SigningKey.from_pem(path.read_bytes()).public == key.public
    assert sorted(p.name for p in path.parent.iterdir()) == ["worker.pem"]


def test_a_session_starting_while_another_writes_the_worker_key_ends_with_the_same_key(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pem = SigningKey.pem
    other_session: list[SigningKey] = []
    started: list[bool] = []

    def pem(self: SigningKey) -> bytes:
        if not started:  # the other session starts while this one is writing its key
            started.append(True)
            other_session.append(worker_key(home))
        return real_pem(self)

    monkeypatch.setattr(SigningKey, "pem", pem)
    mine = worker_key(home)
    monkeypatch.undo()
    assert mine.key_id == other_session[0].key_id == worker_key(home).key_id
    assert stat.S_IMODE((home / WORKER_KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in (home / WORKER_KEY_FILE).parent.iterdir()) == ["worker.pem"]


def test_the_reply_names_the_worker_key_and_what_it_trusts(home: Path, me: SigningKey) -> None:
    keys = [listed(CONTROL), listed(SUCCESSOR)]
    assert json.loads(reply(home, keys)) == {"worker_key": me.public_line, "worker_key_id": me.key_id,
                                             "trusted": [CONTROL.key_id, SUCCESSOR.key_id]}
