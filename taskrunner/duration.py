"""Durations as people write them in YAML: ``90``, ``45s``, ``30m``, ``1h30m``, ``2d``.

Pure. Errors are plain `ValueError`s with a message meant for a person; the
file-level parsers (taskfile, config) wrap them with the file and key.
"""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"\d+(?:\.\d+)?"
# "ms" before "m" so that "500ms" is not read as 500 minutes followed by junk.
_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_WHOLE = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_BARE = re.compile(_NUMBER)

_EXPECTED = "expected a duration like 30s, 5m or 1h"


def parse_duration(value: object) -> float:
    """Return `value` in seconds; raise ValueError unless it is a duration > 0.

    Numbers are seconds. Strings are a number of seconds or one or more
    number+unit parts (ms, s, m, h, d), optionally separated by spaces:
    "1h30m" and "1h 30m" are both 5400.0.
    """
    # bool is an int subclass: `timeout: true` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    if isinstance(value, str):
        seconds = _parse_text(value)
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int past any float: no duration
            raise ValueError(f"{_EXPECTED}, got a number of {len(str(value))} digits") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than zero, got {value!r}")
    return seconds


def _parse_text(value: str) -> float:
    text = "".join(value.split())
    if _BARE.fullmatch(text):
        return float(text)
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """The inverse for messages: 5400 -> '1h30m', 0.5 -> '500ms', 90 -> '1m30s'."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
