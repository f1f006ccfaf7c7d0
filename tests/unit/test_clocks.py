"""Clocks: every timeout, heartbeat, grace period and backoff is measured on a monotonic clock.

A fake clock (installed at the seam, taskrunner/clock.py) moves the wall
clock alone (`jump`, an NTP step or a clock set by hand) or every clock at
once (`advance`, time passing). A jump of two hours either way must neither
end nor extend a Run's timeout, take a Worker offline, end its Runs' grace,
open a session early, or end or extend a retry backoff; the monotonic clock
passing the bound does each of them.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from taskrunner import clock
from taskrunner.batch import Pending
from taskrunner.config import parse_config
from taskrunner.daemon import MAX_SLEEP, Daemon
from taskrunner.defaults import RECORD_LAG_SECONDS
from taskrunner.engine import Engine
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.keys import Keyring
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.state import RunState, TaskState
from taskrunner.taskfile import parse_task
from taskrunner.worker.activerun import ActiveRun, run_clock, run_deadline
from taskrunner.worker.rundir import RunDir
from taskrunner.worker.serve import WorkerServer

HOURS_2 = 2 * 3600.0
JUMPS = [pytest.param(HOURS_2, id="wall+2h"), pytest.param(-HOURS_2, id="wall-2h")]


class FakeClock:
    """Clocks that move only when told: `jump` moves the wall clock, `advance` moves them all."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # wall clock
        self.mono = 1_000.0
        self.boot = 50_000.0
        self.boot_name: str | None = "boot-1"

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def boottime(self) -> float:
        return self.boot

    def boot_id(self) -> str | None:
        return self.boot_name

    def jump(self, seconds: float) -> None:
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
        self.boot += seconds


@pytest.fixture
def fake() -> Iterator[FakeClock]:
    source = FakeClock()
    previous = clock.install(source)
    try:
        yield source
    finally:
        clock.install(previous)


# ---------------------------------------------------------------- the seam


def test_wall_times_read_just_now_measure_durations_on_the_monotonic_clock(fake: FakeClock) -> None:
    before = clock.as_monotonic(clock.wall())
    fake.jump(HOURS_2)
    fake.advance(5)
    assert clock.as_monotonic(clock.wall()) - before == 5


# ---------------------------------------------------------------- a Run's timeout on the Worker


def _run(tmp_path: Path, assignment: dict[str, Any]) -> ActiveRun:
    return ActiveRun(RunDir.at(tmp_path, "r1"), None, None, run_deadline(assignment), assignment=assignment)


def _assignment(fake: FakeClock, timeout: float = 60.0) -> dict[str, Any]:
    # As serve.py writes assignment.json, and as a later process reads it back.
    written = {"run_id": "r1", "timeout": timeout, "assigned_at": fake.now, **run_clock(fake.now, timeout)}
    return json.loads(json.dumps(written))


@pytest.mark.parametrize("jump", JUMPS)
def test_a_wall_clock_jump_neither_times_out_a_run_nor_extends_its_timeout(
        tmp_path: Path, fake: FakeClock, jump: float) -> None:
    run = _run(tmp_path, _assignment(fake))
    fake.jump(jump)
    assert not run.timed_out()
    fake.advance(59.5)
    assert not run.timed_out()
    fake.advance(0.5)
    assert run.timed_out()


@pytest.mark.parametrize("jump", JUMPS)
def test_the_workers_loop_stops_a_run_when_its_timeout_passes_not_when_the_wall_clock_jumps(
        tmp_path: Path, fake: FakeClock, jump: float) -> None:
    stopped: list[tuple[str, str]] = []
    server = WorkerServer.__new__(WorkerServer)  # only its loop's step for one Run, `_tick`
    server._stop = lambda run, status, reason: stopped.append((status, reason))  # type: ignore[method-assign]
    server._check_exit = lambda run: None  # type: ignore[method-assign]
    run = _run(tmp_path, _assignment(fake))
    fake.jump(jump)
    server._tick(run)
    assert stopped == []
    fake.advance(61)
    server._tick(run)
    assert stopped == [("FAILED", "timed out after 60.0s")]


@pytest.mark.parametrize("jump", JUMPS)
def test_a_restarted_worker_adopting_a_run_keeps_its_timeout_whatever_the_wall_clock_did(
        tmp_path: Path, fake: FakeClock, jump: float) -> None:
    assignment = _assignment(fake)
    fake.advance(30)
    fake.jump(jump)
    fake.mono = 7.0  # a new process: its monotonic clock starts anywhere; CLOCK_BOOTTIME goes on
    adopted = _run(tmp_path, assignment)
    fake.advance(29.5)
    assert not adopted.timed_out()
    fake.advance(0.5)
    assert adopted.timed_out()


def test_after_a_reboot_a_run_is_timed_by_the_wall_clock_deadline_it_recorded(tmp_path: Path, fake: FakeClock) -> None:
    assignment = _assignment(fake)
    fake.advance(20)
    fake.boot_name, fake.boot = "boot-2", 3.0  # CLOCK_BOOTTIME of another boot means nothing here
    adopted = _run(tmp_path, assignment)
    fake.advance(39.5)
    assert not adopted.timed_out()
    fake.advance(0.5)
    assert adopted.timed_out()


@pytest.mark.parametrize("fields", [
    {"timeout": "60", "deadline": "soon", "boot": "boot-1"},
    {"timeout": float("nan"), "deadline": float("inf"), "boot": {"id": "boot-1", "at": float("nan")}},
    {"timeout": True, "deadline": None, "boot": {"id": ["boot-1"], "at": 1}},
    {"timeout": 1e308, "deadline": -1e308, "boot": {"id": "boot-1", "at": 1e308}},
])
def test_clock_fields_of_the_wrong_kind_in_assignment_json_never_raise(fake: FakeClock, fields: dict[str, Any]) -> None:
    deadline = run_deadline(fields)
    assert deadline is None or isinstance(deadline, float)


def test_a_run_without_a_timeout_never_times_out(tmp_path: Path, fake: FakeClock) -> None:
    assignment = {"run_id": "r1", "timeout": None, **run_clock(fake.now, None)}
    assert assignment["deadline"] is None
    run = _run(tmp_path, assignment)
    fake.advance(10 * HOURS_2)
    assert not run.timed_out()


# ---------------------------------------------------------------- heartbeats, grace and reconnects in the fleet


def _fleet(tmp_path: Path, scheduler: str) -> tuple[Fleet, WorkerState]:
    keyring, _ = Keyring.ensure(tmp_path / "cp", clock.wall())
    config = parse_config("workers: {local: {transport: local}}\n" + f"scheduler: {scheduler}\n", ".taskrun.yaml")
    fleet = Fleet(config, tmp_path, lambda event: None, keyring)
    worker = next(iter(fleet))
    worker.reconnect_at = None  # no session opened here
    return fleet, worker


@pytest.mark.parametrize("jump", JUMPS)
def test_a_wall_clock_jump_does_not_take_a_heard_worker_offline(tmp_path: Path, fake: FakeClock, jump: float) -> None:
    fleet, worker = _fleet(tmp_path, "{worker_offline_after: 4s}")
    worker.online, worker.last_seen = True, clock.wall()
    fake.jump(jump)
    assert fleet.tick(clock.wall()) == [] and worker.online
    fake.advance(3.9)
    fleet.tick(clock.wall())
    assert worker.online
    fake.advance(0.2)
    fleet.tick(clock.wall())
    assert not worker.online and worker.error == "no heartbeat for 4s"


@pytest.mark.parametrize("jump", JUMPS)
def test_a_wall_clock_jump_neither_ends_nor_extends_the_grace_of_an_offline_workers_runs(
        tmp_path: Path, fake: FakeClock, jump: float) -> None:
    fleet, worker = _fleet(tmp_path, "{worker_grace: 30s}")
    worker.runs.add("r1")
    fleet.link_down(worker, "connection reset", clock.wall())
    worker.reconnect_at = None
    fake.jump(jump)
    assert fleet.tick(clock.wall()) == []
    fake.advance(29.9)
    assert fleet.tick(clock.wall()) == []
    fake.advance(0.2)
    assert fleet.tick(clock.wall()) == [worker]


@pytest.mark.parametrize("jump", JUMPS)
def test_a_wall_clock_jump_neither_opens_a_session_early_nor_delays_it(
        tmp_path: Path, fake: FakeClock, jump: float, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, worker = _fleet(tmp_path, "{}")
    opened: list[float] = []
    monkeypatch.setattr(fleet, "_connect", lambda w, now: opened.append(now))
    fleet.link_down(worker, "connection reset", clock.wall())  # the first retry in 0.25-0.5 s (jittered)
    due = fleet.next_wakeup()
    assert due is not None and fake.mono + 0.25 <= due <= fake.mono + 0.5
    fake.jump(jump)
    fleet.tick(clock.wall())
    assert opened == [] and fleet.next_wakeup() == due
    fake.advance(0.5)
    fleet.tick(clock.wall())
    assert opened == [clock.wall()]


def test_back_online_after_reports_the_time_offline_not_the_jump(tmp_path: Path, fake: FakeClock) -> None:
    fleet, worker = _fleet(tmp_path, "{}")
    notices: list[str] = []
    fleet.hooks.notice = notices.append  # type: ignore[attr-defined]
    fleet.link_down(worker, "connection reset", clock.wall())
    fake.jump(-HOURS_2)
    fake.advance(12)
    fleet.ready(worker, clock.wall())
    assert worker.online and worker.offline_since is None
    assert any("back online after 12.0s" in n for n in notices), notices


# ---------------------------------------------------------------- retry backoff in the engine


def _engine(tmp_path: Path) -> tuple[Engine, TaskState, RunState]:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "--quiet", str(root)], check=True)
    config = parse_config("scheduler: {retries: 2, backoff: {base: 60s, max: 60s}}\n", ".taskrun.yaml")
    keyring, _ = Keyring.ensure(root / ".git" / "taskrun", clock.wall())
    fleet = Fleet(config, root / ".git" / "taskrun", lambda event: None, keyring)
    engine = Engine(root, config, fleet, commit=lambda item: None, rand=lambda: 1.0)  # the full 60 s
    spec = parse_task("t", "tasks/t.md", b"# A thing\n\n```sh\nfalse\n```\n")
    task = TaskState("t", "tasks/t.md", 1, status=TaskStatus.RUNNING, spec=spec, revision=spec.revision)
    run = RunState(run_id="r1", task_id="t", number=1, revision=spec.revision, attempt=1, worker="local",
                   agent="shell", status=RunStatus.RUNNING)
    task.runs.append(run)
    task.attempts = 1
    engine.tasks["t"] = task
    engine.runs[run.run_id] = run
    return engine, task, run


def _in_backoff(task: TaskState) -> bool:
    return (task.waiting or "").startswith("retry backoff")


@pytest.mark.parametrize("jump", JUMPS)
def test_a_wall_clock_jump_neither_fires_nor_delays_a_retry_backoff(tmp_path: Path, fake: FakeClock,
                                                                    jump: float) -> None:
    engine, task, run = _engine(tmp_path)
    engine._finish(run, RunStatus.FAILED, 1, "boom")
    assert task.status is TaskStatus.PENDING and task.not_before == fake.now + 60
    engine.schedule()
    assert _in_backoff(task) and engine.next_wakeup == fake.now + 60

    fake.advance(20)
    fake.jump(jump)
    engine.schedule()
    # The record shows when the retry really comes, on the wall clock as it now reads.
    assert _in_backoff(task) and task.not_before == fake.now + 40
    assert engine.next_wakeup == fake.now + 40 and "(40s)" in (task.waiting or "")

    fake.advance(39.5)
    engine.schedule()
    assert _in_backoff(task)
    fake.advance(0.5)
    engine.schedule()
    assert not _in_backoff(task) and task.not_before <= fake.now


def test_a_backoff_read_from_the_records_is_kept_true_to_the_monotonic_clock_from_then_on(
        tmp_path: Path, fake: FakeClock) -> None:
    engine, task, run = _engine(tmp_path)
    engine.runs.clear()
    run.move(RunStatus.FAILED)
    task.move(TaskStatus.PENDING)
    task.not_before = fake.now + 100  # as a restarted daemon reads it from status.json
    engine.schedule()
    fake.jump(HOURS_2)
    engine.schedule()
    assert _in_backoff(task) and task.not_before == fake.now + 100


@pytest.mark.parametrize("recorded", [float("inf"), float("nan"), -1.0, 0.0])
def test_a_backoff_that_is_no_time_is_never_corrected(fake: FakeClock, recorded: float) -> None:
    deadlines = clock.Deadlines()
    for _ in range(3):
        assert deadlines.correct("t", recorded, fake.now) is None
        fake.jump(HOURS_2)


# ---------------------------------------------------------------- records held back for a moment


@pytest.mark.parametrize("jump", JUMPS)
def test_a_wall_clock_jump_neither_writes_held_back_records_early_nor_holds_them_longer(
        fake: FakeClock, jump: float) -> None:
    pending = Pending()
    task = TaskState("t", "tasks/t.md", 1, status=TaskStatus.RUNNING)
    pending.task(task, late=True)
    fake.jump(jump)
    assert pending.take().tasks == []
    fake.advance(RECORD_LAG_SECONDS)
    assert [record["task_id"] for record in pending.take().tasks] == ["t"]


# ---------------------------------------------------------------- the daemon's loop: git polls and key retirement


class _Quiet:
    """The daemon's event queue with nothing in it: each wait moves the fake clocks by its timeout."""

    def __init__(self, fake: FakeClock, stop: threading.Event, jump: float, jump_at: float, end: float) -> None:
        self.fake, self.stop, self.jump, self.jump_at, self.end = fake, stop, jump, jump_at, end
        self.waits: list[float] = []

    def get(self, timeout: float) -> object:
        self.waits.append(timeout)
        self.fake.advance(timeout)
        if self.jump and self.fake.mono >= self.jump_at:
            self.fake.jump(self.jump)
            self.jump = 0.0
        if self.fake.mono >= self.end or len(self.waits) > 5000:  # a loop that spins ends here too
            self.stop.set()
        raise queue.Empty


@pytest.mark.parametrize("jump", JUMPS)
def test_the_daemons_loop_polls_git_on_the_monotonic_clock_and_never_spins_on_a_retirement_past(
        fake: FakeClock, jump: float) -> None:
    start, stop = fake.mono, threading.Event()
    polls: list[float] = []
    retirement = fake.now + 30  # refresh_keys below cannot take it: it stays past
    loop: Any = SimpleNamespace(
        _stop=stop, once=False, config=None, _tasks_touched=False, _next_poll=fake.now + 60,
        _serving=threading.Event(), _doctor_due=None, _doctor=lambda: None,
        fleet=SimpleNamespace(tick=lambda now: [], next_wakeup=lambda: None,
                              keyring=SimpleNamespace(next_retirement=lambda: retirement)),
        engine=SimpleNamespace(next_wakeup=None, pending=SimpleNamespace(due=None), schedule=lambda: None,
                               refresh_keys=lambda: None),
        syncer=SimpleNamespace(stale=False), repo=SimpleNamespace(moving=False),
        _flush=lambda force=False, wait=False: None, _sync=lambda reason: polls.append(fake.mono - start))
    loop._schedule_poll = lambda config: setattr(loop, "_next_poll", clock.wall() + 60)
    loop.events = _Quiet(fake, stop, jump, start + 90, start + 200)

    Daemon._loop(loop)

    assert polls == pytest.approx([60, 120, 180], abs=MAX_SLEEP)
    assert len(loop.events.waits) <= 200 / MAX_SLEEP + 10, "the loop woke without cause"
