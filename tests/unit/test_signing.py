"""signing.py: DSSE envelopes and Ed25519 keys, and the tampered envelopes they must refuse."""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from taskrunner.errors import TaskrunError
from taskrunner.signing import (
    BUNDLE_TYPE,
    MAX_ENVELOPE_BYTES,
    RESULT_TYPE,
    TRUST_TYPE,
    SignatureRejected,
    SigningKey,
    key_id,
    pae,
    parse_public_line,
    public_line,
    sign,
    verify,
)

FAST = settings(max_examples=60, deadline=None, database=None)
KEY = SigningKey.generate()
OTHER = SigningKey.generate()
BODY = b'{"hello":"world"}'


def exactly(text: str) -> str:
    return f"^{re.escape(text)}$"


def trust(*keys: SigningKey) -> dict[str, bytes]:
    return {key.key_id: key.public for key in keys}


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def with_body(envelope: dict[str, Any], body: bytes) -> dict[str, Any]:
    return {**envelope, "payload": base64.b64encode(body).decode()}


def with_sig(envelope: dict[str, Any], sig: bytes, index: int = 0) -> dict[str, Any]:
    forged = copy.deepcopy(envelope)
    forged["signatures"][index]["sig"] = base64.b64encode(sig).decode()
    return forged


def raw_sig(envelope: dict[str, Any], index: int = 0) -> bytes:
    return base64.b64decode(envelope["signatures"][index]["sig"])


# ---------------------------------------------------------------- keys


def test_a_key_id_is_sha256_colon_unpadded_base64_of_the_raw_public_key() -> None:
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(KEY.public).digest()).decode().rstrip("=")
    assert key_id(KEY.public) == KEY.key_id == expected
    assert "=" not in KEY.key_id
    assert len(KEY.public) == 32


def test_a_public_line_round_trips_to_the_raw_public_key() -> None:
    line = public_line(KEY.public)
    assert line == KEY.public_line
    assert line.startswith("ed25519 ")
    assert parse_public_line(line) == KEY.public


@pytest.mark.parametrize(("line", "reason"), [
    ("ssh-ed25519 AAAA", "not an Ed25519 public key line"),
    ("ed25519", "not an Ed25519 public key line"),
    ("ed25519 AAAA extra", "not an Ed25519 public key line"),
    ("", "not an Ed25519 public key line"),
    ("ed25519 not*base64!", "is not valid base64"),
    ("ed25519 " + base64.b64encode(b"x" * 31).decode(), "an Ed25519 public key is 32 bytes, this one is 31"),
    ("ed25519 " + base64.b64encode(b"x" * 33).decode(), "an Ed25519 public key is 32 bytes, this one is 33"),
])
def test_a_malformed_public_line_is_refused_saying_what_is_wrong(line: str, reason: str) -> None:
    with pytest.raises(SignatureRejected, match=reason):
        parse_public_line(line)


def test_a_public_line_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(SignatureRejected, match="not an Ed25519 public key line"):
        parse_public_line(None)  # type: ignore[arg-type]


def test_a_key_survives_a_pem_round_trip() -> None:
    again = SigningKey.from_pem(KEY.pem())
    assert again.key_id == KEY.key_id
    assert again.public == KEY.public
    body, signer = verify(sign(BUNDLE_TYPE, BODY, [again]), BUNDLE_TYPE, trust(KEY))
    assert (body, signer) == (BODY, KEY.key_id)


def test_a_pem_holding_another_kind_of_key_is_refused() -> None:
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(SignatureRejected, match="does not hold an Ed25519 private key"):
        SigningKey.from_pem(pem)


def test_signature_rejected_is_a_taskrun_error() -> None:
    assert issubclass(SignatureRejected, TaskrunError)


# ---------------------------------------------------------------- PAE and the envelope


def test_pae_is_dssev1_with_byte_lengths() -> None:
    assert pae("t", b"ab") == b"DSSEv1 1 t 2 ab"
    assert pae("", b"") == b"DSSEv1 0  0 "
    # Lengths count bytes, not characters.
    assert pae("é", "ü".encode()) == "DSSEv1 2 é 2 ü".encode()


def test_pae_keeps_type_and_body_apart() -> None:
    # A naive concatenation would make these two equal.
    assert pae("a b", b"c") != pae("a", b"b c")


def test_an_envelope_carries_type_base64_body_and_one_signature_per_signer() -> None:
    envelope = sign(RESULT_TYPE, BODY, [KEY, OTHER])
    assert envelope["payloadType"] == RESULT_TYPE
    assert base64.b64decode(envelope["payload"]) == BODY
    assert [s["keyid"] for s in envelope["signatures"]] == [KEY.key_id, OTHER.key_id]
    assert len(raw_sig(envelope)) == 64


def test_signing_with_no_key_is_refused() -> None:
    with pytest.raises(SignatureRejected, match="nothing to sign with"):
        sign(BUNDLE_TYPE, BODY, [])


def test_verify_returns_the_exact_body_and_the_signer() -> None:
    assert verify(sign(BUNDLE_TYPE, BODY, [KEY]), BUNDLE_TYPE, trust(KEY)) == (BODY, KEY.key_id)


def test_one_trusted_signature_is_enough_among_unknown_ones() -> None:
    envelope = sign(BUNDLE_TYPE, BODY, [OTHER, KEY])
    assert verify(envelope, BUNDLE_TYPE, trust(KEY)) == (BODY, KEY.key_id)


# ---------------------------------------------------------------- tampering


@pytest.mark.parametrize("bit", [0, 7, 8 * 5 + 3, 8 * len(BODY) - 1])
def test_one_bit_flipped_in_the_body_does_not_verify(bit: int) -> None:
    envelope = sign(BUNDLE_TYPE, BODY, [KEY])
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(with_body(envelope, flip_bit(BODY, bit)), BUNDLE_TYPE, trust(KEY))


@pytest.mark.parametrize("bit", [0, 100, 255, 256, 511])
def test_one_bit_flipped_in_the_signature_does_not_verify(bit: int) -> None:
    envelope = sign(BUNDLE_TYPE, BODY, [KEY])
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(with_sig(envelope, flip_bit(raw_sig(envelope), bit)), BUNDLE_TYPE, trust(KEY))


@pytest.mark.parametrize("sig", [b"", b"\x00" * 64, b"\x00" * 63, b"\x00" * 65])
def test_a_signature_of_the_wrong_shape_does_not_verify(sig: bytes) -> None:
    envelope = sign(BUNDLE_TYPE, BODY, [KEY])
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(with_sig(envelope, sig), BUNDLE_TYPE, trust(KEY))


def test_a_signature_that_is_not_base64_does_not_verify() -> None:
    envelope = copy.deepcopy(sign(BUNDLE_TYPE, BODY, [KEY]))
    envelope["signatures"][0]["sig"] = "!!" + envelope["signatures"][0]["sig"][2:]
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(envelope, BUNDLE_TYPE, trust(KEY))


def test_a_signature_by_another_key_under_a_trusted_key_id_does_not_verify() -> None:
    forged = copy.deepcopy(sign(BUNDLE_TYPE, BODY, [OTHER]))
    forged["signatures"][0]["keyid"] = KEY.key_id
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(forged, BUNDLE_TYPE, trust(KEY))


def test_a_signature_by_an_unknown_key_is_refused_naming_it() -> None:
    with pytest.raises(SignatureRejected, match=exactly(f"signed by unknown key id {OTHER.key_id}")):
        verify(sign(BUNDLE_TYPE, BODY, [OTHER]), BUNDLE_TYPE, trust(KEY))


def test_a_signature_by_a_refused_key_gives_the_callers_reason() -> None:
    refused = {KEY.key_id: f"key {KEY.key_id} was retired"}
    with pytest.raises(SignatureRejected, match=exactly(f"key {KEY.key_id} was retired")):
        verify(sign(BUNDLE_TYPE, BODY, [KEY]), BUNDLE_TYPE, {}, refused)


def test_a_bad_signature_by_a_trusted_key_is_reported_before_an_unknown_key() -> None:
    envelope = sign(BUNDLE_TYPE, BODY, [OTHER, KEY])
    forged = with_sig(envelope, flip_bit(raw_sig(envelope, 1), 3), index=1)
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(forged, BUNDLE_TYPE, trust(KEY))


def test_a_body_signed_as_a_result_is_not_a_bundle() -> None:
    envelope = sign(RESULT_TYPE, BODY, [KEY])
    with pytest.raises(SignatureRejected, match=exactly(f"payload type '{RESULT_TYPE}', expected '{BUNDLE_TYPE}'")):
        verify(envelope, BUNDLE_TYPE, trust(KEY))


@pytest.mark.parametrize("signed_as", [RESULT_TYPE, TRUST_TYPE])
def test_relabelling_the_payload_type_breaks_the_signature(signed_as: str) -> None:
    relabelled = {**sign(signed_as, BODY, [KEY]), "payloadType": BUNDLE_TYPE}
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(relabelled, BUNDLE_TYPE, trust(KEY))


# ---------------------------------------------------------------- malformed envelopes


GOOD = sign(BUNDLE_TYPE, BODY, [KEY])


@pytest.mark.parametrize(("envelope", "reason"), [
    (None, "not a signed envelope"),
    ([GOOD], "not a signed envelope"),
    ("envelope", "not a signed envelope"),
    ({}, "the envelope lacks payloadType, payload or signatures"),
    ({**GOOD, "payloadType": None}, "the envelope lacks payloadType, payload or signatures"),
    ({**GOOD, "payload": b"bytes"}, "the envelope lacks payloadType, payload or signatures"),
    ({**GOOD, "signatures": GOOD["signatures"][0]}, "the envelope lacks payloadType, payload or signatures"),
    ({**GOOD, "payload": "not base64!"}, "the payload is not valid base64"),
    ({**GOOD, "signatures": []}, "the envelope carries no signature"),
    ({**GOOD, "signatures": ["sig"]}, "a signature entry lacks keyid or sig"),
    ({**GOOD, "signatures": [{"keyid": KEY.key_id}]}, "a signature entry lacks keyid or sig"),
    ({**GOOD, "signatures": [{"keyid": 1, "sig": GOOD["signatures"][0]["sig"]}]},
     "a signature entry lacks keyid or sig"),
])
def test_a_malformed_envelope_is_refused_saying_what_is_wrong(envelope: Any, reason: str) -> None:
    with pytest.raises(SignatureRejected, match=exactly(reason)):
        verify(envelope, BUNDLE_TYPE, trust(KEY))


def test_an_oversized_payload_is_refused_unread() -> None:
    huge = {**GOOD, "payload": "A" * (MAX_ENVELOPE_BYTES + 4)}
    with pytest.raises(SignatureRejected, match="over the size limit"):
        verify(huge, BUNDLE_TYPE, trust(KEY))


# ---------------------------------------------------------------- properties


@FAST
@given(body=st.binary(max_size=512), kind=st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
def test_any_body_and_type_round_trip(body: bytes, kind: str) -> None:
    assert verify(sign(kind, body, [KEY]), kind, trust(KEY)) == (body, KEY.key_id)


@FAST
@given(body=st.binary(min_size=1, max_size=256), data=st.data())
def test_any_single_bit_flip_of_body_or_signature_does_not_verify(body: bytes, data: st.DataObject) -> None:
    envelope = sign(BUNDLE_TYPE, body, [KEY])
    if data.draw(st.booleans(), label="flip the signature"):
        bit = data.draw(st.integers(0, 64 * 8 - 1), label="bit")
        forged = with_sig(envelope, flip_bit(raw_sig(envelope), bit))
    else:
        bit = data.draw(st.integers(0, len(body) * 8 - 1), label="bit")
        forged = with_body(envelope, flip_bit(body, bit))
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(forged, BUNDLE_TYPE, trust(KEY))


@FAST
@given(body=st.binary(max_size=256), extra=st.binary(min_size=1, max_size=16), at_end=st.booleans())
def test_any_extension_of_the_body_does_not_verify(body: bytes, extra: bytes, at_end: bool) -> None:
    envelope = sign(BUNDLE_TYPE, body, [KEY])
    longer = body + extra if at_end else extra + body
    with pytest.raises(SignatureRejected, match="^signature does not verify$"):
        verify(with_body(envelope, longer), BUNDLE_TYPE, trust(KEY))
