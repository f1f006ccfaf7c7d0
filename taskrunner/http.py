"""The daemon's HTTP endpoint: one listener, routes by path (the webhook receiver now; metrics can join).

    POST /webhook  (and POST /)   forges' push deliveries -> a sync is queued

The server is the standard library's `http.server.ThreadingHTTPServer`: request
lines, headers and status lines are parsed and written by it, so no HTTP is
hand-written here, and taskrun gains no dependency (nothing to pin or audit
beyond Python itself). What it lacks for a listener facing a network is added
around it: a body is read only with a Content-Length no larger than the route's
limit (413 otherwise, without reading it; no chunked bodies: 411; more than
one Content-Length: 400), a socket timeout per read, a deadline for each whole
request (request line, headers and body: REQUEST_DEADLINE seconds from accept,
or from the previous answer on a kept-alive connection; past it the socket is
shut down by a timer, so a client trickling a byte at a time cannot hold a
slot), a cap on connections handled at once (503 past it) and a smaller cap per
client address (503 past it), so that one address cannot take every slot.
It speaks plain HTTP: put it behind a TLS-terminating proxy when forges reach it
over a network you do not trust (README, "Triggers").

A route is an object with `methods`, `max_body_bytes` and a call
`(Request) -> Response`; a Prometheus `/metrics` route is one more entry in
the routes mapping (GET, max_body_bytes 0). Nothing the client sent is logged
here: a route logs what it decided, through its own `notice`. Notices a client
can cause over and over (a refused delivery, a request cut off at its deadline)
go through a `RateLimitedNotice`: at most one per NOTICE_INTERVAL, then one line
counting those held back.

Threads: `http` accepts; one short-lived thread per connection answers.
Routes run on those threads, so they only read their own state and queue work
(the webhook route hands a sync to the daemon's queue; it never runs git).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from taskrunner.atomic import write_bytes
from taskrunner.defaults import CONFIG_FILE
from taskrunner.errors import ConfigError, TaskrunError
from taskrunner.gitflow import webhook

#: Seconds a connection may sit idle (one read of headers or a body) before it is closed.
SOCKET_TIMEOUT = 10.0
#: Seconds a client has for a whole request (request line, headers, body), from accept or from the previous
#: answer on a kept-alive connection; then the socket is shut down. Read when a connection starts.
REQUEST_DEADLINE = 15.0
#: Connections answered at once; more are answered 503 at once.
MAX_CONNECTIONS = 16
#: Connections answered at once from one client address (the IP, without the port); more are answered 503.
MAX_CONNECTIONS_PER_ADDRESS = 4
#: A notice a client can cause again and again is logged at most once per this many seconds (then counted).
NOTICE_INTERVAL = 10.0
#: How many webhook delivery ids are remembered (oldest forgotten first); forges redeliver within days, not thousands.
MAX_DELIVERIES = 2000
#: The file under the daemon's state directory remembering them across restarts.
DELIVERIES_FILE = "webhook-deliveries.json"


@dataclass(frozen=True)
class Request:
    """One request: method, path (no query), headers (lower-case names; repeats joined by ", "), the raw body."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    text: str
    content_type: str = "text/plain; charset=utf-8"


class Route(Protocol):
    methods: frozenset[str]
    max_body_bytes: int

    def __call__(self, request: Request) -> Response: ...


class HttpServer:
    """One listener on (host, port) serving `routes` (path -> Route) on a thread of its own.

    start() binds and listens (ConfigError naming `where` if it cannot);
    stop() closes the listener and waits for the accepting thread.
    """

    def __init__(self, host: str, port: int, routes: Mapping[str, Route], notice: Callable[[str], None],
                 where: str = "webhook.listen") -> None:
        self.host, self.port, self.routes, self.notice, self.where = host, port, dict(routes), notice, where
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The address listened on (the port is the real one when 0 was asked for)."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("_Bound", (_Server,), {"address_family": family})
        try:
            self._server = server_class((self.host, self.port), _Handler, bind_and_activate=True)
        except OSError as exc:
            raise ConfigError(CONFIG_FILE, f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                              key=self.where) from None
        self._server.routes = self.routes
        self._server.notice = self.notice
        self._server.cut_off_notice = RateLimitedNotice(self.notice, "requests cut off at their deadline")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server.cut_off_notice.flush()
        for route in {id(r): r for r in self.routes.values()}.values():
            flush = getattr(route, "flush_notices", None)
            if callable(flush):
                flush()
        self._server = self._thread = None


class RateLimitedNotice:
    """A notice callable that logs at most one message per `interval` seconds and counts the rest.

    The first message after a quiet interval is logged as it is; those within
    `interval` of it are only counted, and when the interval ends (a timer) one
    line says how many: "webhook: and 499 more refused deliveries since 20:31:05Z
    (not logged one by one)". `what` names them ("refused deliveries"). flush()
    logs a pending count now (on stop). `interval` None: NOTICE_INTERVAL when made.
    """

    def __init__(self, notice: Callable[[str], None], what: str, interval: float | None = None,
                 prefix: str = "http") -> None:
        self._notice, self.what, self.prefix = notice, what, prefix
        self.interval = NOTICE_INTERVAL if interval is None else interval
        self._lock = threading.Lock()
        self._quiet_until = 0.0  # time.monotonic() before which messages are only counted
        self._held = 0
        self._since = ""  # when the last logged one was logged (UTC, for the count's line)
        self._timer: threading.Timer | None = None

    def __call__(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now >= self._quiet_until and not self._held:
                self._quiet_until = now + self.interval
                self._since = time.strftime("%H:%M:%SZ", time.gmtime())
                log = True
            else:
                self._held += 1
                log = False
                if self._timer is None:
                    self._timer = threading.Timer(max(0.0, self._quiet_until - now), self.flush)
                    self._timer.daemon = True
                    self._timer.name = "http-notice"
                    self._timer.start()
        if log:
            self._notice(message)

    def flush(self) -> None:
        """Log how many were held back, if any; the next message after this starts a new interval."""
        with self._lock:
            held, since, self._held = self._held, self._since, 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if held:
                # The count's line counts as the interval's one line: the next message waits out a new interval.
                self._quiet_until = time.monotonic() + self.interval
                self._since = time.strftime("%H:%M:%SZ", time.gmtime())
        if held:
            self._notice(f"{self.prefix}: and {held} more {self.what} since {since} (not logged one by one)")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    routes: Mapping[str, Route]
    notice: Callable[[str], None]
    cut_off_notice: Callable[[str], None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.per_address_limit = MAX_CONNECTIONS_PER_ADDRESS
        self.deadline = REQUEST_DEADLINE
        self.per_address: dict[str, int] = {}
        self.per_address_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _admit(self, address: str) -> bool:
        """Take a slot for a connection from `address`: False (nothing taken) past either cap."""
        with self.per_address_lock:
            if self.per_address.get(address, 0) >= self.per_address_limit:
                return False
            if not self.slots.acquire(blocking=False):
                return False
            self.per_address[address] = self.per_address.get(address, 0) + 1
            return True

    def _leave(self, address: str) -> None:
        with self.per_address_lock:
            left = self.per_address.get(address, 1) - 1
            if left > 0:
                self.per_address[address] = left
            else:
                self.per_address.pop(address, None)
            self.slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        if not self._admit(address):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._leave(address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._leave(str(client_address[0]))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection reset or shut down at its deadline is no error worth a traceback in the daemon's log."""
        import sys

        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "taskrun"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = SOCKET_TIMEOUT  # per read; the deadline below bounds the whole request
        self._guard = threading.Lock()
        self._timer: threading.Timer | None = None
        self._cut_off = False
        super().setup()
        self._arm()  # the first request's time runs from accept (this thread starts right after it)

    def finish(self) -> None:
        self._disarm()
        super().finish()

    def handle_one_request(self) -> None:
        if self._timer is None:
            self._arm()  # a kept-alive connection's next request: its time runs from the previous answer
        try:
            super().handle_one_request()
        finally:
            self._disarm()

    def _arm(self) -> None:
        with self._guard:
            if self._cut_off:
                return
            self._timer = threading.Timer(self.server.deadline, self._deadline_passed)
            self._timer.daemon = True
            self._timer.name = "http-deadline"
            self._timer.start()

    def _disarm(self) -> None:
        """The request is read (or the connection done): the deadline no longer applies to it."""
        with self._guard:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _deadline_passed(self) -> None:
        with self._guard:
            if self._timer is None:  # disarmed meanwhile: the request was read in time
                return
            self._timer = None
            self._cut_off = True
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once, with nothing
            except OSError:
                pass
        self.server.cut_off_notice(f"http: a connection from {self.client_address[0]} did not send a whole "
                                   f"request within {self.server.deadline:g} s; closed")

    def log_message(self, format: str, *args: Any) -> None:
        """http.server logs request lines (paths, maybe a token in a query): nothing of them is logged."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_OPTIONS(self) -> None:
        self._serve()

    def _serve(self) -> None:
        if self._cut_off:  # headers cut short by the deadline: not a request to answer
            self.close_connection = True
            return
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            return self._send(Response(404, "no such path"), close=True)
        if self.command not in route.methods:
            return self._send(Response(405, f"only {', '.join(sorted(route.methods))} here"), close=True,
                              allow=", ".join(sorted(route.methods)))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._send(Response(411, "a Content-Length is required"), close=True)
        if len(self.headers.get_all("Content-Length") or []) > 1:
            # Which one counts is what request smuggling plays on: refuse rather than pick one.
            return self._send(Response(400, "more than one Content-Length header"), close=True)
        length_text = self.headers.get("Content-Length")
        if length_text is None and self.command in ("POST", "PUT"):
            return self._send(Response(411, "a Content-Length is required"), close=True)
        if length_text is not None and not (length_text.isascii() and length_text.isdigit()):
            # isascii: str.isdigit takes '²' and other digits int() refuses.
            return self._send(Response(400, "malformed Content-Length"), close=True)
        digits = (length_text or "").lstrip("0")
        # More than 18 digits is past any limit (and, past 4300, past what int() converts).
        length = int(digits or 0) if len(digits) <= 18 else route.max_body_bytes + 1
        if length > route.max_body_bytes:
            # Not read: the connection is closed instead.
            return self._send(Response(413, f"body over {route.max_body_bytes} bytes"), close=True)
        try:
            body = self.rfile.read(length) if length else b""
        except OSError:  # a read timed out, or the socket was shut down at the deadline
            body = b""
        self._disarm()
        if len(body) < length or self._cut_off:
            self.close_connection = True
            return
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            response = route(Request(self.command, path, headers, body))
        except Exception as exc:  # a route must never take the listener down
            self.server.notice(f"http: {path}: {type(exc).__name__}: {exc}")
            response = Response(500, "internal error")
        self._send(response)

    def _send(self, response: Response, close: bool = False, allow: str | None = None) -> None:
        data = (response.text + "\n").encode()
        self.send_response(response.status, HTTPStatus(response.status).phrase)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class DeliveryLog:
    """The delivery keys (`forge:id`) already queued: bounded (oldest dropped), kept in `path` across restarts.

    The file is a JSON list of strings, written atomically after each addition;
    an unreadable one is started afresh with a notice.
    """

    def __init__(self, path: Path, notice: Callable[[str], None], limit: int = MAX_DELIVERIES) -> None:
        self.path, self.limit = path, limit
        self._keys: dict[str, None] = {}
        try:
            loaded = json.loads(path.read_bytes())
            if not isinstance(loaded, list) or not all(isinstance(k, str) for k in loaded):
                raise ValueError("not a list of strings")
            self._keys = dict.fromkeys(loaded[-limit:])
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            notice(f"webhook: {path} is unreadable ({exc}); earlier delivery ids are forgotten")

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys[key] = None
        while len(self._keys) > self.limit:
            del self._keys[next(iter(self._keys))]
        write_bytes(self.path, json.dumps(list(self._keys)).encode(), mode=0o600, durable=False)


class WebhookRoute:
    """POST: check a forge's delivery (gitflow.webhook), skip one seen before, queue a sync for a push.

    `sync(reason)` must only queue (it runs on the connection's thread). The
    secret is read once, from the environment variable the configuration
    names; without it the route cannot be made (ConfigError, fail closed).
    """

    methods = frozenset({"POST"})

    def __init__(self, secret_env: str, max_body_bytes: int, state_dir: Path, sync: Callable[[str], None],
                 notice: Callable[[str], None]) -> None:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise ConfigError(CONFIG_FILE, f"the environment variable {secret_env} is not set or empty: the "
                              "webhook receiver does not start without its secret", key="webhook.secret_env")
        self._secret = secret.encode()
        self.max_body_bytes = max_body_bytes
        self._sync, self._notice = sync, notice
        # Refusals and duplicates come as fast as anyone can send them: logged at most once per NOTICE_INTERVAL.
        self._refused_notice = RateLimitedNotice(notice, "refused deliveries", prefix="webhook")
        self._duplicate_notice = RateLimitedNotice(notice, "duplicate deliveries", prefix="webhook")
        self._lock = threading.Lock()
        self._seen = DeliveryLog(state_dir / DELIVERIES_FILE, notice)

    def flush_notices(self) -> None:
        """Log the counts of refusals and duplicates not yet logged (the server calls it when it stops)."""
        self._refused_notice.flush()
        self._duplicate_notice.flush()

    def __call__(self, request: Request) -> Response:
        verdict = webhook.check(request.headers, request.body, self._secret, time.time())
        delivery = verdict.delivery
        if delivery is None:
            self._refused_notice(f"webhook: refused ({verdict.status}): {verdict.reason}")
            return Response(verdict.status, verdict.reason)
        described = f"{delivery.forge} {delivery.event!r} delivery {delivery.delivery_id}"
        if not delivery.triggers:
            return Response(verdict.status, verdict.reason)
        with self._lock:  # two copies of one delivery at once: one is queued, the other is the duplicate
            if delivery.key in self._seen:
                self._duplicate_notice(f"webhook: {described} seen before; nothing triggered")
                return Response(200, "duplicate")
            branches = f" ({', '.join(delivery.branches)})" if delivery.branches else ""
            self._sync(f"webhook: {delivery.forge} {delivery.event}{branches}")
            try:
                self._seen.add(delivery.key)
            except (OSError, TaskrunError) as exc:
                self._notice(f"webhook: could not remember delivery ids in {self._seen.path}: {exc}")
        self._notice(f"webhook: {described}{branches}: sync queued")
        return Response(200, "sync queued")
