"""The holder of the daemon's SSH key, against real sshd Workers (DESIGN.md §5.8, §5.9).

It passes sshd and the gate, as `ssh -i .git/taskrun/ssh_key` does here, but
holds no key a Worker's admin named and no signing key the Worker trusts. It
cannot enroll a Worker (no token, a wrong one, a replayed statement, right
after `taskrun-worker trust --reset`), cannot see, stream, cancel or
acknowledge the daemon's Runs, and cannot start one of its own. And a Worker
whose trust store was changed behind the control plane's back is shown
untrusted, with the fix, and gets no Runs until it is enrolled again.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import pytest

from taskrunner.enroll import trust_request
from taskrunner.keys import Keyring
from taskrunner.protocol import FROM_WORKER_LIMITS, Message, Reader, encode
from taskrunner.sessionauth import auth_envelope
from taskrunner.signing import SigningKey
from tests.agentprobes import Gate
from tests.conftest import run_record, taskrun, wait_status, wait_until, write_task
from tests.integration.test_ssh_workers import _add, hosts  # noqa: F401 (hosts is a fixture)
from tests.sshd import SshdHost, worker_command

pytestmark = pytest.mark.sshd

TOKEN_RE = re.compile(r"enrollment token ([0-9a-f]{32})")


def _as_key_holder(repo: Path, host: SshdHost, command: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`command` through the Worker's gate with the daemon's own SSH key: all its holder can do."""
    return subprocess.run(host.ssh_argv(repo / ".git/taskrun/ssh_key", command), input=data,
                          capture_output=True, timeout=60)


@contextmanager
def _key_holder_session(repo: Path, host: SshdHost) -> Iterator[tuple[IO[bytes], Reader, Message]]:
    """`taskrun-worker serve` opened with the daemon's own SSH key: its stdin, a reader of its records, its hello."""
    with subprocess.Popen(host.ssh_argv(repo / ".git/taskrun/ssh_key", "taskrun-worker serve"),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        reader = Reader(proc.stdout, FROM_WORKER_LIMITS)
        hello = reader.read()
        assert hello is not None and hello.type == "hello"
        yield proc.stdin, reader, hello


def _worker_key_id(repo: Path, host: SshdHost) -> str:
    status = _as_key_holder(repo, host, "taskrun-worker status --json")
    assert status.returncode == 0, status.stderr
    return str(json.loads(status.stdout)["worker_key_id"])


def _reset_on_the_worker(host: SshdHost, *extra: str) -> str | None:
    """What the Worker's admin runs on the Worker itself; the new token it prints, if any."""
    result = subprocess.run([worker_command(), "trust", "--home", str(host.home), "--reset", *extra],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = TOKEN_RE.search(result.stdout)
    return found.group(1) if found else None


def _workers(repo: Path) -> dict[str, dict[str, Any]]:
    result = taskrun(repo, "workers", "--json")
    assert result.returncode == 0, result.stderr
    return {w["name"]: w for w in json.loads(result.stdout)["workers"]}


def _start(repo: Path) -> subprocess.Popen[bytes]:
    """`taskrun up`, without waiting for its Workers (one of them is meant to stay untrusted)."""
    log = open(repo.parent / "daemon.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(repo), "up"], stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    wait_until(lambda: taskrun(repo, "workers", "--json").returncode == 0, 20, "the daemon's control socket")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_the_key_holder_cannot_enroll_a_worker_with_no_token_a_wrong_one_a_replay_or_after_a_reset(
        repo: Path, hosts: list[SshdHost]) -> None:
    host = hosts[0]
    assert host.token is not None  # what `taskrun-worker init` printed for the admin, not for the key holder
    now = time.time()
    attacker = Keyring.ensure(repo.parent / "attacker-state", now)[0]
    ring = Keyring.ensure(repo / ".git/taskrun", now)[0]
    worker_id = _worker_key_id(repo, host)

    attempts = [
        ("no token", trust_request(attacker, worker_id, now)),
        ("wrong token", trust_request(attacker, worker_id, now, "0123456789abcdef" * 2)),
        ("unaddressed", trust_request(attacker, None, now)),
    ]
    for what, request in attempts:
        refused = _as_key_holder(repo, host, "taskrun-worker trust", json.dumps(request).encode())
        assert refused.returncode == 2, f"{what}: {refused.stdout!r}"
        assert b"trust refused" in refused.stderr, what
    # The statement `worker add` would send, captured (say from a log) before it is delivered.
    captured = json.dumps(trust_request(ring, worker_id, now, host.token)).encode()
    assert host.token.encode() not in captured

    _add(repo, "w1", host)  # the real enrollment, with the token

    replayed = _as_key_holder(repo, host, "taskrun-worker trust", captured)
    assert replayed.returncode == 2 and b"not newer" in replayed.stderr
    new_token = _reset_on_the_worker(host)
    assert new_token is not None and new_token != host.token
    for what, request in [("replay after reset", captured),
                          ("own key after reset", json.dumps(trust_request(attacker, worker_id, time.time())).encode()),
                          ("old token after reset",
                           json.dumps(trust_request(attacker, worker_id, time.time(), host.token)).encode())]:
        refused = _as_key_holder(repo, host, "taskrun-worker trust", request)
        assert refused.returncode == 2, what
    status = json.loads(_as_key_holder(repo, host, "taskrun-worker status --json").stdout)
    assert status["trusted"] == []

    # And it cannot run `id` there: its session never authenticates, so its bundle is not even read.
    with _key_holder_session(repo, host) as (to_worker, reader, hello):
        own = SigningKey.generate()
        to_worker.write(encode(Message("auth", {"envelope": auth_envelope([own], hello["challenge"], worker_id,
                                                                          time.time())})))
        to_worker.flush()
        refusal = reader.read()
        assert refusal is not None and refusal.type == "error" and refusal["request"] == "auth"
        assert reader.read() is None  # the session ended
    assert not list((host.home / "runs").iterdir())

    # The admin's new token enrolls the real control plane again.
    host.token = new_token
    _add(repo, "w1", host)
    assert json.loads(_as_key_holder(repo, host, "taskrun-worker status --json").stdout)["trusted"] == \
        [ring.current.key_id]


def test_the_key_holder_cannot_list_stream_cancel_or_ack_the_daemons_run(
        repo: Path, hosts: list[SshdHost], gate: Gate) -> None:
    host = hosts[0]
    _add(repo, "w1", host)
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    write_task(repo, "real", f"echo started\nuntil {gate.check}; do sleep 0.05; done\necho finished")
    daemon = _start(repo)
    try:
        wait_until(lambda: (run_record(repo, "real", 1) or {}).get("status") == "RUNNING"
                   and (repo / "runs/real/run-1/output.log").exists(), 60, "the Run to be running")
        run_id = run_record(repo, "real", 1)["run_id"]  # type: ignore[index]

        with _key_holder_session(repo, host) as (to_worker, reader, hello):
            assert "runs" not in hello.fields and run_id not in json.dumps(hello.fields)
            requests = [Message("resume", {"run_id": run_id, "offset": 0}),
                        Message("cancel", {"run_id": run_id, "reason": "the key holder says so"}),
                        Message("ack", {"run_id": run_id})]
            to_worker.write(b"".join(encode(m) for m in requests))
            to_worker.flush()
            replies = [reader.read() for _ in requests]
            to_worker.close()
            rest = []
            while (message := reader.read()) is not None:
                rest.append(message)
        for request, reply in zip(requests, replies):
            assert reply is not None and reply.type == "error" and reply["request"] == request.type
            assert "not authenticated" in reply["message"]
        assert [m.type for m in rest if m.type not in ("heartbeat",)] == []

        gate.open()
        record = wait_status(repo, "real", "COMPLETED", "FAILED", "CANCELLED", timeout=60)
    finally:
        _stop(daemon)
    assert record["status"] == "COMPLETED", record
    assert (repo / "runs/real/run-1/output.log").read_text() == "started\nfinished\n"
    assert "the key holder" not in json.dumps(run_record(repo, "real", 1))


@pytest.mark.parametrize("dated", ["far in the future", "just ahead"])
def test_a_worker_whose_trust_store_was_changed_behind_the_daemons_back_gets_no_runs_until_enrolled_again(
        repo: Path, hosts: list[SshdHost], dated: str) -> None:
    host = hosts[0]
    _add(repo, "w1", host)
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    # What an Agent did on this Worker: plant a key of its own and date the store ahead, so that the
    # daemon's corrective statement is refused as "not newer".
    planted = SigningKey.generate()
    trust_file = host.home / "trust.json"
    data = json.loads(trust_file.read_text())
    data["keys"].append({"key_id": planted.key_id, "public": planted.public_line, "retire_at": None})
    data["issued_at"] = time.time() + (10 * 365 * 86400 if dated == "far in the future" else 120)
    trust_file.write_text(json.dumps(data))
    write_task(repo, "after-tampering", "echo ran")
    daemon = _start(repo)
    try:
        worker = wait_until(lambda: (w := _workers(repo)["w1"])["trusted"] is False and w["error"] and w, 60,
                            "w1 to be shown untrusted")
        assert "changed behind the control plane's back" in worker["error"]
        assert "taskrun-worker trust --reset" in worker["error"] and "taskrun worker add w1" in worker["error"]
        shown = taskrun(repo, "workers")
        assert "--reset" in shown.stdout, shown.stdout
        assert run_record(repo, "after-tampering", 1) is None  # no Run went to it

        token = _reset_on_the_worker(host)
        host.token = token
        _add(repo, "w1", host)
        record = wait_status(repo, "after-tampering", "COMPLETED", "FAILED", timeout=90)
        assert record["status"] == "COMPLETED", record
        assert _workers(repo)["w1"]["trusted"] is True
    finally:
        _stop(daemon)
    assert planted.key_id not in trust_file.read_text()


def test_a_worker_reset_while_its_session_lasts_gets_no_more_runs_and_its_refused_run_goes_elsewhere(
        repo: Path, hosts: list[SshdHost]) -> None:
    # One slot each: the first two Runs go one to each Worker, so w1 is sure to be sent one after its reset.
    _add(repo, "w1", hosts[0])
    _add(repo, "w2", hosts[1])
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    daemon = _start(repo)
    try:
        wait_until(lambda: all(w["online"] and w["trusted"] for w in _workers(repo).values()), 60,
                   "both Workers online and trusted")
        _reset_on_the_worker(hosts[0])  # its admin, on the Worker, while the daemon's session is open
        for i in range(4):
            write_task(repo, f"t{i}", "echo ran")
        records = [wait_status(repo, f"t{i}", "COMPLETED", "FAILED", timeout=90) for i in range(4)]
        worker = _workers(repo)["w1"]
    finally:
        _stop(daemon)
    assert [r["status"] for r in records] == ["COMPLETED"] * 4, records
    refused = [run for i in range(4) for n in (1, 2) if (run := run_record(repo, f"t{i}", n))
               and run["worker"] == "w1"]
    assert refused and all(run["lost"] and "trusts no control plane key" in run["error"] for run in refused), refused
    assert worker["trusted"] is False and "no longer trusts this control plane" in worker["error"]
    assert "taskrun-worker trust --reset" in worker["error"]
