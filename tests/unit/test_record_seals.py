"""Records the daemon did not write are never believed; its Run directories are its own; ids map one to one."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskrunner.cli.status import from_records
from taskrunner.status_query import StatusQuery
from taskrunner.cli.submit import _final_record
from taskrunner.errors import ForeignRecord, RecordError
from taskrunner.keys import RECORD_KEY_FILE
from taskrunner.model import MAX_TASK_ID_CHARS, MAX_TASK_ID_PART_CHARS, RECORD_NAMES
from taskrunner.records import SEAL_KEY, Records
from taskrunner.taskfile import parse_task, task_id_for, task_id_problem

TASK = {"task_id": "check", "status": "COMPLETED", "revision": "abc", "runs": [{"run": 1}]}
RUN = {"task_id": "check", "run": 1, "status": "COMPLETED", "run_id": "r1"}


@pytest.fixture()
def notices() -> list[str]:
    return []


@pytest.fixture()
def records(tmp_path: Path, notices: list[str]) -> Records:
    root = tmp_path / "repo"
    root.mkdir()
    return Records(root, notices.append)


def key_file(records: Records) -> Path:
    return records.root / ".git" / "taskrun" / RECORD_KEY_FILE


# ---------------------------------------------------------------- seals


def test_a_record_the_daemon_wrote_is_sealed_and_loads_back_without_its_seal(records: Records) -> None:
    records.save_task(TASK)
    records.save_run(RUN)
    on_disk = json.loads(records.task_file("check").read_text())
    assert isinstance(on_disk[SEAL_KEY], str) and len(on_disk[SEAL_KEY]) == 64
    assert records.load_task("check") == TASK
    assert records.load_run("check", 1) == RUN


def test_the_record_key_is_private_local_and_made_on_first_write(records: Records) -> None:
    assert records.load_task("check") is None
    assert not key_file(records).exists()  # reading makes no key
    records.save_task(TASK)
    assert stat.S_IMODE(key_file(records).stat().st_mode) == 0o600
    assert len(key_file(records).read_bytes()) == 32


def test_a_hand_written_record_is_not_believed(records: Records) -> None:
    records.save_task({**TASK, "task_id": "other"})  # the clone has a key
    path = records.task_file("check")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(TASK))
    with pytest.raises(ForeignRecord, match=r"runs/check/status.json was not written by this daemon \(no valid seal\)"):
        records.load_task("check")


@pytest.mark.parametrize("change", [{"status": "FAILED"}, {"revision": "other"}, {"extra": 1}, {SEAL_KEY: "0" * 64}])
def test_a_changed_sealed_record_is_not_believed(records: Records, change: dict[str, object]) -> None:
    records.save_task({**TASK, "status": "FAILED"})
    path = records.task_file("check")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **change, "status": data["status"] if "status" not in change else "x"}))
    with pytest.raises(ForeignRecord):
        records.load_task("check")


def test_a_sealed_record_moved_to_another_path_is_not_believed(records: Records) -> None:
    records.save_task({**TASK, "task_id": "other"})
    records.task_file("check").parent.mkdir(parents=True)
    shutil.copy(records.task_file("other"), records.task_file("check"))
    records.save_run(RUN)
    (records.run_dir("check", 2)).mkdir()
    shutil.copy(records.run_dir("check", 1) / "status.json", records.run_dir("check", 2) / "status.json")
    with pytest.raises(ForeignRecord):
        records.load_task("check")
    with pytest.raises(ForeignRecord):
        records.load_run("check", 2)


def test_records_another_clone_sealed_are_not_believed(tmp_path: Path, records: Records) -> None:
    other = Records(tmp_path / "other-clone")
    other.save_task(TASK)
    records.save_task({**TASK, "task_id": "mine"})
    shutil.copytree(other.runs / "check", records.runs / "check")
    with pytest.raises(ForeignRecord):
        records.load_task("check")


def test_without_a_record_key_nothing_under_runs_is_believed(tmp_path: Path, records: Records) -> None:
    other = Records(tmp_path / "other-clone")
    other.save_task(TASK)
    shutil.copytree(other.runs, records.runs)
    with pytest.raises(ForeignRecord):
        records.load_task("check")
    assert not key_file(records).exists()


def test_a_damaged_record_key_is_a_record_error_that_says_what_to_do(records: Records) -> None:
    records.save_task(TASK)
    key_file(records).write_bytes(b"short")
    with pytest.raises(RecordError, match="damaged"):
        Records(records.root).load_task("check")


@pytest.mark.parametrize("kind", ["link to a sealed record", "link outside", "fifo", "directory"])
def test_a_record_that_is_not_a_regular_file_is_not_believed(records: Records, tmp_path: Path, kind: str) -> None:
    records.save_task({**TASK, "task_id": "real"})
    path = records.task_file("check")
    path.parent.mkdir(parents=True)
    if kind == "link to a sealed record":
        path.symlink_to("../real/status.json")
    elif kind == "link outside":
        path.symlink_to(tmp_path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(ForeignRecord, match="cannot read runs/check/status.json"):
        records.load_task("check")


def test_a_record_written_over_a_link_replaces_the_link(records: Records, tmp_path: Path,
                                                        notices: list[str]) -> None:
    target = tmp_path / "config"
    target.write_text("[core]\n")
    records.task_file("check").parent.mkdir(parents=True)
    records.task_file("check").symlink_to(target)
    records.save_task(TASK)
    assert target.read_text() == "[core]\n"
    assert records.load_task("check") == TASK
    assert notices == ["runs/check/status.json was a symbolic link, which taskrun never follows: removed it and "
                       "put a regular file of its own there"]


@pytest.mark.parametrize("link", ["runs", "runs/check", "runs/check/run-1"])
def test_a_linked_directory_on_a_record_path_is_replaced_by_the_daemons_own(
        records: Records, tmp_path: Path, notices: list[str], link: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = records.root / link
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(elsewhere)
    records.save_task(TASK)
    records.save_run(RUN)
    records.append_output("check", 1, 0, b"out")
    assert list(elsewhere.iterdir()) == []
    assert records.load_run("check", 1) == RUN
    assert any(n.startswith(f"{link} was a symbolic link") for n in notices)


def test_status_lists_only_believed_records_and_says_which_it_ignored(records: Records) -> None:
    records.save_task({**TASK, "task_id": "mine", "seq": 1})
    records.task_file("check").parent.mkdir(parents=True)
    records.task_file("check").write_text(json.dumps(TASK))
    ignored: list[str] = []
    shown = from_records(records, StatusQuery(limit=None), ignored).shown
    assert [t["task_id"] for t in shown] == ["mine"]
    assert ignored == ["runs/check/status.json was not written by this daemon (no valid seal); ignored"]


def test_submit_wait_does_not_take_a_forged_completed_record_for_an_answer(records: Records) -> None:
    records.save_task({**TASK, "task_id": "mine"})
    records.task_file("check").parent.mkdir(parents=True)
    records.task_file("check").write_text(json.dumps(TASK))
    ignored: list[str] = []
    assert _final_record(records, "check", TASK["revision"], ignored) is None
    assert ignored == ["runs/check/status.json was not written by this daemon (no valid seal); ignored"]


# ---------------------------------------------------------------- Run directories are the daemon's own


def test_output_committed_into_a_run_directory_is_not_taken_for_recorded_output(records: Records,
                                                                                notices: list[str]) -> None:
    foreign = records.output("check", 1)
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"AAAA pushed by someone else\n")
    (foreign.parent / "summary.md").write_text("not ours\n")

    assert records.append_output("check", 1, 0, b"hello\n") == 6

    assert foreign.read_bytes() == b"hello\n"
    assert sorted(os.listdir(foreign.parent)) == ["output.log"]
    assert notices and "held files this daemon did not write (output.log, summary.md)" in notices[0]


def test_a_restarted_daemon_keeps_the_output_of_its_own_run_directory(records: Records) -> None:
    records.save_run({**RUN, "status": "RUNNING"})
    records.append_output("check", 1, 0, b"first ")
    restarted = Records(records.root)
    assert restarted.append_output("check", 1, 6, b"second") == 12
    assert records.output("check", 1).read_bytes() == b"first second"


def test_output_log_that_is_a_link_is_replaced_and_never_appended_through(records: Records, tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_text("[core]\n")
    records.save_run({**RUN, "status": "RUNNING"})
    records.output("check", 1).symlink_to(target)
    assert records.output_size("check", 1) == 0
    assert records.read_output("check", 1) is None
    assert records.output_digest("check", 1)[0] == 0
    assert records.append_output("check", 1, 0, b"core.fsmonitor = evil\n") == 22
    assert target.read_text() == "[core]\n"


def test_run_taken_sees_anything_at_a_run_directory_path(records: Records, tmp_path: Path) -> None:
    assert not records.run_taken("check", 1)
    records.runs.joinpath("check").mkdir(parents=True)
    records.run_dir("check", 1).symlink_to(tmp_path)
    records.run_dir("check", 2).write_text("a file")
    assert records.run_taken("check", 1) and records.run_taken("check", 2) and not records.run_taken("check", 3)


# ---------------------------------------------------------------- the layout: ids map to records one to one


@pytest.mark.parametrize("name", [*RECORD_NAMES, "run-1", "run-12"])
def test_a_task_id_part_named_like_a_record_file_is_unusable(name: str) -> None:
    for task_id in (f"a/{name}", name, f"{name}/b"):
        assert task_id_for(f"tasks/{task_id}.md") == task_id
        assert "reserved" in (task_id_problem(task_id) or "")


def test_task_ids_over_the_length_limits_are_unusable() -> None:
    assert task_id_problem("a" * MAX_TASK_ID_PART_CHARS) is None
    assert "over the limit" in (task_id_problem("a" * (MAX_TASK_ID_PART_CHARS + 1)) or "")
    long_id = "/".join(["b" * 90] * 3)
    assert len(long_id) > MAX_TASK_ID_CHARS and "over the limit" in (task_id_problem(long_id) or "")
    assert "over the limit" in (task_id_problem("/".join(["c" * 190] * 20)) or "")


def test_a_dependency_on_an_unusable_id_is_refused() -> None:
    with pytest.raises(Exception, match="can never be a Task"):
        parse_task("t", "tasks/t.md", b"---\ndepends_on: [a/status.json]\n---\n# t\nbody\n")


def test_records_refuse_an_unusable_task_id(records: Records) -> None:
    with pytest.raises(RecordError, match="not a Task id"):
        records.save_task({**TASK, "task_id": "a/run-1"})
    assert records.load_task("../x") is None and records.load_task("a/status.json") is None


def _owned(task_id: str) -> set[str]:
    """The paths that are one Task's alone (two Runs stand for all): its files, temp files and Run directories."""
    base = f"runs/{task_id}"
    owned = {f"{base}/status.json", f"{base}/.status.json.1.2.tmp"}
    for n in (1, 2):
        owned |= {f"{base}/run-{n}"} | {f"{base}/run-{n}/{name}" for name in RECORD_NAMES}
    return owned


def _clash(a: str, b: str) -> bool:
    """True when a path of `b` (its directory included) is one of `a`'s own or lies inside one."""
    theirs = _owned(b) | {f"runs/{b}"}
    return any(q == p or q.startswith(p + "/") for p in _owned(a) for q in theirs)


_PART = st.sampled_from(["a", "b", "run-1", "run-2", "x.md", *RECORD_NAMES])


@given(st.lists(_PART, min_size=1, max_size=3), st.lists(_PART, min_size=1, max_size=3))
def test_no_usable_task_s_record_path_is_another_task_s(first: list[str], second: list[str]) -> None:
    a, b = "/".join(first), "/".join(second)
    if a == b or task_id_problem(a) or task_id_problem(b):
        return
    assert not _clash(a, b) and not _clash(b, a)


def test_the_clash_the_reserved_names_prevent_is_real() -> None:
    assert _clash("a", "a/status.json") and _clash("a", "a/run-1") and not _clash("a", "a/b")


def test_a_fresh_clone_of_a_repository_believes_no_record_it_holds(tmp_path: Path) -> None:
    """The records are committed; the key is not: a clone starts with none of them believed."""
    origin = tmp_path / "origin"
    origin.mkdir()
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    Records(origin).save_task(TASK)
    subprocess.run(["git", "-C", str(origin), "add", "-A"], check=True)
    tracked = subprocess.run(["git", "-C", str(origin), "ls-files"], check=True, capture_output=True,
                             text=True).stdout.split()
    assert tracked == ["runs/check/status.json"]  # the key lives in .git/taskrun/, never tracked
    clone = tmp_path / "clone"
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "-C", str(origin), "commit", "-qm", "r"],
                   check=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    with pytest.raises(ForeignRecord):
        Records(clone).load_task("check")
    # Copying the origin's .git/taskrun/ along (moving the daemon) carries its key: then they are believed.
    shutil.copytree(origin / ".git" / "taskrun", clone / ".git" / "taskrun")
    assert Records(clone).load_task("check") == TASK
