"""`taskrun wait` and `taskrun logs -f` against a real daemon: exit codes, and following a Task across a retry."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from tests.agentprobes import Counter, Gate
from tests.conftest import Daemon, taskrun, wait_status, wait_until, write_task


def test_wait_exits_zero_for_a_completed_task_and_one_for_a_failed_one(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "good", "echo fine")
    write_task(daemon.root, "bad", "echo broken; exit 3")

    completed = taskrun(daemon.root, "wait", "good", "--timeout", "60")
    failed = taskrun(daemon.root, "wait", "bad", "--timeout", "60")
    both = taskrun(daemon.root, "wait", "good", "bad", "--timeout", "60", "--json")

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("good COMPLETED")
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.startswith("bad FAILED")
    assert both.returncode == 1
    answer = json.loads(both.stdout)
    assert [(t["task_id"], t["status"]) for t in answer["tasks"]] == [("good", "COMPLETED"), ("bad", "FAILED")]
    assert answer["exit_code"] == 1 and answer["tasks"][1]["run"]["exit_code"] == 3


def follow(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(root), "logs", "flaky", "-f", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_lines(proc: subprocess.Popen[str], count: int, timeout: float = 60) -> list[str]:
    """The next `count` lines `proc` writes, read without blocking the test past `timeout`."""
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout.readline() for _ in range(count)),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        raise AssertionError(f"timed out after {timeout}s waiting for {count} lines; got {lines}")
    return lines


def test_logs_follow_goes_on_with_the_retry_and_ends_when_the_task_is_finished(daemon: Daemon, counter: Counter,
                                                                                gate: Gate) -> None:
    config = daemon.root / ".taskrun.yaml"
    config.write_text(config.read_text().replace("base: 5s", "base: 100ms"))
    daemon.start()
    # Both followers start before the Task exists: they wait for its record, then follow it.
    text, lines = follow(daemon.root), follow(daemon.root, "--json")
    # Confined Runs share no file: the counter tells the Agent which time it runs. The first Run
    # waits at the gate until both followers have shown its first line.
    write_task(daemon.root, "flaky", f'{counter.read}\necho "attempt $n"\n'
               f'if [ "$n" -gt 1 ]; then echo second; else until {gate.check}; do sleep 0.05; done; '
               'echo first; exit 1; fi', front="retries: 1\n")
    assert read_lines(text, 1) == ["attempt 1\n"]
    run, output = (json.loads(line) for line in read_lines(lines, 2))
    assert (run["event"], run["run"], output["event"], output["text"]) == ("run", 1, "output", "attempt 1\n")
    gate.open()
    wait_status(daemon.root, "flaky", "COMPLETED", timeout=60)

    rest, err = text.communicate(timeout=30)
    json_rest, json_err = lines.communicate(timeout=30)
    out = "attempt 1\n" + rest
    events = [run, output] + [json.loads(line) for line in json_rest.splitlines()]

    assert text.returncode == 0, err
    assert out == "attempt 1\nfirst\n== run 2 on local ==\nattempt 2\nsecond\n"
    assert lines.returncode == 0, json_err
    assert [(e["event"], e["run"]) for e in events if e["event"] != "output"] == \
        [("run", 1), ("end", 1), ("run", 2), ("end", 2)]
    assert [e["status"] for e in events if e["event"] == "end"] == ["FAILED", "COMPLETED"]
    assert all(e["worker"] == "local" and e["task_id"] == "flaky" for e in events if e["event"] == "run")
    for number, shown in ((1, "attempt 1\nfirst\n"), (2, "attempt 2\nsecond\n")):
        assert "".join(e["text"] for e in events if e["event"] == "output" and e["run"] == number) == shown


def test_logs_follow_of_a_finished_task_shows_its_last_run_and_ends(daemon: Daemon) -> None:
    daemon.start()
    write_task(daemon.root, "done", "echo over")
    wait_status(daemon.root, "done", "COMPLETED")
    wait_until(lambda: taskrun(daemon.root, "wait", "done").returncode == 0, 30, "the Run's final record")

    result = taskrun(daemon.root, "logs", "done", "-f", timeout=30)

    assert result.returncode == 0 and result.stdout == "over\n"
