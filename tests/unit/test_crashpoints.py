"""Crash points (taskrunner/crashpoints.py): named in the code exactly as POINTS lists them, inert without the
environment, and a SIGKILL at the n-th hit with the mark written once when a test asks."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import taskrunner
from taskrunner.crashpoints import POINTS

PACKAGE = Path(taskrunner.__file__).parent


_POINT_SHAPE = re.compile(r"(daemon|worker)\.[a-z_]+")


def _points_in_code() -> dict[str, list[str]]:
    """Every point the code under taskrunner/ passes to `reached(...)`: point -> files.

    A literal argument names its point. A computed one (`reached(_SENT_POINTS[kind])`) names every
    point-shaped string literal of its module, so a table of points is checked too.
    """
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "crashpoints.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        named: set[str] = set()
        computed = False
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name != "reached" or not node.args:
                continue
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                named.add(node.args[0].value)
            else:
                computed = True
        if computed:
            named |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                      and isinstance(node.value, str) and _POINT_SHAPE.fullmatch(node.value)}
        for point in named:
            found.setdefault(point, []).append(str(path.relative_to(PACKAGE)))
    return found


def test_every_point_is_reached_somewhere_in_the_code() -> None:
    assert sorted(set(POINTS) - set(_points_in_code())) == []


def test_the_code_names_no_point_that_points_does_not_list() -> None:
    assert sorted(set(_points_in_code()) - set(POINTS)) == []


def test_there_are_at_least_forty_points_on_both_sides() -> None:
    assert len(POINTS) >= 40
    assert {name.split(".", 1)[0] for name in POINTS} == {"daemon", "worker"}


def test_worker_points_are_in_the_worker_and_daemon_points_are_not() -> None:
    for point, files in _points_in_code().items():
        in_worker = all(f.startswith("worker/") for f in files)
        assert in_worker == point.startswith("worker."), (point, files)


def test_reached_does_nothing_without_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUN_CRASH_")}
    code = ("from taskrunner.crashpoints import POINTS, reached\n"
            "for point in POINTS:\n    reached(point)\nprint('survived')\n")

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)

    assert result.returncode == 0 and result.stdout == "survived\n"
    assert list(tmp_path.iterdir()) == []


_CHILD = """
import sys
from taskrunner.crashpoints import reached
for i in range(1, 6):
    print(i, flush=True)
    reached("daemon.commit_built")
print("survived", flush=True)
"""


def _child(at: str, mark: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUN_CRASH_")}
    env["TASKRUN_CRASH_AT"] = at
    if mark is not None:
        env["TASKRUN_CRASH_MARK"] = str(mark)
    return subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=60)


def test_a_process_is_killed_at_the_nth_hit_and_the_mark_names_the_point(tmp_path: Path) -> None:
    mark = tmp_path / "mark"

    result = _child("daemon.commit_built#3", mark)

    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1", "2", "3"]
    point, pid = mark.read_text().split()
    assert point == "daemon.commit_built" and pid.isdigit()


def test_without_a_count_the_first_hit_kills(tmp_path: Path) -> None:
    result = _child("daemon.commit_built", tmp_path / "mark")
    assert result.returncode == -signal.SIGKILL and result.stdout.split() == ["1"]


def test_the_mark_makes_the_crash_happen_once_across_restarts(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    assert _child("daemon.commit_built", mark).returncode == -signal.SIGKILL
    first = mark.read_text()

    again = _child("daemon.commit_built", mark)

    assert again.returncode == 0 and again.stdout.split()[-1] == "survived"
    assert mark.read_text() == first


def test_without_a_mark_or_at_another_point_nothing_happens(tmp_path: Path) -> None:
    assert _child("daemon.commit_built", None).returncode == 0
    other = _child("daemon.head_moved", tmp_path / "mark")
    assert other.returncode == 0 and not (tmp_path / "mark").exists()
