"""A full disk under runs/ in the engine: records kept and written again by themselves, commits and
dependent messages held until they are, no new Run while full, and a Run's output that stalls instead
of failing the Run, resumed from the recorded offset once there is room."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pytest

from taskrunner import diskspace
from taskrunner.config import parse_config
from taskrunner.diskspace import Space
from taskrunner.engine import Engine
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.hooks import Hooks
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent, WorkerLink
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.protocol import Message
from taskrunner.recorder import CommitItem
from taskrunner.signing import RESULT_TYPE, SigningKey, sign
from taskrunner.state import RunState, TaskState
from taskrunner.taskfile import parse_task
from tests.conftest import git

KEY = SigningKey.generate()
RUN_ID = "r1"


class _Link(WorkerLink):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sent: list[Message] = []

    def send(self, *messages: Message) -> None:
        self.sent.extend(messages)

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        raise AssertionError("no session is opened in these tests")

    def _disconnect(self) -> None:
        pass


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Notices(Hooks):
    def __init__(self) -> None:
        self.said: list[str] = []

    def notice(self, message: str) -> None:
        self.said.append(message)


class _Plane:
    """An engine with one Worker, `local`, holding one running Run r1 of Task t; commits are kept."""

    def __init__(self, root: Path) -> None:
        self.root = root
        config = parse_config("workers: {local: {transport: local, sandbox: none}}\n", ".taskrun.yaml")
        keyring, _ = Keyring.ensure(root / ".git" / "taskrun", 0.0)
        self.fleet = Fleet(config, root / ".git" / "taskrun", lambda event: None, keyring)
        self.commits: list[CommitItem] = []
        self.hooks = _Notices()
        self.engine = Engine(root, config, self.fleet, commit=self.commits.append, hooks=self.hooks,
                             clock=lambda: 1000.0)
        self.clock = _Clock()
        self.engine.records.space = Space(root, clock=self.clock)
        self.worker: WorkerState = self.fleet.workers["local"]
        self.link = self.worker.link = _Link(self.worker.spec, lambda event: None)
        spec = parse_task("t", "tasks/t.md", b"# T\n\n```sh\ntrue\n```\n")
        self.task = TaskState("t", "tasks/t.md", 1, status=TaskStatus.RUNNING, spec=spec, revision=spec.revision)
        self.run = RunState(run_id=RUN_ID, task_id="t", number=1, revision=spec.revision, attempt=1,
                            worker="local", agent="shell", status=RunStatus.RUNNING)
        self.task.runs.append(self.run)
        self.task.attempts = 1
        self.engine.tasks["t"] = self.task
        self.engine.runs[RUN_ID] = self.run
        self.worker.generation += 1
        self.worker.online, self.worker.error, self.worker.result_key = True, None, KEY.public
        self.worker.runs = {RUN_ID}

    def feed(self, message: Message) -> None:
        self.engine.on_link_event(LinkEvent("local", self.worker.generation, message))
        self.engine.flush(force=True)

    def idle(self) -> _Plane:
        """No Task, no Run: the Worker free, trusted, offering the shell Agent."""
        self.engine.tasks.clear()
        self.engine.runs.clear()
        self.worker.runs = set()
        self.worker.hello = {"agents": {"shell": {"version": None}}}
        self.worker.trusted = True
        return self

    def said_once(self, text: str) -> list[str]:
        return [n for n in self.hooks.said if n == text]

    def task_record(self) -> dict[str, Any]:
        return json.loads((self.root / "runs" / "t" / "status.json").read_text())


@pytest.fixture()
def plane(tmp_path: Path) -> Iterator[_Plane]:
    git(tmp_path, "init", "-q")
    yield _Plane(tmp_path)


def _no_room(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _envelope(data: bytes, status: str = "COMPLETED") -> dict[str, Any]:
    body = {"run_id": RUN_ID, "status": status, "exit_code": 0, "error": None, "started_at": 1.0,
            "finished_at": 2.0, "output_size": len(data), "output_sha256": hashlib.sha256(data).hexdigest(),
            "nonce": "n", "change": None}
    return sign(RESULT_TYPE, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), [KEY])


def _result(data: bytes) -> Message:
    return Message("result", {"run_id": RUN_ID, "output_size": len(data), "envelope": _envelope(data)})


# ---------------------------------------------------------------- records written again by themselves


def test_a_record_that_could_not_be_written_is_written_by_itself_once_there_is_room(
        plane: _Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = plane.engine.records._tree
    with monkeypatch.context() as full:
        full.setattr(tree, "write_atomic", _no_room)
        plane.engine.cancel("t")  # the Run's Worker is online: a cancel goes out, the Task is saved
        plane.engine._finish(plane.run, RunStatus.CANCELLED, None, "cancelled")
        plane.engine.flush(force=True)
        assert not (plane.root / "runs" / "t" / "status.json").exists()
        assert plane.engine.records.space.full is not None
        assert len(plane.engine.unwritten) == 2  # the Task's record and the Run's
        plane.engine.flush(force=True)  # tried again, still full
        said = [n.split(":")[0] for n in plane.hooks.said if "is full (ENOSPC)" in n]
        assert sorted(said) == ["cannot write runs/t/run-1/status.json", "cannot write runs/t/run-1/summary.md",
                                "cannot write runs/t/status.json"]  # once per file, not once per attempt
    # No new change to the Task: the next flush (the daemon's timer) writes what was kept.
    plane.engine.flush()
    assert plane.task_record()["status"] == "CANCELLED"
    run_record = json.loads((plane.root / "runs" / "t" / "run-1" / "status.json").read_text())
    assert run_record["status"] == "CANCELLED"
    assert "CANCELLED" in (plane.root / "runs" / "t" / "run-1" / "summary.md").read_text()
    assert len(plane.engine.unwritten) == 0
    plane.clock.now += diskspace.RETRY_SECONDS
    assert plane.engine.records.space.still_full() is None
    assert any("written, after it could not be" in n for n in plane.hooks.said)


def test_commits_and_acks_wait_for_their_records_other_messages_do_not(
        plane: _Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = plane.engine.records._tree
    with monkeypatch.context() as full:
        full.setattr(tree, "write_atomic", _no_room)
        plane.feed(_result(b""))  # a verified result: final records, a commit, an ack
        plane.engine._send(plane.worker, Message("resume", {"run_id": "other", "offset": 0}))
        plane.engine.flush(force=True)
        assert plane.commits == []
        assert [m.type for m in plane.link.sent] == ["resume"]
    plane.engine.flush()
    assert [m.type for m in plane.link.sent] == ["resume", "ack"]
    assert [c.status for c in plane.commits] == ["COMPLETED"]
    assert plane.task_record()["status"] == "COMPLETED"


def test_a_newer_version_of_a_kept_record_replaces_it(plane: _Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = plane.engine.records._tree
    with monkeypatch.context() as full:
        full.setattr(tree, "write_atomic", _no_room)
        plane.task.waiting = "first"
        plane.engine._save_task(plane.task)
        plane.engine.flush(force=True)
        plane.task.waiting = "second"
        plane.engine._save_task(plane.task)
        plane.engine.flush(force=True)
        assert len(plane.engine.unwritten) == 1
    plane.engine.flush()
    assert plane.task_record()["waiting"] == "second"


def test_a_path_in_the_way_of_one_tasks_record_holds_only_that_task(plane: _Plane) -> None:
    """A directory pushed where Task t's status.json goes: t's commit waits, with a notice saying what is
    in the way; another Task's records, commit and messages go on (a full disk would hold them all). The
    ack of t's Run goes: the Run's own record is on disk."""
    (plane.root / "runs" / "t" / "status.json").mkdir(parents=True)
    plane.feed(_result(b""))  # t's Run ends: final records, a commit, an ack
    other = TaskState("u", "tasks/u.md", 2, status=TaskStatus.RUNNING)
    run = RunState(run_id="r-u", task_id="u", number=1, revision="rev", attempt=1, worker="local", agent="shell",
                   status=RunStatus.COMPLETED)
    other.runs.append(run)
    plane.engine.tasks["u"] = other
    plane.engine._save_run(run)
    plane.engine._save_task(other, commit=True)
    plane.engine._send(plane.worker, Message("ack", {"run_id": "r-u"}))
    plane.engine.flush(force=True)
    assert [c.task_id for c in plane.commits] == ["u"]
    assert [m.get("run_id") for m in plane.link.sent] == [RUN_ID, "r-u"]
    assert json.loads((plane.root / "runs" / "u" / "status.json").read_text())["task_id"] == "u"
    said = [n for n in plane.hooks.said if n.startswith("cannot write runs/t/status.json")]
    assert len(said) == 1 and "a directory" in said[0] and "only this Task's Runs wait" in said[0], plane.hooks.said
    plane.engine.flush(force=True)  # still in the way: still waiting, said once
    assert [c.task_id for c in plane.commits] == ["u"] and len(plane.said_once(said[0])) == 1
    (plane.root / "runs" / "t" / "status.json").rmdir()
    plane.engine.flush()
    assert plane.task_record()["status"] == "COMPLETED"
    assert [c.task_id for c in plane.commits] == ["u", "t"]


def test_a_run_whose_own_records_cannot_be_written_is_failed_unsent_and_others_are_assigned(
        tmp_path: Path) -> None:
    """A file pushed where Task v's runs/v/ directory goes: v's Run is never sent (a Worker takes bundles in
    sequence, and a held one would be overtaken by the next), it fails saying why; Task w is assigned."""
    git(tmp_path, "init", "-q")
    (tmp_path / "tasks").mkdir()
    for name in ("v", "w"):
        (tmp_path / "tasks" / f"{name}.md").write_text(f"# {name}\n\n```sh\ntrue\n```\n")
    git(tmp_path, "add", "tasks")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "v").write_text("pushed\n")
    plane = _Plane(tmp_path).idle()
    for name in ("v", "w"):
        plane.engine.task_file_changed(f"tasks/{name}.md")
    plane.engine.schedule()  # one slot: v's Run takes it
    plane.engine.flush(force=True)
    assert [m.type for m in plane.link.sent] == []  # v's assign is not sent, nor held
    plane.engine.flush(force=True)  # the engine fails the Run it was told of: the slot is free again
    v = plane.engine.tasks["v"]
    assert v.runs and v.runs[-1].status is RunStatus.FAILED, v
    assert "not started: its records cannot be written" in (v.runs[-1].error or "")
    assert "runs/v is a regular file" in (v.runs[-1].error or ""), v.runs[-1].error
    plane.engine.schedule()
    plane.engine.flush(force=True)
    sent = [m for m in plane.link.sent if m.type == "assign"]
    assert [plane.engine.runs[m.get("run_id")].task_id for m in sent] == ["w"]
    assert (tmp_path / "runs" / "v").read_text() == "pushed\n"  # someone's file: kept


# ---------------------------------------------------------------- no new Run while full


def test_no_run_is_assigned_while_runs_cannot_be_written_and_the_task_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "a.md").write_text("# A\n\n```sh\ntrue\n```\n")
    git(tmp_path, "add", "tasks")
    plane = _Plane(tmp_path).idle()
    space = plane.engine.records.space
    space.failed(OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: False)
    plane.engine.task_file_changed("tasks/a.md")
    plane.engine.schedule()
    task = plane.engine.tasks["a"]
    assert task.status is TaskStatus.PENDING and task.active_run is None
    assert task.waiting is not None and "is full (ENOSPC)" in task.waiting and "by themselves" in task.waiting
    # Room again: the next plan assigns it, without anyone touching the Task.
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: True)
    plane.clock.now += diskspace.RETRY_SECONDS
    plane.engine.schedule()
    assert task.status is TaskStatus.RUNNING and task.active_run is not None


# ---------------------------------------------------------------- a Run's output stalls, then resumes


def test_output_that_cannot_be_recorded_stalls_the_run_and_resumes_from_the_recorded_offset(
        plane: _Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"0123456789" * 100
    plane.feed(Message("output", {"run_id": RUN_ID, "offset": 0}, data[:300]))
    real_write = os.write

    room = [100]

    def half_then_full(fd: int, chunk: Any) -> int:
        if room[0]:
            done = real_write(fd, bytes(chunk[:room[0]]))  # part of the chunk makes it, then the disk is full
            room[0] -= done
            return done
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: False)
    with monkeypatch.context() as full:
        full.setattr(os, "write", half_then_full)
        plane.feed(Message("output", {"run_id": RUN_ID, "offset": 300}, data[300:600]))
    # The Run goes on: not failed, not cancelled; the rest of its output is not recorded meanwhile.
    assert plane.run.status is RunStatus.RUNNING and RUN_ID in plane.engine.runs
    assert not any(m.type == "cancel" for m in plane.link.sent)
    plane.feed(Message("output", {"run_id": RUN_ID, "offset": 600}, data[600:]))
    plane.feed(_result(data))  # neither judged nor acknowledged while its output waits
    assert plane.run.status is RunStatus.RUNNING
    assert not any(m.type == "ack" for m in plane.link.sent)
    assert plane.engine.records.output_size("t", 1) == 400  # what made it stays, at its offset
    assert any("goes on, its output waits" in n for n in plane.hooks.said)
    plane.clock.now += diskspace.RETRY_SECONDS
    plane.engine.flush()
    assert not any(m.type == "resume" for m in plane.link.sent)  # still no room: no resume yet
    # Room again: the Worker is asked to resume from byte 300, and the output is recorded whole.
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: True)
    plane.clock.now += diskspace.RETRY_SECONDS
    plane.engine.flush()
    resumes = [m for m in plane.link.sent if m.type == "resume"]
    assert [m["offset"] for m in resumes] == [400]
    plane.feed(Message("output", {"run_id": RUN_ID, "offset": 400}, data[400:]))
    plane.feed(_result(data))
    assert plane.engine.records.read_output("t", 1) == data
    assert plane.run.status is RunStatus.COMPLETED
    assert [m.type for m in plane.link.sent].count("ack") == 1


def test_a_change_whose_ref_cannot_be_written_on_a_full_disk_waits_instead_of_failing_the_run(
        plane: _Plane, monkeypatch: pytest.MonkeyPatch) -> None:
    # git's words for a ref it cannot write on a full disk name no errno ("couldn't write '<ref>.lock'"):
    # the disk itself is asked, and the Run is not judged until there is room.
    from taskrunner import sessions
    from taskrunner.errors import GitError
    from taskrunner.gitflow.importer import Imported

    data = b"done\n"
    body = {"run_id": RUN_ID, "status": "COMPLETED", "exit_code": 0, "error": None, "started_at": 1.0,
            "finished_at": 2.0, "output_size": len(data), "output_sha256": hashlib.sha256(data).hexdigest(),
            "nonce": "n", "change": {"commit": "a" * 40, "base": None, "sha256": "b" * 64, "size": 0}}
    envelope = sign(RESULT_TYPE, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), [KEY])
    result = Message("result", {"run_id": RUN_ID, "output_size": len(data), "envelope": envelope})
    plane.feed(Message("output", {"run_id": RUN_ID, "offset": 0}, data))

    def cannot_write_ref(*args: Any, **kwargs: Any) -> Imported:
        raise GitError("git update-ref failed: fatal: cannot update ref 'refs/taskrun/runs/r1': "
                       "couldn't write '.git/refs/taskrun/runs/r1.lock'")

    monkeypatch.setattr(sessions, "import_change", cannot_write_ref)
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: False)
    plane.feed(result)
    assert plane.run.status is RunStatus.RUNNING, plane.run.error  # not FAILED: nothing is wrong with it
    assert not any(m.type == "ack" for m in plane.link.sent)
    assert any("waits for room" in n for n in plane.hooks.said), plane.hooks.said
    # With room, the same failure is a fault of the repository, said as git said it (not a forged ref).
    monkeypatch.setattr(diskspace, "has_room", lambda path, need=0: True)
    plane.clock.now += diskspace.RETRY_SECONDS
    plane.engine.flush()  # room again: the Run is released and its result is taken when sent again
    plane.feed(result)
    assert plane.run.status is RunStatus.FAILED and "couldn't write" in (plane.run.error or "")
    assert "already names" not in (plane.run.error or "")


def test_runs_a_worker_refused_for_want_of_room_do_not_count_toward_the_lost_limit(plane: _Plane) -> None:
    # Each refusal was a lost Run: the 4th failed the Task, though nothing of it ever ran.
    for n in range(2, 6):
        plane.task.runs.append(RunState(run_id=f"old{n}", task_id="t", number=n, revision=plane.task.revision,
                                        attempt=1, worker="local", agent="shell", status=RunStatus.FAILED,
                                        lost=True, refused=True))
    plane.run.status = RunStatus.ASSIGNED
    plane.feed(Message("error", {"run_id": RUN_ID, "request": "assign", "disk_full": True,
                                 "message": "the disk holding the Worker home is full (ENOSPC)"}))
    assert plane.run.status is RunStatus.FAILED and plane.run.lost and plane.run.refused
    assert plane.task.status is TaskStatus.PENDING and plane.task.attempts == 0
    record = json.loads((plane.root / "runs" / "t" / "run-1" / "status.json").read_text())
    assert record["refused"] is True and record["lost"] is True
    assert RunState.from_record(record).refused


def test_a_fourth_lost_run_still_fails_the_task(plane: _Plane) -> None:
    for n in range(2, 5):
        plane.task.runs.append(RunState(run_id=f"old{n}", task_id="t", number=n, revision=plane.task.revision,
                                        attempt=1, worker="local", agent="shell", status=RunStatus.FAILED,
                                        lost=True))
    plane.engine.grace_expired(plane.worker)
    plane.engine.flush(force=True)
    assert plane.run.lost and not plane.run.refused and plane.task.status is TaskStatus.FAILED
