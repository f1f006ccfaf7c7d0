"""Pure placement: the state of Tasks and Workers in, a `Plan` out.

Nothing here does I/O or reads the clock: the daemon passes `now` and the
jitter, applies the Plan (assign, block, unblock) and plans again when state
changes or `Plan.next_wakeup` arrives. Every input order gives the same Plan.

Rules, in the order `plan` applies them:

1. Dependencies. A PENDING Task whose dependency is FAILED, CANCELLED, BLOCKED
   or INVALID becomes BLOCKED; a BLOCKED Task whose dependencies are all
   PENDING, RUNNING or COMPLETED goes back to PENDING (and starts in a later
   plan). Both are resolved through the dependency graph in one plan, so a
   chain a <- b <- c blocks (or unblocks) all the way down at once.
2. Eligibility. A PENDING Task starts only when every dependency is
   COMPLETED, its retry backoff (`not_before`) has passed, and some configured
   Worker could run it at all.
3. Order. Priority first, then arrival (`seq`). Within a concurrency group
   Runs start strictly in arrival order: the group is one queue that competes
   with the priority of the most urgent Task it holds, because that Task can
   only start after the ones ahead of it (no priority inversion).
   A Worker can run a Task only if it offers the Task's Agent, carries its
   labels and has the Agent's CLI (`WorkerView.lacking`: its `ready` did not
   list the preset's program).
4. Pauses. An Agent paused for a usage limit (pauses.py) starts nothing until
   the pause ends, everywhere (`plan(paused=...)`) or on one Worker
   (`WorkerView.paused`); its Tasks wait with the pause's reason, and the end
   of the pause is a wakeup.
5. Placement. An online Worker with a free slot, the Agent and every label.
   Retries prefer a Worker not tried before, then the most free slots, then the
   name.

The rules are carried out by `queues.Backlog`, which keeps the Tasks indexed
between plans so that a plan costs the Tasks that changed, not the backlog;
`plan` below builds one for a single decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping, Sequence

from taskrunner.defaults import CONFIG_FILE
from taskrunner.model import Priority, TaskStatus
from taskrunner.pauses import reason as pause_reason

_FAILED = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.BLOCKED, TaskStatus.INVALID})
_NOT_FAILED = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED})


@dataclass(frozen=True)
class TaskView:
    """What the scheduler needs to know of one Task."""

    id: str
    status: TaskStatus
    priority: Priority  # higher = more urgent
    seq: int  # arrival order; lower = earlier
    agent: str  # the resolved Agent name
    depends_on: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    group: str | None = None
    not_before: float = 0.0  # retry backoff: not eligible while now < not_before
    tried_workers: tuple[str, ...] = ()  # Workers earlier Runs of this Task ran on


@dataclass(frozen=True)
class WorkerView:
    """What the scheduler needs to know of one configured Worker."""

    name: str
    slots: int
    used: int  # Runs currently on it
    agents: frozenset[str]
    labels: Mapping[str, str] = field(default_factory=dict)
    online: bool = True
    note: str | None = None  # why an online Worker takes no Runs (it cannot confine Agents), for `waiting`
    lacking: Mapping[str, str] = field(default_factory=dict)  # Agent -> preset whose CLI this Worker lacks
    paused: Mapping[str, float] = field(default_factory=dict)  # Agent -> end of its usage-limit pause here


@dataclass(frozen=True)
class Assignment:
    task_id: str
    worker: str


@dataclass(frozen=True)
class Blocked:
    task_id: str
    dependency: str  # the first dependency that failed
    reason: str  # e.g. "dependency 'db-schema' is FAILED"


@dataclass(frozen=True)
class Plan:
    assignments: tuple[Assignment, ...] = ()
    blocked: tuple[Blocked, ...] = ()  # PENDING Tasks that must become BLOCKED
    unblocked: tuple[str, ...] = ()  # BLOCKED Tasks whose deps are no longer failed -> PENDING
    waiting: Mapping[str, str] = field(default_factory=dict)  # PENDING id -> why it is not starting
    next_wakeup: float | None = None  # earliest not_before in the future


def backoff_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Seconds to wait before retry `attempt` (1 = first retry).

    Exponential, capped, with "equal jitter": the result lies in [d/2, d], so
    retries of many Tasks that failed together spread out, yet no retry comes
    sooner than half the planned delay. `jitter` in [0, 1] comes from the caller
    so this stays a pure function.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter}")
    if base < 0 or cap < 0:
        raise ValueError(f"base and cap must be >= 0, got base={base}, cap={cap}")
    # 2.0 ** 1024 raises OverflowError; any exponent this large is past every cap.
    delay = min(cap, base * 2.0 ** min(attempt - 1, 1000))
    return delay / 2 + delay / 2 * jitter


def plan(tasks: Sequence[TaskView], workers: Sequence[WorkerView], groups: Mapping[str, int], now: float,
         paused: Mapping[str, float] | None = None) -> Plan:
    """Decide which PENDING Tasks start where, and which Tasks change state; `waiting` covers every PENDING Task.

    `paused`: Agent -> end (epoch seconds) of a usage-limit pause on every Worker.
    A daemon keeps a `queues.Backlog` instead and plans with it, so that a plan
    does not cost the whole backlog; this builds one for the Tasks given.
    """
    from taskrunner.queues import Backlog  # queues.py builds on the types above

    return Backlog(tasks).plan(workers, groups, now, paused)


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


def backoff_text(not_before: float, now: float) -> str:
    """The waiting reason of a Task in retry backoff until `not_before` (epoch seconds)."""
    until = datetime.fromtimestamp(not_before, tz=timezone.utc).isoformat(timespec="seconds")
    return f"retry backoff until {until} ({not_before - now:.0f}s)"


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


def _no_free_worker(task: TaskView, capable: Sequence[WorkerView]) -> str:
    names = ", ".join(f"{w.name}: {w.note}" if w.note else w.name for w in capable)
    return f"every Worker offering Agent '{task.agent}'{_labels_text(task.labels)} is busy or offline ({names})"


def _no_worker_offers(task: TaskView, workers: Sequence[WorkerView]) -> str:
    """Why no Worker could ever run `task`, and the change to the configuration that would let one."""
    labelled = [w.name for w in workers if all(w.labels.get(k) == v for k, v in task.labels.items())]
    offering = [w.name for w in workers if task.agent in w.agents]
    lacking = [w.lacking[task.agent] for w in workers if task.agent in w.agents and task.agent in w.lacking
               and all(w.labels.get(k) == v for k, v in task.labels.items())]
    if lacking:
        return (f"no Worker has the {lacking[0]} CLI (Agent '{task.agent}'): install it on a Worker's PATH "
                f"or set agents.{task.agent}.path")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(task.labels.items()))
    if labelled:
        fix = f"add '{task.agent}' to {_worker_key(labelled, 'agents')}"
    elif offering:
        fix = f"add {labels} to {_worker_key(offering, 'labels')}"
    else:
        fix = f"add '{task.agent}' to workers.<name>.agents" + (
            f" and {labels} to workers.<name>.labels" if labels else "")
    return f"no Worker offers Agent '{task.agent}'{_labels_text(task.labels)}: {fix} in {CONFIG_FILE}"


def _worker_key(names: Sequence[str], key: str) -> str:
    """`workers.NAME.key`, or for several candidates `workers.<name>.key (<name>: a or b)`."""
    if len(names) == 1:
        return f"workers.{names[0]}.{key}"
    return f"workers.<name>.{key} (<name>: {', '.join(names[:-1])} or {names[-1]})"


def _labels_text(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return " with labels " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
