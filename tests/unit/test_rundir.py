"""The wrappers that run an Agent and leave its exit status behind, run by real bash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from taskrunner.worker.rundir import RunDir, wrapped


def run_shell_preset(tmp_path: Path, script: str) -> tuple[int, str, int | None]:
    path = tmp_path / "script.sh"
    path.write_text(script)
    argv = wrapped(tmp_path, ["bash", "-euo", "pipefail", str(path)])
    assert "bash" not in argv[4:]  # one bash: the script is not handed to a second one
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return done.returncode, done.stdout + done.stderr, RunDir(tmp_path).exit_code()


@pytest.mark.parametrize(("script", "code"), [
    ("echo ok\n", 0),
    ("exit 5\n", 5),
    ("false\necho not reached\n", 1),  # -e
    ("echo $UNSET_VARIABLE_X\n", 1),  # -u
    ("false | true\necho not reached\n", 1),  # pipefail
])
def test_the_shell_preset_keeps_bash_euo_pipefail_semantics(tmp_path: Path, script: str, code: int) -> None:
    returncode, output, recorded = run_shell_preset(tmp_path, script)
    assert (returncode, recorded) == (code, code)
    assert "not reached" not in output


def test_the_scripts_own_exit_trap_runs_and_the_status_is_still_recorded(tmp_path: Path) -> None:
    returncode, output, recorded = run_shell_preset(tmp_path, "trap 'echo cleanup' EXIT\nexit 3\n")
    assert (returncode, recorded) == (3, 3)
    assert output == "cleanup\n"


def test_the_script_sees_no_positional_parameters(tmp_path: Path) -> None:
    _, output, _ = run_shell_preset(tmp_path, 'echo "args=$#"\n')
    assert output == "args=0\n"


def test_other_agents_run_their_argv_as_given(tmp_path: Path) -> None:
    argv = wrapped(tmp_path, ["sh", "-c", "exit 7", "x"])
    assert subprocess.run(argv, timeout=10).returncode == 7
    assert RunDir(tmp_path).exit_code() == 7
