"""The daemon's HTTP endpoint: one listener, routes by path (the webhook receiver now; metrics can join).

    POST /webhook  (and POST /)   forges' push deliveries -> a sync is queued

The server is the standard library's `http.server.ThreadingHTTPServer`: request
lines, headers and status lines are parsed and written by it, so no HTTP is
hand-written here, and taskrun gains no dependency (nothing to pin or audit
beyond Python itself). What it lacks for a listener facing a network is added
around it: a body is read only with a Content-Length no larger than the route's
limit (413 otherwise, without reading it; no chunked bodies: 411), a socket
timeout per connection, and a cap on connections handled at once (503 past it).
It speaks plain HTTP: put it behind a TLS-terminating proxy when forges reach it
over a network you do not trust (README, "Triggers").

A route is an object with `methods`, `max_body_bytes` and a call
`(Request) -> Response`; a Prometheus `/metrics` route is one more entry in
the routes mapping (GET, max_body_bytes 0). Nothing the client sent is logged
here: a route logs what it decided, through its own `notice`.

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

#: Seconds a connection may sit idle (reading headers or a body) before it is closed.
SOCKET_TIMEOUT = 10.0
#: Connections answered at once; more are answered 503 at once.
MAX_CONNECTIONS = 16
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
        self._server = self._thread = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    routes: Mapping[str, Route]
    notice: Callable[[str], None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "taskrun"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

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
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            return self._send(Response(404, "no such path"), close=True)
        if self.command not in route.methods:
            return self._send(Response(405, f"only {', '.join(sorted(route.methods))} here"), close=True,
                              allow=", ".join(sorted(route.methods)))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._send(Response(411, "a Content-Length is required"), close=True)
        length_text = self.headers.get("Content-Length")
        if length_text is None and self.command in ("POST", "PUT"):
            return self._send(Response(411, "a Content-Length is required"), close=True)
        length = int(length_text) if length_text and length_text.isdigit() else (0 if length_text is None else -1)
        if length < 0:
            return self._send(Response(400, "malformed Content-Length"), close=True)
        if length > route.max_body_bytes:
            # Not read: the connection is closed instead.
            return self._send(Response(413, f"body over {route.max_body_bytes} bytes"), close=True)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
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
        self._lock = threading.Lock()
        self._seen = DeliveryLog(state_dir / DELIVERIES_FILE, notice)

    def __call__(self, request: Request) -> Response:
        verdict = webhook.check(request.headers, request.body, self._secret, time.time())
        delivery = verdict.delivery
        if delivery is None:
            self._notice(f"webhook: refused ({verdict.status}): {verdict.reason}")
            return Response(verdict.status, verdict.reason)
        described = f"{delivery.forge} {delivery.event!r} delivery {delivery.delivery_id}"
        if not delivery.triggers:
            return Response(verdict.status, verdict.reason)
        with self._lock:  # two copies of one delivery at once: one is queued, the other is the duplicate
            if delivery.key in self._seen:
                self._notice(f"webhook: {described} seen before; nothing triggered")
                return Response(200, "duplicate")
            branches = f" ({', '.join(delivery.branches)})" if delivery.branches else ""
            self._sync(f"webhook: {delivery.forge} {delivery.event}{branches}")
            try:
                self._seen.add(delivery.key)
            except (OSError, TaskrunError) as exc:
                self._notice(f"webhook: could not remember delivery ids in {self._seen.path}: {exc}")
        self._notice(f"webhook: {described}{branches}: sync queued")
        return Response(200, "sync queued")
