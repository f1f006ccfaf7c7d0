"""Statuses and their transition tables."""

from __future__ import annotations

import pytest

from taskrunner.errors import TaskrunError, TransitionError
from taskrunner.model import RunStatus, TaskStatus

T, R = TaskStatus, RunStatus

TASK_ALLOWED = [
    (T.PENDING, T.RUNNING), (T.PENDING, T.BLOCKED), (T.PENDING, T.CANCELLED), (T.PENDING, T.INVALID),
    (T.RUNNING, T.COMPLETED), (T.RUNNING, T.FAILED), (T.RUNNING, T.CANCELLED), (T.RUNNING, T.PENDING),
    (T.RUNNING, T.INVALID),
    (T.COMPLETED, T.PENDING), (T.FAILED, T.PENDING), (T.CANCELLED, T.PENDING),
    (T.COMPLETED, T.INVALID), (T.FAILED, T.BLOCKED), (T.CANCELLED, T.BLOCKED),
    (T.BLOCKED, T.PENDING), (T.BLOCKED, T.CANCELLED), (T.BLOCKED, T.INVALID),
    (T.INVALID, T.PENDING), (T.INVALID, T.CANCELLED),
]
TASK_FORBIDDEN = [
    (T.PENDING, T.COMPLETED), (T.PENDING, T.FAILED),
    (T.COMPLETED, T.RUNNING), (T.FAILED, T.RUNNING), (T.CANCELLED, T.RUNNING),
    (T.COMPLETED, T.FAILED), (T.FAILED, T.COMPLETED), (T.COMPLETED, T.CANCELLED),
    (T.BLOCKED, T.RUNNING), (T.BLOCKED, T.COMPLETED),
    (T.INVALID, T.RUNNING), (T.INVALID, T.COMPLETED),
    (T.RUNNING, T.BLOCKED),
]
RUN_ALLOWED = [
    (R.PENDING, R.ASSIGNED), (R.PENDING, R.CANCELLED), (R.PENDING, R.FAILED),
    (R.ASSIGNED, R.RUNNING), (R.ASSIGNED, R.COMPLETED), (R.ASSIGNED, R.FAILED), (R.ASSIGNED, R.CANCELLED),
    (R.RUNNING, R.COMPLETED), (R.RUNNING, R.FAILED), (R.RUNNING, R.CANCELLED),
]
RUN_FORBIDDEN = [
    (R.COMPLETED, R.RUNNING), (R.COMPLETED, R.FAILED), (R.COMPLETED, R.PENDING),
    (R.FAILED, R.RUNNING), (R.FAILED, R.COMPLETED), (R.FAILED, R.ASSIGNED),
    (R.CANCELLED, R.RUNNING), (R.CANCELLED, R.COMPLETED),
    (R.PENDING, R.RUNNING), (R.PENDING, R.COMPLETED),
    (R.RUNNING, R.PENDING), (R.RUNNING, R.ASSIGNED), (R.ASSIGNED, R.PENDING),
]


@pytest.mark.parametrize(("old", "new"), TASK_ALLOWED, ids=lambda s: s.value)
def test_an_allowed_task_transition_returns_the_new_status(old: TaskStatus, new: TaskStatus) -> None:
    assert old.to(new) is new


@pytest.mark.parametrize(("old", "new"), TASK_FORBIDDEN, ids=lambda s: s.value)
def test_a_forbidden_task_transition_raises_transition_error(old: TaskStatus, new: TaskStatus) -> None:
    with pytest.raises(TransitionError, match=f"from {old.value} to {new.value}"):
        old.to(new)


@pytest.mark.parametrize(("old", "new"), RUN_ALLOWED, ids=lambda s: s.value)
def test_an_allowed_run_transition_returns_the_new_status(old: RunStatus, new: RunStatus) -> None:
    assert old.to(new) is new


@pytest.mark.parametrize(("old", "new"), RUN_FORBIDDEN, ids=lambda s: s.value)
def test_a_forbidden_run_transition_raises_transition_error(old: RunStatus, new: RunStatus) -> None:
    with pytest.raises(TransitionError, match=f"from {old.value} to {new.value}"):
        old.to(new)


def test_a_completed_run_cannot_go_back_to_running() -> None:
    with pytest.raises(TransitionError):
        RunStatus.COMPLETED.to(RunStatus.RUNNING)


def test_a_pending_task_cannot_jump_to_completed() -> None:
    with pytest.raises(TransitionError):
        TaskStatus.PENDING.to(TaskStatus.COMPLETED)


@pytest.mark.parametrize("final", [R.COMPLETED, R.FAILED, R.CANCELLED])
def test_a_final_run_status_allows_no_transition_to_another_status(final: RunStatus) -> None:
    for other in RunStatus:
        if other is not final:
            with pytest.raises(TransitionError):
                final.to(other)


@pytest.mark.parametrize("status", list(TaskStatus) + list(RunStatus), ids=lambda s: f"{type(s).__name__}.{s.value}")
def test_staying_in_the_same_status_is_always_allowed(status: TaskStatus | RunStatus) -> None:
    assert status.to(status) is status  # type: ignore[arg-type]


def test_transition_error_belongs_to_the_taskrun_exception_tree() -> None:
    assert issubclass(TransitionError, TaskrunError)


def test_run_final_statuses_are_completed_failed_and_cancelled() -> None:
    assert {s for s in RunStatus if s.final} == {R.COMPLETED, R.FAILED, R.CANCELLED}


def test_task_final_statuses_are_the_settled_ones_including_blocked_and_invalid() -> None:
    assert {s for s in TaskStatus if s.final} == {T.COMPLETED, T.FAILED, T.CANCELLED, T.BLOCKED, T.INVALID}
    assert not T.PENDING.final
    assert not T.RUNNING.final


def test_statuses_are_upper_case_strings_as_in_the_files() -> None:
    assert RunStatus("COMPLETED") is R.COMPLETED
    assert TaskStatus.BLOCKED == "BLOCKED"
    assert all(s.value == s.value.upper() == s.name for s in list(TaskStatus) + list(RunStatus))


def test_every_run_path_from_pending_reaches_a_final_status() -> None:
    # Every non-final Run status can reach some final status through allowed steps.
    for start in RunStatus:
        frontier, seen = [start], {start}
        while frontier:
            status = frontier.pop()
            for nxt in RunStatus:
                if nxt not in seen:
                    try:
                        status.to(nxt)
                    except TransitionError:
                        continue
                    seen.add(nxt)
                    frontier.append(nxt)
        assert any(s.final for s in seen), start
