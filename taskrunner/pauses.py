"""Usage-limit pauses: which Agent is paused, where, until when.

When an Agent's tool reports a usage or session limit (the Worker's reader,
design "Usage limit"), its Run ends FAILED without spending a retry, and the
Agent is paused until the limit resets: everywhere (a credential shared by
every Worker, the default) or on that Worker only (`agents.<name>.pause_scope:
worker`). PENDING Tasks of a paused Agent wait with the reason `reason()`
gives, and run again on their own once the pause ends.

`Pauses` is plain data and pure functions of `now`; `load` and `save` keep it
as JSON at `<state dir>/pauses.json` (.git/taskrun/, never committed), so a
restarted daemon keeps its pauses. A damaged or foreign file there is read as
no pauses: a bad file never stops the daemon. A save that fails (a full disk)
leaves the pauses `unsaved`, and `prune` then asks for another save, so the
file catches up by itself once there is room; only the first failure in a row
raises (one notice, not one per plan).

    pauses.json: {"version": 1, "pauses": [{"agent": str, "worker": str|null,
                  "until": float (epoch s), "since": float, "message": str}]}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from taskrunner.agents.stream import LATEST_EPOCH
from taskrunner.atomic import write_json

FILE_NAME = "pauses.json"
#: How long an Agent is paused when its tool reported a limit without a reset time.
DEFAULT_PAUSE_SECONDS = 15 * 60.0
#: A reset time already past (a skewed clock) still pauses this long, so a Task does not hit the same
#: limit at once; a reset time ahead, however near, is kept as it is.
MIN_PAUSE_SECONDS = 60.0
#: A reset time further away than this is taken as this (a week-long limit plus a day; a bad clock or a
#: hostile report must not park an Agent for years).
MAX_PAUSE_SECONDS = 8 * 24 * 3600.0
#: The longest message kept with a pause.
MAX_MESSAGE_CHARS = 300
_VERSION = 1


@dataclass(frozen=True)
class Pause:
    """One Agent paused, everywhere (`worker` None) or on one Worker, until `until` (epoch seconds)."""

    agent: str
    worker: str | None
    until: float
    since: float
    message: str = ""

    def record(self) -> dict[str, Any]:
        return {"agent": self.agent, "worker": self.worker, "until": self.until, "since": self.since,
                "message": self.message}

    def view(self) -> dict[str, Any]:
        """For `taskrun agents --json`: the record plus `until_iso`."""
        return {**self.record(), "until_iso": iso(self.until)}


def iso(epoch: float) -> str:
    """`2026-11-29T23:00:00Z`: UTC, whole seconds."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def reason(agent: str, until: float, worker: str | None = None) -> str:
    """The `waiting` text of a PENDING Task whose Agent is paused."""
    where = f" on Worker '{worker}'" if worker else ""
    return f"Agent '{agent}' paused{where}: usage limit until {iso(until)}"


def pause_until(resets_at: object, now: float) -> float:
    """When a pause for a limit reported with `resets_at` (epoch seconds, or None/anything else) ends."""
    if isinstance(resets_at, bool) or not isinstance(resets_at, (int, float)) or math.isnan(resets_at):
        return now + DEFAULT_PAUSE_SECONDS
    if resets_at <= now:
        return now + MIN_PAUSE_SECONDS
    return min(float(resets_at), now + MAX_PAUSE_SECONDS)


class Pauses:
    """The pauses in force; at most one per (Agent, Worker or everywhere), the later end winning."""

    def __init__(self, entries: Iterable[Pause] = ()) -> None:
        self._entries: dict[tuple[str, str | None], Pause] = {}
        #: The last save failed: the file is behind (see `save`).
        self.unsaved = False
        for pause in entries:
            self.add(pause)

    def __iter__(self) -> Any:
        return iter(sorted(self._entries.values(), key=lambda p: (p.agent, p.worker or "", p.until)))

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, pause: Pause) -> Pause:
        """Record `pause`; an existing pause of the same Agent and place ending later stays. Returns the one kept."""
        key = (pause.agent, pause.worker)
        current = self._entries.get(key)
        if current is not None and current.until >= pause.until:
            return current
        self._entries[key] = pause
        return pause

    def prune(self, now: float) -> bool:
        """Forget pauses that ended; True when any did, or when the last save failed: either way, save."""
        ended = [key for key, pause in self._entries.items() if pause.until <= now]
        for key in ended:
            del self._entries[key]
        return bool(ended) or self.unsaved

    def clear(self, agent: str) -> bool:
        """End every pause of `agent`; True when there was one."""
        keys = [key for key in self._entries if key[0] == agent]
        for key in keys:
            del self._entries[key]
        return bool(keys)

    def everywhere(self, now: float) -> dict[str, float]:
        """Agent -> end of its pause on every Worker, for pauses in force at `now`."""
        return {p.agent: p.until for p in self._entries.values() if p.worker is None and p.until > now}

    def on_worker(self, worker: str, now: float) -> dict[str, float]:
        """Agent -> end of its pause on `worker` alone, for pauses in force at `now`."""
        return {p.agent: p.until for p in self._entries.values() if p.worker == worker and p.until > now}

    def of(self, agent: str, now: float) -> list[Pause]:
        """The pauses of `agent` in force at `now`."""
        return [p for p in self if p.agent == agent and p.until > now]

    def next_end(self, now: float) -> float | None:
        """The earliest end of a pause still in force: when the daemon must plan again."""
        return min((p.until for p in self._entries.values() if p.until > now), default=None)

    def records(self) -> dict[str, Any]:
        return {"version": _VERSION, "pauses": [p.record() for p in self]}

    @classmethod
    def from_records(cls, data: Any) -> Pauses:
        """Pauses from `records()` output; entries that are not well-formed are skipped."""
        entries = data.get("pauses") if isinstance(data, dict) else None
        pauses = cls()
        for entry in entries if isinstance(entries, list) else []:
            pause = _entry(entry)
            if pause is not None:
                pauses.add(pause)
        return pauses


def _entry(entry: Any) -> Pause | None:
    if not isinstance(entry, dict):
        return None
    agent, worker, until, since = entry.get("agent"), entry.get("worker"), entry.get("until"), entry.get("since")
    message = entry.get("message")
    if not isinstance(agent, str) or not agent or not (worker is None or isinstance(worker, str)):
        return None
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (until, since)):
        return None
    try:
        until, since = float(until), float(since)
    except OverflowError:
        return None
    if not all(math.isfinite(t) and 0 <= t <= LATEST_EPOCH for t in (until, since)):
        return None  # no time a pause could have (its end must print as a date)
    return Pause(agent=agent, worker=worker, until=until, since=since,
                 message=message[:MAX_MESSAGE_CHARS] if isinstance(message, str) else "")


def load(state_dir: Path) -> Pauses:
    """The pauses saved in `state_dir`; none when the file is missing, unreadable or not ours."""
    path = state_dir / FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return Pauses()
    try:
        with os.fdopen(fd, "rb") as handle:
            data = json.loads(handle.read(1024 * 1024))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return Pauses()
    return Pauses.from_records(data)


def save(state_dir: Path, pauses: Pauses) -> None:
    """Write the pauses atomically to `state_dir`.

    OSError when it cannot (a full disk, say; its temp file is removed), the
    first time in a row only: the pauses stay `unsaved` and a failing retry is
    quiet. They stay in force in memory meanwhile.
    """
    try:
        write_json(state_dir / FILE_NAME, pauses.records(), mode=0o600)
    except OSError:
        again, pauses.unsaved = pauses.unsaved, True
        if not again:
            raise
        return
    pauses.unsaved = False
