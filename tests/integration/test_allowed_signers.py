"""security.allowed_signers with the real daemon: only Tasks an allowed signer committed run, the rest are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import (
    Daemon,
    git,
    run_record,
    task_record,
    taskrun,
    wait_until,
    write_task,
)
from tests.unit.test_signers import Keys, commit, make_keys, tamper

# Under CI (.ci/run installs OpenSSH) a missing ssh-keygen fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None and os.environ.get("CI") != "true",
                                reason="needs OpenSSH's ssh-keygen")


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def use_policy(repo: Path, allowed: Path, revocation: Path | None = None) -> None:
    """Turn the policy on in .taskrun.yaml (the caller commits it)."""
    lines = ["security:", f"  allowed_signers: {allowed}"]
    lines += [f"  revocation_file: {revocation}"] if revocation else []
    with open(repo / ".taskrun.yaml", "a") as handle:
        handle.write("\n" + "\n".join(lines) + "\n")


def add_task(repo: Path, task_id: str, key: Path | None, script: str = "echo ran") -> None:
    write_task(repo, task_id, script)
    commit(repo, f"add {task_id}", key, f"tasks/{task_id}.md")


def error_of(repo: Path, task_id: str) -> str:
    record = task_record(repo, task_id)
    assert record is not None, f"no record for {task_id}"
    assert record["status"] == "INVALID", record
    assert run_record(repo, task_id, 1) is None, f"{task_id} must not have run"
    return str(record["error"])


def test_only_tasks_committed_signed_by_an_allowed_signer_run(repo: Path, keys: Keys) -> None:
    use_policy(repo, keys.allowed_signers, keys.revocation_file)
    commit(repo, "policy", keys.alice)
    add_task(repo, "tampered", keys.alice)
    tamper(repo, git(repo, "rev-parse", "HEAD").strip())
    add_task(repo, "good", keys.alice)
    add_task(repo, "unsigned", None)
    add_task(repo, "stranger", keys.mallory)
    add_task(repo, "retired", keys.retired)
    write_task(repo, "dropped", "echo ran")  # never committed

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 1, result.stdout + result.stderr
    good = run_record(repo, "good", 1)
    assert good and good["status"] == "COMPLETED" and good["authorized_by"] == "alice@example.com"
    reasons = {t: error_of(repo, t) for t in ("unsigned", "stranger", "retired", "tampered", "dropped")}
    assert all(reason.startswith("refused: ") for reason in reasons.values()), reasons
    assert "is not signed" in reasons["unsigned"]
    assert "not in the allowed signers file" in reasons["stranger"]
    assert "revoked key" in reasons["retired"]
    assert "bad signature" in reasons["tampered"]
    assert "in no commit" in reasons["dropped"] and "git commit -S" in reasons["dropped"]


def test_a_refused_task_runs_once_it_is_committed_signed(repo: Path, keys: Keys) -> None:
    use_policy(repo, keys.allowed_signers)
    commit(repo, "policy", keys.alice)
    write_task(repo, "dropped", "echo ran")
    taskrun(repo, "up", "--once")
    assert error_of(repo, "dropped").startswith("refused: ")

    commit(repo, "sign the Task", keys.alice, "tasks/dropped.md")
    result = taskrun(repo, "up", "--once")

    assert result.returncode == 0, result.stdout + result.stderr
    record = task_record(repo, "dropped")
    assert record and record["status"] == "COMPLETED"
    assert (run_record(repo, "dropped", 1) or {}).get("authorized_by") == "alice@example.com"


def test_a_missing_allowed_signers_file_refuses_every_task_and_doctor_says_so(repo: Path, keys: Keys,
                                                                              tmp_path: Path) -> None:
    gone = tmp_path / "no-such-dir" / "allowed_signers"
    use_policy(repo, gone)
    commit(repo, "policy", keys.alice)
    add_task(repo, "good", keys.alice)

    result = taskrun(repo, "up", "--once")
    doctor = taskrun(repo, "doctor", "--json")

    assert result.returncode == 1
    assert "cannot be read" in error_of(repo, "good") and str(gone) in error_of(repo, "good")
    findings = json.loads(doctor.stdout)["findings"]
    assert any("security.allowed_signers" in f["what"] and "cannot be read" in f["what"] for f in findings), findings


@pytest.mark.slow
def test_an_unsigned_configuration_change_does_not_turn_the_policy_off(repo: Path, keys: Keys) -> None:
    use_policy(repo, keys.allowed_signers)
    commit(repo, "policy", keys.alice)
    daemon = Daemon(repo).start()
    try:
        text = (repo / ".taskrun.yaml").read_text()
        (repo / ".taskrun.yaml").write_text(text.split("\nsecurity:")[0] + "\n")
        commit(repo, "drop the policy", None, ".taskrun.yaml")
        wait_until(lambda: "configuration not reloaded" in daemon.output(), 20, "the reload to be refused")
        add_task(repo, "sneaky", None)
        wait_until(lambda: (task_record(repo, "sneaky") or {}).get("status") == "INVALID", 20,
                   "the unsigned Task to be refused")
    finally:
        daemon.stop()
    assert "the previous one stays in force: refused: " in daemon.output()
    assert error_of(repo, "sneaky").startswith("refused: ")
