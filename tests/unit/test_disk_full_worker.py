"""A full Worker home (streaming.py, rundir.py, audit.py): rendered output kept until there is room and
never lost, a Run not judged before it is all written, a new Run refused before anything of it is on
disk, and no half audit line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from taskrunner import diskspace
from taskrunner.worker import audit, rundir, streaming
from taskrunner.worker.rundir import HomeFull, RunDir

LINES = [f'{{"n": {i}, "text": "{"x" * 50}"}}'.encode() for i in range(200)]


class _Echo:
    """A stream reader that renders each line as itself: output.log must end up byte-identical."""

    keeps_events = True

    def feed(self, line: bytes) -> str:
        return line.decode() + "\n"

    def verdict(self, exit_code: int | None) -> Any:
        return type("Verdict", (), {"status": "COMPLETED", "error": None, "usage_limit": None})()

    def limit(self) -> None:
        return None

    def report(self) -> Any:
        return type("Report", (), {"as_record": lambda self: {}})()


def _pump(tmp_path: Path) -> streaming.Pump:
    (tmp_path / streaming.EVENTS_FILE).write_bytes(b"".join(line + b"\n" for line in LINES))
    return streaming.Pump(tmp_path, _Echo())


def _expected() -> bytes:
    return b"".join(line + b"\n" for line in LINES)


def test_rendered_text_a_full_disk_kept_out_is_written_later_byte_for_byte(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pump = _pump(tmp_path)
    real_write = os.write
    room = [1000]

    def full(fd: int, data: Any) -> int:
        if room[0]:
            done = real_write(fd, bytes(data[:room[0]]))
            room[0] -= done
            return done
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full)
        assert pump.step() is None  # no reason to stop the Run: a full disk is not the Agent's doing
        assert pump.failed is None
        assert (tmp_path / "output.log").stat().st_size == 1000
        assert len(pump.unwritten) == len(_expected()) - 1000
        pump.ending()
        assert not pump.caught_up()  # not judged while text waits to be written
        read = pump.pos
        assert pump.step() is None and pump.pos == read  # nothing more is read meanwhile
    pump.step()
    assert pump.unwritten == b"" and pump.caught_up()
    assert (tmp_path / "output.log").read_bytes() == _expected()
    assert pump.outcome(0).status == "COMPLETED"


def test_a_replay_after_a_full_disk_writes_no_byte_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pump = _pump(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota")))
        pump.step()
    pump.step()
    again = streaming.Pump(tmp_path, _Echo())  # another session adopting the Run reads it from byte 0
    again.step()
    assert (tmp_path / "output.log").read_bytes() == _expected()


def test_another_write_error_still_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pump = _pump(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad fd")))
        assert pump.step() is not None
    assert pump.failed is not None


def test_a_run_directory_that_finds_no_room_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir.at(tmp_path, "r1")
    real_mkdir = Path.mkdir

    def full(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == run.path:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(HomeFull) as raised:
        run.create(tmp_path)
    assert "the disk holding the Worker home is full (ENOSPC)" in str(raised.value)
    assert "takes new Runs again by itself" in str(raised.value)
    assert not run.path.exists()


def test_discard_removes_a_run_whose_start_found_no_room(tmp_path: Path) -> None:
    run = RunDir.at(tmp_path, "r1")
    run.create(tmp_path)
    run.write_assignment({"run_id": "r1"})
    run.discard()
    assert not run.path.exists() and rundir.held_runs(tmp_path) == []


def test_home_refusal_says_why_while_statvfs_shows_no_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert rundir.home_refusal(tmp_path) is None
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 4096)
    refusal = rundir.home_refusal(tmp_path)
    assert refusal is not None and str(tmp_path) in refusal and "is full" in refusal


def test_an_audit_entry_cut_short_by_a_full_disk_leaves_no_half_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    audit.record(tmp_path, audit.GATE_REFUSED, "first")
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:10])))
    audit.record(tmp_path, audit.GATE_REFUSED, "second")
    monkeypatch.setattr(os, "write", real_write)
    audit.record(tmp_path, audit.GATE_REFUSED, "third")
    lines = (tmp_path / audit.AUDIT_FILE).read_bytes().splitlines()
    assert [json.loads(line)["reason"] for line in lines] == ["first", "third"]
    assert "the disk holding the Worker home is full (ENOSPC)" in capsys.readouterr().err
