"""Real network faults between the daemon and sshd Workers (issue 13, "Network faults, real ones").

Each Worker is a real OpenSSH sshd inside a network namespace of its own
(tests/netns.py), reached by the real `taskrun up` over a veth pair; the
faults are iptables rules and a tbf qdisc on that link: a blackhole, resets,
30% random loss, partitions that heal after 5 s, 30 s or after the grace period,
one-way loss either way, and a bandwidth limit.

The Agent (the shell preset) prints a numbered line every 0.1 s, so for every
fault the test knows exactly what output.log must hold. Where the Worker
comes back, the Agent prints until a gate opens (tests/agentprobes.py, on the
host side of the Worker's link), and the gate opens only once the daemon has
recorded lines the Agent printed after the link healed: the Run is still
running when it is reattached (a Run that ended during the cut only has its
output collected, which proves less). What is asserted, from the README
("Workers and the session protocol", "SSH Workers"):

- detection: a Worker silent for `scheduler.worker_offline_after` is marked
  offline, and a session silent for that plus READ_MARGIN_SECONDS is dead:
  the "offline" notice comes within that bound of the cut;
- back within `scheduler.worker_grace`, the Run is reattached while it runs:
  output printed after the heal reaches output.log; then one Run, every line
  once, COMPLETED;
- gone longer, the Run fails ("unreachable for longer than the grace
  period") and runs again on the other Worker; when the first Worker comes
  back, its duplicate Agent is stopped and its stale result is not recorded;
- every Run record reaches exactly one final status, written once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from taskrunner import agents, keys
from taskrunner.defaults import MIN_OFFLINE_AFTER_SECONDS, READ_MARGIN_SECONDS
from taskrunner.worker import agentprobe
from tests.agentprobes import Gate
from tests.conftest import (Daemon, git, run_record, status_of, task_record, taskrun, wait_status, wait_until,
                            write_task)
from tests.netns import Netns, NetnsSshdHost, start_netns_sshd
from tests.sshd import enroll

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

#: `scheduler.worker_offline_after` in these tests: the least the configuration accepts.
OFFLINE_AFTER = MIN_OFFLINE_AFTER_SECONDS
#: README: a Worker silent for worker_offline_after is offline; a session silent for that plus
#: READ_MARGIN_SECONDS is dead. The offline notice must come within this of the cut.
DETECTION_BOUND = OFFLINE_AFTER + READ_MARGIN_SECONDS
#: `scheduler.worker_grace` where the Worker must come back in time (its Run reattached).
LONG_GRACE = "30s"
#: `scheduler.worker_grace` where it must not (its Run retried on the other Worker).
SHORT_GRACE = "1s"
#: How long `taskrun up` may take to have every Worker online.
UP_SECONDS = 60.0
#: The daemon reconnects with backoff up to 30 s and a connect attempt into a blackhole waits 10 s:
#: how long a healed Worker may take to be back online.
BACK_ONLINE_SECONDS = 45.0
#: Lines the daemon must have recorded past what the Agent had printed when the link healed, before
#: the gate opens: output it can only have from the Run reattached while it runs.
AFTER_HEAL_LINES = 10
#: How long a reattached Run may take to deliver AFTER_HEAL_LINES lines once its Worker is back online.
AFTER_HEAL_SECONDS = 30.0
#: How long the gated Agent waits on one connection to its gate: a cut link drops the attempt (or the
#: refusal), and the Agent must keep printing through the fault, not wait out the kernel's SYN retries.
GATE_CONNECT_SECONDS = 1

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


def lines(count: int, pad: int = 0) -> str:
    """What the Agent of `agent(count, pad)` prints: "line 1" ... "line COUNT" (each padded), then "done"."""
    filler = " " + "x" * pad if pad else ""
    return "".join(f"line {i}{filler}\n" for i in range(1, count + 1)) + "done\n"


def agent(count: int, pad: int = 0, long_on: str | None = None, long_count: int = 0) -> str:
    """A shell Agent printing a numbered line every 0.1 s, `count` of them, then "done".

    With `long_on` (a Worker-side interface name), it prints `long_count` lines instead when
    it runs on that Worker: an Agent sees its own network namespace in /proc/net/dev.
    """
    filler = " " + "x" * pad if pad else ""
    head = f"n={count}\n"
    if long_on is not None:
        head += f"if grep -q '{long_on}:' /proc/net/dev; then n={long_count}; fi\n"
    return head + f'for i in $(seq 1 "$n"); do echo "line $i{filler}"; sleep 0.1; done\necho done'


def gated_agent(gate: Gate) -> str:
    """A shell Agent printing "line 1", "line 2", ... every 0.1 s until `gate` opens, then "done".

    While the link is cut, each look at the gate waits up to GATE_CONNECT_SECONDS: fewer lines, never none.
    """
    return ("i=0\n"
            f"until timeout {GATE_CONNECT_SECONDS} bash -c '{gate.check}'; do\n"
            '  i=$((i + 1)); echo "line $i"; sleep 0.1\n'
            "done\n"
            "echo done")


@dataclass
class NetWorker:
    """A Worker `w<N>` in its own namespace."""

    name: str
    ns: Netns
    host: NetnsSshdHost

    def run_dir(self, run_id: str) -> Path:
        return self.host.home / "runs" / run_id


@pytest.fixture(scope="module")
def agent_versions(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The Worker's cache of Agent CLI versions (worker/agentprobe.py), asked once for the module.

    A fresh Worker home asks every Agent CLI for its version before its first `ready`, which takes
    seconds; each host starts with this cache, as a Worker does after its first session.
    """
    home = tmp_path_factory.mktemp("probe")
    agentprobe.available(home, agents.PRESETS)
    cache = home / agentprobe.CACHE_FILE
    return cache.read_bytes() if cache.exists() else b""


@pytest.fixture
def net_workers(daemon: Daemon, tmp_path: Path, agent_versions: bytes) -> Iterator[Callable[..., list[NetWorker]]]:
    """Start sshd Workers w1, w2, ... each in a namespace of its own, as the repository's only Workers.

    Teardown (also when the test failed): the daemon, then each host's sshd, its Agents, and its
    namespace with every rule and qdisc in it.
    """
    made: list[NetWorker] = []

    def start(count: int, grace: str) -> list[NetWorker]:
        _, public = keys.ensure_ssh_key(daemon.root / ".git" / "taskrun")
        for n in range(1, count + 1):
            ns = Netns.create()
            try:
                host = start_netns_sshd(ns, tmp_path / f"host{n}", public)
            except BaseException:
                ns.close()
                raise
            made.append(NetWorker(f"w{n}", ns, host))
            if agent_versions:
                cache = host.home / agentprobe.CACHE_FILE
                cache.write_bytes(agent_versions)
                cache.chmod(0o600)
        state = daemon.root / ".git" / "taskrun"
        entries = "".join(
            f'  {w.name}: {{transport: ssh, host: {w.ns.addr}, port: {w.host.port}, '
            f'host_key: "{w.host.host_key_line}", worker_key: "{enroll(w.host.home, state)}"}}\n'
            for w in made)
        (daemon.root / ".taskrun.yaml").write_text(
            f"workers:\n{entries}scheduler: {{worker_offline_after: {OFFLINE_AFTER:g}s, worker_grace: {grace}}}\n")
        return made

    yield start
    daemon.stop()
    for worker in made:
        with contextlib.suppress(Exception):
            worker.ns.heal()
        worker.host.stop()
        for pid_file in (worker.host.home / "runs").glob("*/pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError, OSError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        worker.ns.close()


@pytest.fixture
def link_gate() -> Iterator[Callable[[NetWorker], Gate]]:
    """A closed `Gate` on this machine's side of a Worker's link, where its Agents can reach it
    (they run in the Worker's namespace, which has a loopback of its own); closed at teardown."""
    made: list[Gate] = []

    def make(worker: NetWorker) -> Gate:
        gate = Gate(bind=worker.ns.host_addr)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


def up(daemon: Daemon) -> None:
    """`taskrun up`, waiting until every Worker is online: as `Daemon.start`, with a deadline of
    UP_SECONDS (every Worker's first session is an SSH handshake and a Python start, slow on a busy
    machine)."""
    with open(daemon.log, "ab") as log:
        daemon.proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(daemon.root), "up"],
                                       stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: _online(daemon), UP_SECONDS, "the daemon to answer with every Worker online")


def _online(daemon: Daemon) -> bool:
    assert daemon.proc is not None
    if daemon.proc.poll() is not None:
        raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.output()}")
    result = taskrun(daemon.root, "workers", "--json")
    if result.returncode != 0:
        return False
    data = json.loads(result.stdout)
    return bool(data["daemon"]) and all(w["reachable"] for w in data["workers"])


# -- what the tests read ------------------------------------------------------------


def output(root: Path, task_id: str, number: int = 1) -> bytes:
    path = root / "runs" / task_id / f"run-{number}" / "output.log"
    return path.read_bytes() if path.exists() else b""


def printed(root: Path, task_id: str, number: int = 1) -> int:
    """How many numbered lines the Run's recorded output holds (complete lines only)."""
    return output(root, task_id, number).count(b"\n")


class Log:
    """The daemon's log from a mark on: what it said after a moment the test chose."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.mark = len(daemon.output())

    def text(self) -> str:
        return self.daemon.output()[self.mark:]


def cut(daemon: Daemon, fault: Callable[[], None]) -> tuple[float, Log]:
    """Apply `fault`; the monotonic time it took effect and the daemon's log from then on."""
    log = Log(daemon)
    fault()
    return time.monotonic(), log


def detected(log: Log, worker: str, since: float) -> float:
    """Seconds from `since` until the daemon said `worker` is offline; fails past DETECTION_BOUND + 5 s."""
    wait_until(lambda: f"Worker '{worker}' offline" in log.text(), DETECTION_BOUND + 5,
               f"the daemon to mark {worker} offline")
    return time.monotonic() - since


def record_history(root: Path, task_id: str, number: int) -> list[str]:
    """The statuses a Run record held in each committed version, oldest first."""
    path = f"runs/{task_id}/run-{number}/status.json"
    commits = git(root, "log", "--all", "--format=%H", "--", path).split()
    statuses = []
    for commit in reversed(commits):
        shown = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{path}"], check=False,
                               capture_output=True, text=True)
        if shown.returncode == 0 and '"status"' in shown.stdout:
            statuses.append(json.loads(shown.stdout)["status"])
    return statuses


def assert_one_final_status(root: Path, task_id: str, runs: int) -> None:
    """The Task has exactly `runs` Runs; each Run record reached one final status, committed once."""
    record = task_record(root, task_id)
    assert record is not None and record["status"] in FINAL, record
    assert len(record["runs"]) == runs, record["runs"]
    assert not (root / "runs" / task_id / f"run-{runs + 1}").exists()
    for number in range(1, runs + 1):
        run = run_record(root, task_id, number)
        assert run is not None and run["status"] in FINAL, run
        # The record's commit follows its write within the commit window.
        history = wait_until(lambda n=number: (h := record_history(root, task_id, n)) and h[-1] in FINAL and h,
                             10, f"run-{number}'s final record to be committed")
        # Written once: the one final version is the last, and no later commit touched the record.
        assert [status for status in history if status in FINAL] == [run["status"]], history


def assert_reattached(root: Path, task_id: str, expected: str, worker: str = "w1") -> None:
    """One Run on `worker`, COMPLETED, whose output.log is exactly what the Agent printed."""
    wait_status(root, task_id, "COMPLETED", "FAILED", timeout=60)
    run = run_record(root, task_id, 1)
    assert run is not None and run["status"] == "COMPLETED", run
    assert run["worker"] == worker
    assert output(root, task_id) == expected.encode()
    assert run["output_bytes"] == len(expected.encode())
    assert_one_final_status(root, task_id, runs=1)


def agent_printed(worker: NetWorker, root: Path, task_id: str) -> int:
    """How many lines the Agent of the Task's first Run has printed: its output.log on the Worker."""
    run = run_record(root, task_id, 1)
    assert run is not None
    path = worker.run_dir(str(run["run_id"])) / "output.log"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def heal_and_reattach_mid_run(daemon: Daemon, worker: NetWorker, task_id: str, gate: Gate, log: Log) -> None:
    """Heal `worker`'s link; the Run of `gated_agent(gate)` must be reattached while it runs, and end
    with every line once.

    The gate opens only once output.log holds more than AFTER_HEAL_LINES lines past what the Agent
    had printed at the heal, and the Run is still RUNNING then.
    """
    worker.ns.heal()
    at_heal = agent_printed(worker, daemon.root, task_id)
    wait_until(lambda: f"Worker '{worker.name}' back online" in log.text(), BACK_ONLINE_SECONDS,
               f"{worker.name} to come back")
    wait_until(lambda: printed(daemon.root, task_id) > at_heal + AFTER_HEAL_LINES, AFTER_HEAL_SECONDS,
               f"the reattached Run to record output past line {at_heal + AFTER_HEAL_LINES} "
               f"(the Agent had printed {at_heal} lines at the heal; recorded: {printed(daemon.root, task_id)})")
    assert status_of(daemon.root, task_id) == "RUNNING", "the Run should still run until the gate opens"
    gate.open()

    wait_status(daemon.root, task_id, "COMPLETED", "FAILED", timeout=60)
    count = printed(daemon.root, task_id) - 1  # the numbered lines, then "done"
    assert count > at_heal + AFTER_HEAL_LINES
    assert_reattached(daemon.root, task_id, lines(count), worker.name)


def started(root: Path, task_id: str, count: int) -> None:
    wait_until(lambda: printed(root, task_id) >= count, 30, f"'{task_id}' to print {count} lines")


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# -- a Worker that comes back within the grace: its Run is reattached -----------------


def test_resets_are_detected_in_bound_and_the_run_is_reattached_with_every_line_once(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]],
        link_gate: Callable[[NetWorker], Gate]) -> None:
    (w1,) = net_workers(1, LONG_GRACE)
    gate = link_gate(w1)
    up(daemon)
    write_task(daemon.root, "resets", gated_agent(gate))
    started(daemon.root, "resets", 5)

    since, log = cut(daemon, w1.ns.reset)
    elapsed = detected(log, "w1", since)
    assert elapsed <= DETECTION_BOUND, f"offline after {elapsed:.1f}s"
    assert w1.ns.dropped() > 0

    heal_and_reattach_mid_run(daemon, w1, "resets", gate, log)


@pytest.mark.parametrize(("seconds", "grace"), [(5.0, LONG_GRACE), (30.0, "75s")], ids=["5s", "30s"])
def test_a_partition_healing_within_the_grace_period_is_detected_in_bound_and_the_run_reattached(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]], link_gate: Callable[[NetWorker], Gate],
        seconds: float, grace: str) -> None:
    (w1,) = net_workers(1, grace)
    gate = link_gate(w1)
    up(daemon)
    write_task(daemon.root, "partition", gated_agent(gate))
    started(daemon.root, "partition", 5)

    since, log = cut(daemon, w1.ns.blackhole)
    elapsed = detected(log, "w1", since)
    assert elapsed <= DETECTION_BOUND, f"offline after {elapsed:.1f}s"
    wait_until(lambda: time.monotonic() - since >= seconds, seconds + 5, f"{seconds:.0f} s of partition")

    heal_and_reattach_mid_run(daemon, w1, "partition", gate, log)


def test_thirty_percent_random_loss_loses_and_repeats_no_byte(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]]) -> None:
    (w1,) = net_workers(1, LONG_GRACE)
    up(daemon)
    write_task(daemon.root, "lossy", agent(60, pad=200))
    started(daemon.root, "lossy", 3)

    w1.ns.loss(0.3)
    wait_until(lambda: w1.ns.dropped() >= 20, 30, "the loss to take effect")
    # The whole Agent runs over the lossy link; then the link heals so the test ends in bounded time.
    wait_until(lambda: printed(daemon.root, "lossy") >= 40 or
               task_record(daemon.root, "lossy")["status"] in FINAL, 60, "output over the lossy link")
    w1.ns.heal()

    assert_reattached(daemon.root, "lossy", lines(60, pad=200))


@pytest.mark.parametrize("direction", ["in", "out"])
def test_one_way_loss_is_detected_in_bound_and_the_run_reattached(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]], link_gate: Callable[[NetWorker], Gate],
        direction: str) -> None:
    (w1,) = net_workers(1, LONG_GRACE)
    gate = link_gate(w1)
    up(daemon)
    write_task(daemon.root, "oneway", gated_agent(gate))
    started(daemon.root, "oneway", 5)

    # "in": the daemon's segments (its ACKs, keepalives) are lost; "out": the Worker's heartbeats and output.
    since, log = cut(daemon, lambda: w1.ns.blackhole(direction))
    elapsed = detected(log, "w1", since)
    assert elapsed <= DETECTION_BOUND, f"offline after {elapsed:.1f}s"

    heal_and_reattach_mid_run(daemon, w1, "oneway", gate, log)


def test_a_bandwidth_limit_below_the_agents_output_rate_loses_nothing_and_is_no_outage(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]]) -> None:
    (w1,) = net_workers(1, LONG_GRACE)
    # ~20 KB/s of output over a 128 kbit/s (16 KB/s) link: the stream falls behind and catches up.
    w1.ns.limit_rate("128kbit")
    up(daemon)
    log = Log(daemon)
    write_task(daemon.root, "narrow", agent(50, pad=2000))

    assert_reattached(daemon.root, "narrow", lines(50, pad=2000))
    assert w1.ns.overlimits() > 0, "the stream should have been held back by the rate limit"
    assert "Worker 'w1' offline" not in log.text(), "a slow link that keeps delivering is no outage"


# -- a Worker gone longer than the grace: its Run is retried elsewhere, and fenced -----


def test_a_blackholed_worker_is_detected_in_bound_and_its_run_retried_on_the_other_worker(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]]) -> None:
    workers = net_workers(2, SHORT_GRACE)
    up(daemon)
    write_task(daemon.root, "hole", agent(30))
    started(daemon.root, "hole", 5)
    first = run_record(daemon.root, "hole", 1)
    assert first is not None
    lost = next(w for w in workers if w.name == first["worker"])
    other = next(w for w in workers if w is not lost)

    since, log = cut(daemon, lost.ns.blackhole)
    elapsed = detected(log, lost.name, since)
    assert elapsed <= DETECTION_BOUND, f"offline after {elapsed:.1f}s"

    wait_status(daemon.root, "hole", "COMPLETED", "FAILED", timeout=60)
    failed = run_record(daemon.root, "hole", 1)
    assert failed is not None and failed["status"] == "FAILED" and failed["lost"] is True
    assert f"Worker '{lost.name}'" in failed["error"] and "grace period" in failed["error"]
    recorded = output(daemon.root, "hole", 1)
    assert lines(30).encode().startswith(recorded)  # a prefix of what the Agent printed, nothing repeated
    second = run_record(daemon.root, "hole", 2)
    assert second is not None and second["status"] == "COMPLETED" and second["worker"] == other.name
    assert output(daemon.root, "hole", 2) == lines(30).encode()
    assert_one_final_status(daemon.root, "hole", runs=2)


def _retried_elsewhere(daemon: Daemon, workers: list[NetWorker], task_id: str,
                       ) -> tuple[NetWorker, NetWorker, dict[str, object], bytes, Log]:
    """Blackhole the first Run's Worker until the Run is retried on the other one.

    Returns the lost Worker, the other, the first Run's record and recorded output, and the log.
    """
    first = run_record(daemon.root, task_id, 1)
    assert first is not None
    lost = next(w for w in workers if w.name == first["worker"])
    other = next(w for w in workers if w is not lost)
    _, log = cut(daemon, lost.ns.blackhole)
    wait_until(lambda: (r := run_record(daemon.root, task_id, 2)) and r["worker"] == other.name, 30,
               "the Run to be retried on the other Worker")
    failed = run_record(daemon.root, task_id, 1)
    assert failed is not None and failed["status"] == "FAILED" and failed["lost"] is True
    assert "grace period" in failed["error"]
    return lost, other, failed, output(daemon.root, task_id, 1), log


def test_a_worker_back_after_its_run_was_retried_has_its_duplicate_agent_stopped(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]]) -> None:
    workers = net_workers(2, SHORT_GRACE)
    up(daemon)
    # The scheduler places a first Run on the untried Worker with the most free slots, by name: w1;
    # the retry on w2. The Agent runs 40 s on w1 (still running when w1 comes back), 3 s on w2.
    write_task(daemon.root, "twin", agent(30, long_on=workers[0].ns.worker_if, long_count=400))
    started(daemon.root, "twin", 5)
    lost, _, failed, recorded, log = _retried_elsewhere(daemon, workers, "twin")
    assert lost is workers[0]
    run_id = str(failed["run_id"])
    pid_file = lost.run_dir(run_id) / "pid"
    pgid = int(pid_file.read_text())
    assert process_group_alive(pgid), "the first Agent should still run on the cut-off Worker"

    lost.ns.heal()
    wait_until(lambda: f"Worker '{lost.name}' back online" in log.text(), BACK_ONLINE_SECONDS,
               f"{lost.name} to come back")
    wait_until(lambda: not process_group_alive(pgid), 15, "the duplicate Agent to be stopped")

    wait_status(daemon.root, "twin", "COMPLETED", "FAILED", timeout=60)
    assert output(daemon.root, "twin", 2) == lines(30).encode()
    assert output(daemon.root, "twin", 1) == recorded  # nothing of the duplicate was recorded
    assert run_record(daemon.root, "twin", 1) == failed
    assert_one_final_status(daemon.root, "twin", runs=2)
    # The stopped duplicate is not wanted by anyone: the Worker must not keep its directory
    # (workspace, output) for as long as the session lasts.
    wait_until(lambda: not lost.run_dir(run_id).exists(), 15, "the Worker to forget the stopped duplicate Run")


def test_a_worker_back_after_its_run_was_retried_cannot_get_its_stale_result_recorded(
        daemon: Daemon, net_workers: Callable[..., list[NetWorker]]) -> None:
    workers = net_workers(2, SHORT_GRACE)
    up(daemon)
    # 2 s of output: the first Agent ends (its result made, never delivered) while its Worker is cut off.
    write_task(daemon.root, "stale", agent(20))
    started(daemon.root, "stale", 3)
    lost, other, failed, recorded, log = _retried_elsewhere(daemon, workers, "stale")
    run_id = str(failed["run_id"])
    wait_until(lambda: (lost.run_dir(run_id) / "result.json").exists(), 20,
               "the first Agent to finish on the cut-off Worker")

    lost.ns.heal()
    wait_until(lambda: f"Worker '{lost.name}' back online" in log.text(), BACK_ONLINE_SECONDS,
               f"{lost.name} to come back")
    wait_until(lambda: not lost.run_dir(run_id).exists(), 15, "the Worker to forget the retried Run")

    wait_status(daemon.root, "stale", "COMPLETED", "FAILED", timeout=60)
    assert run_record(daemon.root, "stale", 1) == failed  # still FAILED (lost): the COMPLETED result was refused
    assert output(daemon.root, "stale", 1) == recorded
    second = run_record(daemon.root, "stale", 2)
    assert second is not None and second["status"] == "COMPLETED" and second["worker"] == other.name
    assert output(daemon.root, "stale", 2) == lines(20).encode()
    assert_one_final_status(daemon.root, "stale", runs=2)
