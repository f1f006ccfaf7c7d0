"""The session protocol: records over any byte stream, here an io.BytesIO."""

from __future__ import annotations

import fcntl
import io
import json
import os
import threading
from typing import Any

import pytest

from taskrunner.defaults import OUTPUT_CHUNK_BYTES
from taskrunner.errors import ProtocolError
from taskrunner.protocol import (FROM_WORKER_LIMITS, INLINE_PAYLOAD_BYTES, MAX_OUTPUT_CHUNK_BYTES, PAYLOAD_LIMITS,
                                 PIPE_BYTES, READ_PIECE_BYTES, REQUIRED, SKIP_CHUNK_BYTES, SMALL_HEADER_BYTES, FromWorker,
                                 Message, Reader, Writer, decode_header, encode, widen_pipe)

#: A DSSE envelope as bundles, results and trust statements carry it (signing.py); the protocol only routes it.
ENVELOPE = {"payloadType": "application/vnd.taskrun.result+json", "payload": "eyJydW5faWQiOiJyMSJ9",
            "signatures": [{"keyid": "SHA256:k0Kw4wE2", "sig": "c2ln"}]}
#: One complete, valid set of fields for each record type.
FIELDS: dict[str, dict[str, Any]] = {
    "hello": {"protocol": 2, "version": "0.1", "worker": "w1", "pid": 42, "agents": ["shell"],
              "slots": 2, "worker_key": "ed25519 " + "A" * 43 + "=",
              "trust": {"keys": ["SHA256:k0Kw4wE2"], "issued_at": 1700000000.25},
              "challenge": "0123456789abcdef0123456789abcdef"},
    "ready": {"runs": [{"run_id": "r1", "state": "running", "size": 10}]},
    "heartbeat": {"time": 1700000000.5, "running": 1},
    "started": {"run_id": "r1", "pid": 4242, "started_at": 1.5},
    "output": {"run_id": "r1", "offset": 128},
    "result": {"run_id": "r1", "output_size": 3, "envelope": ENVELOPE},
    "trusted": {"keys": ["SHA256:k0Kw4wE2", "SHA256:n3wK3y"]},
    "error": {"message": "no such Run", "run_id": "r9", "request": "resume"},
    "auth": {"envelope": dict(ENVELOPE, payloadType="application/vnd.taskrun.session+json")},
    "assign": {"run_id": "r1", "envelope": dict(ENVELOPE, payloadType="application/vnd.taskrun.bundle+json")},
    "trust": {"request": {"keys": ["ed25519 " + "A" * 43 + "="],
                          "envelope": dict(ENVELOPE, payloadType="application/vnd.taskrun.trust+json")}},
    "resume": {"run_id": "r1", "offset": 7},
    "cancel": {"run_id": "r1", "reason": "user asked"},
    "ack": {"run_id": "r1"},
}

BINARY = b"line one\nline two\r\n\x00\xff\xfe binary \n\n{\"type\":\"ack\"}\n" + bytes(range(256))


def roundtrip(*messages: Message) -> list[Message]:
    stream = io.BytesIO()
    writer = Writer(stream)
    for message in messages:
        writer.write(message)
    stream.seek(0)
    return read_all(stream.getvalue())


def read_all(data: bytes, limits: Any = PAYLOAD_LIMITS) -> list[Message]:
    reader = Reader(io.BytesIO(data), limits)
    out = []
    while (message := reader.read()) is not None:
        out.append(message)
    return out


def test_the_fixture_covers_every_record_type() -> None:
    assert set(FIELDS) == set(REQUIRED)


@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_every_record_type_without_payload_survives_a_round_trip(kind: str) -> None:
    message = Message(kind, FIELDS[kind])
    assert roundtrip(message) == [message]


@pytest.mark.parametrize("kind", sorted(PAYLOAD_LIMITS))
def test_every_record_type_that_carries_a_binary_payload_survives_a_round_trip(kind: str) -> None:
    message = Message(kind, FIELDS[kind], BINARY)
    [back] = roundtrip(message)
    assert back.type == kind
    assert back.fields == FIELDS[kind]
    assert back.payload == BINARY


@pytest.mark.parametrize("kind", sorted(set(FIELDS) - set(PAYLOAD_LIMITS)))
def test_a_payload_on_a_record_type_that_carries_none_is_refused_before_it_is_read(kind: str) -> None:
    stream = io.BytesIO(encode(Message(kind, FIELDS[kind], BINARY)))
    with pytest.raises(ProtocolError, match=f"{kind} record announces {len(BINARY)} payload bytes, over its limit of 0"):
        Reader(stream).read()
    assert stream.read() == BINARY  # not a byte of it consumed


def test_the_control_plane_takes_output_chunks_up_to_its_limit_and_nothing_larger() -> None:
    assert MAX_OUTPUT_CHUNK_BYTES >= OUTPUT_CHUNK_BYTES  # what a Worker sends is always read
    fits = Message("output", {"run_id": "r", "offset": 0}, b"x" * MAX_OUTPUT_CHUNK_BYTES)
    assert read_all(encode(fits), FROM_WORKER_LIMITS) == [fits]
    over = encode(Message("output", {"run_id": "r", "offset": 0}, b"x" * (MAX_OUTPUT_CHUNK_BYTES + 1)))
    with pytest.raises(ProtocolError, match="over its limit"):
        read_all(over, FROM_WORKER_LIMITS)
    with pytest.raises(ProtocolError, match="assign record announces"):
        read_all(encode(Message("assign", FIELDS["assign"], b"archive")), FROM_WORKER_LIMITS)


def test_a_small_record_with_a_huge_header_is_refused() -> None:
    line = encode(Message("resume", {"run_id": "r", "offset": 0, "padding": "x" * SMALL_HEADER_BYTES}))
    with pytest.raises(ProtocolError, match="resume record header is .* over its limit"):
        read_all(line)


class _Tracking(io.RawIOBase):
    """`size` zero bytes after `head`, made up as they are read; remembers the largest read asked for."""

    def __init__(self, head: bytes, size: int) -> None:
        self._head, self._left, self.largest = head, size, 0

    def readable(self) -> bool:
        return True

    def readline(self, limit: int = -1) -> bytes:  # type: ignore[override]
        line, sep, rest = self._head.partition(b"\n")
        self._head = rest
        return line + sep

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        self.largest = max(self.largest, size)
        if self._head:
            raise AssertionError("read past a header")
        n = min(size, self._left)
        self._left -= n
        return bytes(n)


def test_a_skipped_payload_is_read_a_chunk_at_a_time_never_whole() -> None:
    size = 50 * 1024 * 1024
    stream = _Tracking(encode(Message("assign", FIELDS["assign"])).rstrip(b"\n")[:-1] +
                       f',"len":{size}}}\n'.encode(), size)
    reader = Reader(stream)  # type: ignore[arg-type]
    header = reader.read_header()
    assert header is not None and (header.type, header.size) == ("assign", size)
    reader.skip_payload(header)
    assert stream.largest == SKIP_CHUNK_BYTES
    assert reader.read_header() is None


def test_records_follow_each_other_on_one_stream_in_order() -> None:
    messages = [Message(kind, FIELDS[kind], BINARY if kind in PAYLOAD_LIMITS else b"") for kind in sorted(FIELDS)]
    assert roundtrip(*messages) == messages


def test_a_header_is_one_line_of_json_followed_by_exactly_len_payload_bytes() -> None:
    data = encode(Message("output", {"run_id": "r1", "offset": 0}, b"a\nb"))
    line, rest = data.split(b"\n", 1)
    header = json.loads(line)
    assert header == {"type": "output", "run_id": "r1", "offset": 0, "len": 3}
    assert rest == b"a\nb"


def test_the_length_field_is_not_exposed_as_a_message_field() -> None:
    [back] = roundtrip(Message("output", {"run_id": "r", "offset": 0}, b"xyz"))
    assert "len" not in back.fields
    assert "type" not in back.fields


def test_an_assignment_carries_only_the_run_id_and_the_envelope_besides_the_archive() -> None:
    archive = bytes(range(256)) * 4
    data = encode(Message("assign", FIELDS["assign"], archive))
    line, rest = data.split(b"\n", 1)
    assert set(json.loads(line)) == {"type", "run_id", "envelope", "len"}
    assert rest == archive


def test_a_result_without_its_signed_envelope_raises_protocol_error() -> None:
    unsigned = {"run_id": "r1", "status": "COMPLETED", "exit_code": 0, "output_size": 3}
    with pytest.raises(ProtocolError, match="result record lacks envelope"):
        read_all(encode(Message("result", unsigned)))


def test_an_assignment_in_the_unsigned_form_of_earlier_versions_raises_protocol_error() -> None:
    old = {"run_id": "r1", "task_id": "a/b", "revision": "abc", "attempt": 1,
           "agent": {"name": "shell", "preset": "shell"}, "timeout": None, "task_file": "tasks/a/b.md"}
    with pytest.raises(ProtocolError, match="assign record lacks envelope"):
        read_all(encode(Message("assign", old, b"archive")))


def test_message_fields_are_reachable_by_item_and_by_get() -> None:
    message = Message("resume", {"run_id": "r1", "offset": 5})
    assert message["offset"] == 5
    assert message.get("missing", "dflt") == "dflt"


def test_non_ascii_text_fields_survive_a_round_trip() -> None:
    message = Message("error", {"message": "Fehler: Größe überschritten ✗"})
    assert roundtrip(message) == [message]


def test_a_clean_end_of_stream_reads_as_none() -> None:
    assert Reader(io.BytesIO(b"")).read() is None


def test_the_end_after_a_whole_record_reads_as_none_again_and_again() -> None:
    reader = Reader(io.BytesIO(encode(Message("ack", {"run_id": "r"}))))
    assert reader.read() == Message("ack", {"run_id": "r"})
    assert reader.read() is None
    assert reader.read() is None


def test_a_truncated_header_raises_protocol_error() -> None:
    data = encode(Message("ack", {"run_id": "r"}))
    with pytest.raises(ProtocolError, match="header"):
        read_all(data[:-3])


def test_a_truncated_payload_raises_protocol_error() -> None:
    data = encode(Message("output", {"run_id": "r", "offset": 0}, b"0123456789"))
    with pytest.raises(ProtocolError, match="payload"):
        read_all(data[:-4])


def test_a_header_announcing_a_payload_that_never_comes_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="payload"):
        read_all(b'{"type":"output","run_id":"r","offset":0,"len":5}\n')


def test_a_stream_ending_after_a_whole_record_and_a_partial_one_raises_after_the_whole_one() -> None:
    whole = encode(Message("ack", {"run_id": "a"}))
    reader = Reader(io.BytesIO(whole + b'{"type":"ack"'))
    assert reader.read() == Message("ack", {"run_id": "a"})
    with pytest.raises(ProtocolError):
        reader.read()


@pytest.mark.parametrize("line", [
    b"{not json}\n",
    b'{"type": "ack", "run_id": \n',
    b"\xff\xfe\xfd\n",
    b"\n",
])
def test_malformed_json_raises_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        read_all(line)


@pytest.mark.parametrize("line", [
    b"[1, 2, 3]\n",
    b'"ack"\n',
    b'{"run_id": "r"}\n',
    b'{"type": 5, "run_id": "r"}\n',
])
def test_a_header_that_is_not_an_object_with_a_string_type_raises_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="type"):
        read_all(line)


def test_an_unknown_record_type_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unknown record type 'explode'"):
        read_all(b'{"type":"explode","run_id":"r"}\n')


@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_a_record_lacking_a_required_field_raises_protocol_error(kind: str) -> None:
    for missing in REQUIRED[kind]:
        fields = {k: v for k, v in FIELDS[kind].items() if k != missing}
        with pytest.raises(ProtocolError, match=f"lacks {missing}"):
            read_all(encode(Message(kind, fields)))


@pytest.mark.parametrize("length", [-1, -100, True, False, 1.5, "3", None, [1]])
def test_a_negative_bool_or_non_integer_length_raises_protocol_error(length: Any) -> None:
    header = json.dumps({"type": "output", "run_id": "r", "offset": 0, "len": length}).encode()
    with pytest.raises(ProtocolError, match="invalid payload length"):
        read_all(header + b"\n" + b"x" * 8)


def test_decode_header_returns_type_fields_and_length() -> None:
    assert decode_header(b'{"type":"output","run_id":"r","offset":3,"len":4}\n') == (
        "output", {"run_id": "r", "offset": 3}, 4)


def test_a_zero_length_is_accepted_as_no_payload() -> None:
    [back] = read_all(b'{"type":"ack","run_id":"r","len":0}\n')
    assert back == Message("ack", {"run_id": "r"}, b"")


class _SlowStream(io.BytesIO):
    """A stream whose write() hands over one byte at a time, releasing the GIL
    between bytes, so that unsynchronized writers would interleave."""

    def write(self, data: Any) -> int:
        view = bytes(data)
        for i in range(len(view)):
            super().write(view[i:i + 1])
            if i % 7 == 0:
                threading.Event().wait(0)  # yields the GIL; not synchronization
        return len(view)


def test_writer_is_safe_across_threads_and_the_reader_sees_whole_records() -> None:
    stream = _SlowStream()
    writer = Writer(stream)
    threads_n, per_thread = 8, 40
    barrier = threading.Barrier(threads_n)

    def produce(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            payload = (f"{t}:{i}\n".encode() * (i % 5 + 1)) + bytes([t, i])
            writer.write(Message("output", {"run_id": f"t{t}", "offset": i}, payload))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stream.seek(0)
    seen: dict[str, list[int]] = {}
    for message in read_all(stream.getvalue()):
        t = int(message["run_id"][1:])
        i = message["offset"]
        assert message.payload == (f"{t}:{i}\n".encode() * (i % 5 + 1)) + bytes([t, i])
        seen.setdefault(message["run_id"], []).append(i)
    assert seen == {f"t{t}": list(range(per_thread)) for t in range(threads_n)}


def test_several_records_written_together_are_one_write_and_read_back_in_order() -> None:
    class Counting(io.BytesIO):
        writes = 0

        def write(self, data: Any) -> int:  # type: ignore[override]
            Counting.writes += 1
            return super().write(data)

    stream = Counting()
    messages = [Message("ack", {"run_id": "r1"}), Message("assign", FIELDS["assign"], BINARY),
                Message("cancel", {"run_id": "r2", "reason": "x"})]
    Writer(stream).write(*messages)
    assert Counting.writes == 1
    back = read_all(stream.getvalue())
    assert [(m.type, m.fields, m.payload) for m in back] == [(m.type, m.fields, m.payload) for m in messages]


class _Trickle(io.RawIOBase):
    """A stream that is not a Python buffered file (as paramiko's channel file is not): hands over at most
    `most` bytes per read, and remembers the largest read asked for."""

    def __init__(self, data: bytes, most: int) -> None:
        self._data, self._most, self.largest = data, most, 0

    def readable(self) -> bool:
        return True

    def readline(self, limit: int = -1) -> bytes:  # type: ignore[override]
        line, sep, rest = self._data.partition(b"\n")
        self._data = rest
        return line + sep

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        self.largest = max(self.largest, size)
        out, self._data = self._data[:min(size, self._most)], self._data[min(size, self._most):]
        return out


@pytest.mark.parametrize("most", [1, 1000, READ_PIECE_BYTES, 10 * READ_PIECE_BYTES])
def test_a_payload_from_a_stream_that_is_not_a_buffered_file_is_read_a_piece_at_a_time(most: int) -> None:
    payload = bytes(range(256)) * (3 * READ_PIECE_BYTES // 256) + b"tail"
    messages = [Message("output", {"run_id": "r", "offset": 0}, payload), Message("ack", {"run_id": "r"})]
    stream = _Trickle(b"".join(encode(m) for m in messages), most)
    reader = Reader(FromWorker(stream), FROM_WORKER_LIMITS)  # type: ignore[arg-type]
    assert [reader.read(), reader.read(), reader.read()] == [*messages, None]
    assert stream.largest == READ_PIECE_BYTES


def test_a_payload_from_a_buffered_file_is_read_in_one_call() -> None:
    payload = b"y" * (3 * READ_PIECE_BYTES)

    class Asked(io.BytesIO):
        largest = 0

        def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
            Asked.largest = max(Asked.largest, size or 0)
            return super().read(size)

    reader = Reader(Asked(encode(Message("output", {"run_id": "r", "offset": 0}, payload))), FROM_WORKER_LIMITS)
    assert reader.read() == Message("output", {"run_id": "r", "offset": 0}, payload)
    assert Asked.largest == len(payload)


def test_a_large_payload_is_written_as_it_is_after_its_header_not_copied_into_one_string() -> None:
    class Parts(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[Any] = []

        def write(self, data: Any) -> int:  # type: ignore[override]
            self.parts.append(data)
            return super().write(data)

    payload = b"z" * (INLINE_PAYLOAD_BYTES + 1)
    small = Message("output", {"run_id": "r", "offset": 0}, b"small")
    big = Message("output", {"run_id": "r", "offset": 5}, payload)
    stream = Parts()
    Writer(stream).write(small, big, Message("heartbeat", {"time": 1.0}))
    assert [p is payload for p in stream.parts] == [False, True, False]  # the very object, no copy of it
    assert read_all(stream.getvalue(), FROM_WORKER_LIMITS) == [small, big, Message("heartbeat", {"time": 1.0})]


def _pipe_size(fd: int) -> int:
    return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))


@pytest.mark.parametrize("end", ["writer", "reader"])
def test_the_pipe_a_writer_or_reader_is_made_of_is_widened_so_a_whole_output_chunk_fits(end: str) -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as inbound, os.fdopen(write_fd, "wb") as outbound:
        assert _pipe_size(write_fd) < OUTPUT_CHUNK_BYTES  # Linux's default: 64 KiB
        if end == "writer":
            Writer(outbound)
        else:
            Reader(inbound, FROM_WORKER_LIMITS)
        assert _pipe_size(write_fd) == PIPE_BYTES >= OUTPUT_CHUNK_BYTES
        # A record of a whole chunk now goes into the pipe in one go, before anyone reads.
        chunk = Message("output", {"run_id": "r", "offset": 0}, b"o" * (OUTPUT_CHUNK_BYTES - 4096))
        Writer(outbound).write(chunk)
        assert Reader(inbound, FROM_WORKER_LIMITS).read() == chunk


def test_a_stream_that_is_no_pipe_is_left_as_it_is(tmp_path: Any) -> None:
    with open(tmp_path / "f", "wb") as handle:
        assert widen_pipe(handle) is None
    assert widen_pipe(io.BytesIO()) is None


def test_a_pipe_the_system_will_not_widen_stays_as_it_was() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb") as outbound:
        before = _pipe_size(write_fd)
        with open("/proc/sys/fs/pipe-max-size") as handle:
            limit = int(handle.read())
        # Past pipe-max-size only a privileged process may go (as root it may): either way nothing raises.
        got = widen_pipe(outbound, limit * 4)
        assert (got is None and _pipe_size(write_fd) == before) or got == _pipe_size(write_fd) >= limit * 4
