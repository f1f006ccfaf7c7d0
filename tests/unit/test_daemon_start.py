"""A daemon's start: a ping is answered while it restores, other requests once its loop runs; doctor's
start-up checks wait DOCTOR_DELAY so they never share the CPU with the first answers (daemon.py)."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from taskrunner import daemon as daemon_module
from taskrunner import gitbase, gitops
from taskrunner.config import load_config
from taskrunner.daemon import Daemon, _Request
from tests.conftest import git, wait_until


def test_a_starting_daemon_answers_a_ping_at_once_and_other_requests_once_its_loop_runs(repo: Path) -> None:
    daemon = Daemon(repo, load_config(repo))
    assert daemon._ask({"command": "ping"}) == {"ok": True, "pid": os.getpid(), "starting": True}
    answers: list[dict[str, Any]] = []
    asking = threading.Thread(target=lambda: answers.append(daemon._ask({"command": "cancel", "task": "x"})),
                              daemon=True)
    asking.start()
    request = daemon.events.get(timeout=30)  # handed to the loop, which has not started: nobody answers it
    assert isinstance(request, _Request) and request.payload == {"command": "cancel", "task": "x"}
    assert asking.is_alive() and answers == []
    daemon._serving.set()  # the loop runs
    daemon._handle(request)
    asking.join(timeout=30)
    assert answers and "starting" not in answers[0] and answers[0]["ok"] is False  # no Task x: from the engine
    # Once the loop runs, a ping, `workers` and `status` go through it too (a stuck loop does not answer).
    for command in ("ping", "workers", "status"):
        pinging = threading.Thread(target=lambda: answers.append(daemon._ask({"command": command})), daemon=True)
        pinging.start()
        ping = daemon.events.get(timeout=30)
        assert isinstance(ping, _Request) and ping.payload == {"command": command}
        daemon._handle(ping)
        pinging.join(timeout=30)
        assert answers[-1]["ok"] is True and "starting" not in answers[-1]
    assert answers[-3] == {"ok": True, "pid": os.getpid()}


def test_a_starting_daemon_lists_its_workers_and_leaves_status_to_the_records_at_once(repo: Path) -> None:
    daemon = Daemon(repo, load_config(repo))
    workers = daemon._ask({"command": "workers"})  # the loop has not started: answered on this thread
    assert workers["ok"] is True and workers["starting"] is True
    assert [(w["name"], w["online"]) for w in workers["workers"]] == [("local", False)]
    status = daemon._ask({"command": "status"})
    assert status["ok"] is False and status["starting"] is True
    assert daemon.events.empty()  # nothing waits for the loop


def test_status_reads_the_records_while_the_daemon_starts(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskrunner.cli import status as status_cli
    from taskrunner.records import Records
    from taskrunner import control

    monkeypatch.setattr(control, "request", lambda state, payload, **kw: {"ok": False, "starting": True,
                                                                           "error": "the daemon is starting"})
    from taskrunner.status_query import StatusQuery
    query = StatusQuery((), frozenset(), None)
    assert status_cli.from_daemon(Records(repo), query) is None  # the caller reads runs/ itself


def _loop_with(events: queue.Queue[object], stop: threading.Event, doctor: threading.Event,
               handled: list[object], count: int) -> Any:
    def handle(event: object) -> bool:
        handled.append(event)
        if len(handled) == count:
            stop.set()
        return True

    return SimpleNamespace(
        _stop=stop, once=False, config=None, _tasks_touched=False, _next_poll=None, events=events,
        _serving=threading.Event(), _doctor_due=None, _doctor=doctor.set,
        fleet=SimpleNamespace(tick=lambda now: [], next_wakeup=lambda: None,
                              keyring=SimpleNamespace(next_retirement=lambda: None)),
        engine=SimpleNamespace(next_wakeup=None, pending=SimpleNamespace(due=None), schedule=lambda: None,
                               refresh_keys=lambda: None),
        syncer=SimpleNamespace(stale=False), repo=SimpleNamespace(moving=False),
        _flush=lambda force=False, wait=False: None, _handle=handle)


def test_doctor_checks_do_not_start_with_the_first_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "DOCTOR_DELAY", 3600.0)
    events: queue.Queue[object] = queue.Queue()
    for n in range(50):
        events.put(n)
    stop, doctor, handled = threading.Event(), threading.Event(), []
    loop = _loop_with(events, stop, doctor, handled, 50)
    Daemon._loop(loop)
    assert handled == list(range(50)) and loop._serving.is_set()
    assert not doctor.is_set() and loop._doctor_due is not None  # still to come


def test_doctor_checks_start_once_their_delay_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "DOCTOR_DELAY", 0.0)
    events: queue.Queue[object] = queue.Queue()
    stop, doctor, handled = threading.Event(), threading.Event(), []
    loop = _loop_with(events, stop, doctor, handled, 1)
    runner = threading.Thread(target=Daemon._loop, args=(loop,), daemon=True)
    runner.start()
    try:
        wait_until(doctor.is_set, 30, "doctor's checks to start")
        assert loop._doctor_due is None
    finally:
        events.put("done")
        runner.join(timeout=30)
    assert not runner.is_alive()


def test_state_dir_asks_git_once_per_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "--quiet")
    asked: list[tuple[str, ...]] = []
    real = gitbase._ask

    def counting(cwd: Path, *args: str) -> str | None:
        asked.append(args)
        return real(cwd, *args)

    monkeypatch.setattr(gitbase, "_ask", counting)
    assert gitops.state_dir(root) == root.resolve() / ".git" / "taskrun"
    assert gitops.state_dir(root) == gitops.state_dir(root) == root.resolve() / ".git" / "taskrun"
    assert gitops.git_dirs(root) == (root.resolve() / ".git",)
    assert len(asked) == 1


def test_state_dir_follows_a_repository_made_or_moved_after_it_was_asked(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    git(outer, "init", "--quiet")
    assert gitops.state_dir(inner) == outer.resolve() / ".git" / "taskrun"
    git(inner, "init", "--quiet")  # a repository of its own now
    assert gitops.state_dir(inner) == inner.resolve() / ".git" / "taskrun"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert gitops.git_dirs(plain) == ()  # no repository: asked again next time
    git(plain, "init", "--quiet")
    assert gitops.git_dirs(plain) == (plain.resolve() / ".git",)


def test_taskrun_up_holds_the_daemon_lock_before_it_reads_its_configuration(repo: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """From `taskrun up`'s first step, a command sent to it waits for its socket (control.request) rather than
    finding no daemon: the lock is taken before the configuration is read or the daemon is loaded."""
    from taskrunner import config as config_module
    from taskrunner import daemonlock
    from taskrunner.cli.main import main
    from taskrunner.errors import ConfigError

    seen: list[bool] = []

    def reading(root: Path) -> Any:
        seen.append(daemonlock.held(gitbase.state_dir(root)))
        raise ConfigError(root / ".taskrun.yaml", "stop here")

    monkeypatch.setattr(config_module, "load_config", reading)
    assert main(["-C", str(repo), "up", "--once"]) != 0
    assert seen == [True]
    assert not daemonlock.held(gitbase.state_dir(repo))  # let go with the failed start


def test_a_second_taskrun_up_is_refused_naming_the_first(repo: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from taskrunner import daemonlock
    from taskrunner.cli.main import main

    fd = daemonlock.take(gitbase.state_dir(repo), repo)
    try:
        assert main(["-C", str(repo), "up", "--once"]) != 0
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert f"a taskrun daemon is already running in {repo} (pid {os.getpid()})" in err and "Traceback" not in err


def test_commands_looking_at_the_lock_never_make_a_starting_daemon_lose_it(repo: Path) -> None:
    """`held` takes a shared lock for a moment; `taskrun up` started while a command looked said "a daemon is
    already running (pid unknown)" (the demo's post-receive hook did it in CI)."""
    from taskrunner import daemonlock

    state = gitbase.state_dir(repo)
    state.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def look() -> None:
        while not stop.is_set():
            daemonlock.held(state)

    lookers = [threading.Thread(target=look, daemon=True) for _ in range(3)]
    for looker in lookers:
        looker.start()
    try:
        for _ in range(200):
            os.close(daemonlock.take(state, repo))
    finally:
        stop.set()
        for looker in lookers:
            looker.join(10)
    held = daemonlock.take(state, repo)
    try:
        with pytest.raises(daemonlock.LockBusy, match=f"pid {os.getpid()}"):
            daemonlock.take(state, repo)  # a daemon's lock is still refused, after the grace
    finally:
        os.close(held)


@pytest.mark.parametrize(("err", "fix"), [(30, "writable by this user"), (13, "writable by this user"),
                                          (40, r"remove it \(the daemon makes it again\)")])
def test_a_lock_that_cannot_be_opened_is_said_with_a_fix_that_can_be_followed(repo: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                                            err: int, fix: str) -> None:
    """A read-only state dir was told to remove the lock, which it cannot."""
    from taskrunner import daemonlock
    from taskrunner.errors import LockError

    def refuse(path: Path, flags: int, mode: int = 0o600) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(daemonlock, "open_regular", refuse)
    with pytest.raises(LockError, match=fix):
        daemonlock.take(gitbase.state_dir(repo), repo)
