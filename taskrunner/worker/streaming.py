"""The stream pump: an Agent's event stream read as it is written, rendered into output.log, and judged.

An Agent whose preset has a reader (agents.prepare's `Prepared.reader`:
Claude Code, Codex, Gemini CLI, Aider) writes its stdout and stderr to

    <run>/events.jsonl   raw, O_APPEND, by the Agent (its presence marks a Run read this way)
    <run>/output.log     the readable text its reader renders from that stream, by the Worker only

Each loop tick the Worker reads what is new in events.jsonl from
`Pump.pos` (at most PUMP_TICK_BYTES, so one Run's flood never starves the
others or the heartbeat), masks the Run's secrets in it (`StreamMask`, before
the reader sees a byte, so nothing the reader keeps, its final message
included, can hold one), splits it into lines, feeds the reader and appends
what it rendered to output.log in one write.

**Masking a stream in chunks.** `StreamMask` masks the stream as it arrives,
read by read, with `bytes.find`, and gives the same bytes as masking the
whole stream at once (secrets.mask): an occurrence split across two reads,
or across a line end (a value with a newline in it), is masked too. It holds
back only an ending of what arrived that is the beginning of a value (at most
the longest value's length less one byte), until the next read shows whether
the value follows; so a line is fed as soon as its newline arrives, as
before. What is held back when the stream ends is masked, as a line cut
there would be. Then it asks the reader: a usage limit
seen (`limit()`) or a budget passed (`agents.stream.exceeded`) is a reason
to stop the Run, which the session carries out (finisher.py `_stop`).

**Bounded memory.** A line longer than MAX_LINE_BYTES (agents.stream)
reaches the reader cut to its first MAX_LINE_BYTES bytes, the moment that
many have arrived; the rest of it, up to its newline, is skipped. So a Run
holds at most one line of MAX_LINE_BYTES, one read of READ_CHUNK_BYTES and
the ending `StreamMask` holds back (shorter than the longest secret),
whatever the Agent prints (a huge line with no newline at all included).

**Replay.** Readers are deterministic in the sequence of lines, so a Worker
session that adopts a running Run (or one that ended while no session
watched) replays events.jsonl from byte 0 with a fresh reader: that rebuilds
what the reader knows (turns, cost, session id) for the verdict. What it
renders again is not written twice: under an flock on output.log, only the
rendered bytes beyond the file's size are appended (`_append`). The same
rule keeps two live sessions pumping one Run from writing its text twice.

**At the end** (the Agent's group leader is gone): the pump drains the
stream up to the size it had then (`ending`), feeds the last line even
without its newline, and asks the reader for its `verdict(exit_code)`.

**What is shipped.** The signed result names `events: {size, sha256}`:
events.jsonl with the Run's secrets masked (each covered byte becomes `*`,
worker/secrets.py), cut to MAX_EVENTS_BYTES at a line end (`shipped`);
those bytes follow the change pack in the `result` record's payload
(`shipped_bytes`). A reader whose `keeps_events` is false (Aider, whose
stdout is its log) ships none.

A reader that raises anyway (it must not) fails its Run with the reason
(`Pump.failed`), never the session.

**A full disk** (diskspace.py) fails neither: rendered text output.log has no
room for is kept (`Pump.unwritten`, at most one tick's worth: nothing more is
read meanwhile) and appended first on each later tick, so output.log loses
nothing and the Run is judged only once it is all written (`caught_up`).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from taskrunner import agents, diskspace
from taskrunner.agents.stream import MAX_LINE_BYTES, exceeded
from taskrunner.worker import secrets as secret_values

#: The raw stream's file in a Run's directory.
EVENTS_FILE = "events.jsonl"
#: events.jsonl is shipped up to this many bytes, cut at a line end.
MAX_EVENTS_BYTES = 16 * 1024 * 1024
#: How much of the stream one read takes.
READ_CHUNK_BYTES = 1024 * 1024
#: How much of one Run's stream one loop tick reads at most.
PUMP_TICK_BYTES = 4 * 1024 * 1024
#: The signed result keeps a reader's error and a usage limit's message up to this length.
MAX_TEXT_CHARS = 2000


def events_path(run_path: Path) -> Path:
    return run_path / EVENTS_FILE


def open_events(run_path: Path) -> int:
    """Create events.jsonl (0600) and open it for the Agent's stdout and stderr: O_APPEND, so every write
    lands at the end. The caller passes the fd to the Agent's Popen and closes its copy."""
    return os.open(events_path(run_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def limit_record(limit: Any) -> dict[str, Any] | None:
    """A UsageLimit as the signed result carries it: {resets_at: epoch seconds | None, message: str}."""
    if limit is None:
        return None
    resets_at = getattr(limit, "resets_at", None)
    if not isinstance(resets_at, (int, float)) or isinstance(resets_at, bool) or not math.isfinite(resets_at):
        resets_at = None
    message = getattr(limit, "message", "")
    return {"resets_at": float(resets_at) if resets_at is not None else None,
            "message": (message if isinstance(message, str) else str(message))[:MAX_TEXT_CHARS]}


class LineCutter:
    """Raw bytes in, whole lines out (no newline), each at most MAX_LINE_BYTES (see the module doc). Pure."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._partial = bytearray()
        self._skipping = False  # a line was cut: drop what is left of it, up to its newline

    def split(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes (or cuts), in order."""
        lines: list[bytes] = []
        parts = chunk.split(b"\n")
        for piece in parts[:-1]:
            if self._skipping:
                self._skipping = False
                continue
            if self._partial:
                self._partial += piece[:self.max_line + 1 - len(self._partial)]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = piece
            lines.append(line[:self.max_line])
        tail = parts[-1]
        if tail and not self._skipping:
            if len(self._partial) + len(tail) > self.max_line:
                self._partial += tail[:self.max_line - len(self._partial)]
                lines.append(bytes(self._partial))
                self._partial.clear()
                self._skipping = True
            else:
                self._partial += tail
        return lines

    def rest(self) -> bytes | None:
        """The last line, which never got its newline (None if there is none); the cutter is empty after."""
        line = bytes(self._partial) if self._partial and not self._skipping else None
        self._partial.clear()
        self._skipping = False
        return line


class StreamMask:
    """Raw bytes in, chunk by chunk; the same bytes out with every byte inside an occurrence of a value
    replaced by `*`, exactly as masking the whole stream at once would (see the module doc). Pure.

    `values` are the byte strings to mask (secrets.with_json_escapes gives them; empty: nothing is masked or
    held back). `feed` returns the bytes that are final, `end` the rest; their lengths add up to what was fed.
    """

    def __init__(self, values: Sequence[bytes]) -> None:
        self.values = [v for v in values if v]
        self._firsts = frozenset(v[0] for v in self.values)
        self._reach = max((len(v) for v in self.values), default=1) - 1
        self._raw = b""  # held back: the ending that begins a value, as it arrived
        self._masked = b""  # the same bytes, with what occurrences ending in them covered masked

    @property
    def held(self) -> int:
        """Bytes fed and not given back yet (at most the longest value's length less one)."""
        return len(self._raw)

    def feed(self, chunk: bytes) -> bytes:
        """The masked bytes of `chunk` (and of what was held back) that no later byte can change."""
        if not self.values:
            return chunk
        raw = self._raw + chunk
        masked = secret_values.mask(raw, self.values)
        if self._masked != self._raw:  # occurrences found earlier that reach into the held-back bytes
            merged = bytearray(masked)
            for at, byte in enumerate(self._masked):
                if byte == secret_values.MASK:
                    merged[at] = byte
            masked = bytes(merged)
        keep = self._opening(raw)
        self._raw, self._masked = raw[keep:], masked[keep:]
        return masked[:keep]

    def end(self) -> bytes:
        """The bytes held back, masked whole (the beginning of a value that never came); empty after."""
        rest = b"*" * len(self._raw)
        self._raw = self._masked = b""
        return rest

    def _opening(self, data: bytes) -> int:
        """Where the longest ending of `data` that is the beginning of a value starts (len(data): none is)."""
        for at in range(max(0, len(data) - self._reach), len(data)):
            if data[at] in self._firsts:
                ending = data[at:]
                if any(v.startswith(ending) for v in self.values):
                    return at
        return len(data)


@dataclass
class Outcome:
    """How a read Run ended, by its reader: status, error and usage limit (a UsageLimit or None)."""

    status: str
    error: str | None
    usage_limit: Any = None


@dataclass
class Pump:
    """One Run's stream: where reading is (`pos`), what was rendered (`rendered` bytes), and its reader.

    `reader` is an agents StreamReader (None when none could be made: then
    `failed` says why). `budget` is the assignment's {max_turns,
    max_cost_usd}. `secrets` are the values masked in the stream (with the
    forms JSON gives them) before it is cut into lines.
    """

    run_path: Path
    reader: Any
    budget: Mapping[str, Any] | None = None
    secrets: list[bytes] = field(default_factory=list)
    pos: int = 0
    rendered: int = 0
    end: int | None = None  # the stream's size when the Agent was found ended: drained up to there
    failed: str | None = None
    stopped: bool = False  # a reason to stop was given once
    cutter: LineCutter = field(default_factory=LineCutter)
    unwritten: bytes = b""  # rendered text output.log had no room for yet (see "A full disk")
    masker: StreamMask = field(init=False)
    _fd: int | None = None

    def __post_init__(self) -> None:
        self.masker = StreamMask(secret_values.with_json_escapes(tuple(self.secrets)) if self.secrets else [])

    @property
    def keeps_events(self) -> bool:
        return bool(getattr(self.reader, "keeps_events", True))

    def step(self, limit: int = PUMP_TICK_BYTES) -> str | None:
        """Read up to `limit` new bytes, feed them, append the text; a reason to stop the Run (once), or None."""
        try:
            if self.unwritten and not self._write_unwritten():
                return None  # still no room: read nothing more until it is written
            fed = self._step(limit)
        except OSError as exc:
            fed, self.failed = False, f"the Agent's stream could not be read: {exc}"
        # The reader is asked only when it read something: an idle Run costs a tick one fstat.
        return self._reason() if fed or self.failed is not None else None

    def _step(self, limit: int) -> bool:
        """Read and feed; True when lines were fed."""
        if self.failed is None and self.reader is not None:
            lines: list[bytes] = []
            size = self._size()
            stop_at = size if self.end is None else min(size, self.end)
            upto = min(stop_at, self.pos + limit)
            while self.pos < upto:
                chunk = os.pread(self._open(), min(READ_CHUNK_BYTES, upto - self.pos), self.pos)
                if not chunk:
                    break
                self.pos += len(chunk)
                lines.extend(self.cutter.split(self.masker.feed(chunk)))
            if lines:
                self._feed(lines)
                return True
        return False

    def caught_up(self) -> bool:
        """True once everything up to `end` is read (`ending` must have been called)."""
        if self.unwritten:
            return False
        return self.failed is not None or self.reader is None or (self.end is not None and self.pos >= self.end)

    def ending(self) -> None:
        """The Agent has ended: what events.jsonl holds now is all that is read."""
        if self.end is None:
            self.end = self._size()

    def outcome(self, exit_code: int | None) -> Outcome:
        """Feed the last line (without its newline) and ask the reader how the Run ended."""
        if self.failed is None and self.reader is not None:
            lines = self.cutter.split(self.masker.end())
            rest = self.cutter.rest()
            if lines or rest is not None:
                self._feed(lines + ([rest] if rest is not None else []))
        if self.failed is not None or self.reader is None:
            return Outcome("FAILED", self.failed or "the Agent's stream could not be read", self._limit())
        try:
            verdict = self.reader.verdict(exit_code)
            status, error = verdict.status, verdict.error
            usage_limit = verdict.usage_limit if verdict.usage_limit is not None else self.reader.limit()
        except Exception as exc:  # the reader must not raise; if it does, this Run fails, not the session
            return Outcome("FAILED", f"the Agent's stream could not be judged: {exc!r}", None)
        if status not in ("COMPLETED", "FAILED"):
            return Outcome("FAILED", f"the Agent's stream reader gave an unknown status {status!r}", usage_limit)
        if status == "FAILED" and not error:
            error = "the Agent failed"
        return Outcome(status, str(error)[:MAX_TEXT_CHARS] if error else None, usage_limit)

    def report(self) -> dict[str, Any] | None:
        """The reader's Report as the signed result carries it (None when there is no reader or it raised)."""
        if self.reader is None:
            return None
        try:
            record: dict[str, Any] = self.reader.report().as_record()
        except Exception:  # noqa: BLE001 - a reader's failure costs its report, never the session
            return None
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- inside ------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(events_path(self.run_path), os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def _size(self) -> int:
        try:
            return os.fstat(self._open()).st_size
        except FileNotFoundError:
            return 0

    def _feed(self, lines: list[bytes]) -> None:
        texts: list[str] = []
        try:
            for line in lines:
                texts.append(self.reader.feed(line))
        except Exception as exc:  # the reader must not raise; if it does, this Run fails, not the session
            self.failed = f"the Agent's stream could not be read: {exc!r}"
        data = "".join(t for t in texts if isinstance(t, str)).encode("utf-8", "replace")
        if data:
            self.unwritten += data
            self._write_unwritten()

    def _write_unwritten(self) -> bool:
        """Append `unwritten` (see `_append`); True once it is all written, False while there is no room.
        Any other OSError is raised."""
        try:
            self._append(self.unwritten)
        except OSError as exc:
            if not diskspace.is_full(exc):
                raise
            return False
        return True

    def _append(self, data: bytes) -> None:
        """Append the part of `data` (rendered text from byte `rendered - len(unwritten)` on) output.log does
        not hold yet (see "Replay" in the module doc). On a full disk what made it stays, and the rest stays
        in `unwritten` (OSError raised)."""
        before = self.rendered
        fd = os.open(self.run_path / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd).st_size
            view = memoryview(data)[max(0, held - before):]
            try:
                while view:
                    view = view[os.write(fd, view):]
            finally:
                done = len(data) - len(view)
                self.rendered += done
                self.unwritten = bytes(view) if view else b""
        finally:
            os.close(fd)  # and the lock with it

    def _limit(self) -> Any:
        try:
            return self.reader.limit() if self.reader is not None else None
        except Exception:  # noqa: BLE001 - see _feed
            return None

    def _reason(self) -> str | None:
        if self.stopped:
            return None
        reason = self.failed
        if reason is None and self.reader is not None:
            try:
                limit = self.reader.limit()
                if limit is not None:
                    reason = str(limit.error())
                elif self.budget and any(v is not None for v in self.budget.values()):
                    reason = exceeded(self.reader.report(), self.budget)
            except Exception as exc:  # noqa: BLE001 - see _feed
                self.failed = reason = f"the Agent's stream could not be read: {exc!r}"
        if reason is not None:
            self.stopped = True
        return reason


def replay(run_path: Path, assignment: Mapping[str, Any], values: list[bytes]) -> Pump | None:
    """For a Run adopted from another session whose Agent writes events.jsonl: a Pump with a fresh reader
    that reads it again from byte 0 (see "Replay" in the module doc); None for any other Run."""
    if not events_path(run_path).is_file():
        return None
    try:
        reader = agents.reader_for(assignment.get("agent") or {}, assignment)
        failed = None if reader is not None else "this Agent's preset has no stream reader"
    except Exception as exc:  # whatever the assignment holds, this Run fails, not the session
        reader, failed = None, f"no stream reader for this Agent: {exc}"
    return Pump(run_path, reader, assignment.get("budget"), values, failed=failed)


def shipped(run_path: Path, values: Sequence[bytes]) -> dict[str, Any]:
    """{size, sha256} of the events shipped with the result: events.jsonl masked, cut to MAX_EVENTS_BYTES
    at a line end (a file within the cap goes whole, its last line with or without a newline)."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(events_path(run_path), "rb") as stream:
            size = _shipped_size(stream)
            for start in range(0, size, READ_CHUNK_BYTES):
                digest.update(_masked(stream, start, min(size, start + READ_CHUNK_BYTES), size, values))
    except FileNotFoundError:
        pass
    return {"size": size, "sha256": digest.hexdigest()}


def shipped_bytes(run_path: Path, events: Any, values: Sequence[bytes]) -> bytes:
    """The events a result's `events` ({size, sha256} from `shipped`, or None) names: the first `size` bytes
    of events.jsonl, masked as `shipped` masked them (b"" for None, or if the file is gone)."""
    size = events.get("size") if isinstance(events, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return b""
    try:
        with open(events_path(run_path), "rb") as stream:
            return _masked(stream, 0, size, size, values)
    except FileNotFoundError:
        return b""


def _shipped_size(stream: Any) -> int:
    size = os.fstat(stream.fileno()).st_size
    if size <= MAX_EVENTS_BYTES:
        return size
    # The last newline at or before the cap: read backwards from it, a chunk at a time.
    end = MAX_EVENTS_BYTES
    while end > 0:
        start = max(0, end - READ_CHUNK_BYTES)
        stream.seek(start)
        at = stream.read(end - start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def _masked(stream: Any, start: int, end: int, size: int, values: Sequence[bytes]) -> bytes:
    if values:
        return secret_values.masked_range(stream, start, end, size, secret_values.with_json_escapes(tuple(values)))
    stream.seek(start)
    return bytes(stream.read(end - start))
