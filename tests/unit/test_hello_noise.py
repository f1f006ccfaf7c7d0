"""Bytes before a Worker's hello (a login shell that prints): said for what they are, with the fix."""

from __future__ import annotations

import io
import queue
from typing import BinaryIO

import pytest

from taskrunner.errors import ProtocolError
from taskrunner.links.base import LinkEvent, WorkerLink
from taskrunner.model import WorkerSpec
from taskrunner.protocol import (SHOWN_NOISE_CHARS, BytesBeforeHello, FromWorker, Message, Reader, encode)

HELLO = encode(Message("hello", {"protocol": 2, "version": "0", "worker": "w1", "worker_key": "k", "challenge": "c"}))


def _first(stream: bytes) -> Message | None:
    return Reader(FromWorker(io.BytesIO(stream))).read()  # type: ignore[arg-type]


def test_a_greeting_before_the_hello_is_named_with_its_origin_and_fix() -> None:
    with pytest.raises(BytesBeforeHello) as caught:
        _first(b"welcome\n" + HELLO)
    message = str(caught.value)
    assert 'printed "welcome" before' in message
    assert "~/.bashrc" in message and "~/.profile" in message and "/etc/bash.bashrc" in message
    assert '[ -z "$PS1" ] && return' in message
    assert "Expecting value" not in message


def test_what_arrived_is_cut_and_made_inert() -> None:
    noise = b"\x1b]52;c;ZXZpbA==\x07\xe2\x80\xae\xff" + b"B" * 5000 + b"\n"
    with pytest.raises(BytesBeforeHello) as caught:
        _first(noise + HELLO)
    message = str(caught.value)
    assert "\x1b" not in message and "\x07" not in message and "\u202e" not in message
    assert "\\x1b]52" in message and "B" * SHOWN_NOISE_CHARS not in message and "..." in message


def test_a_greeting_without_a_line_end_before_the_stream_ends_is_named_too() -> None:
    with pytest.raises(BytesBeforeHello):
        _first(b"Last login: never")


def test_a_clean_hello_and_a_clean_end_pass() -> None:
    hello = _first(HELLO)
    assert hello is not None and hello.type == "hello"
    assert _first(b"") is None


def test_a_malformed_record_is_not_taken_for_shell_output() -> None:
    with pytest.raises(ProtocolError) as caught:
        _first(b'{"type": "hello"}\n')  # a header, lacking its fields: the Reader's own error
    assert not isinstance(caught.value, BytesBeforeHello) and "lacks" in str(caught.value)


def test_only_the_first_line_is_screened() -> None:
    reader = Reader(FromWorker(io.BytesIO(HELLO + b"later garbage\n")))  # type: ignore[arg-type]
    assert reader.read() is not None
    with pytest.raises(ProtocolError) as caught:
        reader.read()
    assert not isinstance(caught.value, BytesBeforeHello)


class _NoisyLink(WorkerLink):
    """A link whose Worker's shell greets before the hello, read as the ssh link reads it."""

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        return FromWorker(io.BytesIO(b"welcome\n" + HELLO)), io.BytesIO()  # type: ignore[return-value]

    def _disconnect(self) -> None:
        pass


def test_the_daemon_hears_why_the_session_ended() -> None:
    events: queue.Queue[LinkEvent] = queue.Queue()
    link = _NoisyLink(WorkerSpec(name="w1", transport="ssh", slots=1, agents=["shell"]), events.put)
    link.open()
    event = events.get(timeout=10)
    assert event.message is None
    assert event.reason.startswith("protocol error: the Worker account's shell printed \"welcome\"")
    assert '[ -z "$PS1" ] && return' in event.reason
