"""The wrappers that run an Agent and leave its exit status behind, run by real bash; a Run directory's files."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from taskrunner.worker.rundir import RunDir, group_alive, wrapped


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


# ---------------------------------------------------------------- a confined Run: bwrap's status, the leader


def test_a_confined_runs_exit_code_comes_from_bwraps_status_lines(tmp_path: Path) -> None:
    status = tmp_path / "exit_status"
    status.write_text('{ "child-pid": 12, "mnt-namespace": 4026532177, "pid-namespace": 4026532178 }\n')
    assert RunDir(tmp_path).exit_code() is None  # still running, or bwrap was killed before it could say
    status.write_text(status.read_text() + "not json\n" + '{ "exit-code": 137 }\n')
    assert RunDir(tmp_path).exit_code() == 137


def test_the_files_the_worker_writes_for_a_run_are_its_own(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_assignment({"run_id": "r"})
    run.write_pid(123)
    run.write_agent_uid(0x7E000005)
    assert run.create_stop("CANCELLED", "asked")
    assert run.create_result({"status": "CANCELLED"})
    for name in ("assignment.json", "pid", "agent_uid", "stop.json", "result.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    assert (run.pid(), run.agent_uid()) == (123, 0x7E000005)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent_uid", "assignment.json", "pid", "result.json",
                                                          "stop.json"]  # no temp file left behind


def test_the_first_session_to_stop_or_judge_a_run_has_the_last_word(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.create_stop("CANCELLED", "asked") and not run.create_stop("FAILED", "timed out")
    assert run.stop() == {"status": "CANCELLED", "reason": "asked"}
    assert run.create_result({"status": "CANCELLED", "by": "first"})
    assert not run.create_result({"status": "FAILED", "by": "second"})
    assert run.result() == {"status": "CANCELLED", "by": "first"}


def test_a_run_is_being_started_while_its_starter_holds_the_lock_and_not_after(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert not run.being_started()  # no lock file: an older Worker's Run, or one whose start is recorded
    held = run.begin_start()
    assert run.being_started()
    run.end_start(held)
    assert not run.being_started() and not (tmp_path / "starting").exists()
    # A starter that died: its lock file is left, the kernel dropped its lock.
    os.close(run.begin_start())
    assert (tmp_path / "starting").exists() and not run.being_started()


def test_the_groups_a_starter_left_unrecorded_are_found_by_the_run_directory_in_their_argv(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "runs" / "r1")
    run.workspace.mkdir(parents=True)
    other = RunDir(tmp_path / "runs" / "r2")
    agent = subprocess.Popen(wrapped(run.path, ["sleep", "30"]), start_new_session=True)
    bystander = subprocess.Popen(wrapped(other.path, ["sleep", "30"]), start_new_session=True)
    try:
        assert run.stray_groups() == [agent.pid]
    finally:
        for proc in (agent, bystander):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_run_has_ended_once_its_group_leader_has_whatever_it_left_behind(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    leader = subprocess.Popen(["bash", "-c", f'sleep 300 & while [ ! -e "{gate}" ]; do sleep 0.02; done'],
                              start_new_session=True)
    try:
        assert group_alive(leader.pid)
        gate.touch()
        leader.wait(timeout=10)
        # The background sleep is still in the group: the Worker kills it, the Run does not wait for it.
        assert not group_alive(leader.pid)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
