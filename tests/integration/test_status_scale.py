"""A real daemon over many finished Tasks: the record index at start, status from the daemon's memory."""

from __future__ import annotations

import json
import time
from pathlib import Path

from taskrunner.gitops import state_dir
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.record_index import RACY_NS, RecordIndex
from taskrunner.records import Records
from taskrunner.state import RunState, TaskState
from taskrunner.taskfile import parse_task
from tests.conftest import Daemon, git, taskrun, wait_until

COUNT = 120


def seed(root: Path, count: int) -> None:
    """`count` finished Tasks with their files, sealed as the daemon writes them, committed."""
    records = Records(root)
    (root / "tasks").mkdir(exist_ok=True)
    for n in range(count):
        task_id = f"t-{n:03d}"
        rel = f"tasks/{task_id}.md"
        data = f"# probe {n}\n\n```sh\ntrue\n```\n".encode()
        (root / rel).write_bytes(data)
        spec = parse_task(task_id, rel, data)
        run = RunState(run_id=f"run{n}", task_id=task_id, number=1, revision=spec.revision, attempt=1,
                       worker="local", agent="shell", status=RunStatus.COMPLETED, exit_code=0)
        records.save_run(run.record())
        records.save_task(TaskState(task_id, rel, n + 1, TaskStatus.COMPLETED, spec=spec, revision=spec.revision,
                                    attempts=1, runs=[run], updated_at=1000.0 + n).record())
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "seeded records")


def listing(root: Path, *args: str) -> dict:
    result = taskrun(root, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_restart_reads_the_index_and_status_comes_from_the_daemon(repo: Path, daemon: Daemon) -> None:
    seed(repo, COUNT)
    # An index written within RACY_NS of a record's last change does not vouch for it (git's racy rule):
    # the daemon's index below is to vouch for all of them.
    newest = max(path.lstat().st_ctime_ns for path in (repo / "runs").rglob("*"))
    wait_until(lambda: time.time_ns() > newest + RACY_NS, 10, "the records to be older than the racy window")
    without = listing(repo)
    assert without["source"] == "records" and without["total"] == COUNT
    (state_dir(repo) / "record-index").unlink()  # written by that status: the daemon must write its own
    daemon.start()
    first = listing(repo)
    assert first["source"] == "daemon" and first["counts"] == {"COMPLETED": COUNT}
    assert [t["task_id"] for t in first["tasks"]] == [t["task_id"] for t in without["tasks"]]
    assert [t["status"] for t in first["tasks"]] == [t["status"] for t in without["tasks"]]
    summary = taskrun(repo, "status", "--limit", "3")
    assert summary.returncode == 0 and f"3 of {COUNT} Tasks shown ({COUNT} COMPLETED)" in summary.stdout
    assert daemon.stop() == 0

    # The daemon wrote the index at start: every record it holds is believed without a read.
    index = RecordIndex(Records(repo), state_dir(repo))
    assert index.load()
    ids = sorted(index.task_ids())
    assert len(ids) == COUNT and all(index.task_summary(task_id) is not None for task_id in ids)

    daemon.start()
    again = listing(repo, "t-00*", "--status", "COMPLETED")
    assert again["source"] == "daemon" and again["total"] == 10
    assert [t["task_id"] for t in again["tasks"]] == [f"t-00{n}" for n in range(10)]
    assert again["tasks"][0]["runs"][0]["run_id"] == "run0"
    assert "not written by this daemon" not in daemon.output()
