"""Text from outside made safe to show: on a terminal, in a log, in a commit message.

Task titles, file names, error texts, Worker hello fields and Agent output
can hold anything. Written as they are, an ESC starts a terminal escape
sequence (clear the screen, OSC 8 links, OSC 52 clipboard writes), a C1
control such as U+009B does the same on some terminals, a carriage return or
backspace overwrites what was shown, a bidi override (U+202E) reorders it,
and a newline in a commit trailer value adds a trailer. A lone surrogate (a
file name that is not UTF-8) cannot even be encoded, and would crash the
print.

`clean` keeps the text readable and replaces each such character by its
escape in Python's notation (``\\x1b``, ``\\x9b``, ``\\u202e``, ``\\udcff``),
so what was there stays visible. Backslashes are not doubled: the result is
for people to read, not to parse back. Rich markup (``[bold]``) is not this
module's business: the CLI passes cleaned strings to rich as `Text` (or with
``markup=False``), never as markup.

Pure: no I/O, no third-party imports.
"""

from __future__ import annotations

import codecs
import re

#: Bidirectional formatting characters (Unicode Bidi_Control): they reorder
#: how the rest of a line is displayed ("Trojan Source", CVE-2021-42574).
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

# Unicode category Cc (C0, DEL, C1), surrogates (Cs), line/paragraph
# separators (Zl, Zp) and the bidi controls.
_UNSAFE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff\\u2028\\u2029" + BIDI_CONTROLS + "]")
# Everything str.splitlines() breaks at, with CR LF as one break.
_LINE_BREAK = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_UNSAFE_MULTILINE = re.compile("[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f\\ud800-\\udfff\\u2028\\u2029" + BIDI_CONTROLS + "]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def clean(text: str, *, multiline: bool = False) -> str:
    """`text` with nothing a terminal or git would act on: safe to print or commit.

    Single-line (the default; table cells, status lines, commit subjects and
    trailer values): every line break (``\\n``, ``\\r\\n``, ``\\r``, U+2028, ...)
    and tab becomes one space, so the text stays on its line. The result
    holds no control character at all.

    `multiline` (error messages, Agent output): ``\\n`` and ``\\t`` are kept
    and ``\\r\\n`` becomes ``\\n``; a lone ``\\r`` is escaped like the rest.

    Every other control character, surrogate or bidi control is replaced by
    its visible escape, e.g. ESC by the four characters ``\\x1b``.
    """
    if multiline:
        if "\r\n" in text:
            text = text.replace("\r\n", "\n")
        return _UNSAFE_MULTILINE.sub(_escape, text) if _UNSAFE_MULTILINE.search(text) else text
    if not _UNSAFE.search(text):
        return text  # the common case, on the hot path of `up`'s plain lines
    text = _LINE_BREAK.sub(" ", text).replace("\t", " ")
    return _UNSAFE.sub(_escape, text)


class StreamCleaner:
    """`clean(..., multiline=True)` over a byte stream that arrives in pieces (`taskrun logs`).

    Bytes are decoded as UTF-8 (invalid bytes become U+FFFD); a character or
    a CR LF split between two pieces is put back together before cleaning.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def feed(self, data: bytes, final: bool = False) -> str:
        """The cleaned text of `data`; with `final`, also whatever was held back."""
        text = self._held + self._decoder.decode(data, final)
        self._held = ""
        if text.endswith("\r") and not final:
            text, self._held = text[:-1], "\r"  # maybe the first half of a CR LF
        return clean(text, multiline=True)


def size_text(count: int) -> str:
    """A byte count as people read it: '700 bytes', '64 KiB', '8.4 MiB'."""
    if count < 1024:
        return f"{count} byte{'s' if count != 1 else ''}"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    else:
        value, unit = value / 1024, "TiB"
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def over_limit(size: int, limit: int, what: str) -> str:
    """'8.4 MiB (8808038 bytes), over the 1 MiB limit for WHAT': the words every size refusal uses."""
    return f"{size_text(size)} ({size} bytes), over the {size_text(limit)} limit for {what}"
