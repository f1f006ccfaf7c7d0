"""textsafe.clean: hostile strings become visible, inert text."""

from __future__ import annotations

import io
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table
from rich.text import Text

from taskrunner.textsafe import BIDI_CONTROLS, StreamCleaner, clean


def unsafe(ch: str) -> bool:
    """What no cleaned text may hold (beyond "\\n" and "\\t" in multi-line text)."""
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in BIDI_CONTROLS


@pytest.mark.parametrize("text, shown", [
    ("plain [bold]title[/] and [/x]", "plain [bold]title[/] and [/x]"),
    ("clear \x1b[2J screen", "clear \\x1b[2J screen"),
    ("copy \x1b]52;c;aGVsbG8=\x07 me", "copy \\x1b]52;c;aGVsbG8=\\x07 me"),
    ("\x1b]8;;https://evil.example\x1b\\link\x1b]8;;\x1b\\", "\\x1b]8;;https://evil.example\\x1b\\link\\x1b]8;;\\x1b\\"),
    ("C1 CSI \x9b2J", "C1 CSI \\x9b2J"),
    ("back\x08\x08space, bell\x07, nul\x00, del\x7f", "back\\x08\\x08space, bell\\x07, nul\\x00, del\\x7f"),
    ("admin\u202egnp.exe", "admin\\u202egnp.exe"),
    ("isolate \u2066x\u2069", "isolate \\u2066x\\u2069"),
    ("not utf-8 \udcff", "not utf-8 \\udcff"),
    ("line\nTask-Id: injected", "line Task-Id: injected"),
    ("rm -rf /\rls", "rm -rf / ls"),
    ("crlf\r\nnext\u2028sep\x85nel\x0bvt", "crlf next sep nel vt"),
    ("tab\there", "tab here"),
    ("café · 日本語 · emoji 👍🏽 · zwj 👨\u200d👩", "café · 日本語 · emoji 👍🏽 · zwj 👨\u200d👩"),
])
def test_single_line_text_is_shown_literally_on_one_line(text: str, shown: str) -> None:
    assert clean(text) == shown


def test_multiline_text_keeps_newlines_and_tabs_and_escapes_the_rest() -> None:
    text = "one\r\ntwo\n\tthree\rfour\x1b[31mred\u202e"
    assert clean(text, multiline=True) == "one\ntwo\n\tthree\\x0dfour\\x1b[31mred\\u202e"


def test_clean_text_is_returned_unchanged() -> None:
    text = "an ordinary title"
    assert clean(text) is text
    assert clean(clean("a\x1bb")) == clean("a\x1bb")


def test_stream_cleaner_joins_characters_and_crlf_split_between_pieces() -> None:
    cleaner = StreamCleaner()
    pieces = [b"a\r", b"\nb\xe2\x80", b"\xaez\x1b[2J\xff", b"\r"]
    out = "".join(cleaner.feed(piece) for piece in pieces) + cleaner.feed(b"", final=True)
    assert out == "a\nb\\u202ez\\x1b[2J\ufffd\\x0d"


@given(st.text())
def test_single_line_output_holds_no_control_character(text: str) -> None:
    out = clean(text)
    assert not any(unsafe(ch) or ch == "\t" for ch in out)


@given(st.text())
def test_multiline_output_holds_only_newlines_and_tabs(text: str) -> None:
    out = clean(text, multiline=True)
    assert not any(unsafe(ch) and ch not in "\n\t" for ch in out)


@given(st.text())
def test_rich_shows_cleaned_text_as_written(text: str) -> None:
    """As a table cell (Text) or a line printed without markup: never a MarkupError, never an ESC.

    (Not through `rich.markup.escape`: it doubles a trailing backslash, so the
    CLI hands rich `Text` objects instead.)
    """
    out = clean(text)
    buffer = io.StringIO()
    console = Console(file=buffer, width=400, color_system=None, emoji=False, highlight=False)
    table = Table(box=None)
    table.add_column("NOTE")
    table.add_row(Text(out))
    console.print(table)
    console.print(out, markup=False, soft_wrap=True)
    printed = buffer.getvalue()
    assert "\x1b" not in printed
    assert printed.splitlines()[-1].rstrip() == out.rstrip()
