"""Which Tasks `taskrun status` shows (status_query.py), in the daemon and without one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskrunner.model import RunStatus, TaskSpec, TaskStatus
from taskrunner.state import RunState, TaskState
from taskrunner.status_query import StatusQuery, answer, is_glob, record_key, select


def record(task_id: str, status: str, seq: int, updated: float = 0.0) -> dict[str, Any]:
    return {"task_id": task_id, "status": status, "seq": seq, "updated_at": updated, "runs": []}


def ids(chosen: Any) -> list[str]:
    return [r["task_id"] for r in chosen.shown]


BACKLOG = [record(f"done-{n}", "COMPLETED", n, updated=100.0 + n) for n in range(1, 51)] + [
    record("auth/login", "RUNNING", 60), record("auth/logout", "FAILED", 61, updated=10.0),
    record("blocked", "BLOCKED", 62), record("queued", "PENDING", 63), record("bad", "INVALID", 64),
]


def test_the_summary_shows_every_unfinished_task_and_the_latest_finished_ones() -> None:
    chosen = select(BACKLOG, record_key, StatusQuery(limit=3))
    assert ids(chosen) == ["done-48", "done-49", "done-50", "auth/login", "blocked", "queued", "bad"]
    assert chosen.counts == {"BLOCKED": 1, "COMPLETED": 50, "FAILED": 1, "INVALID": 1, "PENDING": 1, "RUNNING": 1}
    assert chosen.total == 55 and chosen.omitted == 48


def test_no_limit_shows_every_task_in_arrival_order() -> None:
    chosen = select(list(reversed(BACKLOG)), record_key, StatusQuery(limit=None))
    assert ids(chosen) == [r["task_id"] for r in BACKLOG] and chosen.omitted == 0


def test_globs_and_statuses_filter_and_counts_follow_them() -> None:
    chosen = select(BACKLOG, record_key, StatusQuery(("auth/*",), limit=None))
    assert ids(chosen) == ["auth/login", "auth/logout"] and chosen.counts == {"FAILED": 1, "RUNNING": 1}
    chosen = select(BACKLOG, record_key, StatusQuery(("done-4?", "queued"), frozenset({"PENDING"}), None))
    assert ids(chosen) == ["queued"] and chosen.total == 1
    chosen = select(BACKLOG, record_key, StatusQuery(statuses=frozenset({"FAILED", "COMPLETED"}), limit=1))
    assert ids(chosen) == ["done-50"] and chosen.total == 51 and chosen.omitted == 50


def test_a_pattern_matches_the_whole_id_and_star_crosses_slashes() -> None:
    query = StatusQuery(("a*",), limit=None)
    assert query.matches("auth/login/x", "PENDING") and not query.matches("xauth", "PENDING")
    assert not StatusQuery(("auth",), limit=None).matches("auth/login", "PENDING")
    assert is_glob("auth/*") and is_glob("t-[0-9]") and is_glob("t?") and not is_glob("auth/login")


def test_records_with_odd_values_sort_last_instead_of_failing() -> None:
    odd = [{"task_id": "z", "status": "UNKNOWN", "error": "unreadable", "runs": []},
           {"task_id": "y", "status": "PENDING", "seq": "7", "updated_at": True}, record("a", "PENDING", 3)]
    assert ids(select(odd, record_key, StatusQuery())) == ["a", "y", "z"]


@pytest.mark.parametrize("payload", [
    {"patterns": "auth/*"}, {"patterns": [1]}, {"patterns": [""]}, {"patterns": ["x"] * 101},
    {"statuses": ["DONE"]}, {"statuses": "PENDING"}, {"limit": -1}, {"limit": "5"}, {"limit": True},
])
def test_a_malformed_request_is_refused_with_its_reason(payload: dict[str, Any]) -> None:
    reply = answer([], {}, {"command": "status", **payload})
    assert reply["ok"] is False and reply["error"].startswith("bad status request: ")


def test_the_daemon_answers_from_its_state_with_unusable_files_as_invalid() -> None:
    tasks = [TaskState(f"t-{n}", f"tasks/t-{n}.md", n, TaskStatus.COMPLETED, updated_at=float(n)) for n in range(1, 6)]
    tasks.append(TaskState("live", "tasks/live.md", 9, TaskStatus.PENDING, waiting="no Worker has a free slot"))
    reply = answer(tasks, {"tasks/.x/BAD.md": "tasks/.x/BAD.md: upper case"},
                   {"command": "status", **StatusQuery(limit=2).as_payload()})
    assert reply["ok"] and [t["task_id"] for t in reply["tasks"]] == ["t-4", "t-5", "live", "tasks/.x/BAD.md"]
    assert reply["tasks"][2] == tasks[-1].record()
    assert reply["counts"] == {"COMPLETED": 5, "INVALID": 1, "PENDING": 1} and reply["omitted"] == 3
    json.dumps(reply)  # goes over the socket as one JSON line


def test_encoded_rows_are_the_records_as_status_json_writes_them() -> None:
    tasks = [TaskState(f"t-{n}", f"tasks/t-{n}.md", n, TaskStatus.COMPLETED, updated_at=float(n)) for n in range(1, 6)]
    tasks[0].error = "é \u2028 \"q\""
    plain = answer(tasks, {"tasks/.x.md": "hidden"}, {"limit": 2})
    coded = answer(tasks, {"tasks/.x.md": "hidden"}, {"limit": 2, "encoded": True})
    assert "tasks" not in coded and coded["rows"] == [json.dumps(t, sort_keys=True) for t in plain["tasks"]]
    assert {k: v for k, v in coded.items() if k != "rows"} == {k: v for k, v in plain.items() if k != "tasks"}
    every = {"limit": None, "encoded": True}
    assert answer(tasks, {}, every)["rows"] == [json.dumps(t.record(), sort_keys=True) for t in tasks]


def test_a_tasks_row_is_made_afresh_whenever_what_its_record_shows_changes() -> None:
    """The daemon keeps each Task's row between answers (TaskState.row); no change may go unseen."""
    task = TaskState("t", "tasks/t.md", 1, TaskStatus.PENDING)

    def fresh() -> bool:
        return task.row() == json.dumps(task.record(), sort_keys=True)

    first = task.row()
    assert fresh() and task.row() is first  # nothing changed: the same text, not made again
    changes = [
        lambda: setattr(task, "waiting", "no Worker has a free slot"),
        lambda: task.move(TaskStatus.RUNNING),
        lambda: task.runs.append(RunState("r1", "t", 1, "rev", 1, "w1", "shell", RunStatus.RUNNING)),
        lambda: setattr(task.runs[0], "status", RunStatus.COMPLETED),
        lambda: setattr(task.runs[0], "worker", "w2"),
        lambda: setattr(task.runs[0], "revision", "rev2"),
        lambda: task.runs.__setitem__(0, RunState("r9", "t", 1, "rev2", 1, "w2", "shell", RunStatus.COMPLETED)),
        lambda: setattr(task, "updated_at", 5.0),
        lambda: setattr(task, "spec", TaskSpec("t", "tasks/t.md", "rev2", "A title", "body")),
        lambda: task.runs.clear(),
    ]
    for change in changes:
        before = task.row()
        change()
        assert fresh() and task.row() != before
