"""CI: `taskrun submit FILE... --wait [--timeout S] [--json] [--junit FILE]` and `taskrun wait`, on the real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import Daemon, git, taskrun, write_task

#: Every byte value, then ESC sequences and U+FFFE (UTF-8 ef bf be), which XML 1.0 forbids.
HOSTILE_SCRIPT = r"""for i in $(seq 0 255); do printf "\\$(printf %03o "$i")"; done
printf '\033]52;c;aGk=\007 \033[2J \357\277\276 \355\240\200 ]]></system-out><x>&amp;\n'
echo last line
exit 5"""


def _task_file(where: Path, name: str, script: str, title: str | None = None) -> Path:
    path = where / name
    path.write_text(f"# {title or name}\n\n```sh\n{script}\n```\n")
    return path


def _junit(path: Path) -> dict[str, ET.Element]:
    """The report's test cases by name, after checking it is one well-formed suite named taskrun."""
    root = ET.parse(path).getroot()
    suites = root.findall("testsuite")
    assert len(suites) == 1 and suites[0].get("name") == "taskrun"
    return {case.get("name") or "": case for case in suites[0].findall("testcase")}


def test_submit_wait_reports_a_completing_and_a_failing_task_as_json_and_junit(daemon: Daemon,
                                                                               tmp_path: Path) -> None:
    daemon.start()
    good = _task_file(tmp_path, "ci-good.md", "echo first line\necho it worked", title="Good work")
    bad = _task_file(tmp_path, "ci-bad.md", "echo trying\nexit 4")
    report = tmp_path / "reports" / "junit.xml"
    report.parent.mkdir()

    result = taskrun(daemon.root, "submit", str(good), str(bad), "--wait", "--json", "--junit", str(report))

    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["timed_out"] is False and data["daemon_stopped"] is False and data["exit_code"] == 1
    tasks = {t["task_id"]: t for t in data["tasks"]}
    assert list(tasks) == ["ci-good", "ci-bad"]
    ok, failed = tasks["ci-good"], tasks["ci-bad"]
    assert set(ok) == {"task_id", "status", "error", "revision", "title", "file", "runs", "run", "timed_out"}
    assert (ok["status"], ok["error"], ok["title"], ok["file"]) == ("COMPLETED", None, "Good work", "tasks/ci-good.md")
    assert len(ok["revision"]) == 64 and ok["timed_out"] is False
    run = ok["run"]
    assert {"number", "run_id", "status", "exit_code", "error", "worker", "agent", "started_at", "finished_at",
            "duration", "result_branch", "result_commit", "result_note", "summary", "output"} == set(run)
    assert (run["number"], run["status"], run["exit_code"], run["worker"], run["agent"]) == (1, "COMPLETED", 0,
                                                                                            "local", "shell")
    assert run["duration"] >= 0 and run["output"] == "runs/ci-good/run-1/output.log"
    assert (daemon.root / run["output"]).read_text() == "first line\nit worked\n"
    assert failed["status"] == "FAILED" and "code 4" in failed["error"] and failed["run"]["exit_code"] == 4

    cases = _junit(report)
    assert set(cases) == {"ci-good", "ci-bad"}
    assert cases["ci-good"].get("classname") == "Good work" and cases["ci-good"].find("failure") is None
    assert float(cases["ci-good"].get("time") or -1) == pytest.approx(run["duration"], abs=0.001)
    assert (cases["ci-good"].findtext("system-out") or "").endswith("first line\nit worked")
    failure = cases["ci-bad"].find("failure")
    assert failure is not None and failure.get("type") == "FAILED" and failure.get("message") == failed["error"]
    assert (cases["ci-bad"].findtext("system-out") or "").endswith("trying")
    assert ET.parse(report).getroot().find("testsuite").get("failures") == "1"  # type: ignore[union-attr]
    assert not [p for p in report.parent.iterdir() if p != report]  # written by rename: no temp file left


def test_submit_wait_exits_zero_and_prints_a_line_per_task_when_all_complete(daemon: Daemon,
                                                                             tmp_path: Path) -> None:
    daemon.start()
    files = [_task_file(tmp_path, f"ci-{n}.md", f"echo {n}") for n in range(3)]

    result = taskrun(daemon.root, "submit", *map(str, files), "--wait")

    assert result.returncode == 0, result.stdout + result.stderr
    for n in range(3):
        assert f"ci-{n} COMPLETED (run 1 on local" in result.stdout


def test_submitting_the_same_bytes_again_says_they_are_not_run_again(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    task = _task_file(tmp_path, "ci-same.md", "echo once")
    assert taskrun(daemon.root, "submit", str(task), "--wait").returncode == 0

    again = taskrun(daemon.root, "submit", str(task), "--wait")

    assert again.returncode == 0, again.stdout + again.stderr
    assert "unchanged since its last Run (COMPLETED): not run again; `taskrun retry ci-same`" in again.stdout


def test_a_timeout_exits_three_and_still_writes_the_report(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    quick = _task_file(tmp_path, "ci-quick.md", "echo quick")
    slow = _task_file(tmp_path, "ci-slow.md", "echo started\nsleep 300")
    report = tmp_path / "junit.xml"
    report.write_text("an old report")

    result = taskrun(daemon.root, "submit", str(quick), str(slow), "--wait", "--timeout", "3", "--json",
                     "--junit", str(report))

    assert result.returncode == 3, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["timed_out"] is True and data["exit_code"] == 3
    tasks = {t["task_id"]: t for t in data["tasks"]}
    assert tasks["ci-quick"]["status"] == "COMPLETED" and tasks["ci-quick"]["timed_out"] is False
    assert tasks["ci-slow"]["timed_out"] is True and tasks["ci-slow"]["status"] in ("PENDING", "RUNNING")
    assert "timed out after 3s" in result.stderr
    cases = _junit(report)
    assert cases["ci-quick"].find("failure") is None
    failure = cases["ci-slow"].find("failure")
    assert failure is not None and failure.get("type") == "UNFINISHED"


def test_hostile_output_bytes_still_make_a_valid_junit_report(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    hostile = _task_file(tmp_path, "ci-hostile.md", HOSTILE_SCRIPT, title="Evil \x1b[31m title")
    report = tmp_path / "junit.xml"

    result = taskrun(daemon.root, "submit", str(hostile), "--wait", "--junit", str(report))

    assert result.returncode == 1, result.stdout + result.stderr
    output = (daemon.root / "runs/ci-hostile/run-1/output.log").read_bytes()
    assert bytes(range(256)) in output  # the Agent did write every byte
    case = _junit(report)["ci-hostile"]  # parses: nothing XML forbids is in it
    out = case.findtext("system-out") or ""
    assert out.endswith("last line")
    assert "\\x00" in out and "\\x1b]52" in out and "\\x1b[2J" in out and "\\ufffe" in out
    assert "]]></system-out><x>&amp;" in out
    assert not any(ch in out for ch in "\x00\x07\x1b\x9b\ufffe")
    assert "\x1b" not in (case.get("classname") or "") and "\x1b" not in result.stdout


def test_submitted_files_are_committed_and_the_users_staged_change_stays_staged(daemon: Daemon,
                                                                                tmp_path: Path) -> None:
    root = daemon.root
    daemon.start()
    (root / "README.md").write_text("the user's staged edit\n")
    git(root, "add", "README.md")
    (root / "notes.txt").write_text("the user's untracked file\n")
    files = [_task_file(tmp_path, "ci-one.md", "echo one"), _task_file(tmp_path, "ci-two.md", "echo two")]

    result = taskrun(root, "submit", *map(str, files), "--wait", "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    commit = json.loads(result.stdout)["commit"]
    assert commit and git(root, "cat-file", "-t", commit).strip() == "commit"
    assert git(root, "merge-base", "--is-ancestor", commit, "HEAD") == ""
    changed = git(root, "show", "--name-only", "--format=", commit).split()
    assert changed == ["tasks/ci-one.md", "tasks/ci-two.md"]
    message = git(root, "show", "-s", "--format=%B", commit)
    assert message.startswith("taskrun: submit ci-one, ci-two") and "Task-Id: ci-one\nTask-Id: ci-two" in message
    assert git(root, "show", f"{commit}:tasks/ci-one.md") == files[0].read_text()
    assert git(root, "diff", "--cached", "--name-only").split() == ["README.md"]
    assert git(root, "show", ":README.md") == "the user's staged edit\n"
    status = git(root, "status", "--porcelain", "--", "tasks")
    assert status == ""  # the Task files are tracked and clean


def test_without_git_commit_the_files_are_only_written(repo: Path, tmp_path: Path) -> None:
    config = repo / ".taskrun.yaml"
    config.write_text(config.read_text().replace("  commit: true", "  commit: false"))
    head = git(repo, "rev-parse", "HEAD")

    result = taskrun(repo, "submit", str(_task_file(tmp_path, "plain.md", "true")), "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["commit"] is None
    assert git(repo, "rev-parse", "HEAD") == head and (repo / "tasks/plain.md").exists()


def test_without_a_daemon_submit_then_up_once_then_wait_reports(repo: Path, tmp_path: Path) -> None:
    files = [_task_file(tmp_path, "ci-a.md", "echo a"), _task_file(tmp_path, "ci-b.md", "exit 2")]
    report = tmp_path / "junit.xml"

    submitted = taskrun(repo, "submit", *map(str, files))
    once = taskrun(repo, "up", "--once")
    waited = taskrun(repo, "wait", "ci-a", "ci-b", "--json", "--junit", str(report))

    assert submitted.returncode == 0 and once.returncode == 1, submitted.stderr + once.stdout + once.stderr
    assert waited.returncode == 1, waited.stdout + waited.stderr
    statuses = {t["task_id"]: t["status"] for t in json.loads(waited.stdout)["tasks"]}
    assert statuses == {"ci-a": "COMPLETED", "ci-b": "FAILED"}
    cases = _junit(report)
    assert cases["ci-a"].find("failure") is None and cases["ci-b"].find("failure") is not None


def test_wait_without_a_daemon_and_unfinished_tasks_says_so_and_exits_two(repo: Path) -> None:
    write_task(repo, "never-run", "true")

    result = taskrun(repo, "wait", "never-run", "--timeout", "30")

    assert result.returncode == 2
    assert "no taskrun daemon is running" in result.stderr and "taskrun up" in result.stderr


def test_wait_for_an_unknown_task_is_a_usage_error(repo: Path) -> None:
    result = taskrun(repo, "wait", "no-such-task")

    assert result.returncode == 2 and "no Task 'no-such-task'" in result.stderr


def test_submit_wait_without_a_daemon_writes_nothing_and_names_the_way_without_one(repo: Path,
                                                                                  tmp_path: Path) -> None:
    result = taskrun(repo, "submit", str(_task_file(tmp_path, "x.md", "true")), "--wait")

    assert result.returncode == 2
    assert "no taskrun daemon is running" in result.stderr and "taskrun up --once" in result.stderr
    assert not (repo / "tasks/x.md").exists()


def test_a_refused_file_leaves_every_file_unwritten(repo: Path, tmp_path: Path) -> None:
    good = _task_file(tmp_path, "fine.md", "true")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fine.md").write_text("# the same Task id again\n")

    twice = taskrun(repo, "submit", str(good), str(tmp_path / "sub" / "fine.md"))
    link = tmp_path / "link.md"
    link.symlink_to(good)
    linked = taskrun(repo, "submit", str(good), str(link))

    assert twice.returncode == 2 and "already given" in twice.stderr
    assert linked.returncode == 2 and "link.md" in linked.stderr
    assert not (repo / "tasks/fine.md").exists() and not (repo / "tasks/link.md").exists()


@pytest.mark.parametrize("options", [["--junit", "r.xml"], ["--timeout", "5"]])
def test_report_and_timeout_options_need_wait(repo: Path, tmp_path: Path, options: list[str]) -> None:
    result = taskrun(repo, "submit", str(_task_file(tmp_path, "t.md", "true")), *options)

    assert result.returncode == 2 and "--wait" in result.stderr and not (repo / "tasks/t.md").exists()


def test_a_report_that_cannot_be_written_is_refused_before_anything_is_submitted(repo: Path,
                                                                                tmp_path: Path) -> None:
    result = taskrun(repo, "submit", str(_task_file(tmp_path, "t.md", "true")), "--wait",
                     "--junit", str(tmp_path / "missing-dir" / "r.xml"))

    assert result.returncode == 2 and "does not exist" in result.stderr and not (repo / "tasks/t.md").exists()


@pytest.mark.slow
def test_a_daemon_that_stops_during_the_wait_ends_it_with_exit_two_and_a_report(daemon: Daemon,
                                                                               tmp_path: Path) -> None:
    daemon.start()
    report = tmp_path / "junit.xml"
    write_task(daemon.root, "long", "sleep 300")
    proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(daemon.root), "wait", "long", "--json",
                             "--junit", str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert "waiting for 1 of 1 Task" in proc.stderr.readline()  # it found the daemon there

    daemon.stop()
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 2, out + err
    assert json.loads(out)["daemon_stopped"] is True and "daemon stopped" in err
    assert _junit(report)["long"].find("failure").get("type") == "UNFINISHED"  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_busy_index_after_the_commit_is_said_with_the_command_that_fixes_it(repo: Path, tmp_path: Path) -> None:
    (repo / "README.md").write_text("the user's staged edit\n")
    git(repo, "add", "README.md")
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # an editor's git holding the index for longer than submit waits

    result = taskrun(repo, "submit", str(_task_file(tmp_path, "locked.md", "true")))

    assert result.returncode == 0, result.stderr
    assert "index was busy" in result.stderr and "git reset -q -- tasks/locked.md" in result.stderr
    assert git(repo, "log", "-1", "--format=%s") == "taskrun: submit locked\n"
    lock.unlink()
    git(repo, "reset", "-q", "--", "tasks/locked.md")
    assert git(repo, "status", "--porcelain") == "M  README.md\n"
