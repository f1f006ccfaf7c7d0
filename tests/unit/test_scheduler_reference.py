"""The indexed scheduler (queues.Backlog) against a naive reference: the same placements on random states.

The reference is the scheduler as it was before its queues were indexed: every
plan walks every Task (`reference_plan` below, kept unchanged as the statement
of the rules). Random states, and random sequences of events applied to one
Backlog the way the engine applies them (`put` what changed, carry out each
plan), must give the same assignments, blocked and unblocked Tasks, wakeup and
waiting reasons as the reference planning the whole state from scratch.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from taskrunner.model import Priority, TaskStatus
from taskrunner.pauses import reason as pause_reason
from taskrunner.queues import Backlog
from taskrunner.taskfile import dependency_cycles
from taskrunner.scheduler import (
    Assignment,
    Blocked,
    Plan,
    TaskView,
    WorkerView,
    _no_free_worker,
    _no_worker_offers,
    plan,
)

_FAILED = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.BLOCKED, TaskStatus.INVALID})
_NOT_FAILED = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED})

# ---------------------------------------------------------------- the reference: every plan walks every Task


def reference_plan(tasks: Sequence[TaskView], workers: Sequence[WorkerView], groups: Mapping[str, int], now: float,
         paused: Mapping[str, float] | None = None) -> Plan:
    """Decide which PENDING Tasks start where, and which Tasks change state.

    `paused`: Agent -> end (epoch seconds) of a usage-limit pause on every Worker.
    """
    paused = paused or {}
    ordered = sorted(tasks, key=_urgency)
    by_id = {t.id: t for t in ordered}
    effective, culprit = _resolve_dependencies(by_id)
    pool = sorted(workers, key=lambda w: w.name)
    fits = _Fits(pool)

    blocked: list[Blocked] = []
    unblocked: list[str] = []
    waiting: dict[str, str] = {}
    eligible: list[TaskView] = []
    wakeups: list[float] = []
    for task in ordered:
        if task.status is TaskStatus.BLOCKED and effective[task.id] is TaskStatus.PENDING:
            unblocked.append(task.id)
        if task.status is not TaskStatus.PENDING:
            continue
        if effective[task.id] is TaskStatus.BLOCKED:
            dep = culprit[task.id]
            blocked.append(Blocked(task.id, dep, f"dependency '{dep}' is {effective[dep].value}"))
            continue
        if task.not_before > now:
            wakeups.append(task.not_before)
        reason = _ineligible(task, by_id, effective, fits, now)
        pause = _pause(task, fits.capable(task), paused, now) if reason is None else None
        if pause is not None:
            reason, until = pause
            wakeups.append(until)
        if reason is None:
            eligible.append(task)
        else:
            waiting[task.id] = reason

    running = Counter(t.group for t in ordered if t.status is TaskStatus.RUNNING and t.group is not None)
    assignments = _place(eligible, pool, fits, groups, running, waiting, now)
    return Plan(
        assignments=tuple(assignments),
        blocked=tuple(blocked),
        unblocked=tuple(unblocked),
        waiting=waiting,
        next_wakeup=min(wakeups, default=None),
    )


def _urgency(task: TaskView) -> tuple[int, int, str]:
    # The id breaks ties so that the Plan never depends on input order.
    return (-int(task.priority), task.seq, task.id)


def _resolve_dependencies(by_id: Mapping[str, TaskView]) -> tuple[dict[str, TaskStatus], dict[str, str]]:
    """Each Task's status once blocking and unblocking have spread through the graph.

    Returns the effective statuses and, for each newly BLOCKED Task, the
    dependency that blocks it. Cycles are INVALID at intake already; should one
    get here, a Task met again on the current path counts with its own status,
    so the walk ends. The walk is iterative: long chains must not hit Python's
    recursion limit.
    """
    effective: dict[str, TaskStatus] = {}
    culprit: dict[str, str] = {}

    def status_of(dep: str) -> TaskStatus | None:
        if dep not in by_id:
            return None
        return effective.get(dep, by_id[dep].status)

    for root in by_id:
        if root in effective:
            continue
        path = {root}
        stack = [(root, iter(by_id[root].depends_on))]
        while stack:
            task_id, deps = stack[-1]
            for dep in deps:
                if dep in by_id and dep not in effective and dep not in path:
                    path.add(dep)
                    stack.append((dep, iter(by_id[dep].depends_on)))
                    break
            else:
                stack.pop()
                path.discard(task_id)
                effective[task_id] = _settle(by_id[task_id], status_of, culprit)
    return effective, culprit


def _settle(task: TaskView, status_of: Callable[[str], TaskStatus | None], culprit: dict[str, str]) -> TaskStatus:
    if task.status is TaskStatus.PENDING:
        for dep in task.depends_on:
            if status_of(dep) in _FAILED:
                culprit[task.id] = dep
                return TaskStatus.BLOCKED
    elif task.status is TaskStatus.BLOCKED:
        # A missing dependency keeps the Task BLOCKED: nothing says it will
        # ever succeed, so only a dependency that is back in play unblocks.
        if all(status_of(dep) in _NOT_FAILED for dep in task.depends_on):
            return TaskStatus.PENDING
    return task.status


def _ineligible(
    task: TaskView,
    by_id: Mapping[str, TaskView],
    effective: Mapping[str, TaskStatus],
    fits: _Fits,
    now: float,
) -> str | None:
    """Why a PENDING, unblocked Task cannot start in any case; None if it may."""
    if not fits.capable(task):
        # Checked first: this needs a person to change the configuration,
        # while the other reasons pass by themselves.
        return fits.missing_reason(task)
    unmet = [
        f"'{dep}' ({effective[dep].value})" if dep in by_id else f"'{dep}' (no such Task)"
        for dep in dict.fromkeys(task.depends_on)
        if effective.get(dep) is not TaskStatus.COMPLETED
    ]
    if unmet:
        return "waiting for " + ", ".join(unmet)
    if now < task.not_before:
        until = datetime.fromtimestamp(task.not_before, tz=timezone.utc).isoformat(timespec="seconds")
        return f"retry backoff until {until} ({task.not_before - now:.0f}s)"
    return None


def _pause(task: TaskView, capable: Sequence[WorkerView], paused: Mapping[str, float],
           now: float) -> tuple[str, float] | None:
    """(reason, end) when the Task's Agent is paused everywhere, or on every Worker that could run it."""
    until = paused.get(task.agent)
    if until is not None and until > now:
        return pause_reason(task.agent, until), until
    ends = [w.paused.get(task.agent) for w in capable]
    if capable and all(end is not None and end > now for end in ends):
        until = min(end for end in ends if end is not None)
        where = capable[0].name if len(capable) == 1 else None
        return pause_reason(task.agent, until, where), until
    return None


def _place(
    eligible: Sequence[TaskView],
    workers: Sequence[WorkerView],
    fits: _Fits,
    groups: Mapping[str, int],
    running: Mapping[str, int],
    waiting: dict[str, str],
    now: float = 0.0,
) -> list[Assignment]:
    """Assign eligible Tasks (in urgency order) to Workers; fills `waiting` for the rest."""
    used = {w.name: w.used for w in workers}
    free = sum(max(0, w.slots - w.used) for w in workers if w.online)
    started = dict(running)
    # One queue per group in arrival order, one queue of one per ungrouped Task.
    queues: list[list[TaskView]] = []
    by_group: dict[str, list[TaskView]] = {}
    for task in eligible:
        if task.group is None:
            queues.append([task])
        else:
            by_group.setdefault(task.group, []).append(task)
    for members in by_group.values():
        queues.append(sorted(members, key=lambda t: (t.seq, t.id)))

    heap = [(_queue_key(q), i) for i, q in enumerate(queues)]
    heapq.heapify(heap)
    assignments: list[Assignment] = []
    while heap:
        _, i = heapq.heappop(heap)
        queue = queues[i]
        head = queue[0]
        group = head.group
        cap = groups.get(group) if group is not None else None
        if group is not None and cap is not None and started.get(group, 0) >= cap:
            for task in queue:
                waiting[task.id] = f"group '{group}' is at its cap of {cap} parallel Run(s)"
            continue
        # Once every slot is taken (the usual case with a backlog), no Worker is looked at again.
        worker = _pick_worker(head, fits.capable(head), used, now) if free else None
        if worker is None:
            waiting[head.id] = fits.busy_reason(head)
            for task in queue[1:]:
                waiting[task.id] = f"behind '{head.id}' in group '{group}' (its Runs start in arrival order)"
            continue
        assignments.append(Assignment(head.id, worker.name))
        used[worker.name] += 1
        free -= 1
        if group is not None:
            started[group] = started.get(group, 0) + 1
        del queue[0]
        if queue:
            heapq.heappush(heap, (_queue_key(queue), i))
    return assignments


def _queue_key(queue: Sequence[TaskView]) -> tuple[int, int, str]:
    # A queue competes with its most urgent member's priority, but its head goes first.
    top = max(int(t.priority) for t in queue)
    return (-top, queue[0].seq, queue[0].id)


def _could_ever_run(worker: WorkerView, task: TaskView) -> bool:
    return (
        worker.slots > 0
        and task.agent in worker.agents
        and task.agent not in worker.lacking
        and all(worker.labels.get(k) == v for k, v in task.labels.items())
    )


class _Fits:
    """Which Workers could ever run a Task, and the busy reason, computed once per (Agent, labels) in a plan."""

    def __init__(self, workers: Sequence[WorkerView]) -> None:
        self._workers = workers
        self._capable: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[WorkerView, ...]] = {}
        self._busy: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._missing: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}

    def capable(self, task: TaskView) -> tuple[WorkerView, ...]:
        key = (task.agent, tuple(sorted(task.labels.items())))
        found = self._capable.get(key)
        if found is None:
            found = self._capable[key] = tuple(w for w in self._workers if _could_ever_run(w, task))
        return found

    def busy_reason(self, task: TaskView) -> str:
        key = (task.agent, tuple(sorted(task.labels.items())))
        reason = self._busy.get(key)
        if reason is None:
            reason = self._busy[key] = _no_free_worker(task, self.capable(task))
        return reason

    def missing_reason(self, task: TaskView) -> str:
        key = (task.agent, tuple(sorted(task.labels.items())))
        reason = self._missing.get(key)
        if reason is None:
            reason = self._missing[key] = _no_worker_offers(task, self._workers)
        return reason


def _pick_worker(task: TaskView, capable: Sequence[WorkerView], used: Mapping[str, int],
                 now: float = 0.0) -> WorkerView | None:
    fitting = [w for w in capable if w.online and used[w.name] < w.slots and w.paused.get(task.agent, 0.0) <= now]
    if not fitting:
        return None
    tried = set(task.tried_workers)
    return min(fitting, key=lambda w: (w.name in tried, -(w.slots - used[w.name]), w.name))


# ---------------------------------------------------------------- random states

S, P = TaskStatus, Priority
NOW = 1_000.0
IDS = [f"t{i}" for i in range(12)]
WORKERS = ["w0", "w1", "w2"]
AGENTS = ["shell", "claude"]
LABELS: list[dict[str, str]] = [{}, {}, {"gpu": "a"}, {"zone": "b"}]
GROUPS = [None, None, "g1", "g1", "g2"]
BACKOFFS = [0.0, 0.0, 0.0, NOW - 1, NOW + 5, NOW + 40]


@st.composite
def task_views(draw: st.DrawFn, task_id: str, seq: int, deps_from: Sequence[str]) -> TaskView:
    # Dependencies name earlier ids or ids that never exist ("x1"): the engine makes cycles INVALID first.
    return TaskView(
        id=task_id,
        status=draw(st.sampled_from([S.PENDING, S.PENDING, S.PENDING, *S])),
        priority=draw(st.sampled_from(list(P))),
        seq=seq,
        agent=draw(st.sampled_from(AGENTS)),
        depends_on=tuple(draw(st.lists(st.sampled_from([*deps_from, "x1"]), max_size=2))) if deps_from else (),
        labels=draw(st.sampled_from(LABELS)),
        group=draw(st.sampled_from(GROUPS)),
        not_before=draw(st.sampled_from(BACKOFFS)),
        tried_workers=tuple(draw(st.lists(st.sampled_from(WORKERS), unique=True, max_size=2))),
    )


@st.composite
def worker_views(draw: st.DrawFn) -> list[WorkerView]:
    names = draw(st.lists(st.sampled_from(WORKERS), unique=True, min_size=1))
    return [
        WorkerView(
            name=n,
            slots=draw(st.integers(0, 3)),
            used=draw(st.sampled_from([0, 0, 1, 2])),
            agents=draw(st.sampled_from([frozenset(AGENTS), frozenset(AGENTS), frozenset({"shell"})])),
            labels=draw(st.sampled_from([{}, {"gpu": "a"}, {"gpu": "a", "zone": "b"}])),
            online=draw(st.sampled_from([True, True, True, False])),
            note=draw(st.sampled_from([None, None, "it cannot confine Agents"])),
            lacking=draw(st.sampled_from([{}, {}, {"claude": "claude"}])),
            paused=draw(st.sampled_from([{}, {}, {"claude": NOW + 60}])),
        )
        for n in names
    ]


@st.composite
def states(draw: st.DrawFn, cycles: bool = True) -> tuple[list[TaskView], list[WorkerView], dict[str, int],
                                                          dict[str, float]]:
    ids = draw(st.lists(st.sampled_from(IDS), unique=True, min_size=1))
    tasks = [draw(task_views(i, draw(st.integers(0, 6)), IDS if cycles else ids[:n])) for n, i in enumerate(ids)]
    groups = draw(st.sampled_from([{}, {"g1": 1}, {"g1": 0, "g2": 2}, {"g2": 1}]))
    paused = draw(st.sampled_from([{}, {}, {"shell": NOW + 30}, {"claude": NOW - 1}]))
    return tasks, draw(worker_views()), groups, paused


@given(states())
@settings(max_examples=300, deadline=None)
def test_the_indexed_plan_of_a_random_state_is_the_reference_plan(state: Any) -> None:
    tasks, workers, groups, paused = state
    assert plan(tasks, workers, groups, NOW, paused) == reference_plan(tasks, workers, groups, NOW, paused)


def test_the_reference_comparison_sees_a_difference() -> None:
    # A scheduler that ignored priority would fail the property above: the reference tells the two apart.
    tasks = [TaskView("low", S.PENDING, P.LOW, 1, "shell"), TaskView("high", S.PENDING, P.HIGH, 2, "shell")]
    workers = [WorkerView("w", 1, 0, frozenset({"shell"}))]
    assert reference_plan(tasks, workers, {}, NOW).assignments == (Assignment("high", "w"),)
    assert plan(tasks, workers, {}, NOW) == reference_plan(tasks, workers, {}, NOW)


# ---------------------------------------------------------------- random events on one Backlog

_SECONDS = re.compile(r" \(\d+s\)$")


def _same_reason(kept: str | None, fresh: str | None) -> bool:
    """A backoff's "(10s)" is written when the Task changes, not in every plan (queues.py)."""
    return kept == fresh or (kept is not None and fresh is not None and _SECONDS.sub("", kept) == _SECONDS.sub("", fresh))


@st.composite
def events(draw: st.DrawFn) -> list[tuple[str, Any]]:
    kinds = st.sampled_from(["task", "task", "finish", "drop", "workers", "time", "pause"])
    found = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(kinds)
        if kind == "task":
            n = draw(st.integers(0, len(IDS) - 1))
            found.append((kind, draw(task_views(IDS[n], draw(st.integers(0, 20)), IDS[:n]))))
        elif kind in ("finish", "drop"):
            found.append((kind, (draw(st.sampled_from(IDS)), draw(st.sampled_from([S.COMPLETED, S.FAILED, S.PENDING])))))
        elif kind == "workers":
            found.append((kind, draw(worker_views())))
        elif kind == "time":
            found.append((kind, draw(st.sampled_from([1.0, 10.0, 45.0]))))
        else:
            found.append((kind, draw(st.sampled_from([{}, {"shell": NOW + 30}, {"claude": NOW + 100}]))))
    return found


@given(states(cycles=False), events())
@settings(max_examples=200, deadline=None)
def test_a_backlog_kept_up_to_date_by_events_plans_as_the_reference(state: Any, steps: list[tuple[str, Any]]) -> None:
    tasks, workers, groups, paused = state
    views = {t.id: t for t in tasks}
    backlog = Backlog(tasks)
    kept: dict[str, str] = {}  # each Task's waiting reason as the engine keeps it: from Plan.waiting alone
    now = NOW

    def change(view: TaskView) -> None:
        views[view.id] = view
        backlog.put(view)

    in_cycle: set[str] = set()

    def check_cycles() -> None:
        # As the engine does before each plan: an edit that closes a dependency cycle makes every Task on it
        # that is not running INVALID (a cycle never reaches the planner), and one no longer on a cycle PENDING.
        on_cycle = {i for cycle in dependency_cycles({i: v.depends_on for i, v in views.items()}) for i in cycle}
        for task_id in sorted(on_cycle - in_cycle):
            if views[task_id].status is not S.RUNNING:
                in_cycle.add(task_id)
                change(dataclasses.replace(views[task_id], status=S.INVALID))
        for task_id in sorted(in_cycle - on_cycle):
            in_cycle.discard(task_id)
            if task_id in views:
                change(dataclasses.replace(views[task_id], status=S.PENDING))

    for kind, value in [("time", 0.0), *steps]:
        if kind == "task":
            in_cycle.discard(value.id)  # a new revision starts afresh
            change(value)
            check_cycles()
        elif kind == "finish" and value[0] in views and views[value[0]].status is S.RUNNING:
            change(dataclasses.replace(views[value[0]], status=value[1], not_before=now + 20 if value[1] is S.PENDING
                                       else 0.0))
        elif kind == "drop" and value[0] in views:
            del views[value[0]]
            backlog.drop(value[0])
            check_cycles()
        elif kind == "workers":
            workers = value
        elif kind == "time":
            now += value
        elif kind == "pause":
            paused = value
        expected = reference_plan(list(views.values()), workers, groups, now, paused)
        got = backlog.plan(workers, groups, now, paused)
        assert (got.assignments, got.blocked, got.unblocked, got.next_wakeup) == \
            (expected.assignments, expected.blocked, expected.unblocked, expected.next_wakeup)
        kept.update(got.waiting)
        for task_id, view in views.items():
            if view.status is S.PENDING and task_id in expected.waiting:
                assert backlog.reason(task_id) == expected.waiting[task_id]
                assert _same_reason(kept.get(task_id), expected.waiting[task_id]), task_id
        # Carried out as the engine does: each change is put back.
        for a in got.assignments:
            change(dataclasses.replace(views[a.task_id], status=S.RUNNING,
                                       tried_workers=(*views[a.task_id].tried_workers, a.worker)))
            kept.pop(a.task_id, None)
        for b in got.blocked:
            change(dataclasses.replace(views[b.task_id], status=S.BLOCKED))
            kept.pop(b.task_id, None)
        for task_id in got.unblocked:
            change(dataclasses.replace(views[task_id], status=S.PENDING))


def test_a_plan_costs_the_same_whatever_the_backlog() -> None:
    # Counted, not timed: how many queue entries one plan looks at with 100 and with 5,000 Tasks waiting.
    looked: list[int] = []
    for n in (100, 5000):
        tasks = [TaskView(f"t{i}", S.PENDING, P.NORMAL, i, "shell") for i in range(n)]
        backlog = Backlog(tasks)
        workers = [WorkerView("w", 2, 0, frozenset({"shell"}))]
        backlog.plan(workers, {}, NOW)
        views = {t.id: t for t in tasks}
        calls = Counter[str]()
        original = backlog.reason

        def counting(task_id: str, original: Callable[[str], str | None] = original,
                     calls: Counter[str] = calls) -> str | None:
            calls[task_id] += 1
            return original(task_id)

        backlog.reason = counting  # type: ignore[method-assign]
        for step in range(20):  # a Run ends, the next one starts
            got = backlog.plan([WorkerView("w", 2, 1, frozenset({"shell"}))], {}, NOW + step)
            assert len(got.assignments) == 1
            backlog.put(dataclasses.replace(views[got.assignments[0].task_id], status=S.COMPLETED))
        looked.append(sum(calls.values()))
    assert looked[0] == looked[1] <= 40
