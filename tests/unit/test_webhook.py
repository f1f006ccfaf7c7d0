"""Forges' webhook deliveries checked (gitflow.webhook), and the delivery log that deduplicates them (http)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from taskrunner.gitflow import webhook
from taskrunner.http import DeliveryLog

SECRET = b"s3cret-shared"
NOW = 1_700_000_000.0
PUSH = json.dumps({"ref": "refs/heads/main", "after": "0" * 40}).encode()
BITBUCKET_PUSH = json.dumps({"push": {"changes": [{"new": {"type": "branch", "name": "main"}},
                                                  {"new": {"type": "tag", "name": "v1"}}]}}).encode()


def _hex(body: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def github(body: bytes, signature: str | None) -> dict[str, str]:
    headers = {"x-github-event": "push", "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}
    if signature is not None:
        headers["x-hub-signature-256"] = signature
    return headers


def gitea(body: bytes, signature: str | None, forge: str = "gitea") -> dict[str, str]:
    headers = {f"x-{forge}-event": "push", f"x-{forge}-delivery": "a1b2c3"}
    if signature is not None:
        headers[f"x-{forge}-signature"] = signature
    return headers


def gitlab_token(body: bytes, token: str | None) -> dict[str, str]:
    headers = {"x-gitlab-event": "Push Hook", "x-gitlab-event-uuid": "13792a34-cac6-4fda-95a8-c58e00a3954e"}
    if token is not None:
        headers["x-gitlab-token"] = token
    return headers


def gitlab_signed(body: bytes, signature: str | None, timestamp: float = NOW) -> dict[str, str]:
    headers = {"x-gitlab-event": "Push Hook", "webhook-id": "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
               "webhook-timestamp": str(int(timestamp))}
    if signature is not None:
        headers["webhook-signature"] = signature
    return headers


def bitbucket(body: bytes, signature: str | None) -> dict[str, str]:
    headers = {"x-event-key": "repo:push", "x-request-uuid": "fd5e4a7e-1c1b-4b2e-9c1e-3f0d5c3b0a11"}
    if signature is not None:
        headers["x-hub-signature"] = signature
    return headers


def _standard(body: bytes, secret: bytes = SECRET, timestamp: float = NOW) -> str:
    key = webhook.standard_key(secret)
    signed = f"msg_2KWPBgLlAfxdpx2AI54pPJ85f4W.{int(timestamp)}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# (name, headers(body, signature), good signature, the forge it reads as)
STYLES = [
    ("github", github, lambda b: "sha256=" + _hex(b), "github"),
    ("gitea", gitea, _hex, "gitea"),
    ("forgejo", lambda b, s: gitea(b, s, "forgejo"), _hex, "forgejo"),
    ("gitlab-token", gitlab_token, lambda b: SECRET.decode(), "gitlab"),
    ("gitlab-signed", gitlab_signed, _standard, "gitlab"),
    ("bitbucket", bitbucket, lambda b: "sha256=" + _hex(b), "bitbucket"),
]


@pytest.mark.parametrize("name,headers,good,forge", STYLES, ids=[s[0] for s in STYLES])
def test_a_well_signed_push_is_accepted_as_its_forge(name, headers, good, forge) -> None:
    body = BITBUCKET_PUSH if forge == "bitbucket" else PUSH

    verdict = webhook.check(headers(body, good(body)), body, SECRET, NOW)

    assert verdict.status == 200, verdict.reason
    assert verdict.delivery is not None and verdict.delivery.forge == forge and verdict.delivery.triggers
    assert verdict.delivery.branches == ("main",)


@pytest.mark.parametrize("name,headers,good,forge", STYLES, ids=[s[0] for s in STYLES])
def test_a_signature_made_with_another_secret_is_refused(name, headers, good, forge) -> None:
    body = PUSH
    other = {"github": lambda: "sha256=" + _hex(body, b"wrong"), "gitea": lambda: _hex(body, b"wrong"),
             "forgejo": lambda: _hex(body, b"wrong"), "gitlab-token": lambda: "wrong",
             "gitlab-signed": lambda: _standard(body, b"wrong"),
             "bitbucket": lambda: "sha256=" + _hex(body, b"wrong")}[name]()

    verdict = webhook.check(headers(body, other), body, SECRET, NOW)

    assert verdict.status == 401 and verdict.delivery is None and "bad" in verdict.reason


@pytest.mark.parametrize("name,headers,good,forge", STYLES, ids=[s[0] for s in STYLES])
def test_a_good_signature_over_another_body_is_refused(name, headers, good, forge) -> None:
    if name == "gitlab-token":
        pytest.skip("a plain token signs no body")
    signature = good(PUSH)

    verdict = webhook.check(headers(PUSH, signature), PUSH + b" ", SECRET, NOW)

    assert verdict.status == 401


@pytest.mark.parametrize("name,headers,good,forge", STYLES, ids=[s[0] for s in STYLES])
def test_an_empty_signature_is_unsigned(name, headers, good, forge) -> None:
    verdict = webhook.check(headers(PUSH, ""), PUSH, SECRET, NOW)

    assert verdict.status == 401 and "unsigned" in verdict.reason


@pytest.mark.parametrize("name,headers,good,forge", STYLES, ids=[s[0] for s in STYLES])
def test_a_missing_signature_is_unsigned(name, headers, good, forge) -> None:
    verdict = webhook.check(headers(PUSH, None), PUSH, SECRET, NOW)

    assert verdict.status == 401 and "unsigned" in verdict.reason


def test_reasons_never_contain_the_secret_or_the_token_sent() -> None:
    for headers in (gitlab_token(PUSH, "client-token-XYZ"), gitlab_token(PUSH, SECRET.decode() + "x"),
                    github(PUSH, "sha256=" + _hex(PUSH, b"x"))):
        reason = webhook.check(headers, PUSH, SECRET, NOW).reason
        assert SECRET.decode() not in reason and "client-token-XYZ" not in reason


def test_github_legacy_sha1_signature_alone_is_refused() -> None:
    headers = {"x-github-event": "push", "x-github-delivery": "d1",
               "x-hub-signature": "sha1=" + hmac.new(SECRET, PUSH, hashlib.sha1).hexdigest()}

    assert webhook.check(headers, PUSH, SECRET, NOW).status == 401


def test_standard_webhooks_timestamp_far_from_now_is_refused() -> None:
    old = NOW - webhook.TIMESTAMP_TOLERANCE - 10
    headers = gitlab_signed(PUSH, _standard(PUSH, timestamp=old), timestamp=old)

    verdict = webhook.check(headers, PUSH, SECRET, NOW)

    assert verdict.status == 401 and "timestamp" in verdict.reason


def test_standard_webhooks_one_matching_signature_among_several_is_enough() -> None:
    headers = gitlab_signed(PUSH, "v1,AAAA " + _standard(PUSH))

    assert webhook.check(headers, PUSH, SECRET, NOW).status == 200


def test_standard_webhooks_whsec_secret_is_base64_decoded() -> None:
    secret = b"whsec_" + base64.b64encode(b"raw key bytes")
    key_signature = _standard(PUSH, secret)

    assert webhook.check(gitlab_signed(PUSH, key_signature), PUSH, secret, NOW).status == 200
    assert webhook.standard_key(secret) == b"raw key bytes"


def test_gitea_sending_github_headers_too_reads_as_gitea() -> None:
    headers = {**gitea(PUSH, _hex(PUSH)), "x-github-event": "push", "x-github-delivery": "a1b2c3",
               "x-hub-signature-256": "sha256=" + _hex(PUSH)}

    verdict = webhook.check(headers, PUSH, SECRET, NOW)

    assert verdict.status == 200 and verdict.delivery is not None and verdict.delivery.forge == "gitea"


def test_a_signed_event_that_is_not_a_push_is_acknowledged_and_triggers_nothing() -> None:
    headers = {**github(PUSH, "sha256=" + _hex(PUSH)), "x-github-event": "issues"}

    verdict = webhook.check(headers, PUSH, SECRET, NOW)

    assert verdict.status == 202 and verdict.delivery is not None and not verdict.delivery.triggers


def test_github_ping_and_bitbucket_diagnostics_ping_trigger() -> None:
    ping = webhook.check({**github(b"{}", "sha256=" + _hex(b"{}")), "x-github-event": "ping"}, b"{}", SECRET, NOW)
    diag = webhook.check({**bitbucket(b"{}", "sha256=" + _hex(b"{}")), "x-event-key": "diagnostics:ping"},
                         b"{}", SECRET, NOW)

    assert ping.status == 200 and diag.status == 200


@pytest.mark.parametrize("delivery", ["", "a b", "x" * 201, "id\nforged log line"])
def test_a_delivery_without_a_usable_id_is_refused(delivery: str) -> None:
    headers = {**github(PUSH, "sha256=" + _hex(PUSH)), "x-github-delivery": delivery}

    verdict = webhook.check(headers, PUSH, SECRET, NOW)

    assert verdict.status == 400 and verdict.delivery is None


def test_a_signed_request_from_no_known_forge_is_refused() -> None:
    verdict = webhook.check({"x-hub-signature-256": "sha256=" + _hex(PUSH)}, PUSH, SECRET, NOW)

    assert verdict.status == 400


def test_branches_of_a_body_that_is_not_json_are_none() -> None:
    assert webhook.branches_of("github", b"payload=%7B%7D") == ()
    assert webhook.branches_of("github", json.dumps({"ref": "refs/tags/v1"}).encode()) == ()


def test_delivery_log_is_bounded_and_survives_a_restart(tmp_path: Path) -> None:
    notices: list[str] = []
    log = DeliveryLog(tmp_path / "seen.json", notices.append, limit=3)
    for key in ("a", "b", "c", "d"):
        log.add(key)

    again = DeliveryLog(tmp_path / "seen.json", notices.append, limit=3)

    assert "a" not in again and all(k in again for k in ("b", "c", "d")) and not notices
    assert (tmp_path / "seen.json").stat().st_mode & 0o077 == 0


def test_an_unreadable_delivery_log_starts_afresh_with_a_notice(tmp_path: Path) -> None:
    (tmp_path / "seen.json").write_text("{not json")
    notices: list[str] = []

    log = DeliveryLog(tmp_path / "seen.json", notices.append)

    assert "anything" not in log and len(notices) == 1
