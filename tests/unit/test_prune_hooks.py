"""A pruned Task leaves whatever the daemon's hooks keep per Task (hooks.Hooks.task_removed): the metrics'
Tasks-by-status gauge, the live view's rows, the notifier's and the log's memory of its status."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from taskrunner import logs
from taskrunner.cli.render import LiveView
from taskrunner.hooks import Hooks, HookSet
from taskrunner.metrics import Metrics
from taskrunner.model import TaskStatus
from taskrunner.notify import Notifier
from taskrunner.state import TaskState
from tests.unit.test_metrics import Clock, value
from tests.unit.test_metrics import task as metrics_task
from tests.unit.test_notify import ALL, Recorded, notifier


def test_a_pruned_task_leaves_the_tasks_by_status_gauge() -> None:
    metrics = Metrics(Clock())
    kept, pruned = metrics_task("kept", TaskStatus.COMPLETED), metrics_task("pruned", TaskStatus.COMPLETED)
    metrics.seed([kept, pruned], [])
    metrics.task_changed(metrics_task("waits", TaskStatus.PENDING))
    assert value(metrics, "taskrun_tasks", status="COMPLETED") == 2
    metrics.task_removed(pruned)
    assert value(metrics, "taskrun_tasks", status="COMPLETED") == 1
    assert value(metrics, "taskrun_tasks", status="PENDING") == 1
    metrics.task_removed(pruned)  # said twice: nothing more goes
    assert value(metrics, "taskrun_tasks", status="COMPLETED") == 1


def test_every_hook_of_a_hook_set_hears_task_removed_even_when_one_raises() -> None:
    heard: list[str] = []

    class Broken(Hooks):
        def task_removed(self, task: TaskState) -> None:
            raise RuntimeError("a hook's bug")

    class Heard(Hooks):
        def task_removed(self, task: TaskState) -> None:
            heard.append(task.id)

    HookSet(Broken(), Heard()).task_removed(metrics_task("x", TaskStatus.COMPLETED))
    Hooks().task_removed(metrics_task("x", TaskStatus.COMPLETED))  # the default does nothing
    assert heard == ["x"]


def test_a_pruned_task_leaves_the_live_table_through_the_filtered_view() -> None:
    view = LiveView(Console(file=io.StringIO(), force_terminal=False, width=200))
    shown = logs.FilteredView(view, "INFO")
    for task_id in ("kept", "pruned"):
        shown.task_changed(metrics_task(task_id, TaskStatus.COMPLETED))
    shown.task_removed(metrics_task("pruned", TaskStatus.COMPLETED))
    table = Console(file=io.StringIO(), width=200)
    table.print(view._table())
    text = table.file.getvalue()  # type: ignore[attr-defined]
    assert "kept" in text and "pruned" not in text


def test_the_notifier_forgets_a_pruned_task_so_a_new_task_of_its_id_is_told() -> None:
    sent = Recorded()
    hooks: Notifier = notifier(ALL, sent, [])
    hooks.seed([metrics_task("x", TaskStatus.COMPLETED)])
    hooks.start()
    hooks.task_removed(metrics_task("x", TaskStatus.COMPLETED))
    hooks.task_changed(metrics_task("x", TaskStatus.COMPLETED))  # its file written again, and run: a new Task
    hooks.stop()
    assert [d.event["kind"] for d in sent.tries] == ["completed"]


def test_the_log_forgets_a_pruned_task_so_a_new_task_of_its_id_is_logged() -> None:
    logger = logging.getLogger("taskrun.test_prune_hooks")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        hooks = logs.LogHooks(logger=logger)
        hooks.task_changed(metrics_task("x", TaskStatus.COMPLETED))
        hooks.task_removed(metrics_task("x", TaskStatus.COMPLETED))
        hooks.task_changed(metrics_task("x", TaskStatus.COMPLETED))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["x COMPLETED", "x COMPLETED"]
