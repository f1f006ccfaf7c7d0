"""`taskrun top` in a real terminal: tmux runs it, the screen is read back, `q` ends it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import Daemon, need_program, wait_status, wait_until, write_task


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[list[str]]:
    """The tmux command line of a server of this test's own (its own socket, no user configuration)."""
    command = [need_program("tmux", "tmux"), "-S", str(tmp_path / "tmux.sock"), "-f", os.devnull]
    yield command
    subprocess.run([*command, "kill-server"], capture_output=True, check=False)


def terminal_env() -> dict[str, str]:
    """This environment without COLUMNS and LINES (set to 80x24 under pytest): the app would take them
    over the size of the terminal tmux gives it (shutil.get_terminal_size)."""
    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


def screen(tmux: list[str]) -> str:
    result = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""


@pytest.mark.slow
def test_top_draws_the_tasks_in_a_terminal_and_q_quits(daemon: Daemon, tmux: list[str]) -> None:
    daemon.start()
    write_task(daemon.root, "first-task", "echo one")
    write_task(daemon.root, "second-task", "echo two; sleep 300")
    wait_status(daemon.root, "first-task", "COMPLETED")
    wait_status(daemon.root, "second-task", "RUNNING")
    exited = daemon.root.parent / "top.exit"
    top = f"{shlex.quote(sys.executable)} -m taskrunner top; echo $? > {shlex.quote(str(exited))}"

    subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "160", "-y", "48", "-c", str(daemon.root), top],
                   check=True, env=terminal_env())

    # The footer, listing the keys, may be drawn a moment after the tables.
    drawn = wait_until(lambda: (text := screen(tmux)) and all(s in text for s in ("first-task", "second-task",
                                                                                   "q quit")) and text,
                       30, "both Task ids and the footer on the screen")
    assert "RUNNING" in drawn and "COMPLETED" in drawn
    subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
    wait_until(exited.exists, 20, "taskrun top to exit after q")
    assert wait_until(lambda: exited.read_text().strip(), 5, "its exit code") == "0"
