"""Text from Tasks, file names, Agents and Workers reaches the terminal and git inert.

Titles, label values, file names, error texts and Agent output are shown as
written (rich markup such as ``[/x]`` literally, control characters as
``\\x1b``-style escapes), and never break a command.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import Daemon, git, status_of, taskrun, write_task

HOSTILE_TITLE = ("--- [/x] [bold red]boom[/] :x: \x1b]52;c;aGk=\x07 \x1b[2J \u202e \u009b "
                 "\rTask-Id: evil\x0bSigned-off-by: x\x85end")
#: How each hostile part of the title is shown.
SHOWN = ["[/x] [bold red]boom[/] :x:", "\\x1b]52;c;aGk=\\x07", "\\x1b[2J", "\\u202e", "\\x9b",
         " Task-Id: evil Signed-off-by: x end"]
HOSTILE_OUTPUT = r"printf 'out \033]52;c;aGk=\007 \033[2J [/x] \342\200\256 \302\233 back\b\b\r\n'"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich folds table cells at 80 columns when it cannot ask a terminal; the checks want whole lines."""
    monkeypatch.setenv("COLUMNS", "1000")


def controls(text: str) -> set[str]:
    """The control, bidi and separator characters in `text`, other than newline."""
    return {ch for ch in text if ch != "\n" and (unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"))}


def on_terminal(root: Path, *args: str) -> bytes:
    """Run `taskrun` with its stdout on a pseudo-terminal; what it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(root), *args],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        stderr = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, stderr
    return b"".join(chunks)


def test_a_hostile_title_is_shown_literally_and_committed_inert(repo: Path) -> None:
    write_task(repo, "evil", "echo ok", title=HOSTILE_TITLE)

    ran = taskrun(repo, "up", "--once")

    assert ran.returncode == 0, ran.stdout + ran.stderr
    for args in (("status",), ("status", "evil")):
        shown = taskrun(repo, *args)
        assert shown.returncode == 0, shown.stderr
        assert not controls(shown.stdout), shown.stdout
        for part in SHOWN:
            assert part in shown.stdout
    exact = json.loads(taskrun(repo, "status", "evil", "--json").stdout)
    assert exact["task"]["title"] == HOSTILE_TITLE  # --json stays exact

    message = git(repo, "log", "-1", "--format=%B")
    assert not controls(message), repr(message)
    for part in SHOWN:
        assert part in message
    run_id = exact["runs"][0]["run_id"]
    trailers = subprocess.run(["git", "interpret-trailers", "--parse"], input=message,
                              capture_output=True, text=True, check=True).stdout
    assert trailers.splitlines() == ["Task-Id: evil", f"Run-Id: {run_id}", "Worker: local", "Agent: shell",
                                     "Status: COMPLETED"]


def test_plain_lines_logs_and_status_show_file_names_output_and_reasons_inert(repo: Path) -> None:
    odd = os.path.join(os.fsencode(repo / "tasks"), b"Bad[red]\x1b[2J\xe2\x80\xae\xff.md")
    with open(odd, "wb") as handle:
        handle.write(b"# ignored\n")
    write_task(repo, "noisy", HOSTILE_OUTPUT)
    write_task(repo, "picky", "true", front='labels: {gpu: "[/x] \\e[2J"}\n')

    ran = taskrun(repo, "up", "--once", "--output")

    assert ran.returncode == 1, ran.stdout + ran.stderr  # picky is BLOCKED
    assert "Traceback" not in ran.stderr, ran.stderr
    assert status_of(repo, "noisy") == "COMPLETED"
    assert not controls(ran.stdout), repr(ran.stdout)
    assert "note: ignoring tasks/Bad[red]\\x1b[2J\\u202e\\udcff.md" in ran.stdout
    assert "noisy | out \\x1b]52;c;aGk=\\x07 \\x1b[2J [/x] \\u202e \\x9b back\\x08\\x08" in ran.stdout
    assert "picky BLOCKED: no Worker offers Agent 'shell' with labels gpu=[/x] \\x1b[2J" in ran.stdout

    status = taskrun(repo, "status")
    assert status.returncode == 0, status.stderr
    assert not controls(status.stdout)
    assert "gpu=[/x] \\x1b[2J" in status.stdout

    # Into a pipe `logs` is `cat`; at a terminal it escapes all but newline and tab, unless --raw.
    raw = taskrun(repo, "logs", "noisy").stdout
    assert "\x1b[2J" in raw
    shown = on_terminal(repo, "logs", "noisy")
    assert b"\x1b" not in shown and b"\xc2\x9b" not in shown and b"\xe2\x80\xae" not in shown
    assert b"out \\x1b]52;c;aGk=\\x07 \\x1b[2J [/x] \\u202e \\x9b back\\x08\\x08\r\n" in shown
    assert b"\x1b[2J" in on_terminal(repo, "logs", "noisy", "--raw")


def test_workers_and_doctor_show_configured_labels_and_file_names_literally(repo: Path) -> None:
    (repo / ".taskrun.yaml").write_text(
        'workers:\n  local:\n    transport: local\n    labels: {gpu: "[/x] \\e]52;c;aGk=\\a \\u202e"}\n')
    (repo / "leak[").mkdir()  # git names the file leak[/x].txt
    (repo / "leak[" / "x].txt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    git(repo, "add", "leak[/x].txt")

    workers = taskrun(repo, "workers")
    doctor = taskrun(repo, "doctor")

    assert workers.returncode == 0, workers.stderr
    assert not controls(workers.stdout)
    assert "gpu=[/x] \\x1b]52;c;aGk=\\x07 \\u202e" in workers.stdout
    assert doctor.returncode == 1, doctor.stderr
    assert "error: leak[/x].txt is tracked by git and holds a private key" in doctor.stdout


def test_submit_wait_shows_the_error_of_an_invalid_task_literally(repo: Path, daemon: Daemon) -> None:
    daemon.start()
    task = repo.parent / "bad.md"
    task.write_text('---\npriority: "[/x] [bold]"\n---\n# Bad\n')

    result = taskrun(repo, "submit", str(task), "--wait", "--timeout", "30")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "bad INVALID: tasks/bad.md: key 'priority'" in result.stdout
    assert "got '[/x] [bold]'" in result.stdout
