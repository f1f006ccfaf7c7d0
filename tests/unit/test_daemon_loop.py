"""The daemon's loop hands every queued event to `_handle`, however long the burst (daemon.py `_loop`)."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from taskrunner.daemon import BATCH, Daemon


@pytest.mark.parametrize("count", [1, BATCH - 1, BATCH, BATCH + 1, 2 * BATCH, 3 * BATCH + 7])
def test_a_burst_of_events_is_handled_whole_and_in_order(count: int) -> None:
    events: queue.Queue[object] = queue.Queue()
    for n in range(count):
        events.put(n)
    handled: list[object] = []
    stop = threading.Event()
    plans: list[int] = []

    def handle(event: object) -> bool:
        handled.append(event)
        if len(handled) == count:
            stop.set()
        return True

    loop: Any = SimpleNamespace(
        _stop=stop, once=False, config=None, _tasks_touched=False, _next_poll=None, events=events,
        _serving=threading.Event(), _doctor_due=None, _doctor=lambda: None,
        fleet=SimpleNamespace(tick=lambda now: [], next_wakeup=lambda: None,
                              keyring=SimpleNamespace(next_retirement=lambda: None)),
        engine=SimpleNamespace(next_wakeup=None, pending=SimpleNamespace(due=None),
                               schedule=lambda: plans.append(len(handled)), refresh_keys=lambda: None),
        syncer=SimpleNamespace(stale=False), repo=SimpleNamespace(moving=False),
        _flush=lambda force=False, wait=False: None, _handle=handle)
    worker = threading.Thread(target=Daemon._loop, args=(loop,), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert handled == list(range(count))  # none dropped at a batch's end, none twice
    # The scheduler runs between batches of at most BATCH events.
    assert all(b - a <= BATCH for a, b in zip(plans, plans[1:]))
