"""A session hands the daemon's loop a bounded amount of unhandled output (links/base.py OutputBudget)."""

from __future__ import annotations

import threading
import time

from taskrunner.links.base import OutputBudget


def test_a_reader_waits_while_the_budget_is_spent_and_goes_on_once_output_is_handled() -> None:
    budget = OutputBudget(limit=100)
    budget.take(60, lambda: True)
    budget.take(40, lambda: True)  # exactly the limit
    taken = threading.Event()
    reader = threading.Thread(target=lambda: (budget.take(10, lambda: True), taken.set()), daemon=True)
    reader.start()
    assert not taken.wait(0.3)  # over the limit: it waits
    budget.give(60)
    assert taken.wait(5)


def test_one_chunk_larger_than_the_limit_passes_when_nothing_is_queued() -> None:
    budget = OutputBudget(limit=100)
    done = threading.Event()
    threading.Thread(target=lambda: (budget.take(500, lambda: True), done.set()), daemon=True).start()
    assert done.wait(5)


def test_a_waiting_reader_stops_waiting_once_its_session_is_no_longer_wanted() -> None:
    budget = OutputBudget(limit=10)
    budget.take(10, lambda: True)
    wanted = [True]
    done = threading.Event()
    threading.Thread(target=lambda: (budget.take(5, lambda: wanted[0]), done.set()), daemon=True).start()
    assert not done.wait(0.3)
    wanted[0] = False
    started = time.monotonic()
    assert done.wait(5)
    assert time.monotonic() - started < 5
