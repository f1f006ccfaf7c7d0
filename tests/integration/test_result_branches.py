"""A Worker's result with a change, through the control plane's session handling (sessions.py), into a real
repository: results signed with a real Worker key (tests/signed.py's Worker home), hostile ones refused with
their reason and the Run FAILED, nothing of them referenced."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from taskrunner.gitflow import change
from taskrunner.gitflow.cache import ObjectCache
from taskrunner.hooks import Hooks
from taskrunner.model import RunStatus
from taskrunner.protocol import Message
from taskrunner.records import Records
from taskrunner.sessions import WorkerSessions
from taskrunner.signing import RESULT_TYPE, sign
from taskrunner.state import RunState
from taskrunner.worker.trust import worker_key
from tests.conftest import git


class _Worker:
    """What sessions.py reads of a Worker: its name and pinned result key."""

    def __init__(self, home: Path) -> None:
        self.name = "w1"
        self.result_key = worker_key(home).public


class _Plane:
    """A WorkerSessions over a real repository; `finished` collects what it decides."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.finished: list[tuple[str, str | None]] = []
        self.sent: list[Message] = []
        self.sessions = WorkerSessions(
            fleet=None, records=Records(root), runs={}, hooks=Hooks(), clock=lambda: 1.0,  # type: ignore[arg-type]
            send=lambda worker, message: self.sent.append(message),
            finish=lambda run, status, code, error, at=None: self.finished.append((status.value, error)),
            run_lost=lambda *a: None, save_run=lambda *a, **k: None)

    def result(self, home: Path, run: RunState, found: dict[str, Any] | None, pack: bytes,
               status: str = "COMPLETED") -> tuple[str, str | None]:
        empty = hashlib.sha256(b"").hexdigest()
        body = {"run_id": run.run_id, "status": status, "exit_code": 0, "error": None, "started_at": 1.0,
                "finished_at": 2.0, "output_size": 0, "output_sha256": empty, "nonce": "n", "change": found}
        envelope = sign(RESULT_TYPE, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(),
                        [worker_key(home)])
        message = Message("result", {"run_id": run.run_id, "output_size": 0, "envelope": envelope}, pack)
        self.sessions._on_result(_Worker(home), run, message)  # type: ignore[arg-type]
        return self.finished[-1]


@pytest.fixture
def setup(repo: Path, tmp_path: Path) -> tuple[_Plane, Path, str, RunState]:
    base = git(repo, "rev-parse", "HEAD").strip()
    run = RunState(run_id="run-abc", task_id="t", number=1, revision="r", attempt=1, worker="w1", agent="shell",
                   status=RunStatus.RUNNING, base_commit=base)
    return _Plane(repo), tmp_path / "worker", base, run


def _worker_change(home: Path, repo: Path, base: str, edit: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    """The Worker's side for real: its cache, a checkout, the Agent's edit, collect."""
    cache = ObjectCache(home, "a" * 32)
    cache.receive(subprocess.run(["git", "-C", str(repo), "pack-objects", "--stdout", "--revs", "-q"],
                                 input=f"{base}\n".encode(), capture_output=True, check=True).stdout, base)
    run_dir = home / "runs" / "run-abc"
    run_dir.mkdir(parents=True)
    cache.checkout(run_dir / "index", run_dir / "workspace", base, "taskrun/t")
    for rel, text in edit.items():
        (run_dir / "workspace" / rel).write_text(text)
    manifest = {"run_id": "run-abc", "task_id": "t", "agent": {"name": "shell"}, "files": [],
                "repo": {"id": cache.repo_id, "base": base},
                "git": {"author_name": "Bot", "author_email": "bot@x", "max_result_bytes": 1 << 20, "title": "T"}}
    found = change.collect(run_dir, run_dir / "workspace", manifest, [], "w1")
    assert found is not None
    return found, change.read_pack(run_dir)


def _refs(root: Path) -> str:
    return git(root, "for-each-ref", "--format=%(refname) %(objectname)")


def test_a_good_change_lands_on_the_result_branch_and_the_run_records_it(setup: Any) -> None:
    plane, home, base, run = setup
    found, pack = _worker_change(home, plane.root, base, {"README.md": "changed\n"})
    assert plane.result(home, run, found, pack) == ("COMPLETED", None)
    assert run.result_commit == found["commit"] and run.result_branch == "taskrun/t" and run.result_note is None
    assert git(plane.root, "rev-parse", "taskrun/t").strip() == found["commit"]


@pytest.mark.parametrize("tamper, reason", [
    (lambda f, p: (f, p + b"\0"), "does not match"),
    (lambda f, p: ({**f, "size": 10 ** 9}, p), "over git.max_result_bytes"),
    (lambda f, p: ({**f, "base": "1" * 40}, p), "builds on"),
    (lambda f, p: ({**f, "commit": "2" * 40, "sha256": hashlib.sha256(p).hexdigest()}, p), "not a commit"),
    (lambda f, p: (None, p), "carries a pack but signs no change"),
])
def test_a_hostile_change_fails_the_run_with_its_reason_and_references_nothing(setup: Any, tamper: Any,
                                                                                reason: str) -> None:
    plane, home, base, run = setup
    found, pack = _worker_change(home, plane.root, base, {"README.md": "changed\n"})
    before = _refs(plane.root)
    status, error = plane.result(home, run, *tamper(found, pack))
    assert status == "FAILED" and reason in (error or "")
    assert _refs(plane.root) == before and run.result_commit is None


def test_a_change_on_a_failed_run_is_refused(setup: Any) -> None:
    plane, home, base, run = setup
    found, pack = _worker_change(home, plane.root, base, {"README.md": "changed\n"})
    status, error = plane.result(home, run, found, pack, status="FAILED")
    assert status == "FAILED" and "only a COMPLETED Run returns a change" in (error or "")
    assert "refs/taskrun/runs/" not in _refs(plane.root)


def test_a_result_signed_by_another_key_is_refused_before_its_pack_is_read(setup: Any, tmp_path: Path) -> None:
    plane, home, base, run = setup
    found, pack = _worker_change(home, plane.root, base, {"README.md": "changed\n"})
    other = tmp_path / "other-worker"
    other.mkdir()
    empty = hashlib.sha256(b"").hexdigest()
    body = {"run_id": run.run_id, "status": "COMPLETED", "exit_code": 0, "error": None, "started_at": 1.0,
            "finished_at": 2.0, "output_size": 0, "output_sha256": empty, "nonce": "n", "change": found}
    envelope = sign(RESULT_TYPE, json.dumps(body).encode(), [worker_key(other)])
    message = Message("result", {"run_id": run.run_id, "output_size": 0, "envelope": envelope}, pack)
    plane.sessions._on_result(_Worker(home), run, message)  # type: ignore[arg-type]
    status, error = plane.finished[-1]
    assert status == "FAILED" and "result rejected" in (error or "")
    assert "refs/taskrun/runs/" not in _refs(plane.root)
