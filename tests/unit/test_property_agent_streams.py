"""Agent event streams as hostile input (property tests), over every reader (claude, codex, gemini,
aider): the recorded streams in tests/fixtures/streams cut at any byte, with any field of any event
given a value of another type, and mixed with garbage lines. `feed` returns whole lines of text and is
a function of the lines alone (a replay renders the same), and what the reader reports is always a
JSON record with finite numbers, a verdict and a usage limit that can be acted on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskrunner.agents.aider import AiderReader
from taskrunner.agents.claude import ClaudeReader
from taskrunner.agents.codex import CodexReader
from taskrunner.agents.gemini import GeminiReader
from taskrunner.agents.stream import StreamReader, exceeded
from tests.unit.test_property_values import budget, nasty_text, nasty_values, swap_types

STREAMS = Path(__file__).resolve().parents[1] / "fixtures" / "streams"
READERS: dict[str, type[StreamReader]] = {"claude": ClaudeReader, "codex": CodexReader, "gemini": GeminiReader,
                                          "aider": AiderReader}
NOW = 1_795_993_200.0  # 2026-11-29T23:00:00Z
#: The recorded lines of each tool (stdout and stderr, as the Worker records both).
LINES: dict[str, list[bytes]] = {
    preset: [line for path in sorted(STREAMS.glob(f"{preset}-*")) for line in path.read_bytes().splitlines()]
    for preset in READERS
}
MAX_FINAL_MESSAGE_BYTES = 16 * 1024


def _reader(preset: str) -> StreamReader:
    return READERS[preset](backend={"provider": "p", "model": "m"}, prices={"input": 3, "output": 15},
                           budget={"max_turns": 5, "max_cost_usd": 1.0}, now=lambda: NOW)


def _swap_somewhere(value: Any, data: st.DataObject) -> Any:
    """`value` with one field, at any depth, given a value of another type."""
    if isinstance(value, dict) and value and data.draw(st.integers(0, 3)):
        key = data.draw(st.sampled_from(sorted(value, key=str)))
        return {**value, key: _swap_somewhere(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.integers(0, 3)):
        index = data.draw(st.integers(0, len(value) - 1))
        return [*value[:index], _swap_somewhere(value[index], data), *value[index + 1:]]
    return data.draw(swap_types(value))


@st.composite
def stream_lines(draw: st.DrawFn, preset: str) -> list[bytes]:
    """A stream of the tool's own lines, some cut, some with a field's type swapped, some garbage."""
    data = draw(st.data())
    lines = []
    for _ in range(draw(st.integers(min_value=1, max_value=12))):
        line = draw(st.sampled_from(LINES[preset]))
        how = draw(st.sampled_from(["as-is", "as-is", "cut", "swap", "swap", "garbage", "json"]))
        if how == "cut":
            line = line[:draw(st.integers(min_value=0, max_value=len(line)))]
        elif how == "swap":
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, (dict, list)):
                line = json.dumps(_swap_somewhere(event, data)).encode()
        elif how == "garbage":
            line = draw(st.binary(max_size=80))
        elif how == "json":
            line = json.dumps(draw(st.dictionaries(st.sampled_from(["type", "subtype", "item", "message",
                                                                    "usage", "error", "result", "stats"]),
                                                   nasty_values(6), max_size=4))).encode()
        lines.append(line)
    return lines


def _read_all(preset: str, lines: list[bytes]) -> tuple[str, StreamReader]:
    reader = _reader(preset)
    out = []
    for line in lines:
        text = reader.feed(line)
        assert isinstance(text, str) and (text == "" or text.endswith("\n")), text[-80:]
        out.append(text)
    return "".join(out), reader


def _check_outcome(reader: StreamReader) -> None:
    record = reader.report().as_record()
    # One JSON record, numbers finite: it is signed into the result and written to the Run's record.
    json.dumps(record, allow_nan=False)
    for key in ("turns",):
        assert record[key] is None or (isinstance(record[key], int) and record[key] >= 0), record
    assert record["cost_usd"] is None or (math.isfinite(record["cost_usd"]) and record["cost_usd"] >= 0), record
    if record["final_message"] is not None:
        assert len(record["final_message"].encode()) <= MAX_FINAL_MESSAGE_BYTES
    limit = reader.limit()
    if limit is not None:
        assert limit.resets_at is None or math.isfinite(limit.resets_at)
        assert isinstance(limit.message, str)
    for code in (0, 1, None, -9):
        verdict = reader.verdict(code)
        assert verdict.status in ("COMPLETED", "FAILED")
        assert verdict.status == "COMPLETED" or verdict.error, verdict
    reason = exceeded(reader.report(), {"max_turns": 1, "max_cost_usd": 0.01})
    assert reason is None or reason.startswith("budget ")


@pytest.mark.parametrize("preset", sorted(READERS))
def test_the_recorded_streams_the_mutations_start_from_are_there(preset: str) -> None:
    assert len(LINES[preset]) >= 5


@pytest.mark.parametrize("preset", sorted(READERS))
@given(data=st.data())
@budget(30)
def test_any_mix_of_the_tools_lines_cut_swapped_and_garbage_is_read(preset: str, data: st.DataObject) -> None:
    lines = data.draw(stream_lines(preset))
    _, reader = _read_all(preset, lines)
    _check_outcome(reader)


@pytest.mark.parametrize("preset", sorted(READERS))
@given(data=st.data())
@budget(20)
def test_a_replay_of_the_same_lines_renders_the_same_text(preset: str, data: st.DataObject) -> None:
    lines = data.draw(stream_lines(preset))
    first, _ = _read_all(preset, lines)
    again, _ = _read_all(preset, lines)
    assert first == again


@pytest.mark.parametrize("preset", sorted(READERS))
@given(st.lists(nasty_text, min_size=1, max_size=4))
@budget(20)
def test_limit_and_error_texts_of_any_shape_are_read_in_bounded_time(preset: str, texts: list[str]) -> None:
    # The texts a reader searches for reset times ("try again at ...", "resets 3pm") are the tool's
    # and, through it, the model's: long runs of digits and spaces must not make a regex crawl.
    events = [{"type": "error", "message": "usage limit reached, resets " + " 1" * 400 + text,
               "error": {"message": "rate limit; try again in " + "9" * 300 + text}} for text in texts]
    lines = [json.dumps(event).encode() for event in events]
    lines += [("Error: usage limit. try again at " + "12:" * 300 + text).encode() for text in texts]
    _, reader = _read_all(preset, lines)
    _check_outcome(reader)
