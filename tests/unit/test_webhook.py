"""Forges' webhook deliveries checked (gitflow.webhook), the delivery log that deduplicates them (http), and
the listener's limits on real sockets: the whole-request deadline, the per-address cap, duplicate
Content-Length, rate-limited refusal notices."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskrunner import http as http_module
from taskrunner.gitflow import webhook
from taskrunner.http import DeliveryLog, HttpServer, WebhookRoute
from tests.conftest import wait_until

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


# A plain token (GitLab's X-Gitlab-Token) signs no body: nothing to change there.
BODY_SIGNING = [s for s in STYLES if s[0] != "gitlab-token"]


@pytest.mark.parametrize("name,headers,good,forge", BODY_SIGNING, ids=[s[0] for s in BODY_SIGNING])
def test_a_good_signature_over_another_body_is_refused(name, headers, good, forge) -> None:
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


# -- the listener, on real sockets -----------------------------------------------------------

SECRET_ENV = "TASKRUN_UNIT_WEBHOOK_SECRET"
DEADLINE = 1.0


class Listener:
    def __init__(self, server: HttpServer, notices: list[str], syncs: list[str]) -> None:
        self.server, self.notices, self.syncs = server, notices, syncs
        self.port = server.address[1]

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def deliver(self, delivery: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
        """One well-signed GitHub push from `source`, on a fresh connection: (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(source, 0))
        try:
            conn.request("POST", "/webhook", PUSH, {**github(PUSH, "sha256=" + _hex(PUSH)),
                                                     "x-github-delivery": delivery})
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    monkeypatch.setattr(http_module, "REQUEST_DEADLINE", DEADLINE)
    monkeypatch.setattr(http_module, "NOTICE_INTERVAL", 1.0)
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    notices: list[str] = []
    syncs: list[str] = []
    route = WebhookRoute(SECRET_ENV, 4096, tmp_path, syncs.append, notices.append)
    server = HttpServer("127.0.0.1", 0, {"/webhook": route}, notices.append)
    server.start()
    try:
        yield Listener(server, notices, syncs)
    finally:
        server.stop()


def _status_line(sock: socket.socket) -> bytes:
    """The first line the server answers on `sock` (b"" when it closed without answering)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def _closed_while_trickling(sock: socket.socket, within: float) -> float:
    """Send one body byte every 0.2 s (a slow sender) until the server closes `sock`; the seconds it took."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < within:
        try:
            sock.sendall(b"x")
        except OSError:  # reset: closed
            return time.monotonic() - start
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    raise AssertionError(f"the server did not close a slow sender within {within} s")


SLOW_HEAD = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"


def test_a_slow_sender_is_cut_off_at_the_whole_request_deadline_not_per_read(listener: Listener) -> None:
    # The per-read timeout (10 s) never fires: a byte arrives every 0.2 s. Only the deadline can end it.
    assert http_module.SOCKET_TIMEOUT > 5 * DEADLINE
    with listener.connect() as slow:
        slow.sendall(SLOW_HEAD)

        took = _closed_while_trickling(slow, within=DEADLINE + 5)

    assert DEADLINE * 0.8 <= took <= DEADLINE + 3, took
    wait_until(lambda: any("did not send a whole request within 1 s" in n for n in listener.notices), 5,
               "the cut-off notice")
    assert not listener.syncs
    assert listener.deliver("after-the-slow-one")[0] == 200


def test_one_address_gets_four_connections_others_still_answered_until_the_slow_ones_are_cut_off(
        listener: Listener) -> None:
    assert http_module.MAX_CONNECTIONS_PER_ADDRESS == 4
    slow = [listener.connect("127.0.0.1") for _ in range(4)]
    try:
        for sock in slow:
            sock.sendall(SLOW_HEAD + b"x")
        # The slots are taken once the server has accepted them; a 5th from the same address is refused.
        wait_until(lambda: listener.server._server.per_address.get("127.0.0.1") == 4, 5, "4 connections held")
        with listener.connect("127.0.0.1") as fifth:
            fifth.sendall(SLOW_HEAD)
            assert _status_line(fifth) == b"HTTP/1.1 503 Service Unavailable"

        # Another address is answered meanwhile.
        assert listener.deliver("from-another-address", source="127.0.0.2") == (200, b"sync queued\n")

        for sock in slow:
            took = _closed_while_trickling(sock, within=DEADLINE + 5)
            assert took <= DEADLINE + 3
        wait_until(lambda: not listener.server._server.per_address, 5, "the slots given back")
        # Once they are cut off, the address is answered again.
        assert listener.deliver("same-address-again", source="127.0.0.1") == (200, b"sync queued\n")
    finally:
        for sock in slow:
            sock.close()
    assert len(listener.syncs) == 2


def test_a_request_with_two_content_length_headers_is_refused_400(listener: Listener) -> None:
    with listener.connect() as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}")

        assert _status_line(sock) == b"HTTP/1.1 400 Bad Request"
    with listener.connect() as sock:  # differing values too
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 2\r\n\r\n{}")

        assert _status_line(sock) == b"HTTP/1.1 400 Bad Request"
    assert not listener.syncs


def test_refusal_notices_are_rate_limited_with_a_count_of_those_not_logged(listener: Listener) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)  # one kept-alive connection
    start = time.monotonic()
    try:
        for n in range(60):
            conn.request("POST", "/webhook", PUSH, {**gitlab_token(PUSH, f"client-token-{n}")})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 401
    finally:
        conn.close()
    elapsed = time.monotonic() - start

    def counted() -> int:
        shown = sum(1 for n in listener.notices if n.startswith("webhook: refused"))
        held = sum(int(n.split()[2]) for n in listener.notices if "more refused deliveries since" in n)
        return shown + held

    wait_until(lambda: counted() == 60, 5, "every refusal logged or counted")
    shown = [n for n in listener.notices if n.startswith("webhook: refused")]
    # At most one refusal line, and one count line, per interval (1 s here).
    assert len(shown) <= elapsed / 1.0 + 2, (len(shown), elapsed)
    assert len(listener.notices) <= 2 * (elapsed / 1.0 + 2)
    assert any(n.startswith("webhook: and ") and "more refused deliveries since" in n for n in listener.notices)
    assert not any("client-token" in n or SECRET.decode() in n for n in listener.notices)


def test_rate_limited_notice_logs_the_first_counts_the_rest_and_starts_afresh_after_the_count() -> None:
    lines: list[str] = []
    limited = http_module.RateLimitedNotice(lines.append, "refused deliveries", interval=60, prefix="webhook")

    for n in range(500):
        limited(f"webhook: refused (401): bad {n}")
    assert lines == ["webhook: refused (401): bad 0"]

    limited.flush()

    assert len(lines) == 2 and lines[1].startswith("webhook: and 499 more refused deliveries since ")
    limited.flush()
    assert len(lines) == 2
