"""A scripted model API on 127.0.0.1: the real Agent CLIs talk to it instead of a paid model.

    with ModelAPI() as api:
        api.script(Tool("write", {"path": "hello.txt", "content": "hi\\n"}), Say("done"))
        env = {"ANTHROPIC_BASE_URL": api.url, ...}
        ... run the real CLI ...
        api.requests          # every request it made, in order

The server is a `ThreadingHTTPServer` on an ephemeral loopback port, served
from a daemon thread. Each provider's wire protocol lives in its own module
(`anthropic`, `gemini`, `openai_responses`, `openai_chat`), which calls
`register(matcher, handler)` at import; `ModelAPI()` imports every protocol
module present in this package.

A *main* request (the model turn the CLI's agent loop asks for) consumes the
next scripted `Step`; once the script is used up the last step repeats. A
*side* request (registered with `side=True`: token counting, title or topic
generation with a small model, model listing, telemetry) gets a harmless
default answer and consumes nothing. `Fail` steps are answered here the same
for every protocol (an HTTP error before any stream starts, as the real APIs
do); the other steps go to the protocol's handler, which writes the response
(SSE when the client asked for a stream) through the `Request` it is given.

Steps:
    Say(text, usage=None)                 the model answers with text and ends its turn
    Tool(intent, args, text="", usage=None)   the model calls a tool: intent "write"
                                          {path, content} or "shell" {command}; each
                                          protocol maps it to its CLI's own tool
    Fail(status, body, headers={})        an HTTP error (body: dict as JSON, or str)
    Cut(text)                             a stream starts, sends `text`, then the
                                          connection drops mid-stream
    Usage(input_tokens, output_tokens)    token counts reported with a Say or Tool
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import socket
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Union
from urllib.parse import parse_qs, urlsplit

#: The protocol modules imported by `ModelAPI()` when present in this package.
PROTOCOLS = ("anthropic", "gemini", "openai_responses", "openai_chat")

#: Default token counts when a step carries no `usage`.
DEFAULT_INPUT_TOKENS = 100
DEFAULT_OUTPUT_TOKENS = 20


@dataclass(frozen=True)
class Usage:
    """Token counts the model reports for one turn."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Say:
    """The model answers `text` and ends its turn."""

    text: str
    usage: Usage | None = None


@dataclass(frozen=True)
class Tool:
    """The model calls a tool. intent "write": args {path, content}; "shell": args {command}."""

    intent: str
    args: dict[str, Any]
    text: str = ""
    usage: Usage | None = None


@dataclass(frozen=True)
class Fail:
    """An HTTP error answer: `status`, `body` (dict sent as JSON, str sent as is), extra headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Cut:
    """A streamed answer that sends `text` and then drops the connection mid-stream."""

    text: str


Step = Union[Say, Tool, Fail, Cut]


def usage_of(step: Step) -> Usage:
    """The step's token counts, or the defaults."""
    usage = getattr(step, "usage", None)
    return usage if usage is not None else Usage(DEFAULT_INPUT_TOKENS, DEFAULT_OUTPUT_TOKENS)


@dataclass
class Recorded:
    """One request as received: headers lower-cased; body parsed JSON, or None (empty or not JSON)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    raw: bytes = field(default=b"", repr=False)
    side: bool = False          # answered by a side handler (consumed no step)
    matched: bool = True        # some handler answered it (else 404)


class Request(Recorded):
    """A `Recorded` request plus the means to answer it (used by protocol handlers)."""

    def __init__(self, recorded: Recorded, http: BaseHTTPRequestHandler) -> None:
        super().__init__(**{name: getattr(recorded, name) for name in recorded.__dataclass_fields__})
        self._http = http
        self._chunked = False

    # -- plain answers ------------------------------------------------------------------------
    def send(self, status: int, body: bytes, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        """A complete response with Content-Length."""
        http = self._http
        http.send_response(status)
        http.send_header("Content-Type", content_type)
        http.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            http.send_header(name, value)
        http.end_headers()
        if self.method != "HEAD":
            http.wfile.write(body)
        http.wfile.flush()

    def json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        """A JSON response."""
        self.send(status, json.dumps(obj).encode(), "application/json", headers)

    # -- streams ------------------------------------------------------------------------------
    def start_stream(self, content_type: str = "text/event-stream",
                     headers: dict[str, str] | None = None) -> None:
        """Begin a 200 chunked response (Server-Sent Events by default)."""
        http = self._http
        http.send_response(200)
        http.send_header("Content-Type", content_type)
        http.send_header("Cache-Control", "no-cache")
        http.send_header("Transfer-Encoding", "chunked")
        for name, value in (headers or {}).items():
            http.send_header(name, value)
        http.end_headers()
        self._chunked = True

    def write(self, data: bytes) -> None:
        """One chunk of the stream."""
        if not data:
            return
        self._http.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self._http.wfile.flush()

    def sse(self, data: Any, event: str | None = None) -> None:
        """One Server-Sent Event; `data` is JSON-encoded unless it is a str."""
        text = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {event}\n" if event else ""
        self.write(f"{head}data: {text}\n\n".encode())

    def end_stream(self) -> None:
        """The final zero-length chunk."""
        self._http.wfile.write(b"0\r\n\r\n")
        self._http.wfile.flush()

    def cut_body(self, body: bytes, content_type: str = "application/json") -> None:
        """Announce `body` whole, send its first half, then drop the connection."""
        http = self._http
        http.send_response(200)
        http.send_header("Content-Type", content_type)
        http.send_header("Content-Length", str(len(body)))
        http.end_headers()
        http.wfile.write(body[: len(body) // 2])
        self.drop()

    def drop(self) -> None:
        """Drop the connection now (mid-stream: the client sees a premature close)."""
        self._http.close_connection = True
        try:
            self._http.wfile.flush()
            self._http.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def wants_stream(self) -> bool:
        """Did the client ask for a streamed answer (JSON `stream: true`, `alt=sse`, or an SSE path)?"""
        if isinstance(self.body, dict) and self.body.get("stream") is True:
            return True
        if "sse" in self.query.get("alt", []):
            return True
        return "stream" in self.path.rsplit("/", 1)[-1].lower()


Handler = Callable[["ModelAPI", Request, "Step | None"], None]
Matcher = Union[str, Callable[[Recorded], bool]]


@dataclass(frozen=True)
class _Route:
    matcher: Matcher
    handler: Handler
    side: bool

    def matches(self, request: Recorded) -> bool:
        if callable(self.matcher):
            return bool(self.matcher(request))
        return request.path == self.matcher


_ROUTES: list[_Route] = []


def register(matcher: Matcher, handler: Handler, *, side: bool = False) -> None:
    """Route requests to `handler(api, request, step)`.

    `matcher` is an exact path or a predicate on the `Recorded` request. Side
    routes are tried before main routes and get `step=None`; a main route gets
    the next scripted step (a `Fail` step never reaches it: it is answered here).
    """
    _ROUTES.append(_Route(matcher, handler, side))


def _load_protocols() -> None:
    for name in PROTOCOLS:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}")


def _decode_body(raw: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "deflate":
        return zlib.decompress(raw)
    if encoding == "br":
        return raw  # not decoded; recorded raw
    return raw


class _HTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        raw = self._read_body()
        try:
            raw = _decode_body(raw, self.headers.get("Content-Encoding", "").lower())
        except (OSError, zlib.error):
            pass
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        parts = urlsplit(self.path)
        recorded = Recorded(self.command, parts.path, parse_qs(parts.query),
                            {k.lower(): v for k, v in self.headers.items()}, body, raw)
        self.server.api._dispatch(Request(recorded, self))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: "ModelAPI"


class ModelAPI:
    """The scripted model API server (see the module docstring). A context manager."""

    def __init__(self) -> None:
        _load_protocols()
        self._lock = threading.Lock()
        self._steps: list[Step] = [Say("done")]
        self._next = 0
        self.requests: list[Recorded] = []
        self.main_steps: list[Step] = []      # the step each main request was answered with
        self.errors: list[str] = []           # handler exceptions (a test may assert it is empty)
        self._server = _Server(("127.0.0.1", 0), _HTTPHandler)
        self._server.api = self
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="modelapi",
                                        daemon=True)
        self._thread.start()

    def script(self, *steps: Step) -> None:
        """The replies to the main model requests, in order; the last one repeats."""
        if not steps:
            raise ValueError("script() needs at least one step")
        with self._lock:
            self._steps = list(steps)
            self._next = 0

    def _take(self) -> Step:
        with self._lock:
            step = self._steps[min(self._next, len(self._steps) - 1)]
            self._next += 1
            self.main_steps.append(step)
            return step

    @property
    def main_requests(self) -> list[Recorded]:
        """The requests that consumed a step."""
        return [r for r in self.requests if r.matched and not r.side]

    @property
    def unmatched(self) -> list[Recorded]:
        """Requests no protocol answered (404)."""
        return [r for r in self.requests if not r.matched]

    def _dispatch(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)
        routes = sorted(_ROUTES, key=lambda r: not r.side)
        route = next((r for r in routes if r.matches(request)), None)
        if route is None:
            request.matched = False
            request.json(404, {"error": {"message": f"no such endpoint: {request.path}"}})
            return
        request.side = route.side
        try:
            if route.side:
                route.handler(self, request, None)
                return
            step = self._take()
            if isinstance(step, Fail):
                body = step.body if isinstance(step.body, (str, bytes)) else json.dumps(step.body)
                request.send(step.status, body.encode() if isinstance(body, str) else body,
                             "application/json", dict(step.headers))
                return
            route.handler(self, request, step)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # recorded for the test; the server thread must live on
            self.errors.append(f"{request.method} {request.path}: {exc!r}")
            try:
                request.json(500, {"error": {"message": f"modelapi handler error: {exc!r}"}})
            except OSError:
                pass

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ModelAPI":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_sse(raw: bytes) -> Iterator[tuple[str | None, str]]:
    """Parse an SSE body into (event, data) pairs (for tests of the protocol modules)."""
    for block in raw.decode().split("\n\n"):
        event, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            yield event, "\n".join(data)
