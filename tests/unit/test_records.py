"""runs/ on disk (records.py) and crash-safe writes (atomic.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from taskrunner import atomic
from taskrunner.errors import ForeignRecord, RecordError
from taskrunner.records import Records

DATA = bytes(range(256)) + b"line\n" * 10


@pytest.fixture()
def records(tmp_path: Path) -> Records:
    return Records(tmp_path)


def output(records: Records) -> bytes:
    return records.output("t", 1).read_bytes()


@pytest.fixture()
def run_dir(records: Records) -> Path:
    path = records.run_dir("t", 1)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- append_output


def test_chunks_in_order_build_the_log_byte_for_byte(records: Records, run_dir: Path) -> None:
    offset = 0
    for size in (1, 7, 100, 0, 50, len(DATA)):
        chunk = DATA[offset:offset + size]
        assert records.append_output("t", 1, offset, chunk) == offset + len(chunk)
        offset += len(chunk)
    assert output(records) == DATA


def test_a_full_disk_while_appending_output_is_a_record_error_not_a_crash(
        records: Records, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(RecordError, match="cannot write runs/t/run-1/output.log: No space left on device"):
        records.write_output("t", 1, 0, b"more than fits")


def test_an_exact_resend_of_recorded_bytes_writes_nothing(records: Records, run_dir: Path) -> None:
    records.append_output("t", 1, 0, DATA[:100])
    assert records.append_output("t", 1, 0, DATA[:100]) == 100
    assert records.append_output("t", 1, 50, DATA[50:100]) == 100
    assert output(records) == DATA[:100]


def test_an_overlapping_resend_appends_only_the_new_tail(records: Records, run_dir: Path) -> None:
    records.append_output("t", 1, 0, DATA[:100])
    assert records.append_output("t", 1, 60, DATA[60:150]) == 150
    assert records.append_output("t", 1, 0, DATA[:200]) == 200
    assert output(records) == DATA[:200]


def test_a_gap_is_not_written_and_the_recorded_size_is_returned(records: Records, run_dir: Path) -> None:
    records.append_output("t", 1, 0, DATA[:10])
    assert records.append_output("t", 1, 20, DATA[20:40]) == 10
    assert output(records) == DATA[:10]
    # the resumed stream from the recorded end then fills in exactly.
    assert records.append_output("t", 1, 10, DATA[10:40]) == 40
    assert output(records) == DATA[:40]


def test_a_gap_before_anything_is_recorded_writes_nothing(records: Records, run_dir: Path) -> None:
    assert records.append_output("t", 1, 5, b"abc") == 0
    assert records.output_size("t", 1) == 0


def test_an_empty_chunk_at_the_end_changes_nothing(records: Records, run_dir: Path) -> None:
    records.append_output("t", 1, 0, b"abc")
    assert records.append_output("t", 1, 3, b"") == 3
    assert output(records) == b"abc"


def test_any_sequence_of_overlapping_resends_yields_each_byte_exactly_once(records: Records, run_dir: Path) -> None:
    # (offset, length) pairs as a reconnecting Worker might send them.
    sends = [(0, 30), (10, 10), (25, 40), (65, 0), (80, 10), (65, 20), (0, 85), (84, 100), (300, 5), (184, 200)]
    for offset, length in sends:
        records.append_output("t", 1, offset, DATA[offset:offset + length])
    assert output(records) == DATA[:len(DATA)]


def test_output_size_of_a_run_without_output_is_zero(records: Records) -> None:
    assert records.output_size("nothing", 3) == 0


# ---------------------------------------------------------------- task_ids


def test_task_ids_finds_flat_and_nested_ids_and_skips_run_directories(records: Records) -> None:
    for task_id in ("a", "a/b", "x/y/z", "db-schema"):
        records.save_task({"task_id": task_id, "status": "PENDING"})
    for task_id, n in (("a", 1), ("a/b", 2), ("x/y/z", 1)):
        records.save_run({"task_id": task_id, "run": n, "status": "COMPLETED"})
    assert sorted(records.task_ids()) == ["a", "a/b", "db-schema", "x/y/z"]


def test_task_ids_ignores_directories_without_a_task_record(records: Records) -> None:
    records.save_task({"task_id": "only/leaf", "status": "PENDING"})
    (records.runs / "stray").mkdir()
    assert list(records.task_ids()) == ["only/leaf"]


def test_task_ids_does_not_report_run_records_as_tasks_even_deep_inside(records: Records) -> None:
    records.save_task({"task_id": "t", "status": "PENDING"})
    records.save_run({"task_id": "t", "run": 12, "status": "FAILED"})
    nested = records.run_dir("t", 12) / "sub"
    nested.mkdir()
    (nested / "status.json").write_text("{}")
    assert list(records.task_ids()) == ["t"]


def test_task_ids_is_empty_without_a_runs_directory(records: Records) -> None:
    assert list(records.task_ids()) == []


# ---------------------------------------------------------------- save / load


def test_saved_records_load_back(records: Records) -> None:
    task = {"task_id": "a/b", "status": "RUNNING", "revision": "abc", "runs": [1]}
    run = {"task_id": "a/b", "run": 1, "status": "RUNNING", "note": "Größe ✓"}
    records.save_task(task)
    records.save_run(run)
    records.save_manifest("a/b", 1, {"files": []})
    assert records.load_task("a/b") == task
    assert records.load_run("a/b", 1) == run
    assert json.loads((records.run_dir("a/b", 1) / "manifest.json").read_text()) == {"files": []}


def test_loading_a_missing_record_returns_none(records: Records) -> None:
    assert records.load_task("nope") is None
    assert records.load_run("nope", 1) is None


def test_a_record_with_other_hard_links_is_not_believed_and_output_is_never_appended_through_one(
        tmp_path: Path) -> None:
    notices: list[str] = []
    records = Records(tmp_path, notices.append)
    config = tmp_path / "config"
    config.write_bytes(b"[core]\n")
    records.save_task({"task_id": "t", "status": "RUNNING"})
    records.save_run({"task_id": "t", "run": 1, "status": "RUNNING"})
    # A sealed record, but the same file is somewhere else too: nothing of it is believed.
    os.link(records.task_file("t"), tmp_path / "elsewhere.json")
    with pytest.raises(ForeignRecord, match="other names too.; taskrun reads only files that are nowhere else"):
        records.load_task("t")
    os.link(config, records.output("t", 1))  # `ln .git/config runs/t/run-1/output.log`

    assert records.append_output("t", 1, 0, b"out\n") == 4

    assert config.read_bytes() == b"[core]\n"
    assert output(records) == b"out\n" and os.stat(records.output("t", 1)).st_nlink == 1
    assert notices == ["runs/t/run-1/output.log was a hard link (the file has other names too), which taskrun "
                       "never writes through: removed it and put a regular file of its own there"]


def test_run_paths_lists_the_task_record_and_every_run_file_written_or_not(records: Records) -> None:
    # Records are written behind, so the list cannot depend on what is on disk yet.
    assert records.run_paths("a/b", 2) == [
        "runs/a/b/status.json", "runs/a/b/run-2/status.json", "runs/a/b/run-2/output.log",
        "runs/a/b/run-2/events.jsonl", "runs/a/b/run-2/manifest.json", "runs/a/b/run-2/summary.md"]


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe{}", b'{"a": 1'])
def test_an_unreadable_json_record_raises_record_error(records: Records, content: bytes) -> None:
    path = records.task_file("t")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(RecordError, match="runs/t/status.json"):
        records.load_task("t")


def test_a_json_record_that_is_not_an_object_raises_record_error(records: Records) -> None:
    path = records.task_file("t")
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2]")
    with pytest.raises(RecordError, match="not a JSON object"):
        records.load_task("t")


def test_a_record_path_that_cannot_be_read_as_a_file_raises_record_error(records: Records) -> None:
    (records.run_dir("t", 1) / "status.json").mkdir(parents=True)
    with pytest.raises(RecordError, match="cannot read runs/t/run-1/status.json"):
        records.load_run("t", 1)


def test_a_record_that_cannot_be_written_raises_record_error(records: Records) -> None:
    records.runs.mkdir()
    (records.runs / "t").write_text("a file where a directory must be")
    with pytest.raises(RecordError, match="cannot write runs/t/status.json"):
        records.save_task({"task_id": "t", "status": "PENDING"})


# ---------------------------------------------------------------- atomic


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "d" / "status.json"
    atomic.write_bytes(path, b"first version, quite long\n")
    atomic.write_bytes(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["status.json"]


def test_atomic_write_replaces_the_file_rather_than_writing_into_it(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    atomic.write_bytes(path, b"old\n")
    with open(path, "rb") as reader_of_old:
        atomic.write_bytes(path, b"new\n")
        # A reader that opened the old file still sees the whole old file.
        assert reader_of_old.read() == b"old\n"
    assert path.read_bytes() == b"new\n"


def test_atomic_write_applies_the_requested_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    atomic.write_bytes(path, b"k", mode=0o600)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    atomic.write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"v": object()})  # not serializable: fails before any file
    with pytest.raises(TypeError):
        atomic.write_bytes(path, "not bytes")  # type: ignore[arg-type]  # fails while writing the temp file
    assert atomic.read_json(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_write_json_then_read_json_round_trips(tmp_path: Path) -> None:
    data = {"b": [1, 2.5, None, True], "a": "ü"}
    atomic.write_json(tmp_path / "x.json", data)
    assert atomic.read_json(tmp_path / "x.json") == data
    assert (tmp_path / "x.json").read_text().endswith("\n")


def test_a_restarted_daemon_drops_the_temp_files_a_killed_one_left_in_its_record_directories(tmp_path: Path) -> None:
    import subprocess
    first = Records(tmp_path)
    first.save_task({"task_id": "t", "status": "RUNNING"})
    first.save_run({"task_id": "t", "run": 1, "status": "RUNNING"})
    gone = subprocess.Popen(["true"])
    gone.wait()
    task_temp = tmp_path / "runs" / "t" / f".status.json.{gone.pid}.1.tmp"
    run_temp = tmp_path / "runs" / "t" / "run-1" / f".status.json.{gone.pid}.1.tmp"
    for temp in (task_temp, run_temp):
        temp.write_bytes(b"{half")  # killed mid-write

    second = Records(tmp_path)  # the next daemon
    second.save_run({"task_id": "t", "run": 1, "status": "COMPLETED"})
    second.save_task({"task_id": "t", "status": "COMPLETED"})
    assert not task_temp.exists() and not run_temp.exists()
    assert second.load_run("t", 1)["status"] == "COMPLETED"
