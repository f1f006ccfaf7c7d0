"""CLI ergonomics: an example at the end of every --help, completion scripts, `taskrun history`, --json."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from taskrunner.cli.completion import script
from taskrunner.cli.examples import EXAMPLE_HEAD, EXAMPLES, walk
from taskrunner.cli.history import task_history
from taskrunner.cli.main import build_parser, main
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.records import Records
from taskrunner.state import RunState, TaskState
from tests.conftest import need_program

#: Commands that read state: each has --json.
READING = [("status",), ("workers",), ("agents",), ("logs",), ("history",), ("wait",), ("keys", "show"),
           ("doctor",)]


def parsers() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return list(walk(build_parser()))


def test_the_walk_reaches_every_command_and_subcommand() -> None:
    paths = {path for path, _ in parsers()}
    assert {(), ("logs",), ("history",), ("completion",), ("wait",), ("worker", "add"), ("keys", "rotate"),
            ("hooks", "install")} <= paths


@pytest.mark.parametrize("path", [path for path, _ in parsers()], ids=lambda p: " ".join(p) or "taskrun")
def test_every_help_ends_with_an_example(path: tuple[str, ...]) -> None:
    parser = dict(parsers())[path]
    text = parser.format_help().rstrip("\n")
    head = text.rfind(f"\n{EXAMPLE_HEAD}")
    assert head != -1, f"`taskrun {' '.join(path)} --help` has no example at its end:\n{text}"
    lines = text[head:].strip().splitlines()[1:]
    assert lines and all(line.startswith("  taskrun") for line in lines), text[head:]
    # Each example parses as the command it stands for.
    for line in lines:
        argv = line.split("#")[0].split("|")[0].split(">")[0].split()[1:]
        if argv and argv[0] == "-C":
            argv = argv[2:]
        if path and argv[:len(path)] == list(path):
            build_parser().parse_args(argv)


def test_an_example_is_printed_as_written_and_the_description_still_wraps(capsys: pytest.CaptureFixture[str]) \
        -> None:
    with pytest.raises(SystemExit):
        main(["logs", "--help"])
    out = capsys.readouterr().out
    assert "\n  taskrun logs fix-login -f      # across retries until it ends\n" in out


def test_the_cli_reference_shows_every_example() -> None:
    reference = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    missing = [line for lines in EXAMPLES.values() for line in lines if line not in reference]
    assert not missing, f"docs/cli.md lacks these examples: {missing}"


@pytest.mark.parametrize("path", READING, ids=" ".join)
def test_every_command_that_reads_state_has_json(path: tuple[str, ...]) -> None:
    parser = dict(parsers())[path]
    assert "--json" in parser._option_string_actions


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_completion_script_names_every_command_and_completes_task_ids(shell: str) -> None:
    text = script(build_parser(), shell)
    for path, parser in parsers():
        if path:
            assert path[-1] in text
        for option in parser._option_string_actions:
            assert option in text, f"{option} of {path} is not in the {shell} script"
    assert "_taskrun_task_ids" in text and "find tasks -type f -name '*.md'" in text


def bash_completion(tmp_path: Path) -> tuple[Path, Callable[..., list[str]]]:
    """A git repository with tasks/auth/login.md and tasks/hello.md, and a function that completes
    `taskrun <words>` in it with the bash script (a real bash, in the repository's tasks/)."""
    completion = tmp_path / "taskrun.bash"
    completion.write_text(script(build_parser(), "bash"))
    repo = tmp_path / "repo"
    (repo / "tasks" / "auth").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "tasks" / "auth" / "login.md").write_text("# login\n")
    (repo / "tasks" / "hello.md").write_text("# hello\n")

    def complete(*words: str) -> list[str]:
        line = " ".join(["taskrun", *words])
        probe = (f'source {completion}; COMP_WORDS=(taskrun {" ".join(words) or ""}); '
                 f'COMP_CWORD={len(words)}; COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; '
                 f'_shtab_taskrun taskrun "{words[-1]}" "{words[-2] if len(words) > 1 else "taskrun"}"; '
                 'printf "%s\\n" "${COMPREPLY[@]}"')
        result = subprocess.run(["bash", "-c", probe], cwd=repo / "tasks", capture_output=True, text=True,
                                check=True)
        return sorted(result.stdout.split())

    return repo, complete


def test_the_bash_script_completes_commands_and_the_task_ids_of_the_repository(tmp_path: Path) -> None:
    _, complete = bash_completion(tmp_path)
    assert {"history", "logs", "wait", "completion"} <= set(complete("h") + complete("l") + complete("w")
                                                             + complete("c"))
    assert complete("logs", "") == ["auth/login", "hello"]
    assert complete("history", "au") == ["auth/login"]


#: File names in tasks/ that a shell would run if it expanded them again, and what each would create.
HOSTILE_NAMES = {"$(touch PWNED).md": "PWNED", "`touch PWNED2`.md": "PWNED2", "a;touch PWNED3.md": "PWNED3",
                 "$(touch pwned4).md": "pwned4", "b`touch pwned5`.md": "pwned5", "c$(touch pwned6).md": "pwned6"}


def test_the_bash_script_never_runs_a_task_file_name(tmp_path: Path) -> None:
    repo, complete = bash_completion(tmp_path)
    for name in HOSTILE_NAMES:
        (repo / "tasks" / name).write_text("# hostile\n")
    (repo / "tasks" / "auth" / "$(touch pwned7).md").write_text("# hostile\n")

    offered = complete("logs", "") + complete("logs", "a") + complete("logs", "b") + complete("logs", "c")
    offered += complete("wait", "$") + complete("history", "auth/")

    created = {p.name for p in tmp_path.rglob("*")} & {*HOSTILE_NAMES.values(), "pwned7", "PWNED3.md"}
    assert not created, f"completing ran a command in a Task file name: {created}"
    assert sorted(set(offered)) == ["auth/login", "hello"]  # only Task ids, and the normal ones still
    assert complete("logs", "he") == ["hello"]


def test_the_shell_pattern_of_a_task_id_is_the_task_files_rule() -> None:
    from taskrunner.cli.completion import TASK_ID_ERE
    from taskrunner.taskfile import task_id_for
    samples = ["hello", "auth/login", "a-b_c.d/e1", "0", "Hello", ".hidden", "a/.b", "a//b", "a/", "-a", "a b",
               "$(id)", "`id`", "a;id", "a\nb", "é", "a/b/c"]
    for sample in samples:
        assert bool(re.fullmatch(TASK_ID_ERE.strip("^$"), sample)) == (task_id_for(f"tasks/{sample}.md")
                                                                        == sample), sample


@pytest.mark.parametrize("options", [[], ["-o", "globsubst", "-o", "shwordsplit"]], ids=["default", "globsubst"])
def test_the_zsh_script_offers_only_task_ids_whatever_the_users_options(tmp_path: Path, options: list[str]) -> None:
    zsh = need_program("zsh", "zsh")
    repo, _ = bash_completion(tmp_path)
    for name in [*HOSTILE_NAMES, "*(e:touch pwned8:).md", "d(e:touch pwned9:).md"]:
        (repo / "tasks" / name).write_text("# hostile\n")
    text = script(build_parser(), "zsh")
    function = text[text.index("_taskrun_task_ids() {"):]
    function = function[:function.index("\n}\n") + 3]
    # compadd works only inside a completion widget: this one prints what it is given, one a line.
    probe = 'compadd() { local name=${@[-1]}; print -rl -- ${(P)name}; }\n' + function + "_taskrun_task_ids\n"
    result = subprocess.run([zsh, "-f", *options, "-c", probe], cwd=repo / "tasks", capture_output=True, text=True,
                            check=True)
    assert sorted(result.stdout.split()) == ["auth/login", "hello"]
    created = {p.name for p in tmp_path.rglob("*")} & {*HOSTILE_NAMES.values(), "pwned8", "pwned9"}
    assert not created, f"completing ran a command in a Task file name: {created}"
    assert "emulate -L zsh" in function and "compgen" not in function and "eval" not in function


def test_completion_for_an_unknown_shell_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["completion", "fish"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def seed_history(root: Path) -> None:
    """A Task whose file changed once: revision "a" failed then completed on a retry; revision "b" is new."""
    records = Records(root)
    first = RunState(run_id="r1", task_id="t", number=1, revision="a" * 64, attempt=1, worker="w1", agent="claude",
                     status=RunStatus.FAILED, started_at=100.0, finished_at=112.5, exit_code=1, error="exit 1",
                     cost_usd=0.25)
    second = RunState(run_id="r2", task_id="t", number=2, revision="a" * 64, attempt=2, worker="w2",
                      agent="claude", status=RunStatus.COMPLETED, started_at=200.0, finished_at=290.0, exit_code=0,
                      cost_usd=0.5, cost_estimated=True, result_branch="taskrun/t", result_commit="c" * 40)
    third = RunState(run_id="r3", task_id="t", number=3, revision="b" * 64, attempt=1, worker="w1", agent="shell",
                     status=RunStatus.RUNNING, started_at=300.0)
    for run in (first, second, third):
        records.save_run(run.record())
    task = TaskState("t", "tasks/t.md", 1, TaskStatus.RUNNING, revision="b" * 64, attempts=1,
                     runs=[first, second, third], updated_at=300.0).record()
    records.save_task(task | {"title": "The task"})


def test_history_json_lists_each_revision_with_its_runs(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed_history(repo)

    assert main(["-C", str(repo), "history", "t", "--json"]) == 0

    history = json.loads(capsys.readouterr().out)
    assert history["task_id"] == "t" and history["status"] == "RUNNING" and history["revision"] == "b" * 64
    older, current = history["revisions"]
    assert (older["revision"], older["current"], current["revision"], current["current"]) == \
        ("a" * 64, False, "b" * 64, True)
    assert [r["number"] for r in older["runs"]] == [1, 2] and [r["number"] for r in current["runs"]] == [3]
    failed, completed = older["runs"]
    assert failed == {"number": 1, "run_id": "r1", "status": "FAILED", "attempt": 1, "worker": "w1",
                      "agent": "claude", "started_at": 100.0, "finished_at": 112.5, "duration": 12.5,
                      "cost_usd": 0.25, "cost_estimated": False, "exit_code": 1, "error": "exit 1",
                      "result_branch": None, "result_commit": None}
    assert completed["result_branch"] == "taskrun/t" and completed["cost_estimated"] is True
    assert completed["duration"] == 90.0 and current["runs"][0]["duration"] is None


def test_history_table_shows_runs_with_duration_cost_and_branch(repo: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    seed_history(repo)

    assert main(["-C", str(repo), "history", "t"]) == 0

    out = capsys.readouterr().out
    assert "t: The task RUNNING" in out
    assert f"revision {'a' * 12}: 2 Runs" in out and f"revision {'b' * 12} (the file now): 1 Run" in out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["2", "COMPLETED"])
    assert row.split()[2:4] == ["w2", "claude"] and "1m30s" in row and "~$0.5000" in row and "taskrun/t" in row
    assert "12.5s" in out and "$0.2500" in out


def test_history_of_a_task_without_a_record_is_a_usage_error(repo: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-C", str(repo), "history", "nosuch"]) == 2
    assert "no Task 'nosuch' has a record" in capsys.readouterr().err


def test_history_believes_no_record_this_clone_did_not_seal(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed_history(repo)
    run = repo / "runs" / "t" / "run-1" / "status.json"
    forged = json.loads(run.read_text()) | {"worker": "forged"}
    run.write_text(json.dumps(forged))

    assert main(["-C", str(repo), "history", "t", "--json"]) == 0

    captured = capsys.readouterr()
    first = json.loads(captured.out)["revisions"][0]["runs"][0]
    assert first["worker"] == "w1" and first["started_at"] is None  # what the Task record says of it
    assert "runs/t/run-1/status.json" in captured.err


def test_a_revision_not_run_yet_is_listed_without_runs() -> None:
    history = task_history({"task_id": "x", "status": "PENDING", "revision": "new", "runs": [
        {"run": 1, "run_id": "r1", "status": "FAILED", "worker": "w", "revision": "old"}]}, {})
    assert [(r["revision"], r["current"], len(r["runs"])) for r in history["revisions"]] == \
        [("old", False, 1), ("new", True, 0)]
    assert history["revisions"][0]["runs"][0]["status"] == "FAILED"


def test_logs_json_gives_a_run_output_and_end_event(repo: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    records = Records(repo)
    run = RunState(run_id="r1", task_id="t", number=1, revision="a", attempt=1, worker="w1", agent="shell",
                   status=RunStatus.RUNNING, started_at=1.0)
    records.save_run(run.record())
    records.append_output("t", 1, 0, "caf\u00e9\n".encode()[:4])  # a character split between two writes
    records.append_output("t", 1, 4, "caf\u00e9\n".encode()[4:] + b"\xff\n")
    run.status, run.exit_code = RunStatus.COMPLETED, 0
    records.save_run(run.record())
    records.save_task(TaskState("t", "tasks/t.md", 1, TaskStatus.COMPLETED, revision="a", runs=[run]).record())

    assert main(["-C", str(repo), "logs", "t", "--json"]) == 0

    events = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert [e["event"] for e in events if e["event"] != "output"] == ["run", "end"]
    assert events[0] == {"event": "run", "task_id": "t", "run": 1, "worker": "w1", "agent": "shell",
                         "status": "COMPLETED"}
    assert "".join(e["text"] for e in events if e["event"] == "output") == "caf\u00e9\n\ufffd\n"
    assert events[-1] == {"event": "end", "task_id": "t", "run": 1, "status": "COMPLETED", "exit_code": 0,
                          "error": None, "output_bytes": 8, "pruned": None}


def test_logs_of_a_run_that_does_not_exist_names_the_runs_that_do(repo: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    records = Records(repo)
    runs = []
    for number in (1, 2):
        run = RunState(run_id=f"r{number}", task_id="t", number=number, revision="a", attempt=number,
                       worker="w1", agent="shell", status=RunStatus.FAILED)
        records.save_run(run.record())
        runs.append(run)
    records.save_task(TaskState("t", "tasks/t.md", 1, TaskStatus.FAILED, revision="a", runs=runs).record())
    assert main(["-C", str(repo), "logs", "t", "--run", "9"]) == 2
    assert "'t' has no Run 9; its Runs: 1, 2" in capsys.readouterr().err


def test_logs_follow_of_a_task_finished_without_runs_ends_with_the_reason(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Records(repo).save_task(TaskState("b", "tasks/b.md", 1, TaskStatus.BLOCKED, revision="a", error="needs x").record())

    assert main(["-C", str(repo), "logs", "b", "-f"]) == 2
    assert "'b' is BLOCKED and has no Runs" in capsys.readouterr().err
