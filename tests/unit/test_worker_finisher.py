"""A Run's end on the Worker (taskrunner/worker/finisher.py), on one WorkerServer without a session: a result
the full Worker home has no room for, held in memory once the wait for room is over."""

from __future__ import annotations

import errno
import io
import time
from pathlib import Path
from typing import Any

import pytest

from taskrunner import diskspace
from taskrunner.protocol import Reader, Writer
from taskrunner.worker.activerun import ActiveRun
from taskrunner.worker.finisher import FULL_HOME_WAIT_SECONDS
from taskrunner.worker.rundir import RunDir
from taskrunner.worker.serve import WorkerServer


def _full_home_run(home: Path, full_for: float) -> tuple[WorkerServer, ActiveRun]:
    """A server and its ended Run whose result.json has found no room for `full_for` seconds."""
    server = WorkerServer(home, "w1", Reader(io.BytesIO()), Writer(io.BytesIO()), agent_probe=lambda: {})
    server._trash.mkdir(parents=True)
    run_dir = RunDir.at(home, "r-full")
    run_dir.create(home)
    run_dir.workspace.mkdir()
    (run_dir.workspace / "big.bin").write_bytes(b"x" * 1024)
    run_dir.output.write_bytes(b"the Agent's output\n")
    run = ActiveRun(run_dir, None, None, None, assignment={"run_id": "r-full", "nonce": "n1", "assigned_at": 1.0})
    run.full_since = time.monotonic() - full_for
    return server, run


@pytest.fixture()
def no_room(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: RunDir, data: dict[str, Any]) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDir, "create_result", refuse)
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: False)


@pytest.mark.usefixtures("no_room")
def test_a_result_with_no_room_past_the_wait_is_held_in_memory_and_the_workspace_goes_to_the_janitor(
        tmp_path: Path) -> None:
    server, run = _full_home_run(tmp_path / "home", FULL_HOME_WAIT_SECONDS + 1)

    server._finish(run, "FAILED", 1, "the Agent exited with code 1")

    assert run.result is not None and run.result["status"] == "FAILED" and run.result["envelope"]
    assert not run.dir.workspace.exists()  # handed over: the control plane may need that room
    gone = server._removals.get_nowait()
    assert gone == server._trash / "r-full.workspace" and (gone / "big.bin").is_file()
    assert run.dir.output.is_file()  # what the result covers stays until it is acknowledged


@pytest.mark.usefixtures("no_room")
def test_a_result_with_no_room_within_the_wait_is_tried_again_and_nothing_is_dropped(tmp_path: Path) -> None:
    server, run = _full_home_run(tmp_path / "home", 0)

    server._finish(run, "FAILED", 1, "the Agent exited with code 1")

    assert run.result is None  # the loop tries again on a later tick
    assert run.dir.workspace.is_dir() and server._removals.empty()
