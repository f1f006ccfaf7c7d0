"""Fixtures shared by unit and integration tests: real git repositories, the real daemon."""

from __future__ import annotations

import json
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

from taskrunner.gitops import state_dir
from taskrunner.links.local import default_home
from tests.agentprobes import Counter, Gate

T = TypeVar("T")


def need_program(name: str, package: str) -> str:
    """The path of the program `name`: a test that needs it skips on a developer's machine without it, and
    fails under CI (CI=true), where .ci/run installs `package` (Debian)."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: .ci/run installs it (Debian package {package})")
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return found


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, what: str = "a condition") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def taskrun(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskrunner", "-C", str(root), *args],
                          capture_output=True, text=True, timeout=timeout)


def write_task(root: Path, task_id: str, script: str, front: str = "", title: str | None = None) -> Path:
    """Write tasks/<id>.md whole (temp name, then rename), as an editor or `submit` does."""
    path = root / "tasks" / f"{task_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"---\n{front}---\n# {title or task_id}\n\n```sh\n{script}\n```\n"
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def task_record(root: Path, task_id: str) -> dict[str, Any] | None:
    try:
        return json.loads((root / "runs" / task_id / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_record(root: Path, task_id: str, number: int) -> dict[str, Any] | None:
    try:
        return json.loads((root / "runs" / task_id / f"run-{number}" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def status_of(root: Path, task_id: str) -> str | None:
    record = task_record(root, task_id)
    return record["status"] if record else None


def wait_status(root: Path, task_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
    return wait_until(lambda: (r := task_record(root, task_id)) and r["status"] in statuses and r,
                      timeout, f"'{task_id}' to be {' or '.join(statuses)} (now {status_of(root, task_id)})")


@pytest.fixture(autouse=True, scope="session")
def _local_worker_homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Local Workers' default homes (under XDG_STATE_HOME) go to this session's temporary directory."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


def local_worker_home(root: Path, name: str = "local") -> Path:
    """The default home of the repository's local Worker `name` (links/local.py default_home)."""
    return default_home(state_dir(root), name)


@pytest.fixture
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No global or system git configuration leaks in; HOME is an empty directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL",
                 "EMAIL", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_CONFIG_GLOBAL"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh `taskrun init` repository with one user commit."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "--quiet")
    git(root, "config", "user.name", "Test User")
    git(root, "config", "user.email", "test@example.com")
    result = taskrun(root, "init")
    assert result.returncode == 0, result.stderr
    (root / "README.md").write_text("a project\n")
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "initial")
    return root


class Daemon:
    """`taskrun up` as a real process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(self.root), "up", *args],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 20, "the daemon to answer on its control socket")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
        result = taskrun(self.root, "workers", "--json")
        if result.returncode != 0:
            return False
        data = json.loads(result.stdout)
        return data["daemon"] and all(w["reachable"] for w in data["workers"])

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def gate() -> Iterator[Gate]:
    """A loopback port a confined Agent can wait on (tests/agentprobes.py); closed until opened."""
    made = Gate()
    yield made
    made.close()


@pytest.fixture
def counter() -> Iterator[Counter]:
    """A loopback server numbering an Agent's connections (tests/agentprobes.py)."""
    made = Counter()
    yield made
    made.close()


@pytest.fixture
def daemon(repo: Path) -> Iterator[Daemon]:
    handle = Daemon(repo)
    yield handle
    handle.stop()
    _kill_leftover_agents(repo)


def _kill_leftover_agents(root: Path) -> None:
    """Agents outlive daemons by design; a test must not leave them behind."""
    runs = local_worker_home(root).parent
    for pid_file in runs.glob("*/runs/*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's size=, e.g. "20m") at where/fs, always unmounted afterwards.

    Needs root: skipped without it on a developer's machine, failed under CI (CI=true), where it must run.
    """
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a tmpfs needs root, and CI runs as root: run the suite as root")
        pytest.skip("mounting a tmpfs needs root")
    mount = where / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
