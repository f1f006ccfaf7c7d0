"""The Worker session protocol: plain records over any byte stream.

A record is one line of compact JSON (the header), optionally followed by
exactly `len` raw bytes (the payload). Headers always carry `type`. The same
records flow over a subprocess's pipes (the local Worker), an SSH channel, or
an `io.BytesIO` in tests.

Worker -> control plane
    hello      {protocol, version, worker, pid, agents, slots, worker_key, trust: {keys, issued_at},
                challenge}
               the first record of every session, before it is authenticated: it lists no
               Runs. worker_key is the Worker's result key (`ed25519 BASE64`); trust lists
               the ids of the control plane keys it trusts and the issued_at of the last
               trust statement it took; challenge is fresh random hex (sessionauth.py).
    ready      {runs: [{run_id, state, size}], repos?: {repo_id: [commits]}}
               the session is authenticated: the Runs this Worker holds. state is "running"
               or "finished"; size is the output bytes on the Worker.
    heartbeat  {time, running}
    started    {run_id, pid, started_at}
    output     {run_id, offset, len} + payload: output bytes [offset, offset+len)
    result     {run_id, output_size, envelope} + payload: the pack of the Agent's change, if any
               sent only after every output byte up to output_size. The envelope (signing.py,
               RESULT_TYPE) is signed by the Worker's result key over {run_id, status,
               exit_code, error, started_at, finished_at, output_size, output_sha256, nonce};
               the control plane records nothing of a result before it verifies.
    trusted    {keys}               a trust statement was taken; the key ids now trusted
    error      {message, run_id?, request?}
               a request the Worker could not act on; request names the record type it
               refused. request "assign": that Run is refused and nothing of it is on the
               Worker; "auth": the session is not authenticated and ends; "trust": the
               statement was not taken.

Control plane -> Worker
    auth       {envelope}           the answer to hello's challenge, signed by the control
                                    plane's keys (sessionauth.py); the Worker refuses every
                                    other record until it has verified one
    assign     {run_id, envelope} + payload: the bundle's archive (see bundle.py). Every
               setting of the Run is in the signed manifest; run_id only routes a refusal.
               The Worker verifies the envelope before it reads the payload.
    trust      {request}            a trust statement (see worker/trust.py)
    resume     {run_id, offset}     stream this Run's output from offset, then its result
    cancel     {run_id, reason}
    ack        {run_id}             the result is recorded; the Worker may forget the Run

A Worker streams a Run only once it is attached: a new assignment attaches it
at offset 0; after a reconnect the control plane sends `resume` with the
number of bytes it has recorded, so no byte is lost or repeated.

Sizes are bounded before anything is buffered: a header line of at most
MAX_HEADER_BYTES (SMALL_HEADER_BYTES for records other than assign, trust,
result and ready), and a payload only on the record types in the reader's `limits`, of
at most that many bytes. `Reader.read` enforces both; a Worker screening an
assignment reads the header alone (`read_header`) and then reads, skips or
refuses its payload.

**Output at the speed of the link.** A Worker sends output in records of up to
OUTPUT_CHUNK_BYTES (defaults.py); the control plane takes records of up to
MAX_OUTPUT_CHUNK_BYTES, so a Worker that sends larger ones than it does is still
read. Each record costs the control plane a fixed amount of work (a header, an
event on its loop, an append), so the larger they are, the less a gigabyte
costs. Neither side copies a payload to frame it: `Writer` writes the header
and then the payload as they are; `Reader` reads a payload in one call from
Python's own buffered files, and READ_PIECE_BYTES at a time (joined once) from
other streams (paramiko's channel file appends each read to what it holds, so
one large read would copy the payload over and over).

A pipe (the local Worker's stdin and stdout) is widened to PIPE_BYTES
(`widen_pipe`, F_SETPIPE_SZ) by whichever end makes a `Reader` or `Writer`
of it. Linux's default pipe holds 64 KiB, so a 1 MiB record took 16 hand-overs
between the Worker and the daemon, each a wake-up of the other side; widened,
a gigabyte costs each side about 1,700 context switches instead of 17,000
(the same CPU for the copies). A pipe the system will not widen (past
pipe-max-size, or a user over /proc/sys/fs/pipe-user-pages-soft) stays as it
was.

Over SSH the Worker account's shell starts taskrun-worker, and a shell whose
startup files print (`echo welcome` in ~/.bashrc) puts that text before the
hello. The control plane reads a Worker's stream through `FromWorker`, which
turns a first line that is not a record header into `BytesBeforeHello`,
saying what arrived, where it comes from and how to silence it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Mapping

from taskrunner.defaults import OUTPUT_CHUNK_BYTES
from taskrunner.errors import ProtocolError
from taskrunner.textsafe import clean

PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 1024 * 1024
#: Headers of records that carry no envelope of a bundle's size (hello, resume, ...).
SMALL_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024 * 1024
#: Record types whose headers may be up to MAX_HEADER_BYTES.
LARGE_HEADERS = frozenset({"assign", "trust", "result", "ready"})
#: The largest `output` record a control plane reads: a few of the chunks a Worker sends (OUTPUT_CHUNK_BYTES),
#: so Workers that send larger ones are read too.
MAX_OUTPUT_CHUNK_BYTES = max(4 * 1024 * 1024, OUTPUT_CHUNK_BYTES)
#: Payload bytes a record type may carry; types not listed carry none.
PAYLOAD_LIMITS: dict[str, int] = {"output": MAX_OUTPUT_CHUNK_BYTES, "assign": MAX_PAYLOAD_BYTES}
#: The largest pack of an Agent's change a `result` may carry (git.max_result_bytes is capped by it).
MAX_RESULT_PAYLOAD_BYTES = 256 * 1024 * 1024
#: What the control plane reads from a Worker: output, one chunk at most, and a result's pack (gitflow/change.py).
FROM_WORKER_LIMITS: dict[str, int] = {"output": MAX_OUTPUT_CHUNK_BYTES, "result": MAX_RESULT_PAYLOAD_BYTES}
#: A payload that is skipped is read this many bytes at a time, never whole.
SKIP_CHUNK_BYTES = 64 * 1024
#: A payload is read this many bytes at a time from a stream that is not one of Python's buffered files.
READ_PIECE_BYTES = 64 * 1024
#: A payload up to this size is written in one piece with its header; a larger one after it, as it is.
INLINE_PAYLOAD_BYTES = 16 * 1024
#: A pipe that records flow through (the local Worker's stdin and stdout) is widened to this many bytes, the
#: most Linux gives an unprivileged process by default (/proc/sys/fs/pipe-max-size); see the module doc.
PIPE_BYTES = 1024 * 1024
#: fcntl's F_SETPIPE_SZ and F_GETPIPE_SZ (Linux 2.6.35; named in the fcntl module from Python 3.10).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

REQUIRED: dict[str, tuple[str, ...]] = {
    "hello": ("protocol", "version", "worker", "worker_key", "challenge"),
    "ready": ("runs",),
    "heartbeat": ("time",),
    "started": ("run_id", "pid"),
    "output": ("run_id", "offset"),
    "result": ("run_id", "output_size", "envelope"),
    "trusted": ("keys",),
    "error": ("message",),
    "auth": ("envelope",),
    "assign": ("run_id", "envelope"),
    "trust": ("request",),
    "resume": ("run_id", "offset"),
    "cancel": ("run_id",),
    "ack": ("run_id",),
}


@dataclass(frozen=True)
class Message:
    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(message: Message) -> bytes:
    """The record as bytes: its header line, then its payload."""
    return encode_header(message) + message.payload


def encode_header(message: Message) -> bytes:
    """The record's header line (newline included); its payload follows it on the stream."""
    if "type" in message.fields or "len" in message.fields:
        raise ProtocolError("'type' and 'len' are reserved in record headers")
    header = dict(message.fields)
    header["type"] = message.type
    if message.payload:
        header["len"] = len(message.payload)
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (RFC 8259 §6): a header carrying one is malformed."""
    raise ValueError(f"{name} is not a JSON number")


def decode_header(line: bytes) -> tuple[str, dict[str, Any], int]:
    """Parse one header line into (type, fields, payload length).

    ProtocolError, naming the reason, for anything that is not one JSON object
    with a known `type` and its required fields: bad UTF-8 or JSON, NaN or
    Infinity, integers too long to convert, nesting deeper than the parser goes.
    """
    try:
        header = json.loads(line, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed record header: {exc}") from exc
    except ValueError as exc:  # NaN/Infinity, or an integer of more digits than Python converts
        raise ProtocolError(f"malformed record header: {exc}") from exc
    except RecursionError as exc:  # arrays or objects nested deeper than the parser recurses
        raise ProtocolError("malformed record header: nested too deeply") from exc
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("record header is not an object with a 'type'")
    kind = header.pop("type")
    if kind not in REQUIRED:
        raise ProtocolError(f"unknown record type {kind!r}")
    missing = [name for name in REQUIRED[kind] if name not in header]
    if missing:
        raise ProtocolError(f"{kind} record lacks {', '.join(missing)}")
    size = header.pop("len", 0)
    # Only its form here: what a record type may carry is the reader's limit, checked before any is read.
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2 ** 63:
        raise ProtocolError(f"{kind} record has an invalid payload length {size!r}")
    return kind, header, size


@dataclass(frozen=True)
class Header:
    """A record's header, read before its payload: `size` payload bytes follow it on the stream."""

    type: str
    fields: dict[str, Any]
    size: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def widen_pipe(stream: Any, size: int = PIPE_BYTES) -> int | None:
    """Make the pipe under `stream` (a file object) hold `size` bytes; its new capacity in bytes, or None when
    `stream` is no pipe or the system refuses (past pipe-max-size or the user's pipe quota: it stays as it was)."""
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        current = int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
        return current if current >= size else int(fcntl.fcntl(fd, _F_SETPIPE_SZ, size))
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        return None


class Reader:
    """Reads records from a binary stream; `read()` returns None at a clean end.

    `limits` maps record types to the most payload bytes they may carry
    (PAYLOAD_LIMITS by default); a record over its limit raises ProtocolError
    before any of its payload is read.
    """

    def __init__(self, stream: BinaryIO, limits: Mapping[str, int] = PAYLOAD_LIMITS) -> None:
        self._stream = stream
        self._limits = limits
        # Python's buffered files read a payload straight into the bytes they return; others in pieces.
        self._piece = None if isinstance(stream, io.BufferedIOBase) else READ_PIECE_BYTES
        widen_pipe(stream)

    def read(self) -> Message | None:
        header = self.read_header()
        if header is None:
            return None
        limit = self._limits.get(header.type, 0)
        if header.size > limit:
            raise ProtocolError(f"{header.type} record announces {header.size} payload bytes, over its limit "
                                f"of {limit}")
        return Message(header.type, header.fields, self.read_payload(header))

    def read_header(self) -> Header | None:
        """The next header alone (None at a clean end); its payload is still on the stream."""
        line = self._stream.readline(MAX_HEADER_BYTES + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            if len(line) > MAX_HEADER_BYTES:
                raise ProtocolError("record header is longer than the limit")
            raise ProtocolError("stream ended inside a record header")
        kind, fields, size = decode_header(line)
        if len(line) > SMALL_HEADER_BYTES and kind not in LARGE_HEADERS:
            raise ProtocolError(f"{kind} record header is {len(line)} bytes, over its limit of {SMALL_HEADER_BYTES}")
        return Header(kind, fields, size)

    def read_payload(self, header: Header, digest: Any = None) -> bytes:
        """The payload that follows `header`, fed to `digest` (a hashlib object) as it arrives."""
        chunks: list[bytes] = []
        left = header.size
        while left:
            chunk = self._stream.read(left if self._piece is None else min(left, self._piece))
            if not chunk:
                raise ProtocolError(f"stream ended inside the payload of a {header.type} record")
            if digest is not None:
                digest.update(chunk)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def skip_payload(self, header: Header) -> None:
        """Read past the payload that follows `header`, SKIP_CHUNK_BYTES at a time, keeping none of it."""
        left = header.size
        while left:
            chunk = self._stream.read(min(left, SKIP_CHUNK_BYTES))
            if not chunk:
                raise ProtocolError(f"stream ended inside the payload of a {header.type} record")
            left -= len(chunk)


class Writer:
    """Writes whole records; safe to share between threads."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        widen_pipe(stream)

    def write(self, *messages: Message) -> None:
        """Write the records in one go (over SSH, one packet instead of one each), then flush. A payload over
        INLINE_PAYLOAD_BYTES is written after its header as it is, not copied into one string with it."""
        parts: list[bytes] = []
        small: list[bytes] = []
        for message in messages:
            small.append(encode_header(message))
            if len(message.payload) <= INLINE_PAYLOAD_BYTES:
                small.append(message.payload)
            else:
                parts += [b"".join(small), message.payload]
                small = []
        if small:
            parts.append(b"".join(small))
        with self._lock:
            for part in parts:
                self._stream.write(part)
            self._stream.flush()


#: Characters of a stray first line that BytesBeforeHello quotes.
SHOWN_NOISE_CHARS = 200


class BytesBeforeHello(ProtocolError):
    """Raised when a Worker session's first line is not a record header: something printed before the hello."""


def bytes_before_hello(line: bytes) -> BytesBeforeHello:
    """The error for a session whose first line is `line`: what arrived (cut, made inert), whence, the fix."""
    text = line.rstrip(b"\r\n").decode("utf-8", errors="replace")
    shown = clean(text[:SHOWN_NOISE_CHARS]) + ("..." if len(text) > SHOWN_NOISE_CHARS else "")
    return BytesBeforeHello(
        f'the Worker account\'s shell printed "{shown}" before taskrun-worker\'s hello (the session\'s first line is '
        "not a record header). It comes from the account's shell startup files (~/.bashrc, ~/.profile, "
        "/etc/bash.bashrc; ~/.zshenv for zsh), which run even when sshd starts a command: make them print "
        'nothing for non-interactive shells, e.g. put `[ -z "$PS1" ] && return` at the top of ~/.bashrc')


class FromWorker:
    """A Worker session's stream as the control plane reads it: its first line must be a record header.

    Wraps the channel's binary stream for `Reader`; `readline` raises
    BytesBeforeHello when the first line is not a JSON object with a `type`
    (a clean end passes through; a header that is merely malformed is left
    to `Reader`). Everything after the first line is passed on untouched.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._first = True

    def readline(self, size: int = -1) -> bytes:
        line = self._stream.readline(size)
        if self._first and line:
            self._first = False
            if not _record_like(line):
                raise bytes_before_hello(line)
        return line

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)


def _record_like(line: bytes) -> bool:
    """Whether `line` is a JSON object with a string `type`: a record header, maybe a malformed one."""
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return isinstance(header, dict) and isinstance(header.get("type"), str)
