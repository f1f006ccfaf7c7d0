"""The fleet's clock (when a silent Worker goes offline, when its Runs' grace runs out, from the
configuration) and its keys (a Worker's hello must present the result key pinned for it)."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from taskrunner.config import parse_config
from taskrunner.enroll import wanted_keys
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent, WorkerLink
from taskrunner.links.local import LocalLink
from taskrunner.sessionauth import verify_auth
from taskrunner.signing import SigningKey
from taskrunner.sshkeys import HostKeyError
from taskrunner.worker.trust import TrustStore, worker_key
from tests.conftest import wait_until

FILE = ".taskrun.yaml"
WORKERS = "workers: {local: {transport: local}}\n"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
PINNED = SigningKey.generate()  # the result key `taskrun worker add` pinned for the ssh Worker
OTHER = SigningKey.generate()


def _fleet(tmp_path: Path, scheduler: str, events: list[LinkEvent] | None = None,
           workers: str = WORKERS) -> tuple[Fleet, WorkerState]:
    post = (events if events is not None else []).append
    keyring, _ = Keyring.ensure(tmp_path / "cp", 0.0)
    fleet = Fleet(parse_config(workers + f"scheduler: {scheduler}\n", FILE), tmp_path, post, keyring)
    worker = next(iter(fleet))
    worker.reconnect_at = None  # no session: these tests only move the clock
    return fleet, worker


def _ssh_workers(worker_key_line: str | None) -> str:
    pin = f', worker_key: "{worker_key_line}"' if worker_key_line else ""
    return f'workers: {{build: {{transport: ssh, host: 127.0.0.1, host_key: "{HOST_KEY}"{pin}}}}}\n'


def _hello(key: SigningKey | None, trust: dict[str, Any] | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"protocol": 2, "version": "0.1", "worker": "w", "agents": ["shell"],
                              "trust": trust or {"keys": [], "issued_at": None}, "challenge": "c" * 32}
    if key is not None:
        fields["worker_key"] = key.public_line
    return fields


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
    assert worker.trusted is False and not worker.online and 2.25 <= (worker.reconnect_at or 0) <= 2.5


# ---------------------------------------------------------------- result keys in hello


def test_a_hello_presenting_the_pinned_result_key_is_answered_and_ready_brings_the_worker_online(
        tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}", workers=_ssh_workers(PINNED.public_line))

    auth = fleet.hello(worker, _hello(PINNED), 5.0)

    assert auth is not None and auth.type == "auth"
    assert verify_auth(auth["envelope"], "c" * 32, PINNED.key_id, {fleet.keyring.current.key_id:
                                                                    fleet.keyring.current.public}, {}, 5.0)
    assert not worker.online, "online only once the session is authenticated"
    fleet.ready(worker, 5.5)
    assert worker.online and worker.result_key == PINNED.public
    assert worker.error is None and worker.last_seen == 5.5


def test_a_worker_trusting_what_the_keyring_holds_is_trusted_and_one_trusting_more_gets_no_runs_until_corrected(
        tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}", workers=_ssh_workers(PINNED.public_line))
    assert fleet.hello(worker, _hello(PINNED), 5.0) is not None
    fleet.ready(worker, 5.0)
    wanted = wanted_keys(fleet.keyring, 5.0)

    assert fleet.trust_correction(worker, wanted, 5.0) is None
    assert worker.trusted is True and not worker.trust_pending

    correction = fleet.trust_correction(worker, [*wanted, OTHER.key_id], 6.0)
    assert correction is not None and correction.type == "trust"
    assert worker.trust_pending and not fleet.views()[0].online
    assert fleet.trust_correction(worker, wanted, 6.5) is None  # the Worker took it
    assert not worker.trust_pending and worker.trusted is True


def test_a_worker_refusing_the_correction_is_untrusted_with_the_reason_and_the_fix(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}", workers=_ssh_workers(PINNED.public_line))
    trust = {"keys": [fleet.keyring.current.key_id, OTHER.key_id], "issued_at": 4.0}
    assert fleet.hello(worker, _hello(PINNED, trust), 5.0) is not None
    fleet.ready(worker, 5.0)
    assert fleet.trust_correction(worker, trust["keys"], 5.0) is not None

    fleet.refused(worker, "trust", "trust refused: replayed or out-of-date statement", 5.1)

    assert worker.trusted is False and not worker.online and not fleet.views()[0].online
    error = worker.view()["error"]
    assert f"trusts {', '.join(sorted(trust['keys']))}, not what this control plane gave it" in error
    assert "replayed or out-of-date" in error and "changed behind the control plane's back" in error
    assert "`taskrun-worker trust --reset`" in error and "`taskrun worker add build --host 127.0.0.1 --token" in error


def test_a_hello_whose_trust_store_is_dated_in_the_future_is_untrusted_at_once(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}", workers=_ssh_workers(PINNED.public_line))
    trust = {"keys": [fleet.keyring.current.key_id], "issued_at": 5.0 + 10 * 365 * 86400}

    assert fleet.hello(worker, _hello(PINNED, trust), 5.0) is None

    assert worker.trusted is False and not worker.online
    assert "trust store dated" in (worker.error or "") and "taskrun-worker trust --reset" in (worker.error or "")


def test_a_hello_presenting_another_result_key_is_refused_naming_both_keys(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}", workers=_ssh_workers(PINNED.public_line))

    assert fleet.hello(worker, _hello(OTHER), 5.0) is None

    assert not worker.online and worker.trusted is False
    assert worker.error is not None
    assert f"result key changed: pinned {PINNED.key_id}, seen {OTHER.key_id}" in worker.error
    assert "enroll it again with `taskrun worker add build --host 127.0.0.1`" in worker.error
    assert 5.25 <= (worker.reconnect_at or 0) <= 5.5 and worker.offline_since == 5.0


def test_a_hello_from_an_ssh_worker_with_no_pinned_result_key_is_refused(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}", workers=_ssh_workers(None))

    assert fleet.hello(worker, _hello(PINNED), 5.0) is None

    assert not worker.online and worker.trusted is False
    assert "has no pinned result key (worker_key)" in (worker.error or "")


def test_a_hello_without_a_result_key_is_refused_as_an_old_worker(tmp_path: Path) -> None:
    fleet, worker = _fleet(tmp_path, "{}", workers=_ssh_workers(PINNED.public_line))

    assert fleet.hello(worker, _hello(None), 5.0) is None

    assert not worker.online and "presents no valid result key" in (worker.error or "")
    assert "upgrade its taskrun-worker" in (worker.error or "")


def test_the_local_worker_is_enrolled_at_connect_and_its_hello_must_present_its_homes_key(tmp_path: Path) -> None:
    events: list[LinkEvent] = []
    fleet, worker = _fleet(tmp_path, "{}", events)
    worker.reconnect_at = 0.0
    fleet.tick(1.0)  # makes the LocalLink, enrolls its home, starts `taskrun-worker serve`
    assert isinstance(worker.link, LocalLink)
    link = worker.link
    (event,) = wait_until(lambda: [e for e in events if e.message is not None], 20, "the local Worker's hello")
    # LocalLink._disconnect does not close the Worker's stdout; close it here once the session has ended.
    assert link._proc is not None and link._proc.stdout is not None
    from_worker = link._proc.stdout
    try:
        home = link.home
        assert worker.result_key == worker_key(home).public
        assert sorted(k["key_id"] for k in TrustStore(home).state()["keys"]) == wanted_keys(fleet.keyring, 1.0)
        assert event.message is not None and event.message.type == "hello"
        assert event.message["trust"]["keys"] == [fleet.keyring.current.key_id]
        assert fleet.hello(worker, event.message.fields, 2.0) is not None
        fleet.ready(worker, 2.0)
        assert fleet.trust_correction(worker, event.message["trust"]["keys"], 2.0) is None
        assert worker.online and worker.trusted is True

        # The same hello with a key other than the home's is refused, and the session closed.
        assert fleet.hello(worker, dict(event.message.fields, worker_key=OTHER.public_line), 3.0) is None
        assert not worker.online and "result key changed" in (worker.error or "")
        wait_until(lambda: [e for e in events if e.message is None], 20, "the refused session to end")
    finally:
        fleet.close()
        wait_until(lambda: [e for e in events if e.message is None], 20, "the session to end")
        from_worker.close()


# ---------------------------------------------------------------- which Agents' CLIs a Worker has

AGENTS = ("agents: {shell: {preset: shell}, claude: {preset: claude}, codex: {preset: codex}, "
          "own: {preset: aider, path: /opt/aider/bin/aider}, cmd: {preset: command, command: [x]}}\n")
ALL = "workers: {local: {transport: local, agents: [shell, claude, codex, own, cmd]}}\n"


def _agents_fleet(tmp_path: Path) -> tuple[Fleet, WorkerState]:
    fleet, worker = _fleet(tmp_path, "{}", workers=AGENTS + ALL)
    worker.online, worker.hello = True, _hello(None)
    return fleet, worker


def test_a_worker_runs_only_agents_whose_cli_its_ready_lists(tmp_path: Path) -> None:
    fleet, worker = _agents_fleet(tmp_path)
    fleet.ready(worker, 1.0, {"claude": {"version": "2.1.332 (Claude Code)", "path": "/usr/bin/claude"},
                              "shell": {"version": None, "path": "bash"}})
    view = fleet.views()[0]
    # shell and command need no CLI, an Agent with `path` is taken as available wherever offered.
    assert view.lacking == {"codex": "codex"}
    assert worker.view()["presets"]["claude"] == {"version": "2.1.332 (Claude Code)", "path": "/usr/bin/claude"}


def test_an_older_worker_without_agents_in_ready_offers_the_presets_its_hello_lists(tmp_path: Path) -> None:
    fleet, worker = _agents_fleet(tmp_path)
    worker.hello["agents"] = ["shell", "command", "codex"]
    fleet.ready(worker, 1.0)
    assert fleet.views()[0].lacking == {"claude": "claude"}
    assert worker.view()["presets"]["codex"] == {"version": None, "path": None}


def test_a_worker_never_seen_lacks_nothing_yet(tmp_path: Path) -> None:
    fleet, _ = _fleet(tmp_path, "{}", workers=AGENTS + ALL)
    assert fleet.views()[0].lacking == {}


@pytest.mark.parametrize("agents", [
    "not a mapping", ["claude"], {"claude": "2.1"}, {"claude": {"version": 7, "path": ["x"]}},
    {"no-such-preset": {"version": "1"}, "claude": {"version": "v" * 5000}},
])
def test_a_malformed_agents_list_in_ready_never_raises(tmp_path: Path, agents: Any) -> None:
    fleet, worker = _agents_fleet(tmp_path)
    fleet.ready(worker, 1.0, agents)
    presets = worker.offered_presets() or {}
    assert set(presets) <= {"shell", "command", "claude", "codex", "gemini", "aider"}
    assert all(len(entry["version"] or "") <= 200 for entry in presets.values())
    fleet.views()


def test_a_pause_on_one_worker_shows_in_its_view_only(tmp_path: Path) -> None:
    from taskrunner.pauses import Pause, Pauses

    fleet, _ = _agents_fleet(tmp_path)
    table = Pauses([Pause("claude", "local", 100.0, 0.0), Pause("codex", "elsewhere", 100.0, 0.0)])
    assert fleet.views(table, 50.0)[0].paused == {"claude": 100.0}
    assert fleet.views(table, 100.0)[0].paused == {}


@pytest.mark.parametrize("change", ["identity: /keys/fixed", "user: deploy", "known_hosts: /etc/ssh/ssh_known_hosts",
                                    "port: 2222", "host_key"])
def test_a_fixed_identity_or_host_key_ends_the_session_so_the_next_uses_it(tmp_path: Path, change: str) -> None:
    """A Worker refused for its identity or its changed host key stayed refused after the fix was saved in
    .taskrun.yaml until the daemon restarted: its session object kept the old values."""
    base = f'workers: {{build: {{transport: ssh, host: 127.0.0.1, host_key: "{HOST_KEY}", labels: {{a: "1"}}}}}}\n'
    fleet, worker = _fleet(tmp_path, "{}", workers=base)
    closed: list[bool] = []
    link = worker.link = _QuietLink(worker.spec, lambda event: None)
    link.close = lambda: closed.append(True)  # type: ignore[method-assign]
    worker.online = True

    changed = (base.replace(HOST_KEY, HOST_KEY[:-4] + "AAAA") if change == "host_key"  # re-pinned
               else base.replace("host: 127.0.0.1", f"host: 127.0.0.1, {change}", 1))
    fleet.configure(parse_config(changed + "scheduler: {}\n", FILE))

    assert closed == [True] and worker.link is None and worker.online is False and worker.reconnect_at == 0.0


def test_labels_or_slots_changed_keep_the_session(tmp_path: Path) -> None:
    base = f'workers: {{build: {{transport: ssh, host: 127.0.0.1, host_key: "{HOST_KEY}", labels: {{a: "1"}}}}}}\n'
    fleet, worker = _fleet(tmp_path, "{}", workers=base)
    link = worker.link = _QuietLink(worker.spec, lambda event: None)
    worker.online = True

    fleet.configure(parse_config(base.replace('a: "1"', 'a: "2"').replace("host: 127.0.0.1", "host: 127.0.0.1, slots: 5")
                                 + "scheduler: {}\n", FILE))

    assert worker.link is link and worker.online and worker.spec.slots == 5
