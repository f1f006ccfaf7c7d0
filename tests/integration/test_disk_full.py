"""A full disk under a real daemon: the repository on a 20 MB tmpfs, a Task printing more than fits.

The daemon keeps serving (its control socket answers, its session with the Worker stays up), starts
no new Run while runs/ cannot be written, loses no byte of output, and catches up by itself once
space returns: every record written, committed, and no fast-import crash report left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.agentprobes import Gate
from tests.conftest import Daemon, _kill_leftover_agents, git, local_worker_home, mounted_tmpfs, taskrun, \
    wait_status, wait_until, write_task

pytestmark = pytest.mark.slow

#: What the big Task prints: 12 MB, more than the disk has left once the filler is written.
BIG_BYTES = 12 * 1024 * 1024
BIG_SCRIPT = f"{{ yes 0123456789abcdefghijklmnopqrstuvwxyz || true; }} | head -c {BIG_BYTES}"


def _expected_big() -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
    return (line * (BIG_BYTES // len(line) + 1))[:BIG_BYTES]


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs at tmp_path/fs (tests/conftest.py mounted_tmpfs)."""
    with mounted_tmpfs(tmp_path, "20m") as mount:
        yield mount


def _repo(where: Path) -> Path:
    root = where / "repo"
    root.mkdir()
    git(root, "init", "--quiet")
    git(root, "config", "user.name", "Test User")
    git(root, "config", "user.email", "test@example.com")
    assert taskrun(root, "init").returncode == 0
    config = root / ".taskrun.yaml"
    config.write_text(config.read_text().replace("sandbox: bwrap", "sandbox: none"))
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "initial")
    return root


def _fill(directory: Path, leave: int) -> Path:
    """Write a filler file until only about `leave` bytes are free on the filesystem of `directory`."""
    filler = directory / "filler"
    stat = os.statvfs(directory)
    size = max(0, stat.f_bavail * stat.f_frsize - leave)
    with open(filler, "wb") as handle:
        chunk = b"\0" * (1024 * 1024)
        try:
            while size > 0:
                size -= handle.write(chunk[:min(len(chunk), size)])
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_repository_disk_stalls_output_refuses_new_runs_and_catches_up(tmpfs: Path) -> None:
    root = _repo(tmpfs)
    daemon = Daemon(root)
    try:
        daemon.start()
        write_task(root, "warm", "echo warm")
        wait_status(root, "warm", "COMPLETED")
        reserve = tmpfs / "reserve"
        reserve.write_bytes(b"\0" * 64 * 1024)  # room for a user to write a Task file while full
        filler = _fill(tmpfs, 3 * 1024 * 1024)
        write_task(root, "big", BIG_SCRIPT)
        # The big Task's output fills the disk: the daemon says so, keeps the Run, and keeps serving.
        wait_until(lambda: "goes on, its output waits" in daemon.output(), 60, "the daemon to stall the output")
        assert "is full (ENOSPC)" in daemon.output()
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert taskrun(root, "workers", "--json").returncode == 0  # the control socket answers
        reserve.unlink()
        write_task(root, "later", "echo later")
        worker_runs = local_worker_home(root) / "runs"
        big_runs = {p.name for p in worker_runs.iterdir()} if worker_runs.is_dir() else set()
        # No new Run starts while runs/ cannot be written.
        with pytest.raises(AssertionError):
            wait_until(lambda: len(set(os.listdir(worker_runs)) - big_runs) > 0, 3, "a new Run to start")
        assert not (root / "runs" / "later").exists() or not any((root / "runs" / "later").glob("run-*"))
        # Room again: everything catches up by itself.
        filler.unlink()
        big = wait_status(root, "big", "COMPLETED", "FAILED", timeout=120)
        assert big["status"] == "COMPLETED", big
        wait_status(root, "later", "COMPLETED", timeout=60)
        # Over records.max_log_bytes: the whole output is kept beside the repository, the committed log capped.
        full = root / ".git" / "taskrun" / "logs" / "big" / "run-1.log"
        same = full.read_bytes() == _expected_big()  # not in the assert: pytest would diff 12 MB
        assert same, f"{full} is not byte for byte what the Agent printed"
        assert (root / "runs" / "big" / "run-1" / "output.log").stat().st_size <= 4 * 1024 * 1024 + 4096
        assert not (root / "runs" / "big" / "run-2").exists()  # one Run: the full disk cost no retry
        wait_until(lambda: '"COMPLETED"' in _committed(root, "runs/big/status.json"), 60, "the record to be committed")
        wait_until(lambda: '"COMPLETED"' in _committed(root, "runs/later/status.json"), 60, "the later record commit")
        git_dir = root / ".git"
        assert [n for n in os.listdir(git_dir) if n.startswith("fast_import_crash_")] == []
        subprocess.run(["git", "-C", str(root), "fsck", "--no-progress"], check=True, capture_output=True)
    except BaseException:
        print(daemon.output()[-20000:])  # the log is on the tmpfs, gone once it is unmounted
        raise
    finally:
        daemon.stop()
        _kill_leftover_agents(root)


def _committed(root: Path, path: str) -> str:
    result = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""


def _home_on_tmpfs(repo: Path, tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """A daemon (not started) whose local Worker's home is on the tmpfs, its Agents unconfined."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmpfs))  # the local Worker's home goes there (conftest)
    config = repo / ".taskrun.yaml"
    config.write_text(config.read_text().replace("sandbox: bwrap", "sandbox: none"))
    git(repo, "commit", "-qam", "unconfined")
    return Daemon(repo)


def test_a_full_worker_home_refuses_new_runs_keeps_its_session_and_takes_them_once_there_is_room(
        repo: Path, tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = _home_on_tmpfs(repo, tmpfs, monkeypatch)
    try:
        daemon.start()
        write_task(repo, "warm", "echo warm")
        wait_status(repo, "warm", "COMPLETED")
        home = local_worker_home(repo)
        assert str(home).startswith(str(tmpfs))
        filler = _fill(tmpfs, 0)
        write_task(repo, "t", "echo made-it")
        # Refused with the reason, while the session stays up: the Task waits, saying why.
        waiting = wait_until(lambda: (r := _task(repo, "t")) and "Worker home is full" in (r.get("waiting") or "")
                             and r, 60, "the Task to wait for the Worker home")
        assert waiting["status"] == "PENDING", waiting
        assert taskrun(repo, "workers", "--json").returncode == 0
        assert "is unreachable" not in daemon.output() and "no longer holds" not in daemon.output()
        assert [p for p in (home / "runs").iterdir()] == []  # nothing of a refused Run on the Worker
        filler.unlink()
        done = wait_status(repo, "t", "COMPLETED", "FAILED", timeout=60)
        assert done["status"] == "COMPLETED", done
        for run in (repo / "runs" / "t").glob("run-*"):
            assert (run / "status.json").is_file(), f"{run} holds no record"  # no empty run-<n>
    except BaseException:
        print(daemon.output()[-20000:])
        raise
    finally:
        daemon.stop()
        _kill_leftover_agents(repo)


def test_an_agent_failing_while_the_worker_home_is_full_is_recorded_with_that_reason(
        repo: Path, tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Agent's own writes land on the full disk: its output and even its error message fail, so
    # nothing it wrote says why it failed. The record does, and nothing of its Run is lost or left.
    daemon = _home_on_tmpfs(repo, tmpfs, monkeypatch)
    try:
        daemon.start()
        write_task(repo, "t", "while [ ! -e go ]; do sleep 0.1; done\nhead -c 4194304 /dev/zero | tr '\\0' x")
        wait_status(repo, "t", "RUNNING")
        run_id = json.loads((repo / "runs" / "t" / "run-1" / "status.json").read_text())["run_id"]
        workspace = local_worker_home(repo) / "runs" / run_id / "workspace"
        wait_until(workspace.is_dir, 60, "the Worker to lay out the workspace")
        filler = _fill(tmpfs, 0)
        (workspace / "go").touch()
        wait_until(lambda: _agent_gone(run_id), 60, "the Agent to fail")
        filler.unlink()
        done = wait_status(repo, "t", "COMPLETED", "FAILED", timeout=60)
        assert done["status"] == "FAILED", done
        run = json.loads((repo / "runs" / "t" / "run-1" / "status.json").read_text())
        assert "the disk holding the Worker home is full" in run["error"], run["error"]
        assert "its writes may have failed" in run["error"], run["error"]
    except BaseException:
        print(daemon.output()[-20000:])
        raise
    finally:
        daemon.stop()
        _kill_leftover_agents(repo)


def _gone_from_worker_home(root: Path, run_id: str) -> None:
    """Wait until the local Worker removed the directory of Run `run_id` (and the room it took)."""
    run_dir = local_worker_home(root) / "runs" / run_id
    wait_until(lambda: not run_dir.exists(), 60, f"the Worker to remove {run_dir}")


def _agent_gone(run_id: str) -> bool:
    """No process of the Run's Agent is left (its command line names the Run's directory)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and run_id.encode() in (entry / "cmdline").read_bytes():
                return False
        except OSError:
            continue
    return True

def _task(root: Path, task_id: str) -> dict[str, object] | None:
    from tests.conftest import task_record
    return task_record(root, task_id)


def test_a_change_returned_while_the_repository_disk_is_full_waits_for_room_and_lands(
        tmpfs: Path, tmp_path: Path) -> None:
    # The Agent writes 1 MiB that does not compress, then waits: its result carries a pack bigger than
    # the room left, so importing the change (git index-pack) fails for want of room, not for the pack.
    root = _repo(tmpfs)
    daemon = Daemon(root)
    daemon.log = tmp_path / "daemon.log"
    try:
        daemon.start()
        # The Agent may be confined: it waits for a file the test puts in its workspace.
        write_task(root, "change", "head -c 1048576 /dev/urandom > blob.bin\n"
                                   "while [ ! -e go ]; do sleep 0.1; done; rm go")
        wait_status(root, "change", "RUNNING")
        run_id = json.loads((root / "runs" / "change" / "run-1" / "status.json").read_text())["run_id"]
        workspace = local_worker_home(root) / "runs" / run_id / "workspace"
        # The Task is RUNNING once its Run is assigned; the Worker lays out the workspace a moment later.
        wait_until(workspace.is_dir, 60, "the Worker to lay out the workspace")
        filler = _fill(tmpfs, 256 * 1024)
        (workspace / "go").touch()
        wait_until(lambda: "waits for room" in daemon.output() or "goes on, its output waits" in daemon.output(),
                   60, "the daemon to wait for room")
        assert daemon.proc is not None and daemon.proc.poll() is None
        # Not judged while the import finds no room: no FAILED Run (it may land already, once a retry fits).
        assert _task(root, "change")["status"] in ("RUNNING", "COMPLETED")
        filler.unlink()
        done = wait_status(root, "change", "COMPLETED", "FAILED", timeout=120)
        assert done["status"] == "COMPLETED", done
        run = json.loads((root / "runs" / "change" / "run-1" / "status.json").read_text())
        assert run["result_branch"] == "taskrun/change", run
        assert git(root, "rev-parse", "--verify", "refs/heads/taskrun/change").strip() == run["result_commit"]
        assert not (root / "runs" / "change" / "run-2").exists()
        # fsck once the record commit is in: one made while fsck runs names an object its pack scan missed.
        wait_until(lambda: '"COMPLETED"' in _committed(root, "runs/change/status.json"), 60, "the record commit")
        fsck = subprocess.run(["git", "-C", str(root), "fsck", "--no-progress"], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    except BaseException:
        print(daemon.output()[-20000:])
        raise
    finally:
        daemon.stop()
        _kill_leftover_agents(root)


def test_a_daemon_started_on_a_full_disk_serves_and_is_found_once_there_is_room(tmpfs: Path, tmp_path: Path) -> None:
    root = _repo(tmpfs)
    write_task(root, "first", "echo first")
    filler = _fill(tmpfs, 0)
    daemon = Daemon(root)
    daemon.log = tmp_path / "daemon.log"  # the daemon's stdout is not on the full disk
    try:
        with open(daemon.log, "ab") as log:
            daemon.proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(root), "up"],
                                           stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "commands do not find this daemon" in daemon.output(), 60,
                   "the daemon to say it cannot write daemon.json")
        assert daemon.proc is not None and daemon.proc.poll() is None  # serving, not dead
        filler.unlink()
        wait_until(lambda: taskrun(root, "workers", "--json").returncode == 0, 30, "commands to find the daemon")
        assert wait_status(root, "first", "COMPLETED", timeout=60)["status"] == "COMPLETED"
    except BaseException:
        print(daemon.output()[-20000:])
        raise
    finally:
        daemon.stop()
        _kill_leftover_agents(root)


@contextlib.contextmanager
def _serving(daemon: Daemon, root: Path) -> Iterator[Daemon]:
    """The test's body with `daemon` (started by it): its log printed when the body fails; stopped after,
    and whatever its Agents left killed."""
    try:
        yield daemon
    except BaseException:
        print(daemon.output()[-20000:])
        raise
    finally:
        daemon.stop()
        _kill_leftover_agents(root)


@pytest.mark.parametrize("ending", ["exit 0", "exit 3"])
def test_an_agent_that_fills_the_worker_home_itself_fails_with_that_reason_and_frees_it(
        repo: Path, tmpfs: Path, monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    # The Agent's own file fills the disk, and stays: neither its change nor the Worker's result.json has
    # room. The Run still ends, FAILED with the reason (the result is sent from memory), and once it is
    # acknowledged its directory goes, so the Worker takes the next Task.
    daemon = _home_on_tmpfs(repo, tmpfs, monkeypatch)
    with _serving(daemon, repo):
        daemon.start()
        write_task(repo, "t", f"head -c 40000000 /dev/zero > big\n{ending}")
        done = wait_status(repo, "t", "COMPLETED", "FAILED", timeout=90)
        assert done["status"] == "FAILED", done
        run = json.loads((repo / "runs" / "t" / "run-1" / "status.json").read_text())
        assert "the disk holding the Worker home is full" in run["error"], run["error"]
        write_task(repo, "after", "echo after")
        assert wait_status(repo, "after", "COMPLETED", "FAILED", timeout=90)["status"] == "COMPLETED"
        assert not list((local_worker_home(repo) / "runs").iterdir())


def test_a_change_that_cannot_be_packed_on_the_full_worker_home_fails_its_run_alone(
        repo: Path, tmpfs: Path, monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    # 12 MB that do not compress fit in the home, their pack does not: git pack-objects fails for want of
    # room. The session crashed on that, and again at every reconnect, until the other Run was lost too.
    daemon = _home_on_tmpfs(repo, tmpfs, monkeypatch)
    with _serving(daemon, repo):
        daemon.start()
        write_task(repo, "other", f"until {gate.check}; do sleep 0.1; done; echo other")
        wait_status(repo, "other", "RUNNING")
        write_task(repo, "bigc", "head -c 12000000 /dev/urandom > big.bin\necho wrote")
        done = wait_status(repo, "bigc", "COMPLETED", "FAILED", timeout=120)
        assert done["status"] == "FAILED", done
        run = json.loads((repo / "runs" / "bigc" / "run-1" / "status.json").read_text())
        assert "the Agent's change was not returned" in run["error"], run["error"]
        assert "the disk holding the Worker home is full" in run["error"], run["error"]
        _gone_from_worker_home(repo, run["run_id"])
        gate.open()  # the room came back: the other Run prints and ends
        other = wait_status(repo, "other", "COMPLETED", "FAILED", timeout=120)
        assert other["status"] == "COMPLETED" and len(other["runs"]) == 1, other
        assert "offline" not in daemon.output() and "closed the session" not in daemon.output()
        wait_until(lambda: not list((local_worker_home(repo) / "runs").iterdir()), 60, "the Runs to be removed")


def test_an_agent_filling_the_disk_the_clone_and_worker_home_share_does_not_stop_everything(
        tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    # The clone and the local Worker's home on one disk: the Run that filled it ends after the wait for room,
    # its files go at once (the daemon cannot record its result without that room), and the rest goes on.
    root = _repo(tmpfs)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmpfs / "state"))
    daemon = Daemon(root)
    daemon.log = tmp_path / "daemon.log"
    with _serving(daemon, root):
        with open(daemon.log, "ab") as log:
            daemon.proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(root), "up"],
                                           stdout=log, stderr=subprocess.STDOUT)
        write_task(root, "q", f"until {gate.check}; do sleep 0.1; done; echo ok")
        wait_status(root, "q", "RUNNING")
        write_task(root, "fill", "dd if=/dev/zero of=fill bs=1M count=100 2>/dev/null; exit 0")
        done = wait_status(root, "fill", "COMPLETED", "FAILED", timeout=150)
        assert done["status"] == "FAILED" and "the disk holding the Worker home is full" in done["error"], done
        filled = json.loads((root / "runs" / "fill" / "run-1" / "status.json").read_text())
        _gone_from_worker_home(root, filled["run_id"])
        gate.open()  # the room came back: the other Run prints and ends
        q = wait_status(root, "q", "COMPLETED", "FAILED", timeout=150)
        assert q["status"] == "COMPLETED" and len(q["runs"]) == 1, q
        write_task(root, "after", "echo after")
        assert wait_status(root, "after", "COMPLETED", "FAILED", timeout=90)["status"] == "COMPLETED"


def test_a_change_bigger_than_the_room_left_fails_its_run_instead_of_holding_every_other(
        tmpfs: Path, tmp_path: Path) -> None:
    # The disk has room, but not for this pack: waiting for room held every Run and every new Task for good.
    root = _repo(tmpfs)
    daemon = Daemon(root)
    daemon.log = tmp_path / "daemon.log"
    with _serving(daemon, root):
        daemon.start()
        write_task(root, "warm", "echo warm")
        wait_status(root, "warm", "COMPLETED")
        _fill(tmpfs, 6 * 1024 * 1024).rename(tmpfs / "kept")  # 6 MiB left, for good
        write_task(root, "huge", "head -c 9000000 /dev/urandom > big.bin")
        done = wait_status(root, "huge", "COMPLETED", "FAILED", timeout=120)
        assert done["status"] == "FAILED" and "does not fit on the disk holding the repository" in done["error"], done
        write_task(root, "small", "echo small")
        assert wait_status(root, "small", "COMPLETED", "FAILED", timeout=90)["status"] == "COMPLETED"
