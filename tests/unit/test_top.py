"""`taskrun top`: the filter and sort rules, and the app driven headless against a real daemon."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Log

from taskrunner.tui import view
from taskrunner.tui.app import TopApp
from taskrunner.tui.source import Source
from tests.conftest import Daemon, taskrun, wait_status, write_task

T = TypeVar("T")


async def until(pilot: Pilot[int], predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Let the app run until `predicate` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)
    return value


def shown_tasks(app: TopApp) -> dict[str, str]:
    """The Tasks table as it is drawn: {task id: status}."""
    table = app.query_one("#tasks", DataTable)
    rows = (table.get_row_at(n) for n in range(table.row_count))
    return {str(row[0]): str(row[1]) for row in rows}


def drive(root: Path, scenario: Callable[[TopApp, Pilot[int]], Awaitable[None]]) -> TopApp:
    """Run `scenario` against a headless TopApp over `root`'s daemon; the app once it has ended."""
    app = TopApp(Source(root))

    async def main() -> None:
        async with app.run_test(size=(160, 48)) as pilot:
            await scenario(app, pilot)

    asyncio.run(main())
    return app


def test_filter_words_are_statuses_or_id_globs() -> None:
    query = view.parse_filter("running Failed auth/* t-0?")
    assert query.statuses == frozenset({"RUNNING", "FAILED"})
    assert query.patterns == ("auth/*", "t-0?")
    assert view.parse_filter("login").patterns == ("*login*",)  # no glob character: the ids that contain it
    assert query.matches("auth/login", "RUNNING") and not query.matches("auth/login", "COMPLETED")
    assert not query.matches("billing", "FAILED")


def test_task_rows_keep_arrival_order_until_a_column_is_chosen() -> None:
    records = [{"task_id": "b", "status": "RUNNING", "updated_at": 2.0, "runs": [{"run": 1, "worker": "w2"}]},
               {"task_id": "a", "status": "PENDING", "updated_at": 3.0, "runs": []},
               {"task_id": "c", "status": "COMPLETED", "updated_at": 1.0, "runs": [{"run": 1, "worker": "w1"}]}]
    assert [r.task_id for r in view.task_rows(records)] == ["b", "a", "c"]
    assert [r.task_id for r in view.task_rows(records, "TASK")] == ["a", "b", "c"]
    assert [r.task_id for r in view.task_rows(records, "UPDATED", reverse=True)] == ["a", "b", "c"]
    assert [r.task_id for r in view.task_rows(records, "STATUS")] == ["a", "b", "c"]  # PENDING, RUNNING, COMPLETED
    assert [r.task_id for r in view.task_rows(records, "WORKER")] == ["a", "c", "b"]  # "-", w1, w2
    assert view.next_column(None) == "TASK" and view.next_column("NOTE") is None


def test_top_without_a_daemon_says_so_and_exits_1(repo: Path) -> None:
    result = taskrun(repo, "top")
    assert result.returncode == 1
    assert f"no daemon is running in {repo}: start one with `taskrun up`" in result.stderr
    assert "\x1b" not in result.stdout  # never entered full screen


@pytest.mark.slow
def test_the_tasks_table_shows_the_tasks_and_the_filter_narrows_it(daemon: Daemon) -> None:
    daemon.start()
    for task_id in ("alpha-1", "alpha-2"):
        write_task(daemon.root, task_id, f"echo {task_id}")
    write_task(daemon.root, "beta", "exit 3")
    for task_id in ("alpha-1", "alpha-2"):
        wait_status(daemon.root, task_id, "COMPLETED")
    wait_status(daemon.root, "beta", "FAILED")

    async def scenario(app: TopApp, pilot: Pilot[int]) -> None:
        await until(pilot, lambda: shown_tasks(app) == {"alpha-1": "COMPLETED", "alpha-2": "COMPLETED",
                                                       "beta": "FAILED"}, "the three Tasks in the table")
        await until(pilot, lambda: app.query_one("#workers", DataTable).row_count == 1, "the local Worker")
        await pilot.press("s")  # by TASK
        assert list(shown_tasks(app)) == ["alpha-1", "alpha-2", "beta"]
        await pilot.click("#tasks", offset=(3, 1))  # the TASK header, again: descending
        assert list(shown_tasks(app)) == ["beta", "alpha-2", "alpha-1"]
        assert "sorted by TASK (descending)" in str(app.query_one("#tasks", DataTable).border_title)
        await pilot.press("slash", *"bet")
        await until(pilot, lambda: shown_tasks(app) == {"beta": "FAILED"}, "only beta after the filter 'bet'")
        await pilot.press(*["backspace"] * 3, *"completed")
        await until(pilot, lambda: set(shown_tasks(app)) == {"alpha-1", "alpha-2"}, "the COMPLETED Tasks")
        await pilot.press(*[" ", *"*-2"])
        await until(pilot, lambda: set(shown_tasks(app)) == {"alpha-2"}, "COMPLETED and matching *-2")
        await pilot.press("escape", "q")

    app = drive(daemon.root, scenario)
    assert app.return_value == 0


@pytest.mark.slow
def test_c_cancels_the_selected_running_task_and_its_output_is_shown(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "done", "echo finished")
    wait_status(daemon.root, "done", "COMPLETED")
    write_task(daemon.root, "long", "echo started-long; sleep 300")
    wait_status(daemon.root, "long", "RUNNING")

    async def scenario(app: TopApp, pilot: Pilot[int]) -> None:
        await until(pilot, lambda: shown_tasks(app).get("long") == "RUNNING", "long RUNNING in the table")
        table = app.query_one("#tasks", DataTable)
        table.move_cursor(row=list(shown_tasks(app)).index("long"))
        log = app.query_one("#output", Log)
        await until(pilot, lambda: any("started-long" in line for line in log.lines), "long's output")
        write_task(daemon.root, "late", "echo late")  # the table is redrawn: the selection and its output stay
        await until(pilot, lambda: shown_tasks(app).get("late") == "COMPLETED", "late COMPLETED in the table")
        await pilot.pause()  # the highlights the redraw posted are handled
        assert app.selected == "long" and any("started-long" in line for line in log.lines)
        await pilot.press("c")
        await until(pilot, lambda: shown_tasks(app).get("long") == "CANCELLED", "long CANCELLED in the table")
        await pilot.press("q")

    drive(daemon.root, scenario)
    wait_status(daemon.root, "long", "CANCELLED")
