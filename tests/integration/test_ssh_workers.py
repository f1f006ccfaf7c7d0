"""SSH Workers with real OpenSSH sshd processes on 127.0.0.1, each one a Worker host."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner import keys
from taskrunner.config import load_config
from taskrunner.keys import Keyring
from tests.agentprobes import Gate
from tests.conftest import run_record, status_of, taskrun, wait_until, write_task
from tests.sshd import SshdHost, client_key, start_sshd


@pytest.fixture
def hosts(repo: Path, tmp_path: Path) -> Iterator[list[SshdHost]]:
    """Three sshd Worker hosts that authorize the control plane's own SSH key (behind the gate)."""
    _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
    started = [start_sshd(tmp_path / f"host{i}", public) for i in range(3)]
    yield started
    for host in started:
        host.stop()


def _add(repo: Path, name: str, host: SshdHost, *extra: str) -> None:
    """`taskrun worker add` with the one-time token the host's `taskrun-worker init` printed."""
    token = ("--token", host.token) if host.token else ()
    result = taskrun(repo, "worker", "add", name, "--host", "127.0.0.1", "--port", str(host.port),
                     "--fingerprint", host.fingerprint, *token, *extra)
    assert result.returncode == 0, result.stdout + result.stderr


def _only_ssh_workers(repo: Path, hosts: list[SshdHost]) -> None:
    for i, host in enumerate(hosts, 1):
        _add(repo, f"w{i}", host)
    assert taskrun(repo, "worker", "remove", "local").returncode == 0


def test_worker_add_pins_the_key_enrolls_and_keeps_the_rest_of_the_file(repo: Path, hosts: list[SshdHost]) -> None:
    before = (repo / ".taskrun.yaml").read_text()

    _add(repo, "build-1", hosts[0], "--slots", "3", "--labels", "gpu=true")

    after = (repo / ".taskrun.yaml").read_text()
    assert hosts[0].host_key_line.split()[1] in after
    assert "gpu: 'true'" in after or "gpu: \"true\"" in after or "gpu: true" in after
    # Every line the user had is still there, comments included.
    assert all(line in after.splitlines() for line in before.splitlines())
    check = taskrun(repo, "worker", "check", "build-1")
    assert check.returncode == 0 and "host key matches" in check.stdout


def test_wrong_fingerprint_is_refused_and_nothing_is_written(repo: Path, hosts: list[SshdHost]) -> None:
    before = (repo / ".taskrun.yaml").read_text()

    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", str(hosts[0].port),
                     "--fingerprint", "SHA256:" + "A" * 43)

    assert result.returncode == 2
    assert "mismatch" in result.stderr and hosts[0].fingerprint in result.stderr
    assert (repo / ".taskrun.yaml").read_text() == before


def test_unconfirmed_host_key_is_not_pinned(repo: Path, hosts: list[SshdHost]) -> None:
    before = (repo / ".taskrun.yaml").read_text()

    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", str(hosts[0].port))

    assert result.returncode == 2 and "--fingerprint" in result.stderr
    assert (repo / ".taskrun.yaml").read_text() == before


def test_tasks_spread_over_three_ssh_workers(repo: Path, hosts: list[SshdHost], gate: Gate, tmp_path: Path) -> None:
    _only_ssh_workers(repo, hosts)
    for n in range(6):
        write_task(repo, f"spread-{n}", f"echo run {n} on $(hostname)\nuntil {gate.check}; do sleep 0.05; done")

    def workers() -> set[str | None]:
        return {(run_record(repo, f"spread-{n}", 1) or {}).get("worker") for n in range(6)} - {None}

    # Each Worker has one slot, which its Run holds until the gate opens: the Tasks must go to all three.
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(repo), "up", "--once"],
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: workers() == {"w1", "w2", "w3"} or up.poll() is not None, 120,
                   "a Run on each of the three Workers")
        gate.open()
        returncode = up.wait(timeout=120)
    finally:
        gate.open()  # on a failure too: no Agent is left waiting
        if up.poll() is None:
            up.kill()
            up.wait()

    assert returncode == 0, log.read_text()
    assert workers() == {"w1", "w2", "w3"}
    assert (repo / "runs/spread-0/run-1/output.log").read_text().startswith("run 0 on ")


def test_changed_host_key_is_refused_and_the_task_runs_elsewhere(repo: Path, hosts: list[SshdHost]) -> None:
    _only_ssh_workers(repo, hosts[:2])
    pinned = hosts[0].fingerprint
    seen = hosts[0].regenerate_host_key() and hosts[0].fingerprint
    write_task(repo, "elsewhere", "echo safe")

    result = taskrun(repo, "up", "--once", timeout=120)

    assert status_of(repo, "elsewhere") == "COMPLETED"
    assert (run_record(repo, "elsewhere", 1) or {})["worker"] == "w2"
    assert "does not match the pinned key" in result.stdout
    assert pinned in result.stdout and seen in result.stdout
    # Nothing ran on the host with the changed key.
    assert not any((hosts[0].home / "runs").glob("*"))


def test_timeout_reaches_the_agent_on_the_remote_worker(repo: Path, hosts: list[SshdHost]) -> None:
    _only_ssh_workers(repo, hosts[:1])
    write_task(repo, "remote-slow", "sleep 300", front="timeout: 2s\n")

    taskrun(repo, "up", "--once", timeout=120)

    run = run_record(repo, "remote-slow", 1)
    assert run and run["worker"] == "w1" and run["status"] == "FAILED" and "timed out" in run["error"]


def test_worker_key_prints_the_daemons_ssh_public_key_for_the_worker_to_authorize(repo: Path) -> None:
    result = taskrun(repo, "worker", "key")

    assert result.returncode == 0, result.stderr
    _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
    assert result.stdout.strip() == public
    assert (repo / ".git" / "taskrun" / "ssh_key").stat().st_mode & 0o077 == 0


def test_repinning_a_changed_key_keeps_the_workers_other_settings(repo: Path, hosts: list[SshdHost]) -> None:
    _add(repo, "w1", hosts[0], "--slots", "3", "--labels", "zone=a", "--agents", "shell")
    hosts[0].regenerate_host_key()
    refused = taskrun(repo, "worker", "check", "w1")
    assert refused.returncode == 2
    assert f"--port {hosts[0].port} --fingerprint {hosts[0].fingerprint}" in refused.stderr

    _add(repo, "w1", hosts[0])  # only --host, --port and the new --fingerprint, as the message says

    spec = load_config(repo).workers["w1"]
    assert (spec.slots, dict(spec.labels), spec.agents) == (3, {"zone": "a"}, ("shell",))
    assert taskrun(repo, "worker", "check", "w1").returncode == 0


@pytest.mark.parametrize("given", ["gq2nAAAA", "SHA256:nope", "MD5:aa:bb"])
def test_a_malformed_fingerprint_is_refused_before_connecting(repo: Path, given: str) -> None:
    before = (repo / ".taskrun.yaml").read_text()

    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", "1", "--fingerprint", given)

    assert result.returncode == 2
    assert "is not a SHA256 fingerprint" in result.stderr
    assert (repo / ".taskrun.yaml").read_text() == before


def test_an_agent_on_an_ssh_worker_does_not_inherit_the_ssh_session(repo: Path, hosts: list[SshdHost]) -> None:
    # With SSH_CLIENT set, Debian's `bash -c` sources ~/.bashrc: in every Run.
    _only_ssh_workers(repo, hosts[:1])
    write_task(repo, "env-check", 'echo "client=${SSH_CLIENT-unset} connection=${SSH_CONNECTION-unset}"')

    taskrun(repo, "up", "--once", timeout=120)

    assert status_of(repo, "env-check") == "COMPLETED"
    output = (repo / "runs" / "env-check" / "run-1" / "output.log").read_text()
    assert output == "client=unset connection=unset\n"


def test_re_enrolling_a_configured_worker_after_a_trust_reset_reuses_its_pinned_host_key(
        repo: Path, hosts: list[SshdHost]) -> None:
    _add(repo, "w1", hosts[0], "--slots", "2", "--labels", "zone=a")
    token = hosts[0].reset_trust()

    # What `taskrun workers`, the daemon and the README say to run after `taskrun-worker trust --reset`.
    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--token", token)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "matches the host key pinned for Worker 'w1'" in result.stdout
    spec = load_config(repo).workers["w1"]
    assert (spec.port, spec.host_key, spec.slots, dict(spec.labels)) == \
        (hosts[0].port, hosts[0].host_key_line, 2, {"zone": "a"})
    assert taskrun(repo, "worker", "check", "w1").returncode == 0


def test_changing_only_the_agents_of_a_configured_worker_needs_no_host_or_fingerprint(
        repo: Path, hosts: list[SshdHost]) -> None:
    config = repo / ".taskrun.yaml"
    config.write_text(config.read_text().replace("  shell:\n    preset: shell\n",
                                                 "  shell:\n    preset: shell\n  sh2:\n    preset: shell\n", 1))
    _add(repo, "w1", hosts[0], "--identity", str(repo / ".git/taskrun/ssh_key"), "--user", hosts[0].user)
    config.write_text(config.read_text().replace("worker_key:", "sandbox: none, worker_key:", 1))
    before = load_config(repo).workers["w1"]

    result = taskrun(repo, "worker", "add", "w1", "--agents", "shell,sh2")

    assert result.returncode == 0, result.stdout + result.stderr
    after = load_config(repo).workers["w1"]
    assert after.agents == ("shell", "sh2")
    for kept in ("host", "port", "user", "identity", "host_key", "worker_key", "sandbox", "slots"):
        assert getattr(after, kept) == getattr(before, kept), kept


def test_a_changed_host_key_of_a_configured_worker_still_needs_a_fingerprint(
        repo: Path, hosts: list[SshdHost]) -> None:
    _add(repo, "w1", hosts[0])
    pinned = hosts[0].fingerprint
    hosts[0].regenerate_host_key()
    before = (repo / ".taskrun.yaml").read_text()

    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1")

    assert result.returncode == 2
    assert f"expected ssh-ed25519 {pinned}, seen ssh-ed25519 {hosts[0].fingerprint}" in result.stderr
    assert f"taskrun worker add w1 --host 127.0.0.1 --port {hosts[0].port} --fingerprint {hosts[0].fingerprint}" \
        in result.stderr
    assert "nothing was written" in result.stderr
    assert (repo / ".taskrun.yaml").read_text() == before


def test_a_new_worker_needs_a_host(repo: Path) -> None:
    result = taskrun(repo, "worker", "add", "w9", "--fingerprint", "SHA256:" + "A" * 43)

    assert result.returncode == 2 and "--host" in result.stderr


def test_an_authentication_failure_names_the_user_and_key_and_what_to_check(
        repo: Path, hosts: list[SshdHost]) -> None:
    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", str(hosts[0].port),
                     "--fingerprint", hosts[0].fingerprint, "--user", "no-such-taskrun-user")

    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    key = str(repo / ".git/taskrun/ssh_key")
    assert "as user 'no-such-taskrun-user'" in message and key in message, message
    assert "--user" in message and "~no-such-taskrun-user/.ssh/authorized_keys" in message
    assert "taskrun-worker init" in message

    stranger = client_key(repo.parent, "not_authorized")
    unknown_key = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", str(hosts[0].port),
                          "--fingerprint", hosts[0].fingerprint, "--identity", str(stranger.path))

    assert unknown_key.returncode == 2
    message = " ".join(unknown_key.stderr.split())
    assert f"as user '{hosts[0].user}' (no user given, so your local user name) with key {stranger.path}" \
        in message, message
    assert f"taskrun-worker init --key '{' '.join(stranger.public_line.split()[:2])}'" in message


def test_an_expired_enrollment_token_is_refused_with_the_fix_said_once(repo: Path, hosts: list[SshdHost]) -> None:
    enrollment = hosts[0].home / "enrollment.json"
    state = json.loads(enrollment.read_text())
    enrollment.write_text(json.dumps({**state, "expires_at": time.time() - 1}))

    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", str(hosts[0].port),
                     "--fingerprint", hosts[0].fingerprint, "--token", hosts[0].token or "")

    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "enrollment token has expired" in message and "nothing was written" in message
    assert message.count("one-time enrollment token") == 1, message
    key_id = Keyring.load(repo / ".git/taskrun").current.key_id
    assert key_id in message
