"""The fleet's clock: when a silent Worker goes offline, when its Runs' grace runs out, from the configuration."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, BinaryIO

from taskrunner.config import parse_config
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.links import LinkEvent, WorkerLink
from taskrunner.sshkeys import HostKeyError
from tests.conftest import wait_until

FILE = ".taskrun.yaml"
WORKERS = "workers: {local: {transport: local}}\n"


def _fleet(tmp_path: Path, scheduler: str, events: list[LinkEvent] | None = None) -> tuple[Fleet, WorkerState]:
    post = (events if events is not None else []).append
    fleet = Fleet(parse_config(WORKERS + f"scheduler: {scheduler}\n", FILE), tmp_path, post)
    worker = fleet["local"]
    worker.reconnect_at = None  # no session: these tests only move the clock
    return fleet, worker


class _QuietLink(WorkerLink):
    """A session whose Worker says nothing and ends at once."""

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        return io.BytesIO(), io.BytesIO()

    def _disconnect(self) -> None:
        pass


class _StuckLink(WorkerLink):
    """A host that accepts the connection and then says nothing until released."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.release = threading.Event()

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        assert self.release.wait(20)
        raise HostKeyError("host key of [127.0.0.1]:2222 does not match the pinned key")

    def _disconnect(self) -> None:
        pass


def test_a_silent_worker_goes_offline_after_worker_offline_after(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{worker_offline_after: 4s}")
    worker.online, worker.last_seen = True, 100.0

    fleet.tick(103.9)
    assert worker.online

    fleet.tick(104.1)
    assert not worker.online and worker.error == "no heartbeat for 4s"
    assert worker.offline_since == 104.1


def test_runs_of_an_offline_worker_wait_out_worker_grace(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{worker_grace: 2s}")
    worker.runs.add("r1")
    worker.offline_since = 100.0

    assert fleet.tick(101.9) == []
    assert fleet.tick(102.1) == [worker]


def test_a_reloaded_configuration_changes_grace_and_offline_after(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}")
    worker.runs.add("r1")
    worker.offline_since = 100.0
    assert fleet.tick(130.0) == []

    fleet.configure(parse_config(WORKERS + "scheduler: {worker_grace: 10s, worker_offline_after: 20s}\n", FILE))

    assert fleet.tick(130.0) == [worker]
    assert (fleet.grace, fleet.offline_after) == (10.0, 20.0)


def test_a_new_session_bounds_its_reads_a_little_past_worker_offline_after(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{worker_offline_after: 30s}")
    link = worker.link = _QuietLink(worker.spec, lambda event: None)
    worker.reconnect_at = 0.0

    fleet.tick(1.0)

    assert link.generation == 1
    assert link.read_timeout == 32.0


def test_opening_a_session_does_not_wait_for_the_host_and_a_refused_key_marks_it_untrusted(tmp_path: Path) -> None:
    events: list[LinkEvent] = []
    fleet, worker = _fleet(tmp_path, "{}", events)
    link = worker.link = _StuckLink(worker.spec, events.append)
    worker.reconnect_at = 0.0

    fleet.tick(1.0)  # returns while the host has not answered

    assert worker.generation == 1 and events == [] and worker.reconnect_at is None
    link.release.set()
    (event,) = wait_until(lambda: events, 10, "the session to end")
    assert (event.generation, event.message) == (1, None) and "does not match the pinned key" in event.reason
    fleet.link_down(worker, event.reason, 2.0)
    assert worker.trusted is False and not worker.online and worker.reconnect_at == 2.5
