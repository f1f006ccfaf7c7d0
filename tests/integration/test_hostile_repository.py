"""A repository someone hostile pushed to: the real daemon keeps its own files its own (DESIGN §5.11).

Every test commits what an attacker could push (links, FIFOs, forged records,
names that break the records layout), then runs the real daemon. Agents here
only print: what they can reach is the sandbox's business, not these tests'.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from taskrunner.records import Records
from tests.conftest import Daemon, git, task_record, taskrun, wait_status, write_task

KEY_MARK = "PRIVATE KEY-----"


def commit(repo: Path, message: str = "a hostile push") -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", message)


def status_json(repo: Path, *task: str) -> tuple[dict[str, Any], str]:
    result = taskrun(repo, "status", *task, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def listed(repo: Path) -> dict[str, dict[str, Any]]:
    return {t["task_id"]: t for t in status_json(repo)[0]["tasks"]}


def runs_of(repo: Path, task_id: str) -> list[str]:
    """The run-<n> directories of a Task's records."""
    base = repo / "runs" / task_id
    return sorted(p.name for p in base.iterdir() if p.name.startswith("run-")) if base.is_dir() else []


def recorded_output(repo: Path, task_id: str) -> str:
    """The output of the latest Run the Task's (sealed) record lists."""
    number = (task_record(repo, task_id) or {})["runs"][-1]["run"]
    return (repo / "runs" / task_id / f"run-{number}" / "output.log").read_text()


def history(repo: Path) -> str:
    """Every blob any commit holds, as text."""
    return git(repo, "log", "--all", "-p", "--no-textconv", "--format=%H")


# ---------------------------------------------------------------- 1. links under runs/ redirect nothing


@pytest.mark.parametrize(("link", "target"), [
    ("runs/pwn/run-1/output.log", "../../../.git/config"),
    ("runs/pwn/run-1", "../../.git"),
    ("runs/pwn", "../.git"),
    ("runs/pwn/status.json", "../../.git/config"),
    ("runs", ".git"),
])
def test_links_under_runs_do_not_redirect_the_daemons_writes(repo: Path, link: str, target: str) -> None:
    if link == "runs":
        shutil.rmtree(repo / "runs")
    path = repo / link
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    write_task(repo, "pwn", "printf '[core]\\n\\tfsmonitor = echo pwned\\n'")
    commit(repo)
    config = (repo / ".git" / "config").read_bytes()

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 0, result.stdout + result.stderr
    assert (repo / ".git" / "config").read_bytes() == config
    assert not {"status.json", "run-1", "run-2", "output.log", "manifest.json"} & set(os.listdir(repo / ".git"))
    assert recorded_output(repo, "pwn") == "[core]\n\tfsmonitor = echo pwned\n"
    assert "fsmonitor" not in git(repo, "config", "--list")
    if link != "runs/pwn/run-1/output.log" and link != "runs/pwn/run-1":
        # The daemon wrote where the link was: it says it replaced it.
        assert f"{link} was a symbolic link, which taskrun never follows" in result.stdout


def test_a_committed_link_to_the_signing_key_never_reaches_a_commit(repo: Path) -> None:
    (repo / "runs" / "x" / "run-1").mkdir(parents=True)
    (repo / "runs" / "x" / "run-1" / "summary.md").symlink_to("../../../.git/taskrun/keys/1.pem")
    (repo / "runs" / "x" / "run-1" / "output.log").symlink_to("../../../.git/taskrun/keys/1.pem")
    (repo / "runs" / "x" / "status.json").symlink_to("../../.git/taskrun/keys/1.pem")
    write_task(repo, "x", "echo done")
    commit(repo)
    key = (repo / ".git" / "taskrun" / "keys" / "1.pem").read_bytes()

    assert taskrun(repo, "up", "--once").returncode == 0

    assert KEY_MARK not in history(repo)
    assert (repo / ".git" / "taskrun" / "keys" / "1.pem").read_bytes() == key
    assert status_json(repo, "x")[0]["task"]["status"] == "COMPLETED"


# ---------------------------------------------------------------- 4. forged records are not believed


def _forge(repo: Path, tmp_path: Path, how: str) -> None:
    revision = hashlib.sha256((repo / "tasks" / "check.md").read_bytes()).hexdigest()
    task = {"version": 1, "task_id": "check", "file": "tasks/check.md", "title": "check", "status": "COMPLETED",
            "revision": revision, "seq": 1, "attempts": 1, "removed": False,
            "runs": [{"run": 1, "run_id": "f" * 16, "status": "COMPLETED", "worker": "local",
                      "revision": revision}]}
    run = {"version": 1, "task_id": "check", "run": 1, "run_id": "f" * 16, "revision": revision, "attempt": 1,
           "status": "COMPLETED", "worker": "local", "agent": "shell", "exit_code": 0}
    if how == "sealed by another clone":
        other = Records(tmp_path / "other-clone")
        other.save_task(task)
        other.save_run(run)
        shutil.copytree(other.runs / "check", repo / "runs" / "check")
        return
    seal = {"seal": "0" * 64} if how == "a made-up seal" else {}
    (repo / "runs" / "check" / "run-1").mkdir(parents=True)
    (repo / "runs" / "check" / "status.json").write_text(json.dumps({**task, **seal}))
    (repo / "runs" / "check" / "run-1" / "status.json").write_text(json.dumps({**run, **seal}))


@pytest.mark.parametrize("how", ["unsealed", "a made-up seal", "sealed by another clone"])
def test_a_forged_completed_record_does_not_let_dependents_run(repo: Path, tmp_path: Path, how: str) -> None:
    write_task(repo, "check", "echo the check fails; exit 1")
    write_task(repo, "deploy", "echo deployed", front="depends_on: [check]\n")
    _forge(repo, tmp_path, how)
    commit(repo)

    before, notice = status_json(repo)
    # `taskrun status` does not believe it either, and says so.
    assert {t["task_id"]: t["status"] for t in before["tasks"]}["check"] == "PENDING"
    assert "runs/check/status.json was not written by this daemon (no valid seal); ignored" in notice

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 1
    assert "runs/check/status.json was not written by this daemon (no valid seal); ignored" in result.stdout
    after = listed(repo)
    assert after["check"]["status"] == "FAILED" and after["deploy"]["status"] == "BLOCKED"
    assert runs_of(repo, "deploy") == []
    assert recorded_output(repo, "check") == "the check fails\n"


def test_output_pushed_into_a_run_directory_is_not_taken_for_recorded_output(repo: Path) -> None:
    pushed = repo / "runs" / "hello" / "run-1"
    pushed.mkdir(parents=True)
    (pushed / "output.log").write_text("AAAA")
    write_task(repo, "hello", "echo hello")
    commit(repo)

    assert taskrun(repo, "up", "--once").returncode == 0

    assert recorded_output(repo, "hello") == "hello\n"
    assert (pushed / "output.log").read_text() == "AAAA"  # someone else's, left alone
    assert runs_of(repo, "hello") == ["run-1", "run-2"]


def test_a_fresh_clone_runs_tasks_again_instead_of_believing_anothers_records(repo: Path, tmp_path: Path) -> None:
    write_task(repo, "once", "echo ran")
    assert taskrun(repo, "up", "--once").returncode == 0
    commit(repo, "the Task file")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", str(repo), str(clone))
    git(clone, "config", "user.name", "Clone")
    git(clone, "config", "user.email", "clone@example.com")

    _, notice = status_json(clone)
    result = taskrun(clone, "up", "--once")

    assert "runs/once/status.json was not written by this daemon" in notice
    assert result.returncode == 0 and "taken up again from their files" in result.stdout
    assert runs_of(clone, "once") == ["run-1", "run-2"]
    assert recorded_output(clone, "once") == "ran\n"
    # The original clone still believes its own records, the new one now its own.
    assert listed(repo)["once"]["status"] == listed(clone)["once"]["status"] == "COMPLETED"


# ---------------------------------------------------------------- 5. names that break the records layout


LONG_ID = "/".join(["p" * 190] * 20)  # about 3,800 characters: the daemon used to die of ENAMETOOLONG


def test_task_names_that_would_break_the_layout_are_invalid_and_crash_nothing(repo: Path) -> None:
    write_task(repo, "a", "echo a")
    unusable = ["a/status.json", "a/run-1", "a/output.log", "a/manifest.json", "a/summary.md", "a/events.jsonl",
                LONG_ID]
    for task_id in unusable:
        write_task(repo, task_id, f"echo {task_id[:10]}")
    commit(repo)

    first = taskrun(repo, "up", "--once")
    second = taskrun(repo, "up", "--once")  # and again: a restart reads what the first left

    assert first.returncode == 1 and second.returncode == 1, first.stdout + first.stderr
    assert "Traceback" not in first.stderr + second.stderr
    assert "INVALID, and no record is written for it: tasks/a/status.json.md: the Task id part 'status.json' " \
           "is reserved" in first.stdout
    tasks = listed(repo)
    assert tasks["a"]["status"] == "COMPLETED"
    for task_id in unusable:
        assert tasks[task_id]["status"] == "INVALID", task_id
        assert ("reserved" if task_id != LONG_ID else "over the limit of 200") in tasks[task_id]["error"]
    record = json.loads((repo / "runs" / "a" / "run-1" / "status.json").read_text())
    assert record["task_id"] == "a" and recorded_output(repo, "a") == "a\n"
    assert (repo / "runs" / "a" / "status.json").is_file()


def test_submit_refuses_a_name_the_layout_reserves(repo: Path, tmp_path: Path) -> None:
    source = tmp_path / "run-3.md"
    source.write_text("# x\n\n```sh\ntrue\n```\n")
    result = taskrun(repo, "submit", str(source))
    assert result.returncode == 2 and "reserved" in result.stderr
    assert not (repo / "tasks" / "run-3.md").exists()


def test_submit_does_not_write_through_a_linked_tasks_directory(repo: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(repo / "tasks")
    (repo / "tasks").symlink_to(elsewhere)
    source = tmp_path / "x.md"
    source.write_text("# x\n\n```sh\ntrue\n```\n")
    result = taskrun(repo, "submit", str(source))
    assert result.returncode == 2 and "tasks is a symbolic link" in result.stderr
    assert list(elsewhere.iterdir()) == []


def submit_from(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`taskrun submit` as CI runs it: from inside the clone, with the path as typed."""
    return subprocess.run([sys.executable, "-m", "taskrunner", "submit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_never_follows_a_link_to_the_file_nor_any_inside_the_work_tree(repo: Path, tmp_path: Path) -> None:
    (repo / "ci").mkdir()
    (repo / "ci" / "leak.md").symlink_to("../.git/taskrun/keys/1.pem")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "diary.md").write_text("# private\n\n```sh\necho my diary\n```\n")
    (repo / "ci" / "notes").symlink_to(notes)  # a pushed link to a directory outside

    leak = submit_from(repo, "ci/leak.md")
    diary = submit_from(repo, "ci/notes/diary.md")

    assert leak.returncode == 2, leak.stderr
    assert leak.stderr.strip() == ("taskrun: ci/leak.md: the file is a symbolic link; taskrun reads only regular "
                                   "files and follows no links")
    assert diary.returncode == 2 and "ci/notes is a symbolic link" in diary.stderr
    assert not (repo / "tasks" / "leak.md").exists() and not (repo / "tasks" / "diary.md").exists()
    assert KEY_MARK not in "".join(p.read_text(errors="replace") for p in (repo / "tasks").rglob("*") if p.is_file())


def test_submit_follows_links_the_person_typed_outside_the_work_tree(repo: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "ok.md").write_text("# ok\n\n```sh\ntrue\n```\n")
    (tmp_path / "via").symlink_to(real)

    result = submit_from(repo, str(tmp_path / "via" / "ok.md"))

    assert result.returncode == 0, result.stderr
    assert (repo / "tasks" / "ok.md").read_text() == (real / "ok.md").read_text()


@pytest.mark.parametrize("kind", ["fifo", "directory", "too big", "socket"])
def test_submit_refuses_a_special_or_oversized_file_at_once(repo: Path, tmp_path: Path, kind: str) -> None:
    source = tmp_path / "f.md"
    if kind == "fifo":
        os.mkfifo(source)  # `mkfifo /tmp/f.md; taskrun submit /tmp/f.md` waited forever
    elif kind == "directory":
        source.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(source))
        sock.close()
    else:
        source.write_text("# big\n\n```sh\ntrue\n```\n" + "x" * 300_000)

    result = submit_from(repo, str(source), timeout=20)

    assert result.returncode == 2
    expected = {"fifo": "the file is a FIFO", "directory": "the file is a directory", "socket": "the file is a socket",
                "too big": "over the limit of 262144 for a Task file"}[kind]
    assert result.stderr.startswith(f"taskrun: {source}: ") and expected in result.stderr, result.stderr
    assert not (repo / "tasks" / "f.md").exists()


# ---------------------------------------------------------------- 3. and 6. Task files that are links or special


def test_task_files_that_are_links_are_invalid_and_nothing_of_them_runs(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.md"
    outside.write_text("# outside\n\n```sh\necho ran-from-outside\n```\n")
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    (outside_dir / "z.md").write_text("# z\n\n```sh\necho ran-from-a-linked-dir\n```\n")
    (repo / "docs").mkdir()
    (repo / "docs" / "real.md").write_text("# real\n\n```sh\necho ran-from-docs\n```\n")
    (repo / "tasks" / "passwd.md").symlink_to("/etc/passwd")
    (repo / "tasks" / "outside.md").symlink_to(os.path.relpath(outside, repo / "tasks"))
    (repo / "tasks" / "inside.md").symlink_to("../docs/real.md")
    (repo / "tasks" / "sub").symlink_to(outside_dir)
    write_task(repo, "fine", "echo fine")
    commit(repo)

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 1
    tasks = listed(repo)
    for task_id in ("passwd", "outside", "inside"):
        assert tasks[task_id]["status"] == "INVALID"
        assert tasks[task_id]["error"] == (f"tasks/{task_id}.md: the file is a symbolic link; taskrun reads only "
                                           "regular files and follows no links")
        assert runs_of(repo, task_id) == []
    assert "sub/z" not in tasks and not (repo / "runs" / "sub").exists()
    assert "tasks/sub is a symbolic link" in result.stdout
    assert tasks["fine"]["status"] == "COMPLETED"
    assert not [log for log in (repo / "runs").rglob("output.log") if "ran-from" in log.read_text()]


def test_fifos_sockets_and_directories_named_like_task_files_are_invalid_and_never_block(
        repo: Path, tmp_path: Path) -> None:
    os.mkfifo(repo / "tasks" / "fifo.md")
    os.mkfifo(tmp_path / "elsewhere-fifo")
    (repo / "tasks" / "link-to-fifo.md").symlink_to(tmp_path / "elsewhere-fifo")
    (repo / "tasks" / "dir.md").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(repo / "tasks" / "sock.md"))
    sock.close()
    write_task(repo, "fine", "echo fine")

    result = taskrun(repo, "up", "--once", timeout=60)

    assert result.returncode == 1
    tasks = listed(repo)
    for task_id, what in (("fifo", "a FIFO"), ("link-to-fifo", "a symbolic link"), ("dir", "a directory"),
                          ("sock", "a socket")):
        assert tasks[task_id]["status"] == "INVALID", task_id
        assert f"the file is {what}" in tasks[task_id]["error"]
    assert tasks["fine"]["status"] == "COMPLETED"


def test_a_fifo_task_file_neither_blocks_the_daemon_nor_its_first_sigterm(daemon: Daemon) -> None:
    os.mkfifo(daemon.root / "tasks" / "stuck.md")
    daemon.start()  # answers on its socket: the main loop is not stuck in open()
    write_task(daemon.root, "after", "echo after")
    wait_status(daemon.root, "after", "COMPLETED")
    assert wait_status(daemon.root, "stuck", "INVALID")["error"].startswith("tasks/stuck.md: the file is a FIFO")

    daemon.signal(signal.SIGTERM)

    assert daemon.wait(timeout=30) == 0


# ---------------------------------------------------------------- 2. context never reads the git directory


CONTEXTS = [".git/taskrun/keys/1.pem", ".git/taskrun/workers/local/keys/worker.pem", ".git/taskrun/ssh_key",
            ".git/config", ".GIT/config", "docs/key.pem", "docs/keys/1.pem", "docs/fifo", "vendor/.git/config"]


def test_context_never_sends_the_git_directory_or_links_to_a_worker(repo: Path) -> None:
    (repo / "docs").mkdir()
    (repo / "docs" / "spec.txt").write_text("the spec\n")
    (repo / "docs" / "key.pem").symlink_to("../.git/taskrun/keys/1.pem")
    (repo / "docs" / "keys").symlink_to("../.git/taskrun/keys")
    os.mkfifo(repo / "docs" / "fifo")
    (repo / "vendor" / ".git").mkdir(parents=True)
    (repo / "vendor" / ".git" / "config").write_text("[core]\n")
    for n, path in enumerate(CONTEXTS):
        write_task(repo, f"ctx-{n}", f"cat {path} || true", front=f"context: ['{path}']\n")
    git(repo, "add", "docs/spec.txt")  # context files are sent only if git tracks them
    write_task(repo, "good", "cat docs/spec.txt", front="context: [docs/spec.txt]\n")

    result = taskrun(repo, "up", "--once", timeout=60)

    assert result.returncode == 1
    tasks = listed(repo)
    for n, path in enumerate(CONTEXTS):
        assert tasks[f"ctx-{n}"]["status"] == "INVALID", path
        assert "key 'context'" in tasks[f"ctx-{n}"]["error"], path
        assert runs_of(repo, f"ctx-{n}") == [], path
    assert tasks["good"]["status"] == "COMPLETED" and recorded_output(repo, "good") == "the spec\n"
    assert KEY_MARK not in history(repo)


def test_context_sends_only_tracked_files_of_their_own_within_the_cap(repo: Path) -> None:
    (repo / ".gitignore").write_text(".env\n")
    commit(repo, "ignore .env")
    (repo / ".env").write_text("API_TOKEN=hunter2-not-for-workers\n")  # ignored
    (repo / "notes.txt").write_text("hunter2-untracked-notes\n")  # untracked
    with open(repo / "huge.bin", "wb") as handle:
        handle.truncate(700 * 1024 * 1024)  # 700 MiB by its size (sparse): refused before it is read
    (repo / "docs").mkdir()
    os.link(repo / ".git" / "config", repo / "docs" / "cfg")  # git's configuration under a second name
    write_task(repo, "env", "cat .env || true", front="context: [.env]\n")
    write_task(repo, "notes", "cat notes.txt || true", front="context: [notes.txt]\n")
    write_task(repo, "huge", "wc -c huge.bin || true", front="context: [huge.bin]\n")
    write_task(repo, "cfg", "cat docs/cfg || true", front="context: [docs/cfg]\n")

    result = taskrun(repo, "up", "--once", timeout=60)

    assert result.returncode == 1
    tasks = listed(repo)
    for task_id, path in (("env", ".env"), ("notes", "notes.txt")):
        assert tasks[task_id]["status"] == "FAILED", task_id
        run = json.loads((repo / "runs" / task_id / "run-1" / "status.json").read_text())
        assert run["error"] == (
            f"tasks/{task_id}.md: key 'context': context file '{path}' is not tracked by git: taskrun sends only "
            "files git tracks, so an ignored or untracked file (a .env, say) never leaves this machine; if it is "
            f"meant to be shared, `git add {path}`, then `taskrun retry {task_id}`")
    run = json.loads((repo / "runs" / "huge" / "run-1" / "status.json").read_text())
    assert tasks["huge"]["status"] == "FAILED" and "over the 64 MiB of context files" in run["error"]
    assert tasks["cfg"]["status"] == "INVALID" and "taskrun reads only files that are nowhere else" in \
        tasks["cfg"]["error"]
    assert "hunter2" not in history(repo)
    assert not [p for p in (repo / "runs").rglob("*") if p.is_file() and "hunter2" in p.read_text(errors="replace")]
    assert "repositoryformatversion" not in history(repo)


# ---------------------------------------------------------------- 7. private keys are not committed; doctor


def test_output_holding_a_private_key_is_left_out_of_the_commit(repo: Path) -> None:
    # The block is made when the Agent runs, so the Task file itself holds none.
    write_task(repo, "leak", "printf -- '-----BEGIN %s PRIVATE KEY-----\\nAAAA\\n' OPENSSH")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 0
    assert "runs/leak/run-1/output.log holds a private key block: left out of the commit" in result.stdout
    assert KEY_MARK not in history(repo)
    tracked = git(repo, "ls-files", "runs/leak").split()
    assert "runs/leak/run-1/status.json" in tracked and "runs/leak/run-1/output.log" not in tracked
    doctor = json.loads(taskrun(repo, "doctor", "--json").stdout)
    assert not [f for f in doctor["findings"] if "holds a private key" in f["what"]]


def test_doctor_reports_a_link_committed_under_runs(repo: Path) -> None:
    (repo / "runs" / "x" / "run-1").mkdir(parents=True)
    (repo / "runs" / "x" / "run-1" / "output.log").symlink_to("../../../.git/config")
    commit(repo)

    result = taskrun(repo, "doctor", "--json")

    assert result.returncode == 1
    [finding] = [f for f in json.loads(result.stdout)["findings"] if f["what"].startswith("runs/")]
    assert finding["what"].startswith("runs/x/run-1/output.log is a symbolic link")
    assert finding["fix"].startswith("git rm --cached")


def test_logs_never_print_through_a_linked_output_log(repo: Path) -> None:
    write_task(repo, "shown", "echo shown")
    assert taskrun(repo, "up", "--once").returncode == 0
    log = repo / "runs" / "shown" / "run-1" / "output.log"
    log.unlink()
    log.symlink_to("../../../.git/config")

    result = taskrun(repo, "logs", "shown")

    assert "[core]" not in result.stdout
    assert result.returncode == 2 and "output.log is a symbolic link: not read" in result.stderr


def test_a_configuration_that_is_a_link_is_refused_at_start(repo: Path) -> None:
    (repo / ".taskrun.yaml").unlink()
    (repo / ".taskrun.yaml").symlink_to(".git/taskrun/keys/1.pem")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 2 and "is a symbolic link" in result.stderr
    assert KEY_MARK not in result.stderr + result.stdout


# ---------------------------------------------------------------- 8. pushed hooks never run in the daemon


def test_hooks_pushed_into_a_hooks_path_the_clone_uses_never_run_for_the_daemon(repo: Path, tmp_path: Path) -> None:
    # The repro: `git config core.hooksPath hooks` (which taskrun once recommended), then a push into hooks/.
    ran = tmp_path / "ran"
    ran.mkdir()
    script = f"#!/bin/sh\ncp -r .git/taskrun/keys {ran}/keys-$(basename $0) 2>/dev/null\ntouch {ran}/$(basename $0)\n" \
             "cat >/dev/null\nexit 0\n"
    for name in ("reference-transaction", "post-index-change", "pre-auto-gc", "fsmonitor"):
        (repo / "hooks" / name).write_text(script)
        (repo / "hooks" / name).chmod(0o755)
    commit(repo)
    git(repo, "config", "core.hooksPath", "hooks")
    git(repo, "config", "core.fsmonitor", str(repo / "hooks" / "fsmonitor"))
    write_task(repo, "x", "echo done")

    result = taskrun(repo, "up", "--once")

    assert result.returncode == 0, result.stdout + result.stderr
    assert status_json(repo, "x")[0]["task"]["status"] == "COMPLETED"
    assert "runs/x/run-1/status.json" in git(repo, "ls-tree", "-r", "--name-only", "HEAD")
    assert sorted(os.listdir(ran)) == []
    # The hooks are live for git itself: only the daemon's git runs none of them.
    git(repo, "update-ref", "refs/heads/probe", "HEAD")
    assert "reference-transaction" in os.listdir(ran)


def test_the_hooks_taskrun_init_writes_do_not_recommend_core_hooks_path(repo: Path) -> None:
    for name in ("post-merge", "post-receive"):
        text = (repo / "hooks" / name).read_text()
        assert "git config core.hooksPath hooks" not in text.replace("Do not run `git config core.hooksPath hooks`", "")
        assert "cp hooks/" in text and "not a link" in text


def test_logs_never_print_a_hard_linked_output_log_and_say_why(repo: Path) -> None:
    write_task(repo, "shown", "echo shown")
    assert taskrun(repo, "up", "--once").returncode == 0
    log = repo / "runs" / "shown" / "run-1" / "output.log"
    log.unlink()
    os.link(repo / ".git" / "config", log)  # the same file as .git/config, under another name

    result = taskrun(repo, "logs", "shown")

    assert "[core]" not in result.stdout
    assert result.returncode == 2 and "output.log is a hard link" in result.stderr, result.stderr
    assert "has no output" not in result.stdout + result.stderr
