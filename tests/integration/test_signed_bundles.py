"""Signed bundles and the trust chain, end to end: real daemon, real sshd Workers, real gate.

The attacker here holds the daemon's SSH key (so passes sshd and the gate) but
not its signing key: its sessions never authenticate, so captured
assignments are refused unread; and even in an authenticated session (the
control plane's own, replaying its capture) replayed, tampered or misaddressed
bundles never run an Agent. Replayed or forged enrollments never plant a key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from taskrunner import bundle
from taskrunner.enroll import trust_request
from taskrunner.keys import Keyring
from taskrunner.protocol import Message, Reader, encode
from taskrunner.sessionauth import auth_envelope
from taskrunner.signing import TRUST_TYPE, SigningKey, sign
from tests.conftest import Daemon, git, taskrun, wait_status, wait_until, write_task, local_worker_home
from tests.integration.test_ssh_workers import _add, hosts  # noqa: F401 (hosts is a fixture)
from tests.sshd import SshdHost

pytestmark = pytest.mark.sshd


def _gate(repo: Path, host: SshdHost, command: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run `command` through the Worker's gate with the daemon's own SSH key (what an attacker holding it can)."""
    return subprocess.run(host.ssh_argv(repo / ".git/taskrun/ssh_key", command), input=data,
                          capture_output=True, timeout=60)


def _worker_status(repo: Path, host: SshdHost) -> dict[str, Any]:
    result = _gate(repo, host, "taskrun-worker status --json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _replay(repo: Path, host: SshdHost, messages: list[Message], authenticate: bool) -> list[str]:
    """Send `assign` records in one `serve` session (answering its challenge with the control plane's
    own keys if `authenticate`); the Worker's refusal of each, in order."""
    refusals: list[str] = []
    with subprocess.Popen(host.ssh_argv(repo / ".git/taskrun/ssh_key", "taskrun-worker serve"),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        reader = Reader(proc.stdout)
        hello = reader.read()
        assert hello is not None and hello.type == "hello" and "runs" not in hello.fields
        if authenticate:
            now = time.time()
            ring = Keyring.load(repo / ".git/taskrun")
            audience = _worker_status(repo, host)["worker_key_id"]
            proc.stdin.write(encode(Message("auth", {"envelope": auth_envelope(ring.signers(now), hello["challenge"],
                                                                               audience, now)})))
            proc.stdin.flush()
            ready = reader.read()
            assert ready is not None and ready.type == "ready", ready
        for message in messages:
            proc.stdin.write(encode(message))
            proc.stdin.flush()
            while True:
                reply = reader.read()
                assert reply is not None, "the Worker ended the session"
                assert reply.type not in ("started", "result"), f"the Worker took {reply.fields}"
                if reply.type == "error" and reply.get("run_id") == message["run_id"]:
                    assert reply["request"] == "assign"
                    refusals.append(reply["message"])
                    break
        proc.stdin.close()
        proc.wait(timeout=30)
    return refusals


def test_worker_add_installs_the_control_planes_key_and_pins_the_workers_result_key(
        repo: Path, hosts: list[SshdHost]) -> None:
    _add(repo, "w1", hosts[0])

    status = _worker_status(repo, hosts[0])
    ring = Keyring.load(repo / ".git/taskrun")
    assert status["trusted"] == [ring.current.key_id]
    shown = json.loads(taskrun(repo, "keys", "show", "--json").stdout)
    assert shown["worker_keys"] == {"w1": status["worker_key_id"]}
    assert "worker_key:" in (repo / ".taskrun.yaml").read_text()
    assert taskrun(repo, "doctor").returncode == 0
    tracked = git(repo, "ls-files").splitlines()
    assert not [path for path in tracked if path.endswith((".pem", "ssh_key"))]


def test_replayed_tampered_or_forged_enrollments_are_refused_by_an_enrolled_worker(
        repo: Path, hosts: list[SshdHost]) -> None:
    ring, _ = Keyring.ensure(repo / ".git/taskrun", time.time())
    enrollment = json.dumps(trust_request(ring, None, time.time(), hosts[0].token)).encode()
    first = _gate(repo, hosts[0], "taskrun-worker trust", enrollment)
    assert first.returncode == 0, first.stderr
    trusted = _worker_status(repo, hosts[0])["trusted"]

    replayed = _gate(repo, hosts[0], "taskrun-worker trust", enrollment)
    update = json.dumps(trust_request(ring, _worker_status(repo, hosts[0])["worker_key_id"], time.time())).encode()
    update_first = _gate(repo, hosts[0], "taskrun-worker trust", update)
    update_again = _gate(repo, hosts[0], "taskrun-worker trust", update)
    attacker = SigningKey.generate()
    tampered = json.loads(enrollment)
    body = json.loads(base64.b64decode(tampered["envelope"]["payload"]))
    body["keys"].append({"key_id": attacker.key_id, "public": attacker.public_line, "retire_at": None})
    tampered["envelope"]["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    tampered_run = _gate(repo, hosts[0], "taskrun-worker trust", json.dumps(tampered).encode())
    forged_body = json.dumps({**body, "keys": body["keys"][-1:], "issued_at": time.time()}).encode()
    forged = {"keys": [attacker.public_line], "envelope": sign(TRUST_TYPE, forged_body, [attacker])}
    forged_run = _gate(repo, hosts[0], "taskrun-worker trust", json.dumps(forged).encode())
    reset = _gate(repo, hosts[0], "taskrun-worker trust --reset")

    assert replayed.returncode == 2 and b"only by a Worker that trusts no key yet" in replayed.stderr
    assert update_first.returncode == 0, update_first.stderr
    assert update_again.returncode == 2 and b"replayed or out-of-date" in update_again.stderr
    assert tampered_run.returncode == 2 and b"signature does not verify" in tampered_run.stderr
    assert forged_run.returncode == 2 and b"signed by unknown key id" in forged_run.stderr
    assert reset.returncode == 2 and b"--reset" in reset.stderr  # the gate does not allow it
    assert _worker_status(repo, hosts[0])["trusted"] == trusted


def test_captured_assignments_replayed_tampered_or_sent_to_another_worker_never_run_the_agent_again(
        repo: Path, hosts: list[SshdHost], daemon: Daemon, tmp_path: Path) -> None:
    # A Task pinned to w1 (by label) whose Agent leaves a trace outside its workspace each time it runs.
    _add(repo, "w1", hosts[0], "--labels", "role=first")
    _add(repo, "w2", hosts[1])
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    write_task(repo, "once", "echo ran", front="labels: {role: first}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "Task once")
    daemon.start()
    wait_status(repo, "once", "COMPLETED", timeout=60)
    daemon.stop()
    assert (repo / "runs/once/run-1/output.log").read_text() == "ran\n"

    # The capture: the signed manifest (the run record keeps its signatures) and the same archive.
    record = json.loads((repo / "runs/once/run-1/manifest.json").read_text())
    signatures = record.pop("signatures")
    envelope = {"payloadType": bundle.BUNDLE_TYPE, "signatures": signatures,
                "payload": base64.b64encode(bundle.manifest_bytes(record)).decode()}
    archive, _ = bundle.pack({"tasks/once.md": (repo / "tasks/once.md").read_bytes()})
    # The repository pack that followed it (README "The repository on the Worker"), built again the same way.
    pack = subprocess.run(["git", "-C", str(repo), "pack-objects", "--stdout", "--revs", "--quiet",
                           "--delta-base-offset", "--threads=1"], input=f"{record['repo']['base']}\n".encode(),
                          capture_output=True, check=True).stdout
    assert hashlib.sha256(pack).hexdigest() == record["repo"]["sha256"]
    archive += pack
    run_id = record["run_id"]
    flipped = bytearray(archive)
    flipped[600] ^= 0x01

    captured = [Message("assign", {"run_id": run_id, "envelope": envelope}, archive),
                Message("assign", {"run_id": run_id, "envelope": envelope}, bytes(flipped)),
                Message("assign", {"run_id": "renamed1", "envelope": envelope}, archive)]
    by_key_holder = _replay(repo, hosts[0], captured, authenticate=False)
    on_w1 = _replay(repo, hosts[0], captured, authenticate=True)
    on_w2 = _replay(repo, hosts[1], captured[:1], authenticate=True)

    assert len(by_key_holder) == 3 and all("not authenticated" in reason for reason in by_key_holder)
    assert on_w1 == ["bundle rejected: replayed nonce", "bundle rejected: the archive does not match the manifest's "
                     "hash", f"bundle rejected: signed for Run {run_id}, assigned as Run renamed1"]
    assert "addressed to another Worker" in on_w2[0]
    # No Agent started (_replay fails on a `started`), and nothing of the replays is on disk.
    for host in hosts[:2]:
        assert list((host.home / "runs").iterdir()) == []


def test_a_rotated_key_is_learnt_by_the_worker_and_the_old_one_retired_after_the_overlap(
        repo: Path, hosts: list[SshdHost], daemon: Daemon) -> None:
    _add(repo, "w1", hosts[0])
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    old = Keyring.load(repo / ".git/taskrun").current.key_id
    daemon.start()

    rotated = taskrun(repo, "keys", "rotate", "--overlap", "3s")
    new = Keyring.load(repo / ".git/taskrun").current.key_id

    assert rotated.returncode == 0, rotated.stderr
    wait_until(lambda: sorted(_worker_status(repo, hosts[0])["trusted"]) == sorted([old, new]), 30,
               "the Worker to trust both keys during the overlap")
    wait_until(lambda: _worker_status(repo, hosts[0])["trusted"] == [new], 30,
               "the old key to be retired on the Worker")
    write_task(repo, "after", "echo signed with the new key")
    record = wait_status(repo, "after", "COMPLETED", timeout=60)
    assert record["status"] == "COMPLETED"
    manifest = json.loads((repo / "runs/after/run-1/manifest.json").read_text())
    assert manifest["key_id"] == new
    assert old not in (repo / ".git/taskrun/keys/keyring.json").read_text()


def test_secrets_reach_the_agent_but_never_a_bundle_record_or_commit(repo: Path, daemon: Daemon) -> None:
    secret = "s3cr3t-value-0123456789"
    home = local_worker_home(repo)
    home.mkdir(parents=True, exist_ok=True)
    (home / "secrets.env").write_text(f"API_TOKEN={secret}\n")
    config = (repo / ".taskrun.yaml").read_text()
    assert "  shell:\n    preset: shell\n" in config
    config = config.replace("  shell:\n    preset: shell\n", "  shell:\n    preset: shell\n    env: [API_TOKEN]\n", 1)
    (repo / ".taskrun.yaml").write_text(config)
    write_task(repo, "uses-secret", 'echo "token=$API_TOKEN"; test "$API_TOKEN" = ' + secret)
    daemon.start()

    wait_status(repo, "uses-secret", "COMPLETED", timeout=60)

    output = (repo / "runs/uses-secret/run-1/output.log").read_text()
    assert output == "token=" + "*" * len(secret) + "\n"
    manifest = json.loads((repo / "runs/uses-secret/run-1/manifest.json").read_text())
    assert manifest["agent"]["env"] == ["API_TOKEN"]
    wait_until(lambda: "runs/uses-secret/run-1/output.log" in git(repo, "ls-files"), 30, "the result commit")
    assert secret not in git(repo, "log", "-p", "--all")
    assert secret not in "".join(p.read_text(errors="replace") for p in (repo / "runs").rglob("*") if p.is_file())


def test_a_bundle_over_the_workers_limits_is_refused_unread_and_its_run_fails_with_the_reason(
        repo: Path, hosts: list[SshdHost], daemon: Daemon) -> None:
    host = hosts[0]
    # The Worker's admin set small limits in the forced command, where the SSH client cannot change them.
    line = host.authorized_keys.read_text()
    host.authorized_keys.write_text(line.replace(" gate --home ", " gate --max-files 2 --max-total-bytes 1000 --home "))
    _add(repo, "w1", host)
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    (repo / "big.txt").write_text("x" * 20_000)
    git(repo, "add", "big.txt")  # context files are sent only if git tracks them
    write_task(repo, "too-big", "echo ran", front="context: [big.txt]\n")
    daemon.start()

    record = wait_status(repo, "too-big", "COMPLETED", "FAILED", timeout=60)

    assert record["status"] == "FAILED"
    run = json.loads((repo / "runs/too-big/run-1/status.json").read_text())
    assert run["error"].startswith("bundle rejected: the archive is ") and "over this Worker's limit" in run["error"]
    log = repo / "runs/too-big/run-1/output.log"
    assert not log.exists() or log.read_text() == ""
    assert list((host.home / "runs").iterdir()) == []
