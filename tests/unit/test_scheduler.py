"""The scheduler: examples of each rule, then properties over random states."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskrunner.model import Priority, TaskStatus
from taskrunner.scheduler import Assignment, Blocked, TaskView, WorkerView, backoff_delay, plan

P, S = Priority, TaskStatus
NOW = 1_000.0


def task(id: str, seq: int = 0, status: TaskStatus = S.PENDING, **kw: Any) -> TaskView:
    kw.setdefault("priority", P.NORMAL)
    kw.setdefault("agent", "shell")
    return TaskView(id=id, status=status, seq=seq, **kw)


def worker(name: str, slots: int = 1, used: int = 0, **kw: Any) -> WorkerView:
    kw.setdefault("agents", frozenset({"shell"}))
    return WorkerView(name=name, slots=slots, used=used, **kw)


def started(p: Any) -> list[str]:
    return [a.task_id for a in p.assignments]


# ---------------------------------------------------------------- order


def test_higher_priority_starts_first_then_earlier_arrival() -> None:
    tasks = [task("late-high", 3, priority=P.HIGH), task("early", 1), task("later", 2), task("first-high", 4, priority=P.HIGH)]
    p = plan(tasks, [worker("w", slots=3)], {}, NOW)
    assert started(p) == ["late-high", "first-high", "early"]
    assert p.waiting["later"].startswith("every Worker offering Agent 'shell' is busy")


def test_only_pending_tasks_are_candidates() -> None:
    tasks = [task(s.value.lower(), i, s) for i, s in enumerate(S) if s is not S.PENDING] + [task("p", 9)]
    p = plan(tasks, [worker("w", slots=9)], {}, NOW)
    assert p.assignments == (Assignment("p", "w"),)
    assert set(p.waiting) == set()


# ---------------------------------------------------------------- dependencies


@pytest.mark.parametrize("dep_status", [S.PENDING, S.RUNNING])
def test_task_waits_for_a_dependency_that_is_not_finished(dep_status: TaskStatus) -> None:
    p = plan([task("dep", 1, dep_status), task("t", 2, depends_on=("dep",))], [worker("w")], {}, NOW)
    assert "t" not in started(p)
    assert p.waiting["t"] == f"waiting for 'dep' ({dep_status.value})"


def test_task_starts_once_its_dependencies_completed() -> None:
    tasks = [task("a", 1, S.COMPLETED), task("b", 2, S.COMPLETED), task("t", 3, depends_on=("a", "b"))]
    assert started(plan(tasks, [worker("w")], {}, NOW)) == ["t"]


def test_unknown_dependency_makes_the_task_wait() -> None:
    p = plan([task("t", depends_on=("not-yet",))], [worker("w")], {}, NOW)
    assert p.assignments == ()
    assert p.waiting["t"] == "waiting for 'not-yet' (no such Task)"


@pytest.mark.parametrize("dep_status", [S.FAILED, S.CANCELLED, S.BLOCKED, S.INVALID])
def test_failed_dependency_blocks_the_task_naming_the_first_failed_one(dep_status: TaskStatus) -> None:
    # A BLOCKED Task stays BLOCKED only while something blocks it: here a missing Task.
    bad = task("bad", 2, dep_status, depends_on=("gone",))
    tasks = [task("ok", 1, S.COMPLETED), bad, task("t", 3, depends_on=("ok", "bad"))]
    p = plan(tasks, [worker("w")], {}, NOW)
    assert p.blocked == (Blocked("t", "bad", f"dependency 'bad' is {dep_status.value}"),)
    assert p.assignments == () and "t" not in p.waiting


def test_blocking_spreads_down_a_chain_in_one_plan() -> None:
    tasks = [task("a", 1, S.FAILED), task("b", 2, depends_on=("a",)), task("c", 3, depends_on=("b",))]
    p = plan(tasks, [worker("w")], {}, NOW)
    assert [(b.task_id, b.reason) for b in p.blocked] == [
        ("b", "dependency 'a' is FAILED"),
        ("c", "dependency 'b' is BLOCKED"),
    ]


@pytest.mark.parametrize("dep_status", [S.PENDING, S.RUNNING, S.COMPLETED])
def test_blocked_task_is_unblocked_but_not_started_when_its_dependency_is_back(dep_status: TaskStatus) -> None:
    tasks = [task("dep", 1, dep_status), task("t", 2, S.BLOCKED, depends_on=("dep",))]
    p = plan(tasks, [worker("w", slots=2)], {}, NOW)
    assert p.unblocked == ("t",)
    assert "t" not in started(p)


def test_blocked_task_stays_blocked_while_a_dependency_is_failed_or_missing() -> None:
    tasks = [task("dep", 1, S.FAILED), task("t", 2, S.BLOCKED, depends_on=("dep",)), task("u", 3, S.BLOCKED, depends_on=("gone",))]
    assert plan(tasks, [worker("w")], {}, NOW).unblocked == ()


def test_blocked_task_without_dependencies_is_unblocked() -> None:
    assert plan([task("t", status=S.BLOCKED)], [worker("w")], {}, NOW).unblocked == ("t",)


def test_waiting_names_every_unfinished_dependency() -> None:
    tasks = [task("a", 1, S.RUNNING), task("b", 2, S.COMPLETED), task("t", 3, depends_on=("a", "b", "c"))]
    assert plan(tasks, [worker("w")], {}, NOW).waiting["t"] == "waiting for 'a' (RUNNING), 'c' (no such Task)"


def test_unblocking_spreads_down_a_chain_and_dependents_wait() -> None:
    tasks = [task("a", 1), task("b", 2, S.BLOCKED, depends_on=("a",)), task("c", 3, S.BLOCKED, depends_on=("b",))]
    p = plan(tasks, [worker("w", slots=0)], {}, NOW)
    assert p.unblocked == ("b", "c")


def test_dependency_cycle_does_not_hang_and_starts_nothing() -> None:
    tasks = [task("a", 1, depends_on=("b",)), task("b", 2, depends_on=("a",)), task("self", 3, depends_on=("self",))]
    p = plan(tasks, [worker("w", slots=3)], {}, NOW)
    assert p.assignments == () and set(p.waiting) == {"a", "b", "self"}


def test_a_long_chain_does_not_hit_the_recursion_limit() -> None:
    tasks = [task("t0", 0, S.FAILED)] + [task(f"t{i}", i, depends_on=(f"t{i - 1}",)) for i in range(1, 5000)]
    assert len(plan(tasks, [worker("w")], {}, NOW).blocked) == 4999


# ---------------------------------------------------------------- placement


def test_task_goes_only_to_a_worker_with_its_agent_and_labels() -> None:
    workers = [
        worker("cpu", slots=5, agents=frozenset({"shell", "claude"})),
        worker("gpu-shell", slots=5, labels={"gpu": "true"}),
        worker("gpu", slots=1, agents=frozenset({"claude"}), labels={"gpu": "true", "zone": "a"}),
    ]
    p = plan([task("t", agent="claude", labels={"gpu": "true"})], workers, {}, NOW)
    assert p.assignments == (Assignment("t", "gpu"),)


def test_task_no_worker_could_ever_run_says_so_and_what_to_configure() -> None:
    workers = [worker("off", online=False, labels={"gpu": "true"}), worker("cpu")]
    p = plan([task("t", agent="claude", labels={"gpu": "true", "zone": "a"})], workers, {}, NOW)
    assert p.waiting["t"] == ("no Worker offers Agent 'claude' with labels gpu=true, zone=a: add 'claude' to "
                              "workers.<name>.agents and gpu=true, zone=a to workers.<name>.labels in .taskrun.yaml")
    assert plan([task("t", agent="x")], [], {}, NOW).waiting["t"] == \
        "no Worker offers Agent 'x': add 'x' to workers.<name>.agents in .taskrun.yaml"


def test_a_newly_configured_agent_no_worker_offers_names_the_worker_to_add_it_to() -> None:
    # `taskrun init` writes `workers.local.agents: [shell]`; an Agent added under `agents:` is not in it.
    p = plan([task("t", agent="py")], [worker("local", slots=2)], {}, NOW)
    assert p.waiting["t"] == "no Worker offers Agent 'py': add 'py' to workers.local.agents in .taskrun.yaml"
    two = [worker("a", labels={"gpu": "true"}), worker("b", labels={"gpu": "true"}), worker("c")]
    assert plan([task("t", agent="py", labels={"gpu": "true"})], two, {}, NOW).waiting["t"] == (
        "no Worker offers Agent 'py' with labels gpu=true: add 'py' to workers.<name>.agents (<name>: a or b) "
        "in .taskrun.yaml")


def test_missing_labels_name_the_workers_that_offer_the_agent() -> None:
    p = plan([task("t", labels={"gpu": "true"})], [worker("cpu")], {}, NOW)
    assert p.waiting["t"] == ("no Worker offers Agent 'shell' with labels gpu=true: add gpu=true to "
                              "workers.cpu.labels in .taskrun.yaml")


def test_offline_worker_gets_nothing_but_the_task_waits_for_it() -> None:
    p = plan([task("t")], [worker("w", online=False)], {}, NOW)
    assert p.assignments == ()
    assert p.waiting["t"] == "every Worker offering Agent 'shell' is busy or offline (w)"


def test_workers_never_get_more_runs_than_slots() -> None:
    tasks = [task(f"t{i}", i) for i in range(10)]
    p = plan(tasks, [worker("a", slots=3, used=1), worker("b", slots=2), worker("full", slots=2, used=2)], {}, NOW)
    per = {w: sum(a.worker == w for a in p.assignments) for w in ("a", "b", "full")}
    assert per == {"a": 2, "b": 2, "full": 0}
    assert started(p) == ["t0", "t1", "t2", "t3"]


def test_worker_with_most_free_slots_is_preferred_then_name() -> None:
    p = plan([task("t1", 1), task("t2", 2), task("t3", 3)], [worker("b", slots=3), worker("a", slots=3, used=1)], {}, NOW)
    assert [a.worker for a in p.assignments] == ["b", "a", "b"]


def test_retry_prefers_a_worker_it_has_not_tried() -> None:
    workers = [worker("roomy", slots=8), worker("small", slots=1)]
    p = plan([task("t", tried_workers=("roomy",))], workers, {}, NOW)
    assert p.assignments == (Assignment("t", "small"),)


def test_retry_goes_back_to_a_tried_worker_when_no_other_fits() -> None:
    workers = [worker("roomy", slots=8), worker("small", slots=1, used=1)]
    p = plan([task("t", tried_workers=("roomy", "small"))], workers, {}, NOW)
    assert p.assignments == (Assignment("t", "roomy"),)


# ---------------------------------------------------------------- groups


def test_group_cap_counts_running_tasks() -> None:
    tasks = [task("r", 1, S.RUNNING, group="be"), task("a", 2, group="be"), task("b", 3, group="be"), task("free", 4)]
    p = plan(tasks, [worker("w", slots=9)], {"be": 2}, NOW)
    assert started(p) == ["a", "free"]
    assert p.waiting["b"] == "group 'be' is at its cap of 2 parallel Run(s)"


def test_group_missing_from_the_caps_is_uncapped() -> None:
    tasks = [task(f"t{i}", i, group="other") for i in range(4)]
    assert len(plan(tasks, [worker("w", slots=9)], {"be": 1}, NOW).assignments) == 4


def test_high_priority_later_task_in_a_group_does_not_overtake() -> None:
    tasks = [task("early", 1, group="be", priority=P.LOW), task("urgent", 2, group="be", priority=P.CRITICAL)]
    p = plan(tasks, [worker("w", slots=9)], {"be": 1}, NOW)
    assert started(p) == ["early"]
    assert "cap" in p.waiting["urgent"]


def test_group_keeps_arrival_order_for_every_run_it_starts() -> None:
    tasks = [task("a", 1, group="be", priority=P.LOW), task("b", 2, group="be", priority=P.LOW), task("c", 3, group="be", priority=P.CRITICAL)]
    assert started(plan(tasks, [worker("w", slots=9)], {"be": 2}, NOW)) == ["a", "b"]


def test_group_head_that_cannot_be_placed_holds_the_rest_of_its_group_only() -> None:
    tasks = [
        task("head", 1, group="be", labels={"gpu": "true"}),
        task("next", 2, group="be"),
        task("other-group", 3, group="fe"),
        task("loose", 4),
    ]
    workers = [worker("cpu", slots=9), worker("gpu", labels={"gpu": "true"}, online=False)]
    p = plan(tasks, workers, {}, NOW)
    assert started(p) == ["other-group", "loose"]
    assert p.waiting["next"] == "behind 'head' in group 'be' (its Runs start in arrival order)"


def test_group_competes_with_the_priority_of_its_most_urgent_task() -> None:
    # Only one slot: the group's LOW head inherits its CRITICAL follower's
    # urgency, so a NORMAL ungrouped Task does not delay the CRITICAL one.
    tasks = [task("head", 1, group="be", priority=P.LOW), task("urgent", 3, group="be", priority=P.CRITICAL), task("normal", 2)]
    assert started(plan(tasks, [worker("w")], {}, NOW)) == ["head"]


def test_ineligible_tasks_do_not_hold_their_group() -> None:
    tasks = [
        task("waits", 1, group="be", depends_on=("x",)),
        task("backoff", 2, group="be", not_before=NOW + 5),
        task("nowhere", 3, group="be", agent="nobody"),
        task("ready", 4, group="be"),
    ]
    assert started(plan(tasks, [worker("w", slots=9)], {"be": 1}, NOW)) == ["ready"]


# ---------------------------------------------------------------- retry backoff


def test_task_in_backoff_waits_and_sets_the_next_wakeup() -> None:
    tasks = [task("a", 1, not_before=NOW + 30), task("b", 2, not_before=NOW + 10), task("c", 3, not_before=NOW)]
    p = plan(tasks, [worker("w", slots=9)], {}, NOW)
    assert started(p) == ["c"]
    assert p.waiting["b"] == "retry backoff until 1970-01-01T00:16:50+00:00 (10s)"
    assert p.next_wakeup == NOW + 10


def test_no_wakeup_when_no_backoff_is_pending() -> None:
    tasks = [task("a", 1, not_before=NOW - 1), task("done", 2, S.COMPLETED, not_before=NOW + 9)]
    assert plan(tasks, [worker("w")], {}, NOW).next_wakeup is None


def test_backoff_delay_grows_exponentially_up_to_the_cap() -> None:
    assert [backoff_delay(n, 5.0, 60.0, 1.0) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert backoff_delay(10_000, 5.0, 60.0, 1.0) == 60.0


def test_backoff_delay_uses_equal_jitter() -> None:
    assert backoff_delay(3, 5.0, 60.0, 0.0) == 10.0
    assert backoff_delay(3, 5.0, 60.0, 0.5) == 15.0


@given(st.integers(1, 2000), st.floats(0, 1e3), st.floats(0, 1e4), st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_backoff_delay_stays_within_half_and_whole_capped_delay(attempt: int, base: float, cap: float, jitter: float) -> None:
    full = min(cap, base * 2.0 ** min(attempt - 1, 1000))
    assert full / 2 <= backoff_delay(attempt, base, cap, jitter) <= full


@pytest.mark.parametrize("args", [(0, 1.0, 1.0, 0.5), (1, 1.0, 1.0, 1.5), (1, 1.0, 1.0, -0.1), (1, -1.0, 1.0, 0.5)])
def test_backoff_delay_refuses_nonsense(args: tuple[int, float, float, float]) -> None:
    with pytest.raises(ValueError):
        backoff_delay(*args)


# ---------------------------------------------------------------- properties

IDS = [f"t{i}" for i in range(10)]
WORKER_NAMES = ["w0", "w1", "w2", "w3"]
BOTH = frozenset({"shell", "claude"})


def often(draw: st.DrawFn, value: Any, otherwise: st.SearchStrategy[Any], weight: int = 3) -> Any:
    """`value` about weight-in-(weight+1) times: random states must often be
    runnable, or the placement properties hold only vacuously."""
    return draw(otherwise) if draw(st.integers(0, weight)) == weight else value


@st.composite
def states(draw: st.DrawFn) -> tuple[list[TaskView], list[WorkerView], dict[str, int]]:
    ids = draw(st.lists(st.sampled_from(IDS), unique=True, min_size=1, max_size=len(IDS)))
    tasks = [
        TaskView(
            id=i,
            status=often(draw, S.PENDING, st.sampled_from(list(S)), weight=2),
            priority=draw(st.sampled_from(list(P))),
            seq=draw(st.integers(0, 5)),
            agent=often(draw, "shell", st.just("claude")),
            # "t10" and "t11" never exist: unknown dependencies.
            depends_on=often(draw, (), st.lists(st.sampled_from(IDS + ["t10", "t11"]), max_size=2).map(tuple)),
            labels=often(draw, {}, st.dictionaries(st.sampled_from(["gpu", "zone"]), st.sampled_from(["a", "b"]), min_size=1)),
            group=draw(st.sampled_from([None, "g1", "g1", "g2", "g3"])),
            not_before=often(draw, 0.0, st.sampled_from([NOW - 1, NOW, NOW + 1, NOW + 50])),
            tried_workers=tuple(draw(st.lists(st.sampled_from(WORKER_NAMES), unique=True, max_size=2))),
        )
        for i in ids
    ]
    names = draw(st.lists(st.sampled_from(WORKER_NAMES), unique=True, min_size=1, max_size=len(WORKER_NAMES)))
    workers = [
        WorkerView(
            name=n,
            slots=draw(st.integers(0, 4)),
            used=often(draw, 0, st.integers(1, 4)),
            agents=often(draw, BOTH, st.sampled_from([frozenset({"shell"}), frozenset({"claude"}), frozenset()])),
            labels=draw(st.sampled_from([{}, {"gpu": "a"}, {"gpu": "a", "zone": "b"}, {"zone": "a"}])),
            online=often(draw, True, st.just(False)),
        )
        for n in names
    ]
    groups = {"g1": draw(st.integers(0, 3)), **draw(st.dictionaries(st.just("g2"), st.integers(0, 3)))}
    return tasks, workers, groups


def fits(w: WorkerView, t: TaskView) -> bool:
    return w.slots > 0 and t.agent in w.agents and all(w.labels.get(k) == v for k, v in t.labels.items())


def eligible(t: TaskView, by_id: dict[str, TaskView], workers: list[WorkerView]) -> bool:
    """An independent statement of eligibility, to check the plan against."""
    return (
        t.status is S.PENDING
        and all(d in by_id and by_id[d].status is S.COMPLETED for d in t.depends_on)
        and t.not_before <= NOW
        and any(fits(w, t) for w in workers)
    )


PROPERTY = settings(max_examples=200, deadline=None)


@given(states())
@PROPERTY
def test_no_worker_ever_exceeds_its_slots(state: Any) -> None:
    tasks, workers, groups = state
    p = plan(tasks, workers, groups, NOW)
    for w in workers:
        n = sum(a.worker == w.name for a in p.assignments)
        assert n == 0 or (w.online and w.used + n <= w.slots)


@given(states())
@PROPERTY
def test_every_assigned_task_was_pending_eligible_and_fits_its_worker(state: Any) -> None:
    tasks, workers, groups = state
    by_id = {t.id: t for t in tasks}
    by_name = {w.name: w for w in workers}
    p = plan(tasks, workers, groups, NOW)
    assert len({a.task_id for a in p.assignments}) == len(p.assignments)
    for a in p.assignments:
        t = by_id[a.task_id]
        assert eligible(t, by_id, workers)  # so all its deps are COMPLETED
        assert fits(by_name[a.worker], t)


@given(states())
@PROPERTY
def test_no_group_exceeds_its_cap_counting_running_tasks(state: Any) -> None:
    tasks, workers, groups = state
    p = plan(tasks, workers, groups, NOW)
    by_id = {t.id: t for t in tasks}
    for g, cap in groups.items():
        running = sum(t.status is S.RUNNING and t.group == g for t in tasks)
        new = sum(by_id[a.task_id].group == g for a in p.assignments)
        assert new == 0 or running + new <= cap


@given(states())
@PROPERTY
def test_groups_start_eligible_tasks_in_arrival_order(state: Any) -> None:
    tasks, workers, groups = state
    by_id = {t.id: t for t in tasks}
    p = plan(tasks, workers, groups, NOW)
    chosen = set(started(p))
    for t in (by_id[i] for i in chosen):
        earlier = [
            u for u in tasks
            if u.group is not None and u.group == t.group and (u.seq, u.id) < (t.seq, t.id) and eligible(u, by_id, workers)
        ]
        assert all(u.id in chosen for u in earlier)


@given(states())
@PROPERTY
def test_every_pending_task_is_assigned_blocked_or_waiting_exactly_once(state: Any) -> None:
    tasks, workers, groups = state
    p = plan(tasks, workers, groups, NOW)
    outcomes = started(p) + [b.task_id for b in p.blocked] + list(p.waiting)
    assert sorted(outcomes) == sorted(t.id for t in tasks if t.status is S.PENDING)
    assert set(p.unblocked) <= {t.id for t in tasks if t.status is S.BLOCKED}
    future = [t.not_before for t in tasks if t.id in p.waiting and t.not_before > NOW]
    assert p.next_wakeup == min(future, default=None)


@given(states(), st.randoms(use_true_random=False))
@PROPERTY
def test_plan_is_deterministic_whatever_the_input_order(state: Any, rnd: random.Random) -> None:
    tasks, workers, groups = state
    first = plan(tasks, workers, groups, NOW)
    assert plan(tasks, workers, groups, NOW) == first
    rnd.shuffle(tasks)
    rnd.shuffle(workers)
    assert plan(tasks, workers, groups, NOW) == first


# ---------------------------------------------------------------- Agents: CLIs and usage-limit pauses


def test_a_worker_lacking_the_agents_cli_gets_none_of_its_tasks() -> None:
    workers = [worker("a", agents=frozenset({"claude"}), lacking={"claude": "claude"}),
               worker("b", agents=frozenset({"claude"}))]
    assert plan([task("t", agent="claude")], workers, {}, NOW).assignments == (Assignment("t", "b"),)


def test_a_task_whose_cli_no_worker_has_waits_saying_how_to_fix_it() -> None:
    workers = [worker("a", agents=frozenset({"claude"}), lacking={"claude": "claude"})]
    p = plan([task("t", agent="claude")], workers, {}, NOW)
    assert p.assignments == ()
    assert p.waiting["t"] == ("no Worker has the claude CLI (Agent 'claude'): install it on a Worker's PATH "
                              "or set agents.claude.path")


def test_an_agent_paused_everywhere_starts_nothing_until_the_pause_ends() -> None:
    until = 1_795_993_200.0  # 2026-11-29T23:00:00Z
    now = until - 600
    tasks = [task("t", agent="claude"), task("s", 2)]
    workers = [worker("w", slots=2, agents=frozenset({"claude", "shell"}))]
    p = plan(tasks, workers, {}, now, paused={"claude": until})
    assert started(p) == ["s"]
    assert p.waiting["t"] == "Agent 'claude' paused: usage limit until 2026-11-29T23:00:00Z"
    assert p.next_wakeup == until
    # At T it runs on its own.
    assert started(plan(tasks, workers, {}, until, paused={"claude": until})) == ["t", "s"]


def test_an_agent_paused_on_one_worker_runs_on_another() -> None:
    workers = [worker("a", agents=frozenset({"claude"}), paused={"claude": NOW + 60}),
               worker("b", agents=frozenset({"claude"}))]
    assert plan([task("t", agent="claude")], workers, {}, NOW).assignments == (Assignment("t", "b"),)


def test_an_agent_paused_on_every_worker_that_could_run_it_waits_for_the_first_end() -> None:
    workers = [worker("a", agents=frozenset({"claude"}), paused={"claude": NOW + 60}),
               worker("b", agents=frozenset({"claude"}), paused={"claude": NOW + 30})]
    p = plan([task("t", agent="claude")], workers, {}, NOW)
    assert p.assignments == ()
    assert p.waiting["t"].startswith("Agent 'claude' paused: usage limit until ")
    assert p.next_wakeup == NOW + 30
    assert plan([task("t", agent="claude")], workers, {}, NOW + 30).assignments == (Assignment("t", "b"),)


def test_a_pause_of_another_agent_changes_nothing() -> None:
    p = plan([task("t")], [worker("w")], {}, NOW, paused={"claude": NOW + 60})
    assert started(p) == ["t"] and p.next_wakeup is None
