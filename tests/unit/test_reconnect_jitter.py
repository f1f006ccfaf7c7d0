"""Reconnect storms are spread out: every Worker dropped at the same instant comes back over a window,
at times drawn with jitter that a seeded random makes deterministic, and always within bounds.

The clocks are fake (clock.install): nothing here waits for real time.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner import clock
from taskrunner.config import parse_config
from taskrunner.fleet import (RECONNECT_BASE, RECONNECT_MAX, SPREAD_PER_WORKER, Fleet, reconnect_delay,
                              startup_delay)
from taskrunner.keys import Keyring

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


class _Clock:
    """Clocks that move only when told."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.mono = 5_000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def boottime(self) -> float:
        return self.mono

    def boot_id(self) -> str | None:
        return None

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


@pytest.fixture
def fake() -> Iterator[_Clock]:
    source = _Clock()
    previous = clock.install(source)
    try:
        yield source
    finally:
        clock.install(previous)


def _fleet(tmp_path: Path, count: int, seed: int) -> Fleet:
    entries = ", ".join(f'w{i:03d}: {{transport: ssh, host: 127.0.0.1, port: {2200 + i}, host_key: "{HOST_KEY}"}}'
                        for i in range(count))
    keyring, _ = Keyring.ensure(tmp_path / "cp", clock.wall())
    return Fleet(parse_config(f"workers: {{{entries}}}\n", ".taskrun.yaml"), tmp_path, lambda event: None,
                 keyring, rng=random.Random(seed))


def _drop_all(fleet: Fleet) -> list[float]:
    """Every Worker online, then every session lost at the same instant: their reconnect times (monotonic)."""
    now = clock.wall()
    for worker in fleet:
        worker.online, worker.last_seen, worker.failures = True, now, 0
    for worker in fleet:
        fleet.link_down(worker, "connection reset", now)
    return [w.reconnect.mono for w in fleet if w.reconnect is not None]


def _busiest(times: list[float], window: float) -> int:
    """The most times that fall in any `window` seconds."""
    ordered = sorted(times)
    return max(sum(1 for t in ordered[i:] if t < start + window) for i, start in enumerate(ordered))


def test_a_hundred_workers_dropped_at_once_reconnect_spread_over_a_window(tmp_path: Path, fake: _Clock) -> None:
    fleet = _fleet(tmp_path, 100, seed=1)
    dropped = fake.mono

    due = [t - dropped for t in _drop_all(fleet)]

    assert len(due) == 100
    window = SPREAD_PER_WORKER * 100
    assert all(RECONNECT_BASE / 2 <= d <= window for d in due)
    assert max(due) - min(due) > window / 2  # spread, not one burst
    assert len({round(d, 6) for d in due}) == 100
    assert _busiest(due, 0.1) <= 15  # about 6 expected in any 100 ms; all 100 without jitter


def test_the_fleet_opens_them_at_the_drawn_times(tmp_path: Path, fake: _Clock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = _fleet(tmp_path, 100, seed=2)
    opened: list[float] = []
    monkeypatch.setattr(fleet, "_connect", lambda worker, now: (opened.append(clock.monotonic()),
                                                                setattr(worker, "reconnect_at", None)))
    dropped = fake.mono
    due = sorted(_drop_all(fleet))

    while len(opened) < 100 and fake.mono - dropped < RECONNECT_MAX:
        fleet.tick(clock.wall())
        fake.advance(0.01)

    assert len(opened) == 100
    assert all(0 <= when - at < 0.011 for when, at in zip(sorted(opened), due))
    assert _busiest([t - dropped for t in opened], 0.1) <= 15


def test_the_jitter_is_deterministic_with_a_seeded_random(tmp_path: Path, fake: _Clock) -> None:
    first = _drop_all(_fleet(tmp_path / "a", 50, seed=7))
    again = _drop_all(_fleet(tmp_path / "b", 50, seed=7))
    other = _drop_all(_fleet(tmp_path / "c", 50, seed=8))

    assert first == again
    assert first != other


def test_every_backoff_step_is_jittered_and_bounded(tmp_path: Path, fake: _Clock) -> None:
    fleet = _fleet(tmp_path, 100, seed=3)
    spread = SPREAD_PER_WORKER * 100
    for failures in range(12):
        now = clock.wall()
        for worker in fleet:
            worker.failures = failures
            fleet.link_down(worker, "connection refused", now)
        delays = [w.reconnect.mono - fake.mono for w in fleet if w.reconnect is not None]
        ceiling = min(RECONNECT_MAX, RECONNECT_BASE * 2 ** failures)
        assert all(ceiling / 2 <= d <= max(ceiling, spread) <= RECONNECT_MAX for d in delays), failures
        assert len({round(d, 6) for d in delays}) == 100, failures
        assert max(delays) - min(delays) > max(ceiling, spread) / 4, failures
        fake.advance(1.0)


def test_a_worker_failing_for_days_still_waits_at_most_reconnect_max() -> None:
    rng = random.Random(4)
    for failures in (20, 1_100, 10**9):
        assert RECONNECT_MAX / 2 <= reconnect_delay(failures, 3, rng) <= RECONNECT_MAX


def test_a_single_worker_retries_within_the_first_backoff_step() -> None:
    rng = random.Random(5)
    delays = [reconnect_delay(0, 1, rng) for _ in range(200)]
    assert all(RECONNECT_BASE / 2 <= d <= RECONNECT_BASE for d in delays)
    assert max(delays) - min(delays) > RECONNECT_BASE / 4


def test_first_sessions_of_a_large_fleet_are_spread_over_a_short_window(tmp_path: Path, fake: _Clock) -> None:
    started = fake.mono
    fleet = _fleet(tmp_path, 100, seed=6)

    due = [w.reconnect.mono - started for w in fleet if w.reconnect is not None]

    assert len(due) == 100
    assert all(0.0 <= d <= SPREAD_PER_WORKER * 99 for d in due)
    assert max(due) - min(due) > SPREAD_PER_WORKER * 99 / 2
    assert _busiest(due, 0.1) <= 15


def test_a_small_fleet_starts_at_once_or_nearly(tmp_path: Path, fake: _Clock) -> None:
    single = _fleet(tmp_path / "one", 1, seed=9)
    four = _fleet(tmp_path / "four", 4, seed=9)

    assert [w.reconnect.mono <= fake.mono for w in single] == [True]
    assert all(w.reconnect.mono - fake.mono <= SPREAD_PER_WORKER * 3 for w in four)
    assert startup_delay(1, random.Random(0)) == 0.0
