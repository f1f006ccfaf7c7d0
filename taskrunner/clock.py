"""The clocks: the wall clock for the times people read, monotonic clocks for every duration.

Times kept for people or checked against other machines use the wall clock
(`wall()`, seconds since the epoch): created/started/finished in records, a
usage limit's reset time, signatures and their expiry, a key's retirement
date. Everything that measures a duration uses a monotonic clock
(`monotonic()`, seconds from an arbitrary start): Run timeouts, heartbeats
and `worker_offline_after`, `worker_grace`, reconnect delays, retry backoff,
the record lag, push retries, the session's auth timeout. So a wall-clock
jump (an NTP step, a clock set by hand) neither ends nor extends any of them.

A Run's timeout must also survive a restart of `taskrun-worker`, and a
process's monotonic clock means nothing to the next process. It is measured
on CLOCK_BOOTTIME (`boottime()`): it counts from the boot (time suspended
included, as a Run's timeout always has), never jumps, and is the same in
every process of one boot, which `boot_id()` names (worker/activerun.py).

Code handed a wall time it must also measure durations from (the fleet and
the engine get one `now` for records, signatures and timers) converts it with
`as_monotonic(now)`; `Deadlines` keeps deadlines that records show as wall
times (a retry backoff's `not_before`) true to the monotonic clock.

Tests replace every reading at once with `install(source)`: any object with
the methods of `SystemClock`.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Protocol, Sequence, TypeVar

#: Wall and monotonic clocks disagreeing by more than this (seconds) means the wall clock jumped.
JUMP_SECONDS = 1.0
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class Backoff(Protocol):
    """What `Deadlines.keep_true` needs of a Task: its id and its `not_before` (wall clock, 0: none)."""

    id: str
    not_before: float


_B = TypeVar("_B", bound=Backoff)


class ClockSource(Protocol):
    def wall(self) -> float: ...
    def monotonic(self) -> float: ...
    def boottime(self) -> float: ...
    def boot_id(self) -> str | None: ...


class SystemClock:
    """The system's clocks."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def boottime(self) -> float:
        if hasattr(time, "CLOCK_BOOTTIME"):
            return time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.monotonic()  # boot_id() is None there: nothing relies on it across processes

    def boot_id(self) -> str | None:
        return _system_boot_id() if hasattr(time, "CLOCK_BOOTTIME") else None


@lru_cache(maxsize=1)
def _system_boot_id() -> str | None:
    try:
        with open(_BOOT_ID_FILE, encoding="ascii", errors="replace") as handle:
            found = handle.read(100).strip()
    except OSError:
        return None
    return found or None


_source: ClockSource = SystemClock()


def install(source: ClockSource) -> ClockSource:
    """Read every clock from `source` from now on (tests); returns the source it replaces."""
    global _source
    previous, _source = _source, source
    return previous


def wall() -> float:
    """The wall clock: seconds since the epoch. For times people read, never to measure a duration."""
    return _source.wall()


def monotonic() -> float:
    """Seconds on a clock that never jumps, from an arbitrary start within this process: for durations."""
    return _source.monotonic()


def boottime() -> float:
    """Seconds since the boot (CLOCK_BOOTTIME, suspend included): durations that outlive a process."""
    return _source.boottime()


def boot_id() -> str | None:
    """This boot's id (/proc/sys/kernel/random/boot_id), or None where there is none: boottime()
    readings from another boot mean nothing here."""
    return _source.boot_id()


def as_monotonic(now: float) -> float:
    """Where a wall time read just now falls on the monotonic clock.

    Two conversions differ by the monotonic time between them whatever the
    wall clock did meanwhile, so durations between `now`s handed around for
    records (fleet.py, engine.py) are measured as `monotonic()` would. A wall
    time kept for a while must be converted when read, not later.
    """
    return now + (monotonic() - wall())


class Deadlines:
    """Deadlines that records show as wall times, kept true to the monotonic clock.

    A retry backoff is recorded as `not_before`, a wall time people read and
    a restarted daemon takes up. `correct` pins each deadline on the
    monotonic clock when it first sees it, and afterwards gives the wall time
    to record instead whenever the wall clock jumped: the deadline neither
    ends early nor waits longer than it was set to.
    """

    def __init__(self) -> None:
        self._pinned: dict[str, tuple[float, float]] = {}  # key -> (wall time recorded, monotonic deadline)

    def correct(self, key: str, recorded: float, now: float) -> float | None:
        """The wall time to record for `key`'s deadline instead of `recorded`, or None when it is right.

        `recorded`: the deadline as recorded (wall clock; 0 or a past time:
        none pending); `now`: the wall clock, read just now. A changed
        `recorded` is a new deadline and is pinned afresh. A deadline that
        passed on the monotonic clock is now; one pending is `now` plus what
        is left of it, when that is more than JUMP_SECONDS from `recorded`.
        """
        mono = as_monotonic(now)
        known = self._pinned.get(key)
        if known is None or known[0] != recorded:
            if recorded > now and math.isfinite(recorded):  # one not finite (a hostile record) is left as it is
                self._pinned[key] = (recorded, mono + (recorded - now))
            else:
                self._pinned.pop(key, None)
            return None
        left = known[1] - mono
        if left <= 0:
            del self._pinned[key]
            return now if recorded > now else None
        wanted = now + left
        if abs(wanted - recorded) <= JUMP_SECONDS:
            return None
        self._pinned[key] = (wanted, known[1])
        return wanted

    def retain(self, keys: set[str]) -> None:
        """Forget every deadline but those of `keys`."""
        for key in [k for k in self._pinned if k not in keys]:
            del self._pinned[key]

    def keep_true(self, items: Sequence[_B], now: float) -> list[_B]:
        """Correct the `not_before` of each of `items` (`correct`), forget every other key; the items changed."""
        self.retain({item.id for item in items})
        changed = []
        for item in items:
            corrected = self.correct(item.id, item.not_before, now)
            if corrected is not None:
                item.not_before = corrected
                changed.append(item)
        return changed
