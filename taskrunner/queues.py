"""Indexed queues of Tasks: the scheduler's rules (scheduler.py) at a cost per plan that does not grow with the backlog.

A `Backlog` holds the scheduler's view (`scheduler.TaskView`) of every Task the
caller knows, kept current by the caller: `put` when a Task changed, `drop`
when it is gone. It indexes them once, on the change, instead of in every plan:

- dependents by dependency id, so a change re-evaluates only the Tasks that
  depend on it (and, when their status changes, theirs);
- the ready Tasks (PENDING, every dependency COMPLETED, backoff over) in one
  heap per class (Agent and labels) for ungrouped Tasks, ordered by priority
  then arrival, and one heap per concurrency group, in arrival order, with a
  count of its members' priorities per class;
- retry backoffs in a heap by `not_before`;
- the PENDING Tasks per class and per group, and the RUNNING ones per group.

`plan` then looks at one queue head per class and per group, assigns while
slots are free, and stops a class at its first head no Worker can take (every
later Task of that class would find the same Workers full). Waiting reasons are
given only for the Tasks whose reason may have changed since the previous plan
(`Plan.waiting`); `reason` answers for any PENDING Task on request. So the cost
of a plan is O((assignments + changed Tasks) log n + classes + groups).

Nothing here does I/O or reads the clock. Its plans are those of the reference
rules (tests/unit/test_scheduler_reference.py checks both on random states and
after random events); one difference: a backoff's waiting text ("... (10s)") is
written when the Task changes or its backoff ends, not refreshed in every plan.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any, Callable, Mapping, Sequence, TypeVar

from taskrunner.model import Priority, TaskStatus
from taskrunner.scheduler import (
    Assignment,
    Blocked,
    Plan,
    TaskView,
    WorkerView,
    _Fits,
    _pause,
    _pick_worker,
    _resolve_dependencies,
    _settle,
    backoff_text,
)

#: A class of Tasks: the same Agent and labels, so the same Workers could run them.
Class = tuple[str, tuple[tuple[str, str], ...]]
_PENDING = TaskStatus.PENDING
#: How often one plan re-evaluates a Task's dependencies: a cycle (INVALID at intake) must still end the walk.
_MAX_EVALUATIONS = 4
_T = TypeVar("_T")


def class_of(view: TaskView) -> Class:
    return (view.agent, tuple(sorted(view.labels.items())))


def _example(cls: Class) -> TaskView:
    """A Task of the class, to ask `_Fits` about the class."""
    return TaskView(id="", status=_PENDING, priority=Priority.NORMAL, seq=0, agent=cls[0], labels=dict(cls[1]))


class Backlog:
    """Every known Task's view, indexed for `plan`; pure (no I/O, no clock: `now` comes in)."""

    def __init__(self, views: Sequence[TaskView] = ()) -> None:
        self._views: dict[str, TaskView] = {}
        self._dependents: dict[str, set[str]] = {}  # dependency id -> ids naming it
        self._members: dict[Class, set[str]] = {}  # PENDING ids per class
        self._group_members: dict[str, set[str]] = {}  # PENDING ids per group
        self._running: Counter[str] = Counter()  # RUNNING Tasks per group
        self._effective: dict[str, TaskStatus] = {}  # ids whose status resolution changed (BLOCKED <-> PENDING)
        self._culprit: dict[str, str] = {}
        self._ready: dict[str, int] = {}  # id -> token of its queue entry
        self._loose: dict[Class, list[tuple[int, int, str, int]]] = {}  # heap (-priority, seq, id, token)
        self._grouped: dict[str, list[tuple[int, str, int]]] = {}  # heap (seq, id, token)
        self._group_prios: dict[str, dict[Class, Counter[int]]] = {}
        self._ready_classes: Counter[Class] = Counter()
        self._backoff: list[tuple[float, str, int]] = []  # heap (not_before, id, token)
        self._backoff_token: dict[str, int] = {}
        self._token = 0
        self._dirty: set[str] = set()  # put or dropped since the last plan
        self._touched: set[str] = set()  # their waiting reason may have changed
        self._full = True  # resolve every dependency (first plan, or after the clock went back)
        self._now = float("-inf")
        # The last plan's outcome, for `reason`.
        self._fits = _Fits(())
        self._paused: Mapping[str, float] = {}
        self._assigned: set[str] = set()
        self._group_note: dict[str, tuple[str, str]] = {}  # group -> ("cap", text) | ("behind", head id)
        self._class_sig: dict[Class, tuple[str | None, str | None]] = {}
        for view in views:
            self.put(view)

    # -- changes -----------------------------------------------------------------

    def put(self, view: TaskView) -> None:
        """A Task is new or changed (status, spec, backoff, tried Workers)."""
        old = self._views.get(view.id)
        if old == view:
            return
        if old is not None:
            self._unindex(old)
        self._views[view.id] = view
        for dep in view.depends_on:
            self._dependents.setdefault(dep, set()).add(view.id)
        if view.status is _PENDING:
            self._members.setdefault(class_of(view), set()).add(view.id)
            if view.group is not None:
                self._group_members.setdefault(view.group, set()).add(view.id)
            if view.not_before > 0:
                self._token += 1
                self._backoff_token[view.id] = self._token
                heapq.heappush(self._backoff, (view.not_before, view.id, self._token))
        elif view.status is TaskStatus.RUNNING and view.group is not None:
            self._running[view.group] += 1
        self._dirty.add(view.id)

    def drop(self, task_id: str) -> None:
        """A Task is gone (its file removed and the Task final): it no longer counts, not even as a dependency."""
        old = self._views.get(task_id)
        if old is not None:
            self._unindex(old)
            del self._views[task_id]
            self._dirty.add(task_id)

    def _unindex(self, view: TaskView) -> None:
        self._leave_ready(view.id)
        for dep in view.depends_on:
            ids = self._dependents.get(dep)
            if ids is not None:
                ids.discard(view.id)
                if not ids:
                    del self._dependents[dep]
        if view.status is _PENDING:
            _discard(self._members, class_of(view), view.id)
            if view.group is not None:
                _discard(self._group_members, view.group, view.id)
        elif view.status is TaskStatus.RUNNING and view.group is not None:
            self._running[view.group] -= 1
            if self._running[view.group] <= 0:
                del self._running[view.group]
        self._backoff_token.pop(view.id, None)
        self._effective.pop(view.id, None)
        self._culprit.pop(view.id, None)

    # -- readiness ---------------------------------------------------------------------

    def _status(self, task_id: str) -> TaskStatus | None:
        view = self._views.get(task_id)
        if view is None:
            return None
        return self._effective.get(task_id, view.status)

    def _refresh(self, task_id: str) -> None:
        """Put the Task in its queue, or take it out, as its state now says."""
        view = self._views.get(task_id)
        ready = (
            view is not None and view.status is _PENDING and self._status(task_id) is _PENDING
            and view.not_before <= self._now
            and all(self._status(dep) is TaskStatus.COMPLETED for dep in view.depends_on)
        )
        if not ready:
            self._leave_ready(task_id)
        elif task_id not in self._ready:
            assert view is not None
            self._token += 1
            self._ready[task_id] = self._token
            self._enqueue(view, self._token)

    def _enqueue(self, view: TaskView, token: int) -> None:
        cls = class_of(view)
        self._ready_classes[cls] += 1
        if view.group is None:
            heapq.heappush(self._loose.setdefault(cls, []), (-int(view.priority), view.seq, view.id, token))
        else:
            heapq.heappush(self._grouped.setdefault(view.group, []), (view.seq, view.id, token))
            self._group_prios.setdefault(view.group, {}).setdefault(cls, Counter())[int(view.priority)] += 1

    def _leave_ready(self, task_id: str) -> None:
        """Out of its queue: the heap entry goes stale (skipped when met), the counts drop now."""
        if self._ready.pop(task_id, None) is None:
            return
        view = self._views[task_id]
        self._uncount(view)

    def _uncount(self, view: TaskView) -> None:
        cls = class_of(view)
        self._ready_classes[cls] -= 1
        if self._ready_classes[cls] <= 0:
            del self._ready_classes[cls]
        if view.group is not None:
            prios = self._group_prios[view.group]
            counts = prios[cls]
            counts[int(view.priority)] -= 1
            if counts[int(view.priority)] <= 0:
                del counts[int(view.priority)]
            if not counts:
                del prios[cls]
            if not prios:
                del self._group_prios[view.group]

    def _resolve(self, now: float) -> None:
        """Spread what changed through the dependency graph: effective statuses, queues, touched Tasks."""
        dirty, self._dirty = self._dirty, set()
        if self._full:
            self._full = False
            # In urgency order, as the rules walk them: a cycle (INVALID at intake) then ends the same way.
            ordered = {v.id: v for v in sorted(self._views.values(), key=_urgency)}
            effective, culprit = _resolve_dependencies(ordered)
            self._effective = {i: s for i, s in effective.items() if s is not self._views[i].status}
            self._culprit = {i: d for i, d in culprit.items() if i in self._effective}
            self._ready.clear()
            self._loose.clear()
            self._grouped.clear()
            self._group_prios.clear()
            self._ready_classes.clear()
            self._backoff = []
            self._backoff_token.clear()
            for view in self._views.values():
                if view.status is _PENDING and view.not_before > now:
                    self._token += 1
                    self._backoff_token[view.id] = self._token
                    self._backoff.append((view.not_before, view.id, self._token))
                self._refresh(view.id)
            heapq.heapify(self._backoff)
            self._touched.update(self._views)
            return
        work = list(dirty)
        seen: Counter[str] = Counter()
        while work:
            task_id = work.pop()
            seen[task_id] += 1
            self._touched.add(task_id)
            view = self._views.get(task_id)
            changed = task_id in dirty and seen[task_id] == 1
            if view is not None:
                before = self._status(task_id)
                culprit: dict[str, str] = {}
                after = _settle(view, self._status, culprit)
                if after is view.status:
                    self._effective.pop(task_id, None)
                    self._culprit.pop(task_id, None)
                else:
                    self._effective[task_id] = after
                    self._culprit[task_id] = culprit.get(task_id, "")
                changed = changed or after is not before
                self._refresh(task_id)
            if changed and seen[task_id] <= _MAX_EVALUATIONS:
                for dependent in self._dependents.get(task_id, ()):
                    other = self._views.get(dependent)
                    if other is not None and other.status in (_PENDING, TaskStatus.BLOCKED):
                        work.append(dependent)

    def _release(self, now: float) -> None:
        """Backoffs that are over: their Tasks may join a queue."""
        while self._backoff and self._backoff[0][0] <= now:
            _, task_id, token = heapq.heappop(self._backoff)
            if self._backoff_token.get(task_id) == token:
                del self._backoff_token[task_id]
                self._touched.add(task_id)
                self._refresh(task_id)

    def _next_backoff(self, now: float) -> float | None:
        """The earliest backoff end after `now` of a PENDING Task that is not (being) BLOCKED."""
        aside = []
        found = None
        while self._backoff:
            entry = self._backoff[0]
            if self._backoff_token.get(entry[1]) != entry[2]:
                heapq.heappop(self._backoff)
                continue
            if self._status(entry[1]) is _PENDING:
                found = entry[0]
                break
            aside.append(heapq.heappop(self._backoff))
        for entry in aside:
            heapq.heappush(self._backoff, entry)
        return found

    def backing_off(self) -> list[str]:
        """The PENDING Tasks whose retry backoff had not ended at the last plan (to keep their deadline true)."""
        return list(self._backoff_token)

    # -- planning ------------------------------------------------------------------

    def plan(self, workers: Sequence[WorkerView], groups: Mapping[str, int], now: float,
             paused: Mapping[str, float] | None = None) -> Plan:
        """What `scheduler.plan` decides for these Tasks, with `waiting` for the Tasks whose reason may have
        changed since the previous plan (every PENDING Task in a first plan). See scheduler.py for the rules."""
        if now < self._now:
            self._full = True  # the clock went back: backoffs that were over may not be
        self._now = now
        self._paused = paused = paused or {}
        self._touched.update(self._assigned)  # the caller may have left one PENDING (a full disk, a changed file)
        self._resolve(now)
        self._release(now)
        pool = sorted(workers, key=lambda w: w.name)
        self._fits = fits = _Fits(pool)
        blocks = {cls: self._block(cls) for cls in self._ready_classes}
        wakeups = [block[1] for block in blocks.values() if block is not None and block[1] is not None]
        backoff = self._next_backoff(now)
        if backoff is not None:
            wakeups.append(backoff)
        assignments, notes = self._place(pool, fits, groups, blocks, now)
        self._assigned = {a.task_id for a in assignments}
        self._touched.update(self._assigned)
        self._touch_changed_queues(fits, notes)
        touched, self._touched = self._touched, set()
        waiting = {}
        for task_id in sorted(touched):
            reason = self.reason(task_id)
            if reason is not None:
                waiting[task_id] = reason
        return Plan(
            assignments=tuple(assignments),
            blocked=self._blocked(),
            unblocked=tuple(sorted((i for i, s in self._effective.items()
                                    if s is _PENDING and self._views[i].status is TaskStatus.BLOCKED),
                                   key=lambda i: _urgency(self._views[i]))),
            waiting=waiting,
            next_wakeup=min(wakeups, default=None),
        )

    def _blocked(self) -> tuple[Blocked, ...]:
        found = []
        for task_id, status in self._effective.items():
            view = self._views[task_id]
            if status is TaskStatus.BLOCKED and view.status is _PENDING:
                dep = self._culprit.get(task_id, "")
                dep_status = self._status(dep)
                found.append((_urgency(view), Blocked(task_id, dep, f"dependency '{dep}' is "
                                                      f"{dep_status.value if dep_status else 'missing'}")))
        return tuple(b for _, b in sorted(found, key=lambda pair: pair[0]))

    def _block(self, cls: Class) -> tuple[str, float | None] | None:
        """Why no Task of the class may start in this plan whatever the slots ((reason, pause end)); None if they may."""
        example = _example(cls)
        capable = self._fits.capable(example)
        if not capable:
            return self._fits.missing_reason(example), None
        return _pause(example, capable, self._paused, self._now)

    def _place(self, pool: Sequence[WorkerView], fits: _Fits, groups: Mapping[str, int],
               blocks: Mapping[Class, tuple[str, float | None] | None],
               now: float) -> tuple[list[Assignment], dict[str, tuple[str, str]]]:
        """Assign queue heads in urgency order; returns the assignments and each group's note."""
        used = {w.name: w.used for w in pool}
        free = sum(max(0, w.slots - w.used) for w in pool if w.online)
        started: Counter[str] = Counter()
        taken: list[TaskView] = []  # assigned in this plan: back into their queues at the end (the caller moves them)
        aside: list[tuple[str, tuple[int, str, int]]] = []  # group entries of blocked classes, put back at the end
        saturated: set[Class] = set()
        notes: dict[str, tuple[str, str]] = {}
        heap: list[tuple[tuple[int, int, str], int, Class | str]] = []
        for cls, entries in self._loose.items():
            if blocks.get(cls) is None and self._head(entries) is not None:
                heap.append((entries[0][:3], 0, cls))
        for group in self._grouped:
            key = self._group_key(group, blocks, aside)
            if key is not None:
                heap.append((key, 1, group))
        heapq.heapify(heap)
        assignments: list[Assignment] = []
        while heap:
            _, kind, ref = heapq.heappop(heap)
            if kind == 0:
                entries = self._loose[ref]  # type: ignore[index]
                head = self._views[entries[0][2]]
            else:
                group = ref
                assert isinstance(group, str)
                cap = groups.get(group)
                if cap is not None and self._running[group] + started[group] >= cap:
                    notes[group] = ("cap", f"group '{group}' is at its cap of {cap} parallel Run(s)")
                    continue
                head = self._views[self._grouped[group][0][1]]
            cls = class_of(head)
            worker = None
            if free and cls not in saturated:
                worker = _pick_worker(head, fits.capable(head), used, now)
            if worker is None:
                saturated.add(cls)
                if kind == 1:
                    notes[ref] = ("behind", head.id)  # type: ignore[index]
                continue
            assignments.append(Assignment(head.id, worker.name))
            used[worker.name] += 1
            free -= 1
            taken.append(head)
            if kind == 0:
                heapq.heappop(entries)
                self._uncount(head)
                if self._head(entries) is not None:
                    heapq.heappush(heap, (entries[0][:3], 0, cls))
            else:
                started[head.group] += 1  # type: ignore[index]
                heapq.heappop(self._grouped[ref])  # type: ignore[index]
                self._uncount(head)
                key = self._group_key(ref, blocks, aside)  # type: ignore[arg-type]
                if key is not None:
                    heapq.heappush(heap, (key, 1, ref))
        for view in taken:
            self._enqueue(view, self._ready[view.id])
        for group, entry in aside:
            heapq.heappush(self._grouped[group], entry)
        return assignments, notes

    def _head(self, entries: list[tuple[int, int, str, int]]) -> tuple[int, int, str, int] | None:
        while entries and self._ready.get(entries[0][2]) != entries[0][3]:
            heapq.heappop(entries)
        return entries[0] if entries else None

    def _group_key(self, group: str, blocks: Mapping[Class, tuple[str, float | None] | None],
                   aside: list[tuple[str, tuple[int, str, int]]]) -> tuple[int, int, str] | None:
        """The group's place among the queues: its most urgent eligible priority, then its head's arrival."""
        prios = self._group_prios.get(group, {})
        top = [max(counts) for cls, counts in prios.items() if counts and blocks.get(cls) is None]
        if not top:
            return None
        entries = self._grouped[group]
        while entries:
            seq, task_id, token = entries[0]
            if self._ready.get(task_id) != token:
                heapq.heappop(entries)
            elif blocks.get(class_of(self._views[task_id])) is not None:
                aside.append((group, heapq.heappop(entries)))
            else:
                return (-max(top), seq, task_id)
        return None

    def _touch_changed_queues(self, fits: _Fits, notes: dict[str, tuple[str, str]]) -> None:
        """Every Task of a class or group whose shared reason changed is touched."""
        signatures: dict[Class, tuple[str | None, str | None]] = {}
        for cls, ids in self._members.items():
            example = _example(cls)
            block = self._block(cls)
            signatures[cls] = (block[0] if block else None, fits.busy_reason(example) if fits.capable(example) else None)
            if self._class_sig.get(cls) != signatures[cls]:
                self._touched.update(ids)
        self._class_sig = signatures
        for group in set(notes) | set(self._group_note):
            if notes.get(group) != self._group_note.get(group):
                self._touched.update(self._group_members.get(group, ()))
        self._group_note = notes

    # -- reasons ------------------------------------------------------------------------

    def reason(self, task_id: str) -> str | None:
        """Why a PENDING Task did not start in the last plan; None if it is not PENDING, is being BLOCKED or
        was assigned. Costs O(its dependencies)."""
        view = self._views.get(task_id)
        if view is None or view.status is not _PENDING or self._status(task_id) is not _PENDING \
                or task_id in self._assigned:
            return None
        cls = class_of(view)
        example = _example(cls)
        capable = self._fits.capable(example)
        if not capable:
            return self._fits.missing_reason(example)
        unmet = []
        for dep in dict.fromkeys(view.depends_on):
            status = self._status(dep)
            if status is not TaskStatus.COMPLETED:
                unmet.append(f"'{dep}' ({status.value})" if status is not None else f"'{dep}' (no such Task)")
        if unmet:
            return "waiting for " + ", ".join(unmet)
        if self._now < view.not_before:
            return backoff_text(view.not_before, self._now)
        pause = _pause(example, capable, self._paused, self._now)
        if pause is not None:
            return pause[0]
        note = self._group_note.get(view.group) if view.group is not None else None
        if note is not None and note[0] == "cap":
            return note[1]
        if note is not None and note[1] != task_id:
            return f"behind '{note[1]}' in group '{view.group}' (its Runs start in arrival order)"
        return self._fits.busy_reason(view)


class TaskViews(dict[str, TaskView]):
    """A caller's cache of its Tasks' views by id, and the Backlog built from them.

    `pop` (the Task changed) also notes the id for the next `index`; `clear` (the configuration changed, so
    every view may have) has the Backlog built afresh.
    """

    def __init__(self) -> None:
        super().__init__()
        self.changed: set[str] = set()
        self.backlog: Backlog | None = None

    def pop(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.changed.add(key)
        return super().pop(key, default)

    def clear(self) -> None:
        super().clear()
        self.backlog = None

    def index(self, tasks: Mapping[str, _T], view_of: Callable[[_T], TaskView | None]) -> Backlog:
        """The Backlog, told about every Task changed since the last call (all of them on the first);
        `view_of` gives None for a Task that counts as absent, even as a dependency."""
        if self.backlog is None:
            self.changed.clear()
            found = (view_of(task) for task in tasks.values())
            self.backlog = Backlog([view for view in found if view is not None])
            return self.backlog
        changed, self.changed = self.changed, set()
        for task_id in changed:
            task = tasks.get(task_id)
            view = view_of(task) if task is not None else None
            if view is None:
                self.backlog.drop(task_id)
            else:
                self.backlog.put(view)
        return self.backlog


def _urgency(view: TaskView) -> tuple[int, int, str]:
    return (-int(view.priority), view.seq, view.id)


def _discard(index: dict, key: object, task_id: str) -> None:  # type: ignore[type-arg]
    ids = index.get(key)
    if ids is not None:
        ids.discard(task_id)
        if not ids:
            del index[key]

