"""Agents run confined (DESIGN.md §5.10): real daemons, over the local Worker and over real sshd Workers.

A hostile Agent tries every path it must not read or change (the Worker's
keys, trust store, ledger and secrets, another Run's directory, the daemon's
repository and its keys, `..` walks out of its workspace) and to leave
processes behind (setsid, nohup, a double fork); the test checks from
outside that nothing leaked, nothing changed and nothing outlived the Run.
A Worker that cannot make a sandbox gets no Runs unless the configuration
accepts `sandbox: none`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner import keys
from taskrunner.worker.sandbox import AGENT_UID_BASE, AGENT_UID_COUNT
from tests.agentprobes import Gate, marker, processes_named
from tests.conftest import Daemon, run_record, task_record, taskrun, wait_status, wait_until, write_task, local_worker_home
from tests.sshd import SshdHost, start_sshd

SECRET = "confined-secret-0123456789"
UNNAMED = "unnamed-worker-value-9876543210"
#: What an Agent's environment may hold (DESIGN.md §5.10), besides what bash itself sets.
ALLOWED_VARIABLES = {"PATH", "HOME", "LANG", "TZ", "TASKRUN_RUN_ID", "TASKRUN_TASK_ID", "TASKRUN_WORKSPACE",
                     "API_TOKEN", "PWD", "OLDPWD", "SHLVL", "_"}


@dataclass
class Worker:
    """The Worker a test's Runs go to: its name in .taskrun.yaml and its home on this machine."""

    name: str
    home: Path
    host: SshdHost | None = None


def _add(repo: Path, name: str, host: SshdHost) -> None:
    token = ("--token", host.token) if host.token else ()
    result = taskrun(repo, "worker", "add", name, "--host", "127.0.0.1", "--port", str(host.port),
                     "--fingerprint", host.fingerprint, "--slots", "2", *token)
    assert result.returncode == 0, result.stdout + result.stderr


def _name_the_secret(repo: Path) -> None:
    config = repo / ".taskrun.yaml"
    text = config.read_text()
    assert "  shell:\n    preset: shell\n" in text
    config.write_text(text.replace("  shell:\n    preset: shell\n", "  shell:\n    preset: shell\n    env: [API_TOKEN]\n", 1))


def _kill_leftovers(home: Path) -> None:
    for pid_file in home.glob("runs/*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), 9)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.sshd)])
def worker(request: pytest.FixtureRequest, repo: Path, tmp_path: Path) -> Iterator[Worker]:
    """The repository's only Worker: the embedded local one, or one real sshd host."""
    keys.ensure_ssh_key(repo / ".git" / "taskrun")  # the daemon's SSH key: one more thing no Agent may read
    if request.param == "local":
        made = Worker("local", local_worker_home(repo))
        made.home.mkdir(parents=True, exist_ok=True)
    else:
        _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
        host = start_sshd(tmp_path / "host", public)
        _add(repo, "w1", host)
        assert taskrun(repo, "worker", "remove", "local").returncode == 0
        made = Worker("w1", host.home, host)
    (made.home / "secrets.env").write_text(f"API_TOKEN={SECRET}\n")
    _name_the_secret(repo)
    yield made
    if made.host is not None:
        made.host.stop()
    _kill_leftovers(made.home)


def _digests(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _output(root: Path, task_id: str, number: int = 1) -> str:
    path = root / "runs" / task_id / f"run-{number}" / "output.log"
    return path.read_text() if path.exists() else ""


def _hostile_script(home: Path, repo: Path, victim: Path) -> str:
    """Tries to read and change what the Agent must not; prints a LEAK line for each success."""
    state = repo / ".git" / "taskrun"
    readable = [home / "keys" / "worker.pem", home / "trust.json", home / "ledger.jsonl", home / "secrets.env",
                victim / "output.log", victim / "assignment.json", victim / "workspace" / "tasks" / "victim.md",
                state / "ssh_key", repo / ".taskrun.yaml", repo / "tasks" / "victim.md", repo / ".git" / "config",
                Path("/etc/shadow"), *sorted(state.glob("keys/*")), *sorted(Path("/etc/ssh").glob("ssh_host_*_key"))]
    writable = [home / "trust.json", home / "ledger.jsonl", home / "secrets.env", home / "keys" / "worker.pem",
                victim / "output.log", victim / "exit_status", victim / "result.json", victim / "workspace" / "x",
                home / "runs" / "planted" / "x", state / "keys" / "planted", repo / "tasks" / "planted.md"]
    lines = ["set +e"]
    for path in readable:
        lines.append(f"if head -c1 {shlex.quote(str(path))} >/dev/null 2>&1; then echo LEAK read {path}; fi")
    for path in writable:
        lines.append(f"if (echo pwned >> {shlex.quote(str(path))}) 2>/dev/null; then echo LEAK write {path}; fi")
    # What is left of the Worker's paths inside: the directories on the way to its own Run, each
    # holding only the next one (checked by the test), and not the victim's Run at all.
    for directory in (repo, state, home, home / "runs", victim):
        lines.append(f'echo "LIST {directory} $(ls -A {shlex.quote(str(directory))} 2>/dev/null | tr "\\n" " ")"')
    # The finding this test started from: walking up out of the workspace.
    lines.append('p=..; for _ in 1 2 3 4 5 6 7 8; do '
                 'for f in "$p"/keys/*.pem "$p"/keys/worker.pem "$p"/trust.json "$p"/ledger.jsonl "$p"/ssh_key; do '
                 'if head -c1 "$f" >/dev/null 2>&1; then echo LEAK walk "$f"; fi; done; p="$p/.."; done')
    lines.append("find / \\( -path /proc -o -path /sys -o -path /dev -o -path /usr \\) -prune -o \\( "
                 "-name worker.pem -o -name trust.json -o -name ledger.jsonl -o -name secrets.env "
                 "-o -name keyring.json -o -name ssh_key \\) -print 2>/dev/null | sed 's/^/LEAK found /'")
    lines.append("if (exec 3</dev/tty) 2>/dev/null; then echo LEAK tty; fi")  # no controlling terminal (TIOCSTI)
    lines.append('echo "uid=$(id -u)"')
    lines.append('echo "token=$API_TOKEN"; test "$API_TOKEN" = ' + shlex.quote(SECRET) + " && echo token-ok")
    lines.append("env | cut -d= -f1 | sort | sed 's/^/VAR /'")
    lines.append('echo "unnamed=${TASKRUN_TEST_UNNAMED-absent}"')
    lines.append("ls /proc | grep -c '^[0-9]' | sed 's/^/PROCS /'")
    return "\n".join(lines)


def test_an_agent_cannot_see_or_change_what_is_not_its_own(repo: Path, worker: Worker, daemon: Daemon, gate: Gate,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_TEST_UNNAMED", UNNAMED)  # in the daemon's, so the local Worker's, environment
    daemon.start()
    # Another Run, held open by a gate: its directory is what the hostile Run reaches for.
    write_task(repo, "victim", f'echo "victim uid=$(id -u)"\nuntil {gate.check}; do sleep 0.05; done\necho released')
    started = wait_until(lambda: re.fullmatch(r"victim uid=(\d+)\n", _output(repo, "victim")), 30,
                         "the victim Run to start")
    victim_uid = int(started.group(1))
    victim_id = (run_record(repo, "victim", 1) or {})["run_id"]
    victim = worker.home / "runs" / victim_id

    # Run directories are private while the Run lasts (0700, files 0600).
    assert _mode(worker.home / "runs") == 0o700 and _mode(worker.home / "trash") == 0o700
    assert _mode(victim) == 0o700
    for name in ("assignment.json", "output.log", "pid", "exit_status", "script.sh", "secrets.json"):
        assert _mode(victim / name) == 0o600, name
    assert _mode(victim / "home") == 0o700
    assert _mode(victim / "workspace") == 0o700
    assert _mode(victim / "workspace" / "tasks" / "victim.md") == 0o600

    guarded = [p for p in [worker.home / "keys" / "worker.pem", worker.home / "trust.json",
                           worker.home / "secrets.env", victim / "output.log",
                           *(repo / ".git" / "taskrun").glob("keys/*"), repo / ".git" / "taskrun" / "ssh_key"]
               if p.is_file()]
    before = _digests(guarded)
    ledger = (worker.home / "ledger.jsonl").read_bytes()

    write_task(repo, "hostile", _hostile_script(worker.home, repo, victim))
    record = wait_status(repo, "hostile", "COMPLETED", "FAILED", timeout=60)
    output = _output(repo, "hostile")
    assert record["status"] == "COMPLETED", output
    assert "LEAK" not in output, output
    assert _digests(guarded) == before
    own_id = (run_record(repo, "hostile", 1) or {})["run_id"]
    # The ledger only grew, by the Worker's entry for the hostile Run's own bundle.
    added = (worker.home / "ledger.jsonl").read_bytes().removeprefix(ledger)
    assert (worker.home / "ledger.jsonl").read_bytes().startswith(ledger)
    assert len(added.splitlines()) == 1 and own_id.encode() in added
    assert not (worker.home / "runs" / "planted").exists()
    assert not (repo / "tasks" / "planted.md").exists()
    assert not (victim / "workspace" / "x").exists()
    own = worker.home / "runs" / own_id
    listed = {Path(line.split()[1]): set(line.split()[2:]) for line in output.splitlines()
              if line.startswith("LIST ")}
    # Besides its own Run: the Worker's repository cache objects, read-only (README "The repository on the Worker").
    cache_objects = next(worker.home.glob("repos/*.git/objects"), None)
    for directory, entries in listed.items():
        if directory in own.parents:
            allowed = {own.relative_to(directory).parts[0]}
            if cache_objects is not None and directory in cache_objects.parents:
                allowed.add(cache_objects.relative_to(directory).parts[0])
            assert entries <= allowed, (directory, entries)
        else:
            assert entries == set(), (directory, entries)  # the victim's Run: not there at all

    # Its environment: only what its Agent is given; the named secret there, and masked in the output.
    names = {line.removeprefix("VAR ") for line in output.splitlines() if line.startswith("VAR ")}
    assert names <= ALLOWED_VARIABLES | {n for n in names if n.startswith("LC_")}, names
    assert {"PATH", "HOME", "TASKRUN_RUN_ID", "API_TOKEN"} <= names
    assert "unnamed=absent" in output and UNNAMED not in output
    assert "token-ok" in output and SECRET not in output and "token=" + "*" * len(SECRET) in output
    # Its own PID namespace: a handful of processes, not the host's.
    assert int(output.split("PROCS ")[1].split()[0]) < 10
    uid = int(re.findall(r"^uid=(\d+)$", output, re.M)[0])
    if os.geteuid() == 0:
        # A root Worker's Agent runs as a uid of its own: not root, not nobody (whose other processes could
        # read its environment), not any account's, and not the uid of another Run the Worker holds.
        assert AGENT_UID_BASE <= uid < AGENT_UID_BASE + AGENT_UID_COUNT and uid != victim_uid
        assert AGENT_UID_BASE <= victim_uid < AGENT_UID_BASE + AGENT_UID_COUNT
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)
    else:
        assert uid == victim_uid == os.geteuid()

    # The victim was not disturbed.
    gate.open()
    wait_status(repo, "victim", "COMPLETED")
    assert _output(repo, "victim") == f"victim uid={victim_uid}\nreleased\n"


def _spawn_leftovers(name: str) -> str:
    """A script that leaves three processes named `name` behind, escaping its process group every way it can."""
    return "\n".join([
        f"setsid bash -c 'exec -a {name} sleep 300' </dev/null >/dev/null 2>&1 &",  # a new session
        f"nohup bash -c 'exec -a {name} sleep 300' </dev/null >/dev/null 2>&1 &",  # immune to SIGHUP
        f"( (exec -a {name} sleep 300) </dev/null >/dev/null 2>&1 & )",  # a double fork: orphaned at once
    ])


def test_no_process_of_a_run_outlives_it_whether_it_ends_is_cancelled_or_times_out(
        repo: Path, worker: Worker, daemon: Daemon, gate: Gate) -> None:
    daemon.start()
    ends, cancelled = marker(), marker()
    write_task(repo, "ends", f"{_spawn_leftovers(ends)}\necho spawned\nuntil {gate.check}; do sleep 0.05; done")
    write_task(repo, "cancelled", f"{_spawn_leftovers(cancelled)}\necho spawned\nexec -a {cancelled} sleep 300")
    wait_until(lambda: len(processes_named(ends)) == 3 and len(processes_named(cancelled)) == 4, 30,
               "both Runs to leave their processes running")

    gate.open()  # the Agent exits 0; what it left behind must go with the Run
    wait_status(repo, "ends", "COMPLETED")
    wait_until(lambda: not processes_named(ends), 10, "the finished Run's leftovers to be gone")

    assert taskrun(repo, "cancel", "cancelled").returncode == 0
    wait_status(repo, "cancelled", "CANCELLED")
    wait_until(lambda: not processes_named(cancelled), 10, "the cancelled Run's processes to be gone")

    slow = marker()
    write_task(repo, "slow", f"{_spawn_leftovers(slow)}\nexec -a {slow} sleep 300", front="timeout: 2s\n")
    wait_until(lambda: len(processes_named(slow)) == 4, 30, "the slow Run to leave its processes running")
    record = wait_status(repo, "slow", "FAILED")
    assert "timed out" in record["error"]
    wait_until(lambda: not processes_named(slow), 10, "the timed-out Run's processes to be gone")


def test_an_agent_that_truncates_its_output_ends_its_run_failed_once_saying_so(
        repo: Path, worker: Worker, daemon: Daemon, gate: Gate) -> None:
    daemon.start()
    # It truncates once its first line reached the daemon, then runs on until the Worker, seeing output.log
    # shrink below what it sent, stops it.
    write_task(repo, "shrinks", f"echo hello\nuntil {gate.check}; do sleep 0.05; done\n"
                                f"{shlex.quote(sys.executable)} -c 'import os; os.ftruncate(1, 0)'\n"
                                "sleep 300\necho done")
    wait_until(lambda: _output(repo, "shrinks") == "hello\n", 60, "the first line to reach the daemon")
    gate.open()
    record = wait_status(repo, "shrinks", "FAILED", timeout=60)
    runs = [run_record(repo, "shrinks", n) for n in range(1, len(record["runs"]) + 1)]
    assert runs and all(r and r["status"] == "FAILED" for r in runs), runs
    for number, run in enumerate(runs, 1):
        assert run and run["error"].startswith("the Agent truncated its output: 6 bytes were sent, "), run
        assert _output(repo, "shrinks", number) == "hello\n"  # what was sent, and nothing after it


# -- a Worker that cannot confine Agents ---------------------------------------------------------


def _path_without_bwrap(tmp_path: Path) -> str:
    """A PATH with every program of this machine's but bwrap: a Worker where bubblewrap is not installed."""
    bin_dir = tmp_path / "no-bwrap-bin"
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/bin"]:
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = bin_dir / entry.name
            if entry.name != "bwrap" and not target.exists() and not target.is_symlink():
                target.symlink_to(entry.path)
    return str(bin_dir)


def _run(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskrunner", "-C", str(root), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_local_worker_without_bwrap_gets_no_runs_unless_sandbox_none_is_configured(
        repo: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _path_without_bwrap(tmp_path)}
    outside = tmp_path / "outside.txt"
    outside.write_text("seen from outside\n")
    write_task(repo, "refused", "echo should not run")

    assert _run(repo, env, "up", "--once").returncode == 1
    record = task_record(repo, "refused")
    assert record and record["status"] == "BLOCKED" and not record["runs"]
    assert "cannot confine Agents" in record["error"] and "bubblewrap" in record["error"]
    assert "workers.local.sandbox: none" in record["error"]
    doctor = _run(repo, env, "doctor", "--json")
    assert doctor.returncode == 1
    (finding,) = [f for f in json.loads(doctor.stdout)["findings"] if "confine" in f["what"]]
    assert finding["level"] == "error" and "bubblewrap" in finding["fix"] and "sandbox: none" in finding["fix"]

    config = repo / ".taskrun.yaml"
    config.write_text(config.read_text().replace("    sandbox: bwrap\n", "    sandbox: none\n"))
    write_task(repo, "accepted", f"cat {outside}")  # unconfined: it sees the test's files

    assert _run(repo, env, "up", "--once").returncode == 0
    assert (task_record(repo, "accepted") or {})["status"] == "COMPLETED"
    assert _output(repo, "accepted") == "seen from outside\n"
    warning = [f for f in json.loads(_run(repo, env, "doctor", "--json").stdout)["findings"] if "confine" in f["what"]
               or "unconfined" in f["what"]]
    assert [f["level"] for f in warning] == ["warning"]


@pytest.mark.sshd
def test_an_ssh_worker_whose_admin_turned_the_sandbox_off_gets_runs_only_where_accepted(
        repo: Path, tmp_path: Path) -> None:
    _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
    host = start_sshd(tmp_path / "host", public)
    try:
        # The admin's choice, in the forced command: the SSH client cannot change it.
        line = host.authorized_keys.read_text()
        assert " gate --home " in line
        host.authorized_keys.write_text(line.replace(" gate --home ", " gate --sandbox none --home "))
        _add(repo, "w1", host)
        assert taskrun(repo, "worker", "remove", "local").returncode == 0
        outside = tmp_path / "outside.txt"
        outside.write_text("seen from outside\n")
        write_task(repo, "refused", "echo should not run")

        assert taskrun(repo, "up", "--once").returncode == 1
        record = task_record(repo, "refused")
        assert record and record["status"] == "BLOCKED" and not record["runs"]
        assert "turned the sandbox off" in record["error"] and "workers.w1.sandbox: none" in record["error"]

        config = repo / ".taskrun.yaml"
        text = config.read_text()
        assert "w1: {transport: ssh," in text
        config.write_text(text.replace("w1: {transport: ssh,", "w1: {transport: ssh, sandbox: none,"))
        write_task(repo, "accepted", f"cat {outside}")

        assert taskrun(repo, "up", "--once").returncode == 0
        assert _output(repo, "accepted") == "seen from outside\n"
    finally:
        host.stop()
        _kill_leftovers(host.home)


def test_the_demo_runs_on_a_machine_without_bwrap_and_says_its_tasks_run_unconfined(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _path_without_bwrap(tmp_path)}

    result = subprocess.run([sys.executable, "-m", "taskrunner", "demo"], capture_output=True, text=True,
                            timeout=180, env=env, cwd="/")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "No sandbox on this machine" in result.stdout and "sandbox: none" in result.stdout
    assert "hello COMPLETED" in result.stdout and "build COMPLETED" in result.stdout
