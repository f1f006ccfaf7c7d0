"""Masking a stream chunk by chunk (worker/streaming.py StreamMask): the same bytes as masking it whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from taskrunner.worker import secrets as secret_values
from taskrunner.worker.streaming import Pump, StreamMask


def whole(data: bytes, values: list[bytes]) -> bytes:
    """What masking the whole stream at once gives, an ending that begins a value masked too (it ended there)."""
    masked = secret_values.mask(data, values)
    reach = max(len(v) for v in values) - 1
    for at in range(max(0, len(data) - reach), len(data)):
        if any(v.startswith(data[at:]) for v in values):
            return masked[:at] + b"*" * (len(data) - at)
    return masked


def chunked(data: bytes, values: list[bytes], cuts: list[int]) -> bytes:
    masker = StreamMask(values)
    out = b""
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += masker.feed(data[start:cut])
        assert masker.held <= max(len(v) for v in values) - 1
        start = cut
    return out + masker.end()


SECRET = b"sk-live-0123456789"


def test_a_secret_split_at_every_possible_chunk_boundary_is_masked() -> None:
    data = b"before " + SECRET + b" after\n"
    expected = b"before " + b"*" * len(SECRET) + b" after\n"
    for cut in range(len(data) + 1):
        assert chunked(data, [SECRET], [cut]) == expected, cut


def test_a_secret_split_at_every_pair_of_chunk_boundaries_is_masked() -> None:
    data = b"a" + SECRET + b"b" + SECRET
    expected = b"a" + b"*" * len(SECRET) + b"b" + b"*" * len(SECRET)
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            assert chunked(data, [SECRET], [first, second]) == expected, (first, second)


def test_a_secret_fed_one_byte_at_a_time_is_masked() -> None:
    data = b"x" + SECRET + SECRET[:5] + SECRET + b"\n"
    assert chunked(data, [SECRET], list(range(len(data)))) == whole(data, [SECRET])


def test_a_value_with_a_newline_in_it_is_masked_across_the_line_end() -> None:
    key = b"-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END KEY-----"
    data = b"leaked: " + key + b"\nok\n"
    assert chunked(data, [key], [20, 40]) == b"leaked: " + b"*" * len(key) + b"\nok\n"


def test_overlapping_occurrences_of_two_values_are_all_masked_whatever_the_cut() -> None:
    values = [b"abcd", b"cdxy"]
    data = b"..abcdxy..abcdzz.."
    for cut in range(len(data) + 1):
        assert chunked(data, values, [cut]) == b"..******..****zz..", cut


def test_without_values_nothing_is_held_back_or_changed() -> None:
    masker = StreamMask([])
    assert masker.feed(b"sk-live") == b"sk-live"
    assert masker.held == 0
    assert masker.end() == b""


def test_only_an_ending_that_begins_a_value_is_held_back() -> None:
    masker = StreamMask([SECRET])
    assert masker.feed(b"line one\n") == b"line one\n"
    assert masker.feed(b"then sk-li") == b"then "
    assert masker.feed(b"ght\n") == b"sk-light\n"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"ab", b"b", b"sk-", b"sk-abc", b"abcab", b"\n", b"x", b"\xff", b"c"]),
                max_size=40),
       st.lists(st.sampled_from([b"sk-abc", b"abcab", b"bc\nb", b"sk"]), min_size=1, max_size=3, unique=True),
       st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_masking_in_chunks_gives_what_masking_the_whole_stream_gives(
        pieces: list[bytes], values: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    values = sorted(values, key=len, reverse=True)
    assert chunked(data, values, [c for c in cuts if c <= len(data)]) == whole(data, values)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=24), st.integers(0, 300), st.data())
def test_a_secret_anywhere_in_any_bytes_is_masked_whatever_the_chunks(
        noise: bytes, secret: bytes, at: int, data: Any) -> None:
    at = min(at, len(noise))
    stream = noise[:at] + secret + noise[at:]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    out = chunked(stream, [secret], cuts)
    assert out == whole(stream, [secret])
    assert out[at:at + len(secret)] == b"*" * len(secret)
    assert len(out) == len(stream)


class Lines:
    """A reader that keeps every line it is fed."""

    keeps_events = True

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def feed(self, line: bytes) -> str:
        self.seen.append(line)
        return ""

    def limit(self) -> None:
        return None

    def verdict(self, exit_code: int | None) -> Any:
        from types import SimpleNamespace
        return SimpleNamespace(status="COMPLETED", error=None, usage_limit=None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_the_pump_never_feeds_its_reader_a_secret_whatever_the_reads(tmp_path_factory: Any, reads: list[int]) -> None:
    tmp_path: Path = tmp_path_factory.mktemp("pump")
    secret = "tok-\"quoted\"-0123"
    stream = ('{"text": "' + secret.replace('"', '\\"') + '"}\n' + secret + "\n" + "{}\n" * 3).encode()
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"")
    reader = Lines()
    pump = Pump(tmp_path, reader, secrets=[secret.encode()])
    written = 0
    for size in reads:
        with open(events, "ab") as agent:
            agent.write(stream[written:written + size])
        written = min(len(stream), written + size)
        pump.step()
    with open(events, "ab") as agent:
        agent.write(stream[written:])
    pump.ending()
    while not pump.caught_up():
        pump.step()
    pump.outcome(0)
    pump.close()
    fed = b"\n".join(reader.seen)
    assert b"quoted" not in fed
    assert reader.seen[-3:] == [b"{}"] * 3
    assert len(reader.seen) == 5
