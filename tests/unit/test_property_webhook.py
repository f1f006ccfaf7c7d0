"""Webhook deliveries as hostile input (property tests): any headers and bodies to gitflow.webhook.check,
signed or not, and any request bytes to the http.py receiver. check always gives a Verdict with a
status and a reason that carries no secret; the receiver answers with a status or closes the
connection, no request reaches a route's error path or the server's traceback, and it keeps serving."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import socket
import threading
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskrunner import http as http_module
from taskrunner.gitflow import webhook
from taskrunner.http import HttpServer, WebhookRoute
from tests.unit.test_property_values import budget

SECRET = b"s3cret-shared"
SECRET_ENV = "PROPERTY_WEBHOOK_SECRET"
NOW = 1_795_993_200.0
#: Header values as http.server hands them over: decoded as ISO-8859-1, so any character below 256.
latin1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=40)
HEADER_NAMES = ["x-github-event", "x-github-delivery", "x-hub-signature-256", "x-hub-signature",
                "x-gitea-event", "x-gitea-delivery", "x-gitea-signature", "x-forgejo-event", "x-forgejo-delivery",
                "x-forgejo-signature", "x-gitlab-event", "x-gitlab-token", "x-gitlab-event-uuid", "webhook-id",
                "webhook-timestamp", "webhook-signature", "idempotency-key", "x-event-key", "x-request-uuid"]
header_values = st.one_of(latin1, st.sampled_from(["", "push", "ping", "Push Hook", "repo:push", "sha256=",
                                                   "sha256=" + "0" * 64, "v1,AAAA", "²", "9" * 5000,
                                                   str(int(NOW)), "\x00", "a" * 300]))
bodies = st.one_of(st.binary(max_size=200),
                   st.sampled_from([b'{"ref": "refs/heads/main"}', b"[" * 5000, b'{"ref": ' + b"[" * 3000 + b"}",
                                    b'{"push": {"changes": [{"new": {"type": "branch", "name": 7}}]}}',
                                    b'{"ref": "refs/heads/\\u0000\\u202e"}', b"\xff\xfe", b"NaN"]))


def _signed(forge: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
    """`headers` plus a correct signature of `body` for `forge`, so the body itself is read."""
    digest = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if forge == "github":
        return {**headers, "x-hub-signature-256": "sha256=" + digest}
    if forge == "gitea":
        return {**headers, "x-gitea-signature": digest}
    if forge == "gitlab":
        return {**headers, "x-gitlab-token": SECRET.decode()}
    stamp = str(int(NOW))
    return {**headers, "webhook-id": headers.get("webhook-id") or "id-1", "webhook-timestamp": stamp,
            "webhook-signature": webhook.standard_signature(headers.get("webhook-id") or "id-1", stamp, body,
                                                            SECRET)}


def _check(headers: dict[str, str], body: bytes) -> webhook.Verdict:
    verdict = webhook.check(headers, body, SECRET, NOW)
    assert verdict.status in (200, 202, 400, 401), verdict
    assert verdict.reason.strip() and SECRET.decode() not in verdict.reason, verdict
    assert (verdict.delivery is not None) == (verdict.status in (200, 202)), verdict
    if verdict.delivery is not None:
        assert all(name.isprintable() for name in verdict.delivery.branches)
    return verdict


@given(st.dictionaries(st.sampled_from(HEADER_NAMES), header_values, max_size=6), bodies)
@budget(300)
def test_any_headers_and_body_give_a_verdict_with_a_reason(headers: dict[str, str], body: bytes) -> None:
    _check(headers, body)


@given(st.sampled_from(["github", "gitea", "gitlab", "standard"]),
       st.dictionaries(st.sampled_from(HEADER_NAMES), header_values, max_size=4), bodies)
@budget(300)
def test_an_authentic_delivery_of_any_body_and_headers_gives_a_verdict(forge: str, headers: dict[str, str],
                                                                       body: bytes) -> None:
    _check(_signed(forge, body, {k: v for k, v in headers.items() if "signature" not in k and "token" not in k}),
           body)


@pytest.mark.parametrize("timestamp", ["²", "١٢٣", "9" * 5000, "", " 1", "-1"])
def test_a_standard_webhooks_timestamp_that_is_no_number_is_refused(timestamp: str) -> None:
    verdict = _check({"webhook-id": "id", "webhook-timestamp": timestamp, "webhook-signature": "v1,AAAA",
                      "x-gitlab-event": "Push Hook"}, b"{}")
    assert verdict.status == 401


def test_a_signed_push_nested_past_the_parsers_depth_names_no_branch() -> None:
    body = b'{"ref": ' + b"[" * 100_000 + b"}"
    verdict = _check(_signed("github", body, {"x-github-event": "push", "x-github-delivery": "d1"}), body)
    assert verdict.status == 200 and verdict.delivery is not None and verdict.delivery.branches == ()


# ---------------------------------------------------------------- the receiver over a socket


class _Receiver:
    def __init__(self, server: HttpServer, notices: list[str], errors: list[str]) -> None:
        self.server, self.notices, self.errors = server, notices, errors
        self.port = server.address[1]

    def raw(self, data: bytes) -> bytes:
        """Send `data`, half-close, and return the first line of the answer (b"" if it closed unanswered)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            answer = b""
            try:
                while b"\r\n" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            except OSError:  # reset: it closed without answering
                pass
        return answer.split(b"\r\n", 1)[0]

    def push(self, delivery: str) -> int:
        body = b'{"ref": "refs/heads/main"}'
        headers = _signed("github", body, {"x-github-event": "push", "x-github-delivery": delivery})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/webhook", body, headers)
            return conn.getresponse().status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Receiver]:
    patch = pytest.MonkeyPatch()
    patch.setenv(SECRET_ENV, SECRET.decode())
    patch.setattr(http_module, "REQUEST_DEADLINE", 2.0)
    errors: list[str] = []

    def handle_error(self: Any, request: Any, client_address: Any) -> None:  # the traceback path
        import sys
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            errors.append(repr(exc))

    patch.setattr(http_module._Server, "handle_error", handle_error)
    notices: list[str] = []
    lock = threading.Lock()

    def notice(text: str) -> None:
        with lock:
            notices.append(text)

    route = WebhookRoute(SECRET_ENV, 4096, tmp_path_factory.mktemp("state"), lambda reason: None, notice)
    server = HttpServer("127.0.0.1", 0, {"/webhook": route}, notice)
    server.start()
    try:
        yield _Receiver(server, notices, errors)
    finally:
        server.stop()
        patch.undo()


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"BREW", b""]))
    path = draw(st.sampled_from([b"/webhook", b"/webhook?x=1", b"/", b"/nope", b"*", b"/webhook" + b"a" * 70_000]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b""]))
    lines = [method + b" " + path + b" " + version]
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        name = draw(st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"X-GitHub-Event",
                                     b"X-Hub-Signature-256", b"Host", b"X-Junk", b""]))
        value = draw(st.one_of(st.sampled_from([b"0", b"5", b"-1", b"\xc2\xb2", b"9" * 5000, b"00000000000000000000012",
                                                b"chunked", b"push"]), st.binary(max_size=20)))
        lines.append(name + b": " + value.replace(b"\r", b"").replace(b"\n", b""))
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    body = draw(st.binary(max_size=40))
    return draw(st.sampled_from([head + body, head[:draw(st.integers(0, len(head)))], draw(st.binary(max_size=60))]))


@given(requests())
@budget(80, deadline_ms=15_000)
def test_any_request_is_answered_or_closed_and_never_reaches_an_error_path(receiver: _Receiver, data: bytes) -> None:
    first = receiver.raw(data)
    # Whatever the answer (a status line; to a request line without a version, http.server answers as
    # HTTP/0.9 does, the text alone; or nothing, the connection closed), it is never a route's failure.
    assert b" 500 " not in first and b"internal error" not in first, first[:100]
    assert not receiver.errors, receiver.errors
    assert not [n for n in receiver.notices if "Error" in n or "internal error" in n], receiver.notices


def test_the_receiver_still_takes_a_push_after_the_garbage(receiver: _Receiver) -> None:
    receiver.raw(b"POST /webhook HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n")
    receiver.raw(b"POST /webhook HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
    assert receiver.push("after-garbage") == 200
    assert not receiver.errors, receiver.errors


@pytest.mark.parametrize("length", [b"\xc2\xb2", "١".encode(), b"9" * 5000], ids=["superscript", "arabic", "digits"])
def test_a_content_length_int_cannot_read_is_answered_400_or_413(receiver: _Receiver, length: bytes) -> None:
    first = receiver.raw(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
    assert first.split(b" ")[1] in (b"400", b"413"), first
    assert not receiver.errors, receiver.errors
