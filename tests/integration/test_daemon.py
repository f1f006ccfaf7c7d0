"""The real daemon process: watching tasks/, revisions, deletions, signals, reattaching."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from taskrunner.records import Records
from taskrunner.worker.rundir import RunDir
from tests.agentprobes import Gate, marker, processes_named
from tests.conftest import (
    local_worker_home,
    Daemon,
    git,
    run_record,
    status_of,
    task_record,
    taskrun,
    wait_status,
    wait_until,
    write_task,
)


def _output(root: Path, task_id: str, number: int = 1) -> str:
    path = root / "runs" / task_id / f"run-{number}" / "output.log"
    return path.read_text() if path.exists() else ""


def _numbered(text: str) -> int:
    """How many "line N" lines `text` holds, asserting they are "line 1", "line 2", ... none missing or
    repeated (a last line not yet ended, and a final "done", are not counted)."""
    lines = text.removesuffix("done\n").split("\n")[:-1]
    assert lines == [f"line {i}" for i in range(1, len(lines) + 1)], text
    return len(lines)


class _Lines:
    """The lines a process writes to its stdout, each waited for with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._queue: queue.Queue[str] = queue.Queue()  # "" once the process closed its stdout
        threading.Thread(target=self._read, args=(proc.stdout,), name="lines", daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put("")

    def next(self, timeout: float = 30) -> str:
        """The next line ("" when the process closed its stdout); fails after `timeout` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout}s waiting for a line") from None

    def rest(self, timeout: float = 30) -> list[str]:
        """Every further line until the process closes its stdout; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while line := self.next(max(0.0, deadline - time.monotonic())):
            lines.append(line)
        return lines


#: An Agent that prints numbered lines until the gate (`{check}`) opens, then five more and "done".
STREAM = """\
i=0
until {check}; do i=$((i + 1)); echo "line $i"; sleep 0.05; done
for _ in 1 2 3 4 5; do i=$((i + 1)); echo "line $i"; done
echo done"""


def test_task_dropped_into_tasks_runs_while_the_daemon_is_up(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "dropped", "echo picked-up")

    wait_status(daemon.root, "dropped", "COMPLETED")

    assert _output(daemon.root, "dropped") == "picked-up\n"


def test_task_written_in_place_in_several_writes_is_read_once_complete(daemon: Daemon) -> None:
    daemon.start()
    path = daemon.root / "tasks" / "slowly.md"
    with open(path, "w") as handle:  # an editor writing in place, flushing halfway
        handle.write("---\npriority: high\n")
        handle.flush()
        handle.write("---\n# Slowly\n\n```sh\necho whole\n```\n")

    record = wait_status(daemon.root, "slowly", "COMPLETED")

    assert record["priority"] == "high" and _output(daemon.root, "slowly") == "whole\n"


def test_editor_temp_files_are_ignored(daemon: Daemon) -> None:
    daemon.start()
    for name in (".hidden.md", "notes.md~", "draft.md.swp", "#autosave.md#"):
        (daemon.root / "tasks" / name).write_text("# not a task\n")
    write_task(daemon.root, "real", "true")

    wait_status(daemon.root, "real", "COMPLETED")

    assert sorted(p.name for p in (daemon.root / "runs").iterdir() if p.is_dir()) == ["real"]


def test_task_added_while_the_daemon_was_down_runs_at_start(daemon: Daemon) -> None:
    write_task(daemon.root, "early", "echo early")
    daemon.start()

    wait_status(daemon.root, "early", "COMPLETED")


def test_editing_a_finished_task_runs_a_new_revision(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "edit-me", "echo first")
    first = wait_status(daemon.root, "edit-me", "COMPLETED")

    write_task(daemon.root, "edit-me", "echo second")

    wait_until(lambda: (r := task_record(daemon.root, "edit-me")) and r["revision"] != first["revision"]
               and r["status"] == "COMPLETED", 30, "the new revision to complete")
    assert _output(daemon.root, "edit-me", 2) == "second\n"
    second = run_record(daemon.root, "edit-me", 2)
    assert second and second["revision"] != first["revision"]


def test_deleting_a_running_task_cancels_it_and_kills_its_processes(daemon: Daemon) -> None:
    daemon.start()
    name = marker()  # inside its PID namespace the Agent's $$ is no host pid: found by its argv[0]
    write_task(daemon.root, "doomed", f"echo started\nexec -a {name} sleep 300")
    wait_until(lambda: _output(daemon.root, "doomed") == "started\n" and processes_named(name), 20,
               "the Run to start")

    (daemon.root / "tasks" / "doomed.md").unlink()

    record = wait_status(daemon.root, "doomed", "CANCELLED")
    assert record["error"] and "deleted" in record["error"]
    assert (run_record(daemon.root, "doomed", 1) or {})["status"] == "CANCELLED"
    wait_until(lambda: not processes_named(name), 10, "the Agent to be killed")


def test_deleting_a_pending_task_cancels_it(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "blocker", "sleep 300")
    write_task(daemon.root, "waiting", "true", front="depends_on: [blocker]\n")
    wait_status(daemon.root, "blocker", "RUNNING")
    wait_status(daemon.root, "waiting", "PENDING")

    (daemon.root / "tasks" / "waiting.md").unlink()

    wait_status(daemon.root, "waiting", "CANCELLED")
    assert not (run_record(daemon.root, "waiting", 1))


def test_cancel_then_retry_from_the_cli(daemon: Daemon, gate: Gate) -> None:
    daemon.start()
    write_task(daemon.root, "gated", f"if {gate.check}; then echo opened; else sleep 300; fi")
    wait_status(daemon.root, "gated", "RUNNING")

    cancel = taskrun(daemon.root, "cancel", "gated")
    assert cancel.returncode == 0, cancel.stderr
    wait_status(daemon.root, "gated", "CANCELLED")

    gate.open()
    retry = taskrun(daemon.root, "retry", "gated")
    assert retry.returncode == 0, retry.stderr
    wait_status(daemon.root, "gated", "COMPLETED")
    assert _output(daemon.root, "gated", 2) == "opened\n"


def test_cancel_of_an_unknown_task_says_so(daemon: Daemon) -> None:
    daemon.start()
    result = taskrun(daemon.root, "cancel", "nope")
    assert result.returncode == 2 and "no Task 'nope'" in result.stderr


def test_second_daemon_in_the_same_repository_exits_with_a_clear_message(daemon: Daemon) -> None:
    daemon.start()

    second = taskrun(daemon.root, "up", timeout=30)

    assert second.returncode == 2
    assert "already running" in second.stderr


def test_sigterm_stops_the_daemon_with_exit_zero(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "quick", "true")
    wait_status(daemon.root, "quick", "COMPLETED")

    daemon.signal(signal.SIGTERM)

    assert daemon.wait() == 0
    assert git(daemon.root, "status", "--porcelain", "runs") == ""


def test_daemon_killed_mid_run_reattaches_without_losing_or_repeating_output(daemon: Daemon, gate: Gate) -> None:
    # The Agent prints until the gate opens, and the gate opens only once the restarted daemon has
    # recorded output of its own: the Run is still going when the new daemon attaches to it, however
    # slow the restart (a Run that ended meanwhile is another test's case).
    daemon.start()
    write_task(daemon.root, "stream", STREAM.format(check=gate.check))
    wait_until(lambda: "line 5\n" in _output(daemon.root, "stream"), 20, "some output")

    daemon.signal(signal.SIGKILL)
    daemon.wait()
    before = _numbered(_output(daemon.root, "stream"))
    daemon.start()

    wait_until(lambda: _numbered(_output(daemon.root, "stream")) > before + 5, 20,
               f"the restarted daemon to record output past line {before}")
    assert status_of(daemon.root, "stream") == "RUNNING"
    gate.open()

    wait_status(daemon.root, "stream", "COMPLETED", timeout=40)
    output = _output(daemon.root, "stream")
    assert output.endswith("done\n") and _numbered(output) > before + 5
    run = run_record(daemon.root, "stream", 1)
    assert run and run["output_bytes"] == len(output)
    assert len((task_record(daemon.root, "stream") or {})["runs"]) == 1


def _kill_mid_run(daemon: Daemon, task_id: str, gate: Gate) -> None:
    """Start a Task that waits for `gate`, then SIGKILL the daemon while it runs."""
    daemon.start()
    write_task(daemon.root, task_id, f"echo begin; until {gate.check}; do sleep 0.05; done; echo end")
    wait_until(lambda: _output(daemon.root, task_id) == "begin\n", 20, "the Run to start")
    daemon.signal(signal.SIGKILL)
    daemon.wait()


def test_run_finished_while_the_daemon_was_down_is_recorded_on_restart(daemon: Daemon, gate: Gate) -> None:
    _kill_mid_run(daemon, "finishes-alone", gate)

    gate.open()
    worker_runs = local_worker_home(daemon.root) / "runs"
    wait_until(lambda: any(RunDir(path).exit_code() is not None for path in worker_runs.iterdir()), 20,
               "the Agent to finish on its own")
    daemon.start()

    wait_status(daemon.root, "finishes-alone", "COMPLETED")
    assert _output(daemon.root, "finishes-alone") == "begin\nend\n"


def test_a_run_the_task_record_does_not_list_yet_is_reattached_on_restart(daemon: Daemon, gate: Gate) -> None:
    """The Task record of a fresh Run trails its Run record; a crash in between loses nothing."""
    _kill_mid_run(daemon, "trailing", gate)
    run_id = (run_record(daemon.root, "trailing", 1) or {})["run_id"]
    # As on disk when the daemon dies within RECORD_LAG_SECONDS of assigning the Run;
    # written (and sealed) by the daemon's own writer, or the daemon would not believe it.
    path = daemon.root / "runs" / "trailing" / "status.json"
    record = json.loads(path.read_text())
    Records(daemon.root).save_task({**record, "status": "PENDING", "runs": [], "attempts": 0})

    daemon.start()
    gate.open()
    wait_status(daemon.root, "trailing", "COMPLETED")
    assert [entry["run"] for entry in (task_record(daemon.root, "trailing") or {})["runs"]] == [1]
    assert (run_record(daemon.root, "trailing", 1) or {})["run_id"] == run_id
    assert _output(daemon.root, "trailing") == "begin\nend\n"
    assert not (daemon.root / "runs" / "trailing" / "run-2").exists()


@pytest.mark.parametrize("trailing", [{"status": "RUNNING", "runs": "ASSIGNED"}, {"status": "PENDING", "runs": None}])
def test_a_task_record_that_trails_its_finished_run_is_settled_on_restart(daemon: Daemon,
                                                                          trailing: dict[str, Any]) -> None:
    """A daemon killed while writing a Task's last record leaves it RUNNING (or PENDING) beside its Run's
    final record, and the Worker has already forgotten the Run: the next daemon settles the Task from
    that Run, runs nothing again, and commits the Task's record."""
    daemon.start()
    write_task(daemon.root, "trails", "echo once")
    wait_status(daemon.root, "trails", "COMPLETED")
    daemon.stop()
    path = daemon.root / "runs" / "trails" / "status.json"
    record = json.loads(path.read_text())
    runs = [{**entry, "status": trailing["runs"]} for entry in record["runs"]] if trailing["runs"] else []
    Records(daemon.root).save_task({**record, "status": trailing["status"], "runs": runs,
                                    "attempts": 1 if runs else 0})

    daemon.start()
    wait_until(lambda: (task_record(daemon.root, "trails") or {}).get("status") == "COMPLETED"
               and git(daemon.root, "status", "--porcelain", "--", "runs/trails") == "", 20,
               "the trailing Task record to be settled and committed")
    assert [entry["run"] for entry in (task_record(daemon.root, "trails") or {})["runs"]] == [1]
    assert not (daemon.root / "runs" / "trails" / "run-2").exists()
    assert _output(daemon.root, "trails") == "once\n"


def test_malformed_config_edit_is_refused_and_the_previous_one_stays(daemon: Daemon) -> None:
    daemon.start()
    config = daemon.root / ".taskrun.yaml"
    good = config.read_text()
    config.write_text(good + "\nbogus_key: 1\n")
    wait_until(lambda: "bogus_key" in daemon.output(), 20, "the refusal to be reported")
    write_task(daemon.root, "still-works", "true")

    wait_status(daemon.root, "still-works", "COMPLETED")
    assert "previous one stays in force" in daemon.output()


def test_workers_json_reports_the_local_worker(daemon: Daemon) -> None:
    daemon.start()

    result = taskrun(daemon.root, "workers", "--json")

    data = json.loads(result.stdout)
    assert data["daemon"] is True
    (local,) = data["workers"]
    assert local["name"] == "local" and local["reachable"] is True and local["slots"] == 2
    assert local["version"] and local["last_seen"]


def test_logs_follow_streams_until_the_run_ends(daemon: Daemon, gate: Gate, tmp_path: Path) -> None:
    daemon.start()
    # The Run prints its first line, then waits at the gate, which opens only once `logs -f` has shown
    # that line: the rest can reach `logs -f` only by following the Run.
    write_task(daemon.root, "followed", f'echo "tick 1"; until {gate.check}; do sleep 0.05; done; '
               'echo "tick 2"; echo "tick 3"')
    wait_status(daemon.root, "followed", "RUNNING")

    with open(tmp_path / "logs.err", "w+") as stderr, \
            subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(daemon.root), "logs", "followed", "-f"],
                             stdout=subprocess.PIPE, stderr=stderr, text=True) as follow:
        try:
            lines = _Lines(follow)
            assert lines.next() == "tick 1\n"
            assert status_of(daemon.root, "followed") == "RUNNING"
            gate.open()
            assert lines.rest() == ["tick 2\n", "tick 3\n"]
            follow.wait(timeout=30)
        finally:
            if follow.poll() is None:
                follow.kill()
        stderr.seek(0)
        assert follow.returncode == 0, stderr.read()
    assert status_of(daemon.root, "followed") == "COMPLETED"
