"""The Worker session protocol: plain records over any byte stream.

A record is one line of compact JSON (the header), optionally followed by
exactly `len` raw bytes (the payload). Headers always carry `type`. The same
records flow over a subprocess's pipes (the local Worker), an SSH channel, or
an `io.BytesIO` in tests.

Worker -> control plane
    hello      {protocol, version, worker, pid, agents, slots, worker_key, trust: {keys, issued_at},
                runs: [{run_id, state, size}]}
               worker_key is the Worker's result key (`ed25519 BASE64`); trust lists the ids
               of the control plane keys it trusts. state is "running" or "finished"; size
               is the output bytes on the Worker.
    heartbeat  {time, running}
    started    {run_id, pid, started_at}
    output     {run_id, offset, len} + payload: output bytes [offset, offset+len)
    result     {run_id, output_size, envelope}
               sent only after every output byte up to output_size. The envelope (signing.py,
               RESULT_TYPE) is signed by the Worker's result key over {run_id, status,
               exit_code, error, started_at, finished_at, output_size, output_sha256, nonce};
               the control plane records nothing of a result before it verifies.
    trusted    {keys}               a trust statement was taken; the key ids now trusted
    error      {message, run_id?}   a request the Worker could not act on

Control plane -> Worker
    assign     {run_id, envelope} + payload: the bundle's archive (see bundle.py). Every
               setting of the Run is in the signed manifest; run_id only routes a refusal.
    trust      {request}            a trust statement (see worker/trust.py)
    resume     {run_id, offset}     stream this Run's output from offset, then its result
    cancel     {run_id, reason}
    ack        {run_id}             the result is recorded; the Worker may forget the Run

A Worker streams a Run only once it is attached: a new assignment attaches it
at offset 0; after a reconnect the control plane sends `resume` with the
number of bytes it has recorded, so no byte is lost or repeated.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from taskrunner.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024 * 1024

REQUIRED: dict[str, tuple[str, ...]] = {
    "hello": ("protocol", "version", "worker", "runs"),
    "heartbeat": ("time",),
    "started": ("run_id", "pid"),
    "output": ("run_id", "offset"),
    "result": ("run_id", "output_size", "envelope"),
    "trusted": ("keys",),
    "error": ("message",),
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
    if "type" in message.fields or "len" in message.fields:
        raise ProtocolError("'type' and 'len' are reserved in record headers")
    header = dict(message.fields)
    header["type"] = message.type
    if message.payload:
        header["len"] = len(message.payload)
    line = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return line + b"\n" + message.payload


def decode_header(line: bytes) -> tuple[str, dict[str, Any], int]:
    """Parse one header line into (type, fields, payload length)."""
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed record header: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("record header is not an object with a 'type'")
    kind = header.pop("type")
    if kind not in REQUIRED:
        raise ProtocolError(f"unknown record type {kind!r}")
    missing = [name for name in REQUIRED[kind] if name not in header]
    if missing:
        raise ProtocolError(f"{kind} record lacks {', '.join(missing)}")
    size = header.pop("len", 0)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"{kind} record has an invalid payload length {size!r}")
    return kind, header, size


class Reader:
    """Reads records from a binary stream; `read()` returns None at a clean end."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def read(self) -> Message | None:
        line = self._stream.readline(MAX_HEADER_BYTES + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            if len(line) > MAX_HEADER_BYTES:
                raise ProtocolError("record header is longer than the limit")
            raise ProtocolError("stream ended inside a record header")
        kind, fields, size = decode_header(line)
        payload = self._read_exact(size, kind) if size else b""
        return Message(kind, fields, payload)

    def _read_exact(self, size: int, kind: str) -> bytes:
        chunks: list[bytes] = []
        left = size
        while left:
            chunk = self._stream.read(left)
            if not chunk:
                raise ProtocolError(f"stream ended inside the payload of a {kind} record")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


class Writer:
    """Writes whole records; safe to share between threads."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, *messages: Message) -> None:
        """Write the records in one go: over SSH, one packet instead of one each."""
        data = b"".join(encode(message) for message in messages)
        with self._lock:
            self._stream.write(data)
            self._stream.flush()
