"""The record index (record_index.py): a start reads only changed records, and the index never wins over runs/."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from taskrunner import record_index, restore
from taskrunner.errors import ForeignRecord
from taskrunner.gitops import state_dir
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.record_index import INDEX_NAME, RecordIndex
from taskrunner.records import Records
from taskrunner.state import RunState, TaskState


def seed(records: Records, count: int, runs: int = 1, updated: float = 1_000.0) -> None:
    """`count` finished Tasks t-<n>, each with `runs` COMPLETED Runs, sealed as the daemon writes them."""
    for n in range(count):
        task_id = f"t-{n}"
        states = [RunState(run_id=f"{n}-{k}", task_id=task_id, number=k, revision="r", attempt=k, worker="local",
                           agent="shell", status=RunStatus.COMPLETED, created_at=updated, exit_code=0)
                  for k in range(1, runs + 1)]
        for run in states:
            records.save_run(run.record())
        records.save_task(TaskState(task_id, f"tasks/{task_id}.md", n + 1, TaskStatus.COMPLETED, revision="r",
                                    attempts=runs, runs=states, updated_at=updated + n).record())


def summary(tasks: list[TaskState]) -> list[tuple[str, str, list[tuple[int, str, str]]]]:
    return [(t.id, t.status.value, [(r.number, r.status.value, r.run_id) for r in t.runs]) for t in tasks]


@pytest.fixture()
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Records:
    # Records written just before the index are read again (the racy rule, tested on its own below):
    # without the window, a test need not wait for the clock to move on.
    monkeypatch.setattr(record_index, "RACY_NS", 0)
    made = Records(tmp_path)
    seed(made, 5, runs=2)
    return made


def read(records: Records) -> tuple[list[TaskState], list[str], RecordIndex]:
    index = RecordIndex(records, state_dir(records.root))
    index.load()
    tasks, foreign, _ = restore.read_tasks(index, lambda message: None)
    index.save()
    return tasks, foreign, index


def test_a_missing_index_is_built_and_the_next_start_reads_no_record(records: Records) -> None:
    direct, _, _ = restore.read_tasks(records, lambda message: None)
    first, _, index = read(records)
    assert not index.loaded and index.misses > 0
    assert (state_dir(records.root) / INDEX_NAME).stat().st_mode & 0o777 == 0o600
    second, foreign, index = read(records)
    assert index.loaded and index.misses == 0 and index.hits == 15  # 5 Task records, 10 Run records
    assert summary(first) == summary(second) == summary(direct) and foreign == []
    assert [t.record() for t in second] == [t.record() for t in direct]


def test_a_record_the_daemon_rewrote_is_read_again(records: Records) -> None:
    read(records)
    task = records.load_task("t-1")
    assert task is not None
    records.save_task({**task, "status": "FAILED", "error": "again"})
    tasks, _, index = read(records)
    # Only that record (and the listing of its directory, where the rename happened) is read again.
    assert {t.id: t.status.value for t in tasks}["t-1"] == "FAILED" and index.hits == 14 and index.misses == 2


def test_a_record_replaced_behind_the_index_is_never_believed_even_with_its_times_and_size(records: Records) -> None:
    read(records)
    path = records.task_file("t-2")
    before = os.lstat(path)
    # Someone else's record, the same size, its times put back: only the ctime gives it away.
    forged = json.dumps({"task_id": "t-2", "status": "COMPLETED", "pad": ""}).encode()
    forged = forged.replace(b'""', b'"' + b"x" * (before.st_size - len(forged)) + b'"')
    with open(path, "r+b") as handle:
        handle.write(forged)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    tasks, foreign, _ = read(records)
    assert "t-2" not in {t.id for t in tasks}
    assert any("runs/t-2/status.json was not written by this daemon" in m for m in foreign)


def test_a_run_record_swapped_for_a_link_is_refused_as_without_an_index(records: Records, tmp_path: Path) -> None:
    read(records)
    target = records.run_dir("t-3", 2) / "status.json"
    elsewhere = tmp_path / "elsewhere.json"
    os.rename(target, elsewhere)
    os.symlink(elsewhere, target)
    tasks, foreign, _ = read(records)
    assert [r.number for r in {t.id: t for t in tasks}["t-3"].runs] == [1]
    assert any("run-2/status.json" in m for m in foreign)
    with pytest.raises(ForeignRecord):
        RecordIndex(records, state_dir(records.root)).load_run("t-3", 2)


def test_a_new_task_directory_and_a_new_run_directory_are_found(records: Records) -> None:
    read(records)
    seed_one = Records(records.root)
    run = RunState(run_id="new", task_id="t-0", number=3, revision="r", attempt=3, worker="local", agent="shell",
                   status=RunStatus.RUNNING)
    seed_one.save_run(run.record())  # the Task record does not list it yet (RECORD_LAG_SECONDS)
    seed_one.save_task(TaskState("nested/x", "tasks/nested/x.md", 50, TaskStatus.PENDING).record())
    tasks, _, _ = read(records)
    by_id = {t.id: t for t in tasks}
    assert "nested/x" in by_id
    assert [r.number for r in by_id["t-0"].runs] == [1, 2, 3]
    assert summary(tasks) == summary(restore.read_tasks(records, lambda message: None)[0])


def test_a_deleted_task_is_gone(records: Records) -> None:
    read(records)
    for path in sorted(records.runs.joinpath("t-4").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    records.runs.joinpath("t-4").rmdir()
    tasks, _, _ = read(records)
    assert "t-4" not in {t.id for t in tasks} and len(tasks) == 4


@pytest.mark.parametrize("content", [
    b"", b"garbage", b"0" * 64 + b"\n{}", b"\xff\xfe\n\n", json.dumps({"version": 1}).encode(),
])
def test_a_corrupt_or_forged_index_is_ignored_and_rebuilt(records: Records, content: bytes) -> None:
    read(records)
    path = state_dir(records.root) / INDEX_NAME
    path.write_bytes(content)
    tasks, foreign, index = read(records)
    assert not index.loaded and len(tasks) == 5 and foreign == []
    assert RecordIndex(records, state_dir(records.root)).load()


def test_an_index_that_is_a_link_is_not_followed(records: Records, tmp_path: Path) -> None:
    read(records)
    path = state_dir(records.root) / INDEX_NAME
    os.rename(path, tmp_path / "moved")
    os.symlink(tmp_path / "moved", path)
    assert not RecordIndex(records, state_dir(records.root)).load()


def sealed(records: Records, body: bytes) -> None:
    """Write `body` as the index, sealed with this clone's record key (as only taskrun itself could)."""
    key = (state_dir(records.root) / "record.key").read_bytes()
    mac = hmac.new(key, b"taskrun-record-index-v2\0" + body, hashlib.sha256).hexdigest().encode()
    (state_dir(records.root) / INDEX_NAME).write_bytes(mac + b"\n" + body)


def stored_prints(records: Records) -> dict[str, bytes]:
    """The fingerprints (40 bytes each) the index written last holds: "task:<id>" and "dir:<path>"."""
    raw = (state_dir(records.root) / INDEX_NAME).read_bytes()
    lines = raw.split(b"\n", 4)
    head = json.loads(lines[1])
    at = sum(len(line) + 1 for line in lines[:4])
    names = [f"task:{i}" for i in head["tasks"]["ids"]] + [f"dir:{p}" for p in head["dirs"]["paths"]]
    return {name: raw[at + 40 * n:at + 40 * (n + 1)] for n, name in enumerate(names)}


def test_an_index_sealed_with_our_key_but_holding_nonsense_crashes_nothing(records: Records) -> None:
    """Shapes that are wrong (a bug in an older version, say) make entries misses, never a crash: here
    with the real fingerprints of t-0, t-1, runs/ and runs/t-0, so that their wrong values are looked at."""
    read(records)
    real = stored_prints(records)
    head = {"version": 3, "stamp": 5, "run_fields": list(record_index.RUN_FIELDS),
            "tasks": {"ids": ["t-0", "t-1", "t-2", "t-3", 5], "status": ["COMPLETED", 7, None, "COMPLETED", "x"],
                      "updated": [1.0, 1.0, None, 1.0, 1.0], "seq": [1, 1, None, 1, 1],
                      "text": [0, 1, "a", None, 0, 0, 0, 99, -5, 3]},
            "dirs": {"paths": ["runs", "runs/t-0", "runs/t-1"], "subdirs": [["../x"], "x", []],
                     "status": [True, 3, True], "runs": [[], {}, None]},
            "prints": 8}
    prints = (real["task:t-0"] + real["task:t-1"] + b"\0" * 40 + b"\xff" * 40 + b"\n" * 40 + real["dir:runs"]
              + real["dir:runs/t-0"] + real["dir:runs/t-1"])
    rows = b'{"t-0": [[1], []], "t-3": 5, "t-4": [[null, null, null, null, null, null, null, null, null], ["x"]]}'
    for runs in (b'{"t-0/1": [[1], 99, {}]}', b"[", b'{"t-0/1": 5}', b'{"t-0/1": [["x", 1, 2, 3, 4], [1]]}',
                 b'{"t-0/1": [[1, 2, 3, 4, 5], ' + json.dumps(["x"] * len(record_index.RUN_FIELDS)).encode() + b"]}"):
        sealed(records, json.dumps(head).encode() + b"\n" + rows + b"\n" + runs + b"\n" + prints + b"{}")
        index = RecordIndex(records, state_dir(records.root))
        assert index.load()
        untouched = RecordIndex(records, state_dir(records.root))
        assert untouched.load() and untouched.save()  # nothing consulted: what is carried over is checked
        tasks, foreign, _ = restore.read_tasks(index, lambda message: None)
        assert len(tasks) == 5 and foreign == [] and all(len(t.runs) == 2 for t in tasks)
        assert index.save()
        sealed(records, json.dumps(head).encode() + b"\n" + rows + b"\n" + runs + b"\n" + prints + b"{}")
        status = RecordIndex(records, state_dir(records.root))
        assert status.load()
        assert sorted(task_id for task_id, _ in status.summaries()) == [f"t-{n}" for n in range(5)]
        assert status.task_summary("t-1") is None and status.task_text("t-2") is None


@pytest.mark.parametrize("head", [
    {"tasks": {"ids": ["t-0"], "status": [], "updated": [], "seq": [], "text": []}},
    {"dirs": {"paths": ["runs"], "subdirs": [], "status": [True], "runs": [[]]}, "prints": 1},
    {"dirs": {"paths": ["runs"], "subdirs": [[]], "status": [True], "runs": [[]]}, "prints": 2},
    {"prints": 10 ** 9}, {"tasks": {"ids": [["t-0"]], "status": ["COMPLETED"], "updated": [1.0], "seq": [1],
                                    "text": [0, 1]}, "prints": 1},
])
def test_an_index_whose_columns_do_not_fit_together_is_not_used(records: Records, head: dict) -> None:
    read(records)
    empty = {"version": 3, "stamp": 5, "run_fields": list(record_index.RUN_FIELDS),
             "tasks": {"ids": [], "status": [], "updated": [], "seq": [], "text": []},
             "dirs": {"paths": [], "subdirs": [], "status": [], "runs": []}, "prints": 0}
    sealed(records, json.dumps({**empty, **head}).encode() + b"\n{}\n{}\n" + b"\0" * 40)
    assert not RecordIndex(records, state_dir(records.root)).load()
    tasks, foreign, index = read(records)
    assert len(tasks) == 5 and foreign == [] and not index.loaded


def test_another_key_makes_the_index_worthless(records: Records) -> None:
    read(records)
    key_file = state_dir(records.root) / "record.key"
    key_file.write_bytes(os.urandom(len(key_file.read_bytes())))
    index = RecordIndex(Records(records.root), state_dir(records.root))
    assert not index.load()


def test_a_record_written_within_the_racy_window_of_the_index_is_read_again(
        records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_index, "RACY_NS", 3600 * 10**9)  # everything is "just before" the index
    read(records)
    _, _, index = read(records)
    assert index.loaded and index.hits == 0 and index.misses > 0


def test_run_taken_from_the_listing_agrees_with_the_records(records: Records) -> None:
    read(records)
    index = RecordIndex(records, state_dir(records.root))
    index.load()
    list(index.task_ids())
    for number in range(0, 5):
        assert index.run_taken("t-1", number) == records.run_taken("t-1", number)


def test_task_summary_parses_no_record_and_agrees_with_it(records: Records) -> None:
    read(records)
    index = RecordIndex(records, state_dir(records.root))
    index.load()
    assert sorted(index.task_ids()) == sorted(records.task_ids())
    assert index.task_summary("t-3") == ("COMPLETED", 1003.0, 4)
    assert index.task_summary("nope") is None
    assert index.load_task("t-3") == records.load_task("t-3")


def test_an_unchanged_task_is_restored_from_the_index_as_from_its_records(records: Records) -> None:
    """The rows a restart rebuilds Tasks from give the states the records give, a Run not final included."""
    running = RunState(run_id="live", task_id="t-2", number=3, revision="r", attempt=3, worker="local",
                       agent="shell", status=RunStatus.RUNNING, created_at=5.0, started_at=6.0)
    records.save_run(running.record())
    task = records.load_task("t-2")
    assert task is not None
    records.save_task({k: v for k, v in task.items() if k != "runs"} | {
        "status": "PENDING", "runs": [*task["runs"], {"run": 3, "run_id": "live", "status": "RUNNING",
                                                      "worker": "local", "revision": "r"}]})
    read(records)
    index = RecordIndex(records, state_dir(records.root))
    assert index.load()
    assert index.restored("t-2") is not None
    indexed, _, _ = restore.read_tasks(index, lambda message: None)
    direct, _, _ = restore.read_tasks(records, lambda message: None)
    assert index.misses == 0
    assert [(t.record(), [r.record() for r in t.runs]) for t in indexed] == \
        [(t.record(), [r.record() for r in t.runs]) for t in direct]
    assert {t.id: t.status for t in indexed}["t-2"] is TaskStatus.RUNNING


def test_task_text_is_the_record_as_status_json_prints_it(records: Records) -> None:
    read(records)
    index = RecordIndex(records, state_dir(records.root))
    index.load()
    list(index.task_ids())
    assert index.task_text("t-1") == json.dumps(records.load_task("t-1"), sort_keys=True)


def test_an_index_made_for_other_run_fields_reads_every_run_record_again(records: Records) -> None:
    read(records)
    path = state_dir(records.root) / INDEX_NAME
    key = (state_dir(records.root) / "record.key").read_bytes()
    body = path.read_bytes().partition(b"\n")[2]
    head, _, rest = body.partition(b"\n")
    data = json.loads(head)
    data["run_fields"] = [*data["run_fields"], "a_field_of_another_version"]
    body = json.dumps(data).encode() + b"\n" + rest
    path.write_bytes(hmac.new(key, b"taskrun-record-index-v2\0" + body, hashlib.sha256).hexdigest().encode()
                     + b"\n" + body)
    tasks, _, index = read(records)
    assert index.loaded and index.misses == 10 and len(tasks) == 5  # the 10 Run records, not the Tasks
    assert summary(tasks) == summary(restore.read_tasks(records, lambda message: None)[0])
    _, _, index = read(records)
    assert index.misses == 0


@pytest.mark.parametrize("task_status,listed", [(TaskStatus.RUNNING, RunStatus.ASSIGNED),
                                               (TaskStatus.PENDING, None)])
def test_a_task_record_that_trails_its_final_run_is_restored_running_and_named(
        records: Records, task_status: TaskStatus, listed: RunStatus | None) -> None:
    """Written before its latest Run ended (a daemon killed while writing it): RUNNING, for the engine to
    settle from that Run, through the index (a second start) and without it alike."""
    run = RunState(run_id="late", task_id="late", number=1, revision="r", attempt=1, worker="local", agent="shell",
                   status=RunStatus.COMPLETED, exit_code=0)
    records.save_run(run.record())
    in_record = [RunState(**{**run.__dict__, "status": listed})] if listed else []
    records.save_task(TaskState("late", "tasks/late.md", 9, task_status, revision="r", attempts=len(in_record),
                                runs=in_record).record())
    for reading in range(3):  # the records, then the index built, then the index used
        tasks, _, trailing = (restore.read_tasks(records, lambda message: None) if reading == 0
                              else restore.read_indexed(records, state_dir(records.root), lambda message: None))
        late = {t.id: t for t in tasks}["late"]
        assert trailing == ["late"] and late.status is TaskStatus.RUNNING and late.attempts == 1
        assert late.active_run is None and late.runs[-1].status is RunStatus.COMPLETED
    records.save_task(TaskState("late", "tasks/late.md", 9, TaskStatus.COMPLETED, revision="r", attempts=1,
                                runs=[run]).record())
    assert restore.read_indexed(records, state_dir(records.root), lambda message: None)[2] == []


def summaries(records: Records) -> tuple[dict[str, tuple[str, float, int] | None], RecordIndex]:
    index = RecordIndex(records, state_dir(records.root))
    index.load()
    return dict(index.summaries()), index


def test_summaries_of_an_unchanged_tree_agree_with_the_records_and_a_save_after_a_miss_keeps_the_rest(
        records: Records) -> None:
    read(records)
    found, index = summaries(records)
    assert index._verified is not None  # the fast path: no directory changed
    direct = {i: records.load_task(i) for i in records.task_ids()}
    assert found == {i: (r["status"], r["updated_at"], r["seq"]) for i, r in direct.items() if r}
    task = records.load_task("t-2")
    assert task is not None
    os.utime(records.task_file("t-2"))  # rewritten in place: the same inode, new times
    found, index = summaries(records)
    assert found["t-2"] is None and all(found[i] is not None for i in found if i != "t-2")
    assert index.load_task("t-2") == task and index.misses == 1
    assert index.save()
    found, index = summaries(records)
    assert None not in found.values() and index.misses == 0 and len(found) == 5


def test_summaries_find_a_task_directory_made_inside_another_and_a_removed_one(records: Records) -> None:
    read(records)
    nested = RunState(run_id="n", task_id="t-1/sub", number=1, revision="r", attempt=1, worker="local",
                      agent="shell", status=RunStatus.COMPLETED, exit_code=0)
    records.save_run(nested.record())
    records.save_task(TaskState("t-1/sub", "tasks/t-1/sub.md", 9, TaskStatus.COMPLETED, revision="r", attempts=1,
                                runs=[nested], updated_at=5.0).record())
    found, index = summaries(records)
    assert found["t-1/sub"] is None and index.load_task("t-1/sub") is not None
    assert index.save()
    found, _ = summaries(records)
    assert found["t-1/sub"] == ("COMPLETED", 5.0, 9) and len(found) == 6
    for name in os.listdir(records.root / "runs" / "t-3"):
        path = records.root / "runs" / "t-3" / name
        if path.is_dir():
            for inner in os.listdir(path):
                os.unlink(path / inner)
            os.rmdir(path)
        else:
            os.unlink(path)
    os.rmdir(records.root / "runs" / "t-3")
    found, _ = summaries(records)
    assert "t-3" not in found and len(found) == 5
