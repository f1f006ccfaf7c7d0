"""`taskrun status` over many Tasks: summary, filters, streamed JSON, the daemon's answer (cli/status.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from rich.console import Console

from taskrunner import status_query
from taskrunner.cli import render
from taskrunner.cli.main import main
from taskrunner.control import ControlServer
from taskrunner.gitops import state_dir
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.records import Records
from taskrunner.state import RunState, TaskState


def seed(root: Path, finished: int, pending: int = 0) -> None:
    """Task files and sealed records: `finished` COMPLETED Tasks done-<n> (done-<finished> the latest), the
    last one FAILED, and `pending` Task files without a record yet."""
    records = Records(root)
    (root / "tasks").mkdir(exist_ok=True)
    for n in range(1, finished + 1):
        task_id = f"done-{n}"
        (root / "tasks" / f"{task_id}.md").write_text(f"# done {n}\n\n```sh\ntrue\n```\n")
        status = RunStatus.FAILED if n == finished else RunStatus.COMPLETED
        run = RunState(run_id=f"r{n}", task_id=task_id, number=1, revision="r", attempt=1, worker="local",
                       agent="shell", status=status, exit_code=0)
        records.save_run(run.record())
        records.save_task(TaskState(task_id, f"tasks/{task_id}.md", n, TaskStatus(status.value), revision="r",
                                    attempts=1, runs=[run], updated_at=1000.0 + n).record())
    for n in range(1, pending + 1):
        (root / "tasks" / f"new-{n}.md").write_text(f"# new {n}\n\n```sh\ntrue\n```\n")


def status(root: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["-C", str(root), "status", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip() and " of " not in line]


def test_a_small_set_is_listed_as_before_without_a_summary(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(repo, 3, pending=1)
    code, out, _ = status(repo, capsys)
    assert code == 0 and rows(out) == ["done-1", "done-2", "done-3", "new-1"]
    assert out.splitlines()[0].split() == ["TASK", "STATUS", "RUNS", "WORKER", "UPDATED", "NOTE"]
    assert "shown" not in out


def test_a_large_set_is_summarised(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(repo, 30, pending=2)
    code, out, _ = status(repo, capsys)
    assert code == 0
    assert rows(out) == [f"done-{n}" for n in range(11, 31)] + ["new-1", "new-2"]
    assert "22 of 32 Tasks shown (29 COMPLETED, 1 FAILED, 2 PENDING)" in out and "--all" in out
    assert len(rows(status(repo, capsys, "--all")[1])) == 32
    assert rows(status(repo, capsys, "--limit", "2")[1]) == ["done-29", "done-30", "new-1", "new-2"]
    assert rows(status(repo, capsys, "--status", "failed")[1]) == ["done-30"]
    assert rows(status(repo, capsys, "--status", "FAILED,PENDING")[1]) == ["done-30", "new-1", "new-2"]
    assert rows(status(repo, capsys, "--status", "FAILED", "--status", "PENDING")[1]) == ["done-30", "new-1", "new-2"]
    assert rows(status(repo, capsys, "done-2?")[1]) == [f"done-{n}" for n in range(20, 30)]
    assert rows(status(repo, capsys, "done-1", "new-*")[1]) == ["done-1", "new-1", "new-2"]
    code, out, _ = status(repo, capsys, "nothing-*")
    assert code == 0 and "No Task matches." in out


def test_one_task_id_without_glob_characters_shows_that_task_with_its_runs(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(repo, 25)
    code, out, _ = status(repo, capsys, "done-3")
    assert code == 0 and rows(out)[0] == "done-3" and "RUN" in out and "shown" not in out
    one = json.loads(status(repo, capsys, "done-3", "--json")[1])
    assert set(one) == {"task", "runs"} and one["runs"][0]["run"] == 1


def test_an_unknown_status_is_a_usage_error(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = status(repo, capsys, "--status", "DONE")
    assert code == 2 and "--status DONE: not a status" in err


def test_json_lists_every_task_unless_limited_and_is_one_document(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(repo, 30, pending=1)
    code, out, _ = status(repo, capsys, "--json")
    data = json.loads(out)
    # One line per Task.
    assert code == 0 and [json.loads(line.strip().rstrip(",")) for line in out.splitlines()
                          if '"task_id"' in line] == data["tasks"]
    assert set(data) == {"counts", "git", "omitted", "source", "tasks", "total"}
    assert len(data["tasks"]) == data["total"] == 31 and data["omitted"] == 0 and data["source"] == "records"
    assert data["tasks"][0] == Records(repo).load_task("done-1")
    limited = json.loads(status(repo, capsys, "--json", "--limit", "5")[1])
    assert [t["task_id"] for t in limited["tasks"]] == [f"done-{n}" for n in range(26, 31)] + ["new-1"]
    assert limited["omitted"] == 25 and limited["counts"] == {"COMPLETED": 29, "FAILED": 1, "PENDING": 1}


def test_the_listing_is_written_one_item_at_a_time_one_line_each() -> None:
    class Once:
        """An iterable that can be walked once: nothing may hold the list."""

        def __iter__(self) -> Iterator[dict[str, Any]]:
            yield from ({"n": n, "s": "a\nb", "nested": {"x": [1, {}]}} for n in range(3))

    for items in ([], Once()):
        stream = io.StringIO()
        render.write_listing(stream, {"zeta": {"k": [1, 2]}, "alpha": 1, "empty": {}}, "tasks", items)
        expected = {"zeta": {"k": [1, 2]}, "alpha": 1, "empty": {}, "tasks": list(items)}
        text = stream.getvalue()
        assert json.loads(text) == expected and text.endswith("}\n")
        assert text.startswith('{\n  "alpha": 1,\n  "empty": {},\n  "tasks": [')
        lines = text.splitlines()
        assert [json.loads(line.strip().rstrip(",")) for line in lines if '"n"' in line] == expected["tasks"]


def test_a_long_table_is_written_as_plain_lines_laid_out_as_rich_does(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"task_id": f"t-{n}" * (n % 3 + 1), "status": "COMPLETED" if n % 2 else "PENDING",
                "runs": [{"worker": "w" * n}] * n, "updated_at": None, "title": f"Ünïcode 全角 {n}"} for n in range(6)]
    rich_out = io.StringIO()
    Console(file=rich_out, width=render.PIPE_WIDTH, soft_wrap=True, highlight=False).print(render.tasks_table(records))
    monkeypatch.setattr(render, "RICH_ROWS", 2)
    plain_out = io.StringIO()
    render.print_tasks(Console(file=plain_out, width=render.PIPE_WIDTH, soft_wrap=True), records)
    assert plain_out.getvalue() == rich_out.getvalue()


def test_with_a_daemon_status_comes_from_its_memory(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(repo, 2)  # on disk; the daemon knows other Tasks
    memory = [TaskState(f"mem-{n}", f"tasks/mem-{n}.md", n, TaskStatus.COMPLETED, updated_at=float(n))
              for n in range(1, 31)]
    asked: list[dict[str, Any]] = []

    def handle(payload: dict[str, Any]) -> dict[str, Any]:
        asked.append(payload)
        return status_query.answer(memory, {}, payload)

    server = ControlServer(state_dir(repo), handle)
    server.start()
    try:
        data = json.loads(status(repo, capsys, "--json", "mem-1*")[1])
        code, out, _ = status(repo, capsys)
    finally:
        server.stop()
    assert data["source"] == "daemon" and [t["task_id"] for t in data["tasks"]] == [
        "mem-1", *(f"mem-1{n}" for n in range(10))]
    # --json asks for each record's text (encoded), the table for records.
    assert asked[0] == {"command": "status", "patterns": ["mem-1*"], "statuses": [], "limit": None, "encoded": True}
    assert "encoded" not in asked[1]
    assert code == 0 and rows(out) == [f"mem-{n}" for n in range(11, 31)] and "20 of 30 Tasks shown" in out
    assert data["tasks"][0] == memory[0].record()


def test_without_a_daemon_a_changed_record_is_seen_through_the_index(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(repo, 3)
    status(repo, capsys)
    assert (state_dir(repo) / "record-index").exists()
    records = Records(repo)
    task = records.load_task("done-2")
    assert task is not None
    records.save_task({**task, "status": "CANCELLED", "error": "stopped"})
    data = json.loads(status(repo, capsys, "--json")[1])
    assert {t["task_id"]: t["status"] for t in data["tasks"]}["done-2"] == "CANCELLED"


def test_a_record_this_clone_did_not_write_is_not_listed_and_is_named(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(repo, 3)
    status(repo, capsys)  # builds the index
    path = Records(repo).task_file("done-1")
    path.write_text(json.dumps({"task_id": "done-1", "status": "COMPLETED", "runs": []}))
    code, out, err = status(repo, capsys, "--all")
    # As if it had no record: its file is listed as not yet seen, and the record is named on stderr.
    line = next(line for line in out.splitlines() if line.startswith("done-1 "))
    assert code == 0 and line.split()[1] == "PENDING" and "not yet seen by the daemon" in line
    assert "runs/done-1/status.json was not written by this daemon" in err


@pytest.mark.parametrize("count", [0, 1, 1203])
def test_the_json_listing_with_record_texts_is_the_listing_of_the_records(count: int) -> None:
    """`status --json` copies the record index's texts: byte for byte what encoding each record writes."""
    from taskrunner.cli.status import write_listing

    tasks = [{"task_id": f"t-{n}", "status": "COMPLETED", "title": "é \u2028 \"q\"", "runs": [{"run": 1}],
              "updated_at": n / 3} for n in range(count)]
    fields = {"counts": {"COMPLETED": count}, "git": {"push": None}, "omitted": 0, "source": "records",
              "total": count}
    expected, given = io.StringIO(), io.StringIO()
    render.write_listing(expected, fields, "tasks", tasks)
    write_listing(given, fields, [json.dumps(t, sort_keys=True) if n % 2 else t for n, t in enumerate(tasks)])
    assert given.getvalue() == expected.getvalue()
    assert json.loads(given.getvalue())["tasks"] == tasks


@pytest.mark.parametrize("args", [(), ("--limit", "3"), ("--all",), ("nothing-*",), ("--status", "FAILED")])
def test_the_plain_table_of_a_pipe_is_what_rich_writes_there(
        repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]) -> None:
    """Into a pipe, `status` writes its table without rich (cli/plain.py): byte for byte rich's output there."""
    from taskrunner.cli import plain

    seed(repo, 25, pending=2)
    task = Records(repo).load_task("done-3")
    assert task is not None
    Records(repo).save_task({**task, "title": "Ünïcode 全角 \x1b[31m [bold]x[/bold]", "error": None})
    code, written, _ = status(repo, capsys, *args)
    monkeypatch.setattr(plain, "is_plain", lambda stream: False)
    _, rendered, _ = status(repo, capsys, *args)
    assert code == 0 and written == rendered and written.strip()


def test_status_into_a_pipe_loads_no_rich_console(repo: Path) -> None:
    import subprocess
    import sys

    seed(repo, 3)
    probe = ("import sys\nfrom taskrunner.cli.main import main\n"
             f"assert main(['-C', {str(repo)!r}, 'status']) == 0\n"
             "print(sorted(m for m in sys.modules if m.startswith('rich.') and m != 'rich.cells'"
             " and not m.startswith('rich._')))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert "done-3" in proc.stdout and proc.stdout.splitlines()[-1] == "[]", proc.stdout


def test_json_from_a_daemon_is_the_same_whether_it_sends_rows_or_records(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A daemon of this version sends `--json`'s rows encoded; one that ignores `encoded` sends records."""
    memory = [TaskState(f"mem-{n}", f"tasks/mem-{n}.md", n, TaskStatus.COMPLETED, updated_at=float(n),
                        error="é \u2028 \"q\"" if n == 2 else None) for n in range(1, 6)]
    outputs = []
    for encode in (True, False):
        server = ControlServer(state_dir(repo), lambda payload: status_query.answer(
            memory, {}, payload if encode else {k: v for k, v in payload.items() if k != "encoded"}))
        server.start()
        try:
            outputs.append(status(repo, capsys, "--json")[1])
        finally:
            server.stop()
    assert outputs[0] == outputs[1] and json.loads(outputs[0])["tasks"] == [t.record() for t in memory]
