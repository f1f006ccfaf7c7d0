"""Reading an Agent's output stream: what every reader shares (pure, no I/O).

An Agent preset with a reader (claude, codex, gemini, aider) has its stdout
and stderr recorded raw as `events.jsonl`; the Worker feeds that file to the
preset's `StreamReader` one line at a time and writes what `feed` returns to
`output.log`. The reader keeps what the tool reported (`report()`), a usage
or session limit the tool hit (`limit()`), and decides the Run's status at
the end (`verdict(exit_code)`).

`feed` is deterministic in the sequence of lines (no clock in the rendered
text): on a new Worker session the raw stream is replayed from byte 0 into a
fresh reader and the text `output.log` already holds is skipped. `feed` never
raises: an unknown event or field is ignored, a malformed or non-JSON line is
returned verbatim, a line over MAX_LINE_BYTES arrives cut.

Also here: the budget check `exceeded(report, budget)`, the cost estimate
`estimate_cost(usage, prices)` and `reset_time(text, now)`, which finds when
a usage limit ends in a tool's message.

Usage dicts are canonical across tools (USAGE_KEYS): `input_tokens` counts
the input tokens read neither from nor into a prompt cache, so the four
figures add up to the input and output the model was billed for.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable, Mapping

#: The Worker cuts a raw line longer than this before `feed` sees it (bytes).
MAX_LINE_BYTES = 1024 * 1024
#: `Report.final_message` is cut to this many bytes of UTF-8.
MAX_FINAL_MESSAGE_BYTES = 16 * 1024
#: A usage limit's message is appended to the Run's error when it is at most this long (characters).
MAX_LIMIT_MESSAGE_CHARS = 200
#: Rendered lines (a tool call's argument, a tool result's line) are cut to this many characters.
MAX_RENDERED_CHARS = 200
#: A tool result shows at most this many lines in output.log.
RESULT_LINES = 3
#: The canonical token counts of `Report.usage`.
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
#: Which price (USD per million tokens) each usage key is billed at.
_PRICE_OF = {"input_tokens": "input", "output_tokens": "output",
             "cache_read_tokens": "cache_read", "cache_write_tokens": "cache_write"}

Budget = Mapping[str, Any]


@dataclass
class Report:
    """What an Agent's stream reported about its Run.

    provider      the ModelBackend's provider (configured, or the tool's own: "anthropic", ...)
    model         the model the tool reports (else the configured one)
    cli_version   the tool's version as it reports it, or None
    session_id    the tool's session/thread id, or None
    turns         model turns so far (each reader documents its rule), or None
    cost_usd      USD: reported by the tool, else estimated from `usage` and a price table, else None
    cost_estimated  True when cost_usd is an estimate
    usage         token counts (USAGE_KEYS), or None when the tool reported none
    final_message the Agent's last message, at most MAX_FINAL_MESSAGE_BYTES of UTF-8, or None
    """

    provider: str | None = None
    model: str | None = None
    cli_version: str | None = None
    session_id: str | None = None
    turns: int | None = None
    cost_usd: float | None = None
    cost_estimated: bool = False
    usage: dict[str, int] | None = None
    final_message: str | None = None

    def as_record(self) -> dict[str, Any]:
        """The report as JSON-able data, exactly the fields above."""
        return asdict(self)


@dataclass(frozen=True)
class UsageLimit:
    """A usage or session limit the tool reported: the Agent is paused until `resets_at`.

    resets_at  epoch seconds, or None when the tool gave no reset time
    message    the tool's own text (one line)
    """

    resets_at: float | None
    message: str

    def error(self) -> str:
        """The Run's error: "usage limit, resets at 2026-11-29T23:00:00Z — <message when short>"."""
        if self.resets_at is None:
            text = "usage limit, reset time unknown"
        else:
            text = "usage limit, resets at " + iso_utc(self.resets_at)
        message = " ".join(self.message.split())
        if message and len(message) <= MAX_LIMIT_MESSAGE_CHARS:
            text += " — " + message
        return text


@dataclass(frozen=True)
class Verdict:
    """How the Run ended: status "COMPLETED" or "FAILED", the error when FAILED, a usage limit seen."""

    status: str
    error: str | None = None
    usage_limit: UsageLimit | None = None


class StreamReader:
    """The base of every preset's reader; see the module doc for the contract.

    Subclasses implement `_line(text)` for one decoded line (no newline) and
    `_verdict(exit_code)`; they fill `self.state` (a Report) as they go.
    `backend` is the Agent's `backend` mapping (provider, model), `prices`
    its price table (USD per million tokens), `budget` the Run's budget
    (for naming a limit the tool enforced itself), `now` the clock used to
    resolve a relative reset time ("resets 3pm").
    """

    keeps_events: bool = True
    default_provider: str | None = None

    def __init__(self, backend: Mapping[str, Any] | None = None, prices: Mapping[str, Any] | None = None,
                 budget: Budget | None = None, now: Callable[[], float] = time.time) -> None:
        backend = backend if isinstance(backend, Mapping) else {}
        self.prices = prices if isinstance(prices, Mapping) else None
        self.budget: Budget = budget if isinstance(budget, Mapping) else {}
        self.now = now
        self.state = Report(provider=_str(backend.get("provider")) or self.default_provider,
                            model=_str(backend.get("model")))
        self.usage_limit: UsageLimit | None = None
        self.lines = 0
        self.ignored = 0

    def feed(self, line: bytes) -> str:
        """Readable text for output.log from one raw line ('' or whole lines ending in '\\n'); never raises."""
        self.lines += 1
        try:
            text = bytes(line).decode("utf-8", "replace").rstrip("\r\n")
        except Exception:  # noqa: BLE001 - not bytes at all: nothing to show
            return ""
        try:
            return self._line(text)
        except Exception:  # noqa: BLE001 - a shape no reader foresaw: keep the line as it was
            self.ignored += 1
            return verbatim(text)

    def report(self) -> Report:
        """What the tool reported so far, the cost estimated from `usage` when the tool gave none."""
        state = Report(**asdict(self.state))
        if state.cost_usd is None and state.usage:
            estimate = estimate_cost(state.usage, self.prices)
            if estimate is not None:
                state.cost_usd, state.cost_estimated = estimate, True
        if state.final_message is not None:
            state.final_message = cut_utf8(state.final_message, MAX_FINAL_MESSAGE_BYTES)
        return state

    def limit(self) -> UsageLimit | None:
        """A usage or session limit reported so far (the Worker stops the Run), or None."""
        return self.usage_limit

    def verdict(self, exit_code: int | None) -> Verdict:
        """The Run's status from what was read and the exit code (None: no code, e.g. killed)."""
        if self.usage_limit is not None:
            return Verdict("FAILED", self.usage_limit.error(), self.usage_limit)
        try:
            return self._verdict(exit_code)
        except Exception as exc:  # noqa: BLE001 - a verdict is always given
            return Verdict("FAILED", f"cannot judge the Agent's stream: {type(exc).__name__}")

    # ------------------------------------------------------------------ for subclasses

    def _line(self, text: str) -> str:
        return verbatim(text)

    def _verdict(self, exit_code: int | None) -> Verdict:
        if exit_code == 0:
            return Verdict("COMPLETED")
        return Verdict("FAILED", exit_text(exit_code))

    def _another_result(self, event: dict[str, Any]) -> str:
        """A result event after the first: the tool reports once per session, so anything later came from
        something else writing to its stdout (a process the Agent started). The first result's verdict
        stands; a higher cost it reports still counts against the budget."""
        for key in ("total_cost_usd", "cost_usd"):
            cost = usd(event.get(key))
            if cost is not None and cost > (self.state.cost_usd or 0.0):
                self.state.cost_usd = cost
        return "[result] another result after the first, ignored\n"

    def _hit_limit(self, message: str, resets_at: float | None = None) -> None:
        """Keep the first usage limit seen; a later one only adds a reset time the first lacked."""
        message = " ".join(message.split())[:1000]
        if resets_at is None:
            resets_at = reset_time(message, self.now())
        resets_at = epoch_seconds(resets_at, self.now())  # finite and in range, whatever the tool said
        if self.usage_limit is None:
            self.usage_limit = UsageLimit(resets_at, message)
        elif self.usage_limit.resets_at is None and resets_at is not None:
            self.usage_limit = UsageLimit(resets_at, self.usage_limit.message or message)

    def _model(self, model: Any) -> None:
        model = _str(model)
        if model and model != "<synthetic>":
            self.state.model = model


# ---------------------------------------------------------------------------- budgets and cost


def exceeded(report: Report, budget: Budget | None) -> str | None:
    """Which budget the report has passed, as the Run's error; None when none.

    `budget`: {max_turns: int|None, max_cost_usd: float|None}. A figure passes
    its budget when it is strictly greater. Messages:
    "budget max_turns exceeded: limit 3, reached 4",
    "budget max_cost_usd exceeded: limit $0.50, reached $0.62".
    """
    if not isinstance(budget, Mapping):
        return None
    turns, max_turns = report.turns, budget.get("max_turns")
    if _number(max_turns) and _number(turns) and turns > max_turns:
        return f"budget max_turns exceeded: limit {max_turns}, reached {turns}"
    cost, max_cost = report.cost_usd, budget.get("max_cost_usd")
    if _number(max_cost) and _number(cost) and cost > max_cost:
        limit, reached = _usd_pair(float(max_cost), float(cost))
        return f"budget max_cost_usd exceeded: limit {limit}, reached {reached}"
    return None


def estimate_cost(usage: Mapping[str, Any] | None, prices: Mapping[str, Any] | None) -> float | None:
    """USD for `usage` (USAGE_KEYS) at `prices` {input, output, cache_read, cache_write} per million tokens.

    A missing cache price is billed at the input price; None without usage,
    without prices, or without an input or output price.
    """
    if not isinstance(usage, Mapping) or not isinstance(prices, Mapping):
        return None
    if not _number(prices.get("input")) or not _number(prices.get("output")):
        return None
    total = 0.0
    for key, price_key in _PRICE_OF.items():
        tokens = usage.get(key)
        if not _number(tokens):
            continue
        price = prices.get(price_key)
        if not _number(price):
            price = prices["input"]
        total += float(tokens) * float(price) / 1_000_000
    return round(total, 6)


def _usd_pair(limit: float, reached: float) -> tuple[str, str]:
    # Cents, unless the two figures look alike at that precision.
    for digits in (2, 3, 4, 5, 6):
        a, b = f"${limit:.{digits}f}", f"${reached:.{digits}f}"
        if a != b:
            return a, b
    return a, b


# ---------------------------------------------------------------------------- reset times

_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_EPOCH_AFTER_BAR = re.compile(r"limit reached\|(\d{9,13})\b", re.IGNORECASE)
_ISO = re.compile(r"\b(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)")
_CLOCK = (r"(?:(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+(?P<day>\d{1,2})"
          r"(?:st|nd|rd|th)?,?\s*(?:(?P<year>\d{4}),?\s*)?(?:at\s+)?)?"
          r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<ampm>[ap]\.?m\.?)?"
          r"(?:\s*\((?P<zone>[A-Za-z_+\-/0-9]+)\)|\s+(?P<utc>UTC|GMT)\b)?")
_AT = re.compile(r"(?:resets?(?:\s+at)?|try again at|reset at|available again at)\s+" + _CLOCK, re.IGNORECASE)
_IN = re.compile(r"(?:resets?|try again|retry|available again)\s+in\s+"
                 r"((?:\d+(?:\.\d+)?\s*(?:days?|d|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s|ms)\b[\s,and]*)+)",
                 re.IGNORECASE)
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(days?|d|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s|ms)\b", re.IGNORECASE)
_SPAN_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def reset_time(text: str, now: float, tz: tzinfo | None = None) -> float | None:
    """When a usage limit described in `text` ends (epoch seconds), or None when it does not say.

    Forms: "usage limit reached|1764450000" (Claude Code's old form, seconds
    or ms), an ISO-8601 time, "resets 3pm", "resets 3:30pm (Europe/Berlin)",
    "try again at 2:15 PM", "try again at Dec 2nd, 2026 9:30 AM", and
    relative "try again in 2 hours 5 minutes" / "Please retry in 37.5s".
    A clock time without a date is its next occurrence after `now`; without
    a zone it is in `tz` (default: this machine's local zone, where the tool
    that printed it runs).
    """
    if not isinstance(text, str) or not text:
        return None
    match = _EPOCH_AFTER_BAR.search(text)
    if match:
        return epoch_seconds(int(match.group(1)), now)
    match = _ISO.search(text)
    if match:
        parsed = parse_iso(match.group(1), tz)
        if parsed is not None:
            return parsed
    match = _AT.search(text)
    if match and (match.group("ampm") or match.group("minute") or match.group("month")):
        parsed = _clock(match, now, tz)
        if parsed is not None:
            return parsed
    match = _IN.search(text)
    if match:
        seconds = 0.0
        for amount, unit in _SPAN.findall(match.group(1)):
            unit = unit.lower()
            seconds += float(amount) / 1000 if unit == "ms" else float(amount) * _SPAN_SECONDS[unit[0]]
        if seconds > 0:
            return now + seconds
    return None


#: The latest reset time kept (9999-12-31T23:59:59Z): later ones are taken as this, and pauses are capped
#: far below it anyway (pauses.py).
LATEST_EPOCH = 253402300799.0
#: A figure is read as milliseconds only when that puts it this close to now (ten years).
_MS_WINDOW_SECONDS = 10 * 365 * 86400.0


def epoch_seconds(value: Any, now: float | None = None) -> float | None:
    """Epoch seconds from a reported reset time in seconds or milliseconds; None when it is no number.

    Read as milliseconds when it is over 1e11 and, as milliseconds, within ten years of `now`
    (default: the clock); else as seconds. Clamped to [0, LATEST_EPOCH], so no value from a stream
    (1e999, NaN, -1e20, a year-9999 time in seconds) can break the date arithmetic after it.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        return LATEST_EPOCH if value > 0 else 0.0
    if math.isnan(seconds):
        return None
    now = time.time() if now is None else now
    if seconds > 1e11 and abs(seconds / 1000 - now) <= _MS_WINDOW_SECONDS:
        seconds /= 1000
    return min(max(seconds, 0.0), LATEST_EPOCH)


def parse_iso(text: str, tz: tzinfo | None = None) -> float | None:
    """Epoch seconds of an ISO-8601 time ("2026-11-29T23:00:00Z"); no zone means `tz`/local; None if invalid."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T", 1))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz) if tz is not None else parsed.astimezone()
        return parsed.timestamp()
    except (ValueError, OverflowError):  # not a time, or one at the ends of the calendar (year 1, 9999)
        return None


def iso_utc(epoch: float) -> str:
    """"2026-11-29T23:00:00Z" for epoch seconds (clamped to [0, LATEST_EPOCH]; NaN is 0)."""
    epoch = min(max(epoch, 0.0), LATEST_EPOCH) if epoch == epoch else 0.0
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: A reset time read from a clock time in text ("resets 10:38pm", "try again at 11:01 PM") is the end of
#: the minute it names, and a time within the current minute is today's, not tomorrow's.
_CLOCK_PRECISION = timedelta(minutes=1)


def _clock(match: re.Match[str], now: float, tz: tzinfo | None) -> float | None:
    hour, minute = int(match.group("hour")), int(match.group("minute") or 0)
    ampm = (match.group("ampm") or "").lower().replace(".", "")
    if ampm:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if ampm == "pm" else 0)
    if hour > 23 or minute > 59:
        return None
    zone = _zone(match.group("zone") or match.group("utc"), tz)
    current = datetime.fromtimestamp(now, zone) if zone is not None else datetime.fromtimestamp(now).astimezone()
    zone = current.tzinfo
    try:
        if match.group("month"):
            month, day = _MONTHS[match.group("month")[:3].lower()], int(match.group("day"))
            year = int(match.group("year") or current.year)
            moment = datetime(year, month, day, hour, minute, tzinfo=zone)
            if not match.group("year") and moment < current - timedelta(days=1):
                moment = moment.replace(year=year + 1)
        else:
            moment = current.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if moment + _CLOCK_PRECISION <= current:
                moment += timedelta(days=1)
        # A time the text gives to the minute resets somewhere within that minute: its end.
        return (moment + _CLOCK_PRECISION).timestamp()
    except ValueError:
        return None
    except OverflowError:  # past the calendar's end (year 9999): the latest time kept
        return LATEST_EPOCH


def _zone(name: str | None, default: tzinfo | None) -> tzinfo | None:
    if not name:
        return default
    if name.upper() in ("UTC", "GMT", "Z"):
        return timezone.utc
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(name)
    except Exception:  # noqa: BLE001 - an unknown zone name: the default zone
        return default


# ---------------------------------------------------------------------------- rendering helpers


def verbatim(text: str) -> str:
    """A line kept as it came: '' for an empty line, else the text and a newline."""
    return text + "\n" if text.strip() else ""


def parse_json(text: str) -> dict[str, Any] | None:
    """The JSON object on a line, or None (not JSON, or JSON that is not an object)."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def one_line(value: Any, limit: int = MAX_RENDERED_CHARS) -> str:
    """`value` as one line of at most `limit` characters ("..." marks a cut)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def abbreviate(text: Any, prefix: str = "   ", lines: int = RESULT_LINES) -> str:
    """A tool result for output.log: its first `lines` lines, each cut, and how many more there were."""
    if not isinstance(text, str):
        text = "" if text is None else one_line(text, 10 * MAX_RENDERED_CHARS)
    rows = [row for row in text.splitlines() if row.strip()]
    shown = [prefix + one_line(row) for row in rows[:lines]]
    if len(rows) > lines:
        shown.append(f"{prefix}... ({len(rows) - lines} more lines)")
    return "".join(row + "\n" for row in shown)


def cut_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def exit_text(exit_code: int | None) -> str:
    """"the Agent exited with code 2" / "the Agent was killed by signal 9" / "... without an exit code"."""
    if exit_code is None:
        return "the Agent ended without an exit code"
    if exit_code < 0:
        return f"the Agent was killed by signal {-exit_code}"
    return f"the Agent exited with code {exit_code}"


#: The largest count kept: a float holds every whole number up to it, so costs and budgets stay arithmetic.
MAX_COUNT = 2 ** 53


def count(value: Any) -> int | None:
    """A token count: a non-negative whole number (capped at MAX_COUNT), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        return None
    try:
        return min(int(value), MAX_COUNT)
    except (OverflowError, ValueError):
        return MAX_COUNT if value > 0 else None


def usd(value: Any) -> float | None:
    """A cost in USD: a finite non-negative number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0 <= value < float("inf") else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def usage_of(input_tokens: Any = None, output_tokens: Any = None, cache_read: Any = None,
             cache_write: Any = None) -> dict[str, int] | None:
    """A canonical usage dict from the figures given (each a count or None); None when all are None."""
    figures = dict(zip(USAGE_KEYS, (count(input_tokens), count(output_tokens), count(cache_read),
                                    count(cache_write)), strict=True))
    if all(value is None for value in figures.values()):
        return None
    return {key: value or 0 for key, value in figures.items()}


def add_usage(a: Mapping[str, int] | None, b: Mapping[str, int] | None) -> dict[str, int] | None:
    """The sum of two usage dicts (either may be None)."""
    if not a:
        return dict(b) if b else None
    if not b:
        return dict(a)
    return {key: int(a.get(key, 0)) + int(b.get(key, 0)) for key in USAGE_KEYS}
