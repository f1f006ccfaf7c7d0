"""CLI start-up: `taskrun --version`, `status`, `logs` and `trigger` load neither paramiko (SSH) nor GitPython.

Each costs about half a second of CPU to import; only the commands that
connect to a Worker or run the daemon need them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("paramiko", "git")

#: Runs `taskrun <argv>` in this interpreter, then prints the heavy modules it loaded as the last line.
PROBE = """
import json, sys
from taskrunner.cli.main import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit:
    pass
sys.stdout.flush()
print("\\nMODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy})))
""".replace("{heavy}", repr(set(HEAVY)))


def loaded(argv: list[str]) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running `taskrun <argv>`."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("MODULES ")]
    assert line, proc.stdout + proc.stderr
    return list(json.loads(line[-1].removeprefix("MODULES ")))


def test_the_probe_sees_a_heavy_import() -> None:
    # The probe itself works: a command that does load GitPython is seen doing so.
    proc = subprocess.run([sys.executable, "-c", "import sys, taskrunner.gitops as g; g.git.Git; "
                           "print('git' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


def test_version_loads_neither_paramiko_nor_gitpython() -> None:
    assert loaded(["--version"]) == []


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["logs", "nosuch"], ["trigger", "--quiet"]])
def test_reading_commands_load_neither(repo: Path, argv: list[str]) -> None:
    assert loaded(["-C", str(repo), *argv]) == []
