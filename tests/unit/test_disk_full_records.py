"""A full disk under runs/, pauses.json and git (records.py, pauses.py, gitops.py, diskspace.py), on a
real tiny tmpfs where it matters: recognised and said the same way, nothing half written left behind,
what could not be written kept and written once there is room."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner import diskspace, pauses
from taskrunner.diskspace import RecordsFull, Space, Stall
from taskrunner.errors import GitError, RecordError
from taskrunner.gitops import Git
from taskrunner.records import Records
from tests.conftest import git, mounted_tmpfs


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs at tmp_path/fs (tests/conftest.py mounted_tmpfs)."""
    with mounted_tmpfs(tmp_path, "2m") as mount:
        yield mount


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; the filler file, to delete for room."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _settle(filler: Path) -> None:
    try:
        filler.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- recognising it


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS])
def test_full_disk_errors_are_recognised_also_behind_another_error(code: int) -> None:
    cause = OSError(code, os.strerror(code))
    assert diskspace.is_full(cause)
    try:
        try:
            raise cause
        except OSError as exc:
            raise RecordError("cannot write x") from exc
    except RecordError as wrapped:
        assert diskspace.is_full(wrapped)


def test_other_errors_are_not_a_full_disk() -> None:
    assert not diskspace.is_full(OSError(errno.EACCES, "Permission denied"))
    assert not diskspace.is_full(ValueError("x"))


def test_the_reason_names_the_disk_the_errno_and_what_happens_next(tmp_path: Path) -> None:
    text = diskspace.reason("runs/", tmp_path, OSError(errno.EDQUOT, "quota"), resumes="it resumes by itself")
    assert text == f"the disk holding runs/ is full (EDQUOT): free space on it ({tmp_path}); it resumes by itself"
    assert "cannot be written (EIO)" in diskspace.reason("runs/", tmp_path, OSError(errno.EIO, "io"))


# ---------------------------------------------------------------- records on a full tmpfs


def test_a_record_on_a_full_disk_raises_records_full_and_leaves_no_temp_file(tmpfs: Path) -> None:
    git(tmpfs, "init", "-q")
    records = Records(tmpfs)
    now = [0.0]
    records.space = Space(tmpfs, clock=lambda: now[0])
    records.save_task({"task_id": "t", "status": "PENDING"})  # makes the record key while there is room
    filler = fill(tmpfs)
    with pytest.raises(RecordsFull) as raised:
        records.save_task({"task_id": "t", "status": "RUNNING", "pad": "x" * 100_000})
    assert "is full (ENOSPC)" in raised.value.reason and str(tmpfs) in raised.value.reason
    assert records.space.full == raised.value.reason
    assert sorted(os.listdir(tmpfs / "runs" / "t")) == ["status.json"]  # the old record, no temp file
    assert records.load_task("t")["status"] == "PENDING"  # type: ignore[index]
    _settle(filler)
    records.save_task({"task_id": "t", "status": "RUNNING"})
    assert records.space.still_full() is not None  # looked less than RETRY_SECONDS ago
    now[0] += diskspace.RETRY_SECONDS
    assert records.space.still_full() is None


def test_output_on_a_full_disk_keeps_what_made_it_and_takes_the_rest_later(tmpfs: Path) -> None:
    git(tmpfs, "init", "-q")
    records = Records(tmpfs)
    records.save_run({"task_id": "t", "run": 1, "status": "RUNNING"})
    data = os.urandom(3 * 1024 * 1024)  # more than the whole disk
    with pytest.raises(RecordsFull):
        records.write_output("t", 1, 0, data)
    kept = records.output_size("t", 1)
    assert 0 < kept < len(data)
    assert records.read_output("t", 1) == data[:kept]
    records.output("t", 1).unlink()  # room: here by taking the log away, then sending it all again
    assert records.write_output("t", 1, 0, data[:1024 * 1024]) == (0, 1024 * 1024)
    assert records.read_output("t", 1) == data[:1024 * 1024]


def test_summary_and_events_a_full_disk_kept_out_are_written_by_write_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = Records(tmp_path)
    records.save_run({"task_id": "t", "run": 1, "status": "RUNNING"})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(records._tree, "write_atomic", full)
        with pytest.raises(RecordsFull):
            records.save_events("t", 1, b'{"type":"x"}\n')
        with pytest.raises(RecordsFull):
            records.save_summary("t", 1, "# done\n")
        assert records.write_kept() == []
        assert sorted(records.kept()) == ["runs/t/run-1/events.jsonl", "runs/t/run-1/summary.md"]
    assert sorted(records.write_kept()) == ["runs/t/run-1/events.jsonl", "runs/t/run-1/summary.md"]
    assert records.kept() == []
    assert (tmp_path / "runs/t/run-1/events.jsonl").read_bytes() == b'{"type":"x"}\n'
    assert (tmp_path / "runs/t/run-1/summary.md").read_text() == "# done\n"


# ---------------------------------------------------------------- Space


def test_stalled_runs_are_released_only_once_there_is_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    space = Space(tmp_path, clock=lambda: now[0])
    assert space.stall(Stall("r1", "w", "t", 1)) is True
    assert space.stall(Stall("r1", "w", "t", 1)) is False
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: False)
    assert space.due() == [] and space.stalled("r1")
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: True)
    assert space.due() == []  # looked less than RETRY_SECONDS ago
    now[0] += diskspace.RETRY_SECONDS
    assert [s.run_id for s in space.due()] == ["r1"] and not space.stalled("r1")


def test_full_clears_itself_once_statvfs_shows_room_and_no_output_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    space = Space(tmp_path, clock=lambda: now[0])
    space.failed(OSError(errno.ENOSPC, "x"))
    space.stall(Stall("r1", "w", "t", 1))
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: True)
    now[0] += diskspace.RETRY_SECONDS
    assert space.still_full() is not None  # a Run's output still waits
    space.release("r1")
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: False)
    now[0] += diskspace.RETRY_SECONDS
    assert space.still_full() is not None
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: True)
    now[0] += diskspace.RETRY_SECONDS
    assert space.still_full() is None


# ---------------------------------------------------------------- pauses.json


def test_pauses_that_could_not_be_saved_are_saved_again_and_say_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = pauses.Pauses([pauses.Pause("claude", None, 4_000_000_000.0, 1.0)])
    real = pauses.write_json

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pauses, "write_json", full)
    with pytest.raises(OSError):
        pauses.save(tmp_path, table)
    assert table.unsaved and table.prune(0.0)  # prune asks for another save
    pauses.save(tmp_path, table)  # failing again: quiet
    monkeypatch.setattr(pauses, "write_json", real)
    pauses.save(tmp_path, table)
    assert not table.unsaved and not table.prune(0.0)
    assert [p.agent for p in pauses.load(tmp_path)] == ["claude"]


# ---------------------------------------------------------------- git on a full disk


def test_a_commit_on_a_full_disk_leaves_no_crash_report_nor_temp_pack_and_succeeds_later(tmpfs: Path) -> None:
    git(tmpfs, "init", "-q")
    git(tmpfs, "-c", "user.name=a", "-c", "user.email=a@b", "commit", "-q", "--allow-empty", "-m", "init")
    (tmpfs / "runs").mkdir()
    (tmpfs / "runs" / "big").write_bytes(os.urandom(1_500_000))  # its blob does not fit beside it
    repo = Git(tmpfs)
    with pytest.raises(GitError) as raised:
        repo.commit_paths(["runs/big"], "records\n")
    assert "the disk holding the repository is full" in str(raised.value)
    git_dir = tmpfs / ".git"
    assert [n for n in os.listdir(git_dir) if n.startswith("fast_import_crash_")] == []
    assert [n for n in os.listdir(git_dir / "objects" / "pack") if n.startswith("tmp_pack_")] == []
    (tmpfs / "runs" / "big").write_bytes(b"small now\n")
    assert repo.commit_paths(["runs/big"], "records\n") is not None
    assert git(tmpfs, "show", "HEAD:runs/big") == "small now\n"
