"""The sandbox of one Run (worker/sandbox.py), the rule that picks confined or unconfined (worker/confine.py),
and an Agent's environment: the argv builder as a pure function, then real bwrap runs."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from taskrunner import scheduler
from taskrunner.cli.render import sandbox_text
from taskrunner.config import parse_config
from taskrunner.config_template import INIT_TEMPLATE
from taskrunner.errors import ConfigError
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.keys import Keyring
from taskrunner.model import Priority, TaskStatus
from taskrunner.worker import serve as serve_module
from taskrunner.worker.confine import (
    write_home_files,
    TURNED_OFF,
    Confinement,
    SandboxRefused,
    allocate_uid,
    decide,
    uid_search_start,
)
from taskrunner.worker.gate import GateRefused, parse_gate_command
from taskrunner.worker.rundir import RunDir
from taskrunner.worker.sandbox import (
    AGENT_UID_BASE,
    AGENT_UID_COUNT,
    HostView,
    Mount,
    RunSandbox,
    SandboxStatus,
    agent_range_clashes,
    agent_range_problem,
    bwrap_argv,
    credentials_problem,
    hand_over,
    hidden_essential_dirs,
    host_view,
    probe,
)
from taskrunner.worker.confine import agent_environment
from tests.signed import ControlPlane
from tests.unit.test_worker_serve import Session, assign, outcome, output_of, reap_orphans_here  # noqa: F401

BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(BWRAP is None and os.environ.get("CI") != "true",
                                 reason="bubblewrap is not installed (apt-get install bubblewrap)")

USR = Mount("/usr", "/usr", source="/usr", essential=True)
BIN = Mount("/bin", "/usr/bin", link="usr/bin", essential=True)
ETC = Mount("/etc", "/etc", source="/etc", essential=True)
OPT = Mount("/opt", "/opt", source="/opt")
TOOLS = Mount("/home/build/.local/bin", "/home/build/.local/bin", source="/home/build/.local/bin")


def host(*mounts: Mount, root: bool = False) -> HostView:
    return HostView(bwrap="/usr/bin/bwrap", chroot="/usr/sbin/chroot", mounts=mounts or (USR, BIN, ETC, OPT),
                    root=root)


RUN = RunSandbox(workspace="/srv/w/runs/r1/workspace", home="/srv/w/runs/r1/home",
                 inputs=("/srv/w/runs/r1/script.sh",), protected=("/srv/w",), status_fd=7)
#: The uid the real sandboxes of these tests run their Agent as, when the test runs as root.
AGENT = AGENT_UID_BASE + 1


def pairs(argv: list[str], option: str, width: int = 2) -> list[tuple[str, ...]]:
    """The arguments after each occurrence of `option` in the bwrap part of `argv`."""
    bwrap = argv[:argv.index("--")]
    return [tuple(bwrap[i + 1:i + 1 + width]) for i, word in enumerate(bwrap) if word == option]


# ---------------------------------------------------------------- the argv, a pure function


def test_the_workspace_and_home_are_read_write_the_inputs_and_the_system_read_only() -> None:
    argv = bwrap_argv(host(), RUN, ["bash", "-euo", "pipefail", "/srv/w/runs/r1/script.sh"])

    assert argv[0] == "/usr/bin/bwrap"
    assert pairs(argv, "--bind") == [(RUN.workspace, RUN.workspace), (RUN.home, RUN.home)]
    assert pairs(argv, "--ro-bind") == [("/usr", "/usr"), ("/etc", "/etc"), ("/opt", "/opt"),
                                        ("/srv/w/runs/r1/script.sh", "/srv/w/runs/r1/script.sh")]
    assert pairs(argv, "--symlink") == [("usr/bin", "/bin")]
    assert pairs(argv, "--chdir", 1) == [(RUN.workspace,)]
    assert argv[argv.index("--"):] == ["--", "bash", "-euo", "pipefail", "/srv/w/runs/r1/script.sh"]


def test_fresh_dev_proc_and_tmp_and_new_pid_ipc_uts_namespaces_but_the_network_is_kept() -> None:
    argv = bwrap_argv(host(), RUN, ["true"])
    bwrap = argv[:argv.index("--")]

    assert {"--unshare-pid", "--unshare-ipc", "--unshare-uts"} <= set(bwrap)
    assert pairs(argv, "--dev", 1) == [("/dev",)] and pairs(argv, "--proc", 1) == [("/proc",)]
    assert pairs(argv, "--tmpfs", 1) == [("/tmp",)]
    # Agents call model APIs; they outlive the session; their pid 1 stays in the Run's process group.
    assert not {"--unshare-net", "--unshare-all", "--die-with-parent", "--new-session"} & set(bwrap)


def test_bwrap_writes_the_exit_status_to_the_fd_it_is_given() -> None:
    assert pairs(bwrap_argv(host(), RUN, ["true"]), "--json-status-fd", 1) == [("7",)]
    no_fd = RunSandbox(RUN.workspace, RUN.home)
    assert "--json-status-fd" not in bwrap_argv(host(), no_fd, ["true"])


@pytest.mark.parametrize(("protected", "left_out"), [
    ("/opt", "/opt"),  # is it
    ("/opt/taskrun-worker", "/opt"),  # lies inside it: the whole of /opt goes
    ("/home/build", "/home/build/.local/bin"),  # contains it
])
def test_a_read_only_candidate_that_is_contains_or_lies_inside_a_protected_path_is_left_out(
        protected: str, left_out: str) -> None:
    run = RunSandbox(RUN.workspace, RUN.home, protected=(protected,))
    argv = bwrap_argv(host(USR, BIN, ETC, OPT, TOOLS), run, ["true"])
    shown = [dest for _, dest in pairs(argv, "--ro-bind")]
    assert left_out not in shown
    assert "/usr" in shown and "/etc" in shown


def test_a_protected_path_beside_a_candidate_takes_nothing_away() -> None:
    run = RunSandbox(RUN.workspace, RUN.home, protected=("/home/build/.local/bin-other", "/optional"))
    shown = [dest for _, dest in pairs(bwrap_argv(host(USR, BIN, ETC, OPT, TOOLS), run, ["true"]), "--ro-bind")]
    assert shown == ["/usr", "/etc", "/opt", "/home/build/.local/bin"]


def test_only_essential_directories_that_a_protected_path_takes_away_leave_no_sandbox() -> None:
    view = host(USR, BIN, ETC, OPT)
    assert hidden_essential_dirs(view, ["/opt/worker"]) == []
    assert hidden_essential_dirs(view, ["/usr/local/worker"]) == ["/usr"]


def test_a_root_worker_runs_the_agent_as_its_own_uid_through_chroot_in_traversable_directories() -> None:
    view = host(USR, BIN, ETC, Mount("/root/.pyenv/versions/3.11", "/root/.pyenv/versions/3.11",
                                     source="/root/.pyenv/versions/3.11"), root=True)
    with pytest.raises(ValueError, match="needs a uid of its own"):
        bwrap_argv(view, RUN, ["bash", "x"])
    argv = bwrap_argv(view, dataclasses.replace(RUN, uid=AGENT_UID_BASE + 7), ["bash", "x"])

    end = argv.index("--")
    uid = AGENT_UID_BASE + 7
    assert argv[end + 1:] == ["/usr/sbin/chroot", f"--userspec={uid}:{uid}", "--groups=", "--skip-chdir", "/",
                              "bash", "x"]
    assert argv[argv.index("--tmpfs") - 2:argv.index("--tmpfs") + 2] == ["--perms", "01777", "--tmpfs", "/tmp"]
    made = [argv[i + 1] for i, word in enumerate(argv[:end]) if word == "--dir"]
    # Those of the host's mounts (the same for every Run), then those of the Run's own paths.
    assert made == ["/root", "/root/.pyenv", "/root/.pyenv/versions", "/srv", "/srv/w", "/srv/w/runs",
                    "/srv/w/runs/r1"]
    assert all(argv[i - 2:i] == ["--perms", "0755"] for i, word in enumerate(argv[:end]) if word == "--dir")
    # Each directory is made before anything is mounted in or below it.
    for i, word in enumerate(argv[:end]):
        if word == "--dir":
            binds = [j for j, w in enumerate(argv[:end]) if w in ("--bind", "--ro-bind")
                     and (argv[j + 2] + "/").startswith(argv[i + 1] + "/")]
            assert binds and min(binds) > i


def test_the_part_of_the_argv_every_run_shares_is_worked_out_once_and_each_run_adds_its_own() -> None:
    view = host(USR, BIN, ETC, Mount("/root/.pyenv/versions/3.11", "/root/.pyenv/versions/3.11",
                                     source="/root/.pyenv/versions/3.11"), root=True)
    runs = [RunSandbox(f"/srv/w/runs/r{n}/workspace", f"/srv/w/runs/r{n}/home", (f"/srv/w/runs/r{n}/script.sh",),
                       protected=("/srv/w",), status_fd=7, uid=AGENT_UID_BASE + n) for n in (1, 2)]
    first, second = (bwrap_argv(view, run, ["true"]) for run in runs)

    # Everything up to the Run's own directories is the same words, from one cached prefix.
    start = first.index("/srv")  # the first directory of the Run's own paths
    assert first[:start] == second[:start] and "r1" not in " ".join(first[:start])
    assert [d for (d,) in pairs(second, "--dir", 1) if d.startswith("/srv")] == \
        ["/srv", "/srv/w", "/srv/w/runs", "/srv/w/runs/r2"]
    assert not any("r1" in word for word in second)
    assert pairs(second, "--bind")[0] == ("/srv/w/runs/r2/workspace", "/srv/w/runs/r2/workspace")


def test_shared_paths_are_bound_read_only_after_the_runs_own_and_a_root_worker_makes_their_way() -> None:
    shared = "/srv/w/cache/repo/objects"
    run = dataclasses.replace(RUN, uid=AGENT_UID_BASE + 1, shared=(shared,))
    argv = bwrap_argv(host(root=True), run, ["true"])
    assert pairs(argv, "--ro-bind")[-2:] == [(RUN.inputs[0], RUN.inputs[0]), (shared, shared)]
    assert (shared, shared) not in pairs(argv, "--bind")
    made = [d for (d,) in pairs(argv, "--dir", 1)]
    assert {"/srv/w/cache", "/srv/w/cache/repo"} <= set(made) and len(made) == len(set(made))


def test_agents_uids_lie_in_a_range_no_account_of_this_host_uses() -> None:
    # Above systemd's container ranges, below its foreign-UID range, far from nobody (65534).
    assert 0x6FFFFFFF < AGENT_UID_BASE and AGENT_UID_BASE + AGENT_UID_COUNT <= 0x7FFE0000
    assert agent_range_problem() is None
    assert not any(AGENT_UID_BASE <= p.pw_uid < AGENT_UID_BASE + AGENT_UID_COUNT for p in pwd.getpwall())
    clashes = agent_range_clashes([("user nobody", 65534), ("user squatter", AGENT_UID_BASE + 3),
                                   ("group g", AGENT_UID_BASE + AGENT_UID_COUNT)],
                                  [("/etc/subuid entry of alice", 100000, 65536),
                                   ("/etc/subuid entry of bob", AGENT_UID_BASE - 10, 11)])
    assert clashes == [f"user squatter ({AGENT_UID_BASE + 3})",
                       f"/etc/subuid entry of bob ({AGENT_UID_BASE - 10}-{AGENT_UID_BASE})"]


def test_a_root_worker_on_a_host_whose_accounts_use_the_agents_range_confines_nothing_and_says_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("taskrunner.worker.sandbox.agent_range_problem",
                        lambda: "this host uses the uids its Agents run as: user squatter (2113929219)")
    status = probe(HostView("/nonexistent/bwrap-for-the-range-test", "/usr/sbin/chroot", (USR, BIN, ETC), True))
    assert status.kind is None and "user squatter" in (status.reason or "")


def test_each_run_held_gets_a_uid_of_its_own_recorded_in_its_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runs = [RunDir.at(home, f"r{i}") for i in range(4)]
    for run in runs:
        run.path.mkdir(parents=True)
    uids = [allocate_uid(home, run) for run in runs]
    assert len(set(uids)) == len(uids)
    assert all(AGENT_UID_BASE <= uid < AGENT_UID_BASE + AGENT_UID_COUNT for uid in uids)
    assert [os.readlink(home / "agent_uids" / str(uid)) for uid in uids] == ["r0", "r1", "r2", "r3"]
    assert [run.agent_uid() for run in runs] == [None] * 4  # the claim is the record: one link per Run
    # The search starts at a number derived from the run id; a Run asking again keeps its uid.
    assert allocate_uid(home, runs[0]) == uids[0]
    # Each uid in use is claimed by a link naming its Run. One whose Run is still held is skipped; one
    # whose Run is gone (acknowledged, its directory removed) is taken over.
    claims = home / "agent_uids"
    assert {os.readlink(claims / str(uid)) for uid in uids} == {"r0", "r1", "r2", "r3"}
    late = RunDir.at(home, "late")
    late.path.mkdir()
    start = uid_search_start("late")
    (claims / str(start)).unlink(missing_ok=True)
    (claims / str(start)).symlink_to("r1")  # held
    (claims / str(start + 1 if start + 1 < AGENT_UID_BASE + AGENT_UID_COUNT else AGENT_UID_BASE)).unlink(
        missing_ok=True)
    assert allocate_uid(home, late) not in {start, *uids}
    gone = RunDir.at(home, "gone")
    gone.path.mkdir()
    start = uid_search_start("gone")
    shutil.rmtree(late.path)
    (claims / str(start)).unlink(missing_ok=True)
    (claims / str(start)).symlink_to("late")  # no longer held
    assert allocate_uid(home, gone) == start and os.readlink(claims / str(start)) == "gone"


def test_claims_are_made_from_the_uids_held_runs_record_when_a_worker_first_needs_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    held = RunDir.at(home, "held")
    held.path.mkdir(parents=True)
    held.write_agent_uid(uid_search_start("new"))  # recorded before claims existed
    new = RunDir.at(home, "new")
    new.path.mkdir()
    assert allocate_uid(home, new) != uid_search_start("new")
    assert os.readlink(home / "agent_uids" / str(uid_search_start("new"))) == "held"


def test_two_sessions_allocating_at_once_never_give_two_held_runs_one_uid(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "runs").mkdir(parents=True)
    # 200 Runs in a range cut down to 256 uids: the two processes contend for most of them.
    script = ("import sys\nfrom pathlib import Path\nfrom taskrunner.worker import confine\n"
              "from taskrunner.worker.confine import allocate_uid\nconfine.AGENT_UID_COUNT = 256\n"
              "from taskrunner.worker.rundir import RunDir\nhome = Path(sys.argv[1])\n"
              "for n in range(100):\n    run = RunDir.at(home, f'{sys.argv[2]}-{n}')\n    run.path.mkdir()\n"
              "    allocate_uid(home, run)\n")
    sessions = [subprocess.Popen([sys.executable, "-c", script, str(home), name]) for name in ("a", "b")]
    assert [session.wait(timeout=60) for session in sessions] == [0, 0]
    owners = {os.readlink(link): int(link.name) for link in (home / "agent_uids").iterdir()}
    uids = [owners.get(path.name) for path in (home / "runs").iterdir()]
    assert len(uids) == 200 and None not in uids and len(set(uids)) == 200
    assert all(AGENT_UID_BASE <= uid < AGENT_UID_BASE + 256 for uid in uids)  # type: ignore[operator]


def test_without_bwrap_or_for_a_root_worker_without_chroot_there_is_no_argv() -> None:
    with pytest.raises(ValueError, match="bwrap"):
        bwrap_argv(HostView(None, "/usr/sbin/chroot", (USR,), False), RUN, ["true"])
    with pytest.raises(ValueError, match="chroot"):
        bwrap_argv(HostView("/usr/bin/bwrap", None, (USR,), True), dataclasses.replace(RUN, uid=AGENT), ["true"])


# ---------------------------------------------------------------- the host's view


def test_path_directories_are_shown_resolved_once_and_relative_or_missing_ones_never(tmp_path: Path) -> None:
    tools, inner, real = tmp_path / "tools", tmp_path / "tools" / "bin", tmp_path / "real"
    inner.mkdir(parents=True)
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    path = os.pathsep.join(["relative/bin", str(tmp_path / "missing"), str(inner), str(tools),
                            str(tmp_path / "link"), "/usr/bin"])

    view = host_view(path=path, prefixes=())

    extra = [m for m in view.mounts if m.dest not in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                                                      "/libx32", "/etc", "/opt")]
    assert [(m.dest, m.source) for m in extra if m.dest.startswith(str(tmp_path))] == \
        [(str(tools), str(tools)), (str(real), str(real))]


# ---------------------------------------------------------------- the probe, and real sandboxes


@needs_bwrap
def test_the_probe_finds_a_working_bwrap_once_per_process() -> None:
    view = host_view()
    status = probe(view, ["/nonexistent/worker-home"])
    assert status.kind == "bwrap" and status.version and status.reason is None
    last = AGENT_UID_BASE + AGENT_UID_COUNT - 1
    assert status.uids == ((AGENT_UID_BASE, last) if os.geteuid() == 0 else None)
    assert status.hello() == {"kind": "bwrap", "version": status.version,
                              **({"uids": [AGENT_UID_BASE, last]} if os.geteuid() == 0 else {})}
    assert probe(view, ["/nonexistent/worker-home"]) is status


def test_the_probe_says_why_there_is_no_sandbox_and_how_to_fix_it(tmp_path: Path) -> None:
    missing = probe(HostView(None, "/usr/sbin/chroot", (USR,), False))
    assert missing.kind is None and "bwrap is not on the Worker's PATH" in (missing.reason or "")
    assert "apt-get install bubblewrap" in (missing.reason or "")

    inside_usr = probe(host_view(), ["/usr/local/taskrun-worker"])
    assert inside_usr.kind is None and "/usr" in (inside_usr.reason or "") and "move it" in (inside_usr.reason or "")

    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    broken.chmod(0o755)
    view = host_view()
    refused = probe(HostView(str(broken), view.chroot, view.mounts, view.root))
    assert refused.kind is None and "No permissions to create new namespace" in (refused.reason or "")
    assert refused.hello() == {"kind": None, "reason": refused.reason}


@pytest.fixture()
def run_dir() -> Iterator[Path]:
    """A Run directory anyone may pass through (tmp_path is root's alone), as on a Worker."""
    top = Path(tempfile.mkdtemp(prefix="taskrun-sandbox-test-"))
    os.chmod(top, 0o755)
    path = top / "runs" / "r1"
    (path / "workspace").mkdir(parents=True, mode=0o700)
    (path / "home").mkdir(mode=0o700)
    yield path
    shutil.rmtree(top)


def _confined(run_dir: Path, script: str, view: HostView, status_fd: int | None = None) -> list[str]:
    (run_dir / "script.sh").write_text(script)
    (run_dir / "script.sh").chmod(0o600)
    paths = [str(run_dir / "workspace"), str(run_dir / "home"), str(run_dir / "script.sh")]
    if os.geteuid() == 0:  # the Agent runs as AGENT: as a root Worker's, or as the unprivileged Worker
        hand_over(paths, AGENT, AGENT)
    sandbox = RunSandbox(paths[0], paths[1], (paths[2],), protected=(str(run_dir.parent.parent),),
                         status_fd=status_fd, uid=AGENT if view.root else None)
    return bwrap_argv(view, sandbox, ["bash", "-eu", paths[2]])


@needs_bwrap
def test_bwrap_leaves_the_exit_status_where_the_agent_cannot_reach_it(run_dir: Path) -> None:
    (run_dir / "secret.txt").write_text("the Run's own files\n")
    status = os.open(run_dir / "exit_status", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    argv = _confined(run_dir, 'echo "{\\"exit-code\\": 0}" > ../exit_status 2>/dev/null || true\n'
                              "cat ../secret.txt 2>/dev/null && echo LEAK\n"
                              'ls -A .. | tr "\\n" " "; echo\nexit 7\n', host_view(), status)
    try:
        done = subprocess.run(argv, pass_fds=(status,), capture_output=True, text=True, timeout=30,
                              cwd=run_dir / "workspace", start_new_session=True)
    finally:
        os.close(status)

    assert done.returncode == 7
    assert "LEAK" not in done.stdout
    assert done.stdout.split() == ["home", "script.sh", "workspace"]
    assert RunDir(run_dir).exit_code() == 7


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                    reason="as root only: it drops to an unprivileged user to try that mode")
def test_an_unprivileged_worker_makes_the_same_sandbox_in_a_user_namespace(run_dir: Path) -> None:
    # What a Worker running as an ordinary user runs: no uid switch, bwrap without privileges.
    view = host_view(path="/usr/bin:/bin", prefixes=())
    view = HostView(view.bwrap, None, view.mounts, root=False)
    hand_over([str(run_dir.parent.parent)], AGENT, AGENT)
    argv = _confined(run_dir, "id -u\ntouch made-here\nhead -c1 /etc/shadow 2>/dev/null && echo LEAK\n"
                              "touch ../escape 2>/dev/null; ls /proc | grep -c '^[0-9]'\n"
                              "cat /proc/self/status > status.txt\n", view)
    done = subprocess.run(["setpriv", f"--reuid={AGENT}", f"--regid={AGENT}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30, cwd="/", start_new_session=True)

    assert done.returncode == 0, done.stderr
    uid, processes = done.stdout.split()
    assert uid == str(AGENT) and int(processes) < 5
    assert (run_dir / "workspace" / "made-here").exists()
    assert not (run_dir / "escape").exists()
    # No capability left, not even in its own user namespace, and no_new_privs (the probe checks the same).
    assert credentials_problem((run_dir / "workspace" / "status.txt").read_text(), None) is None


# ---------------------------------------------------------------- confined or unconfined: the rule


BWRAP_OK = SandboxStatus("bwrap", version="0.8.0")
NO_BWRAP = SandboxStatus(None, reason="bwrap is not on the Worker's PATH: install bubblewrap on the Worker")
ADMIN_OFF = SandboxStatus(None, reason=TURNED_OFF)


@pytest.mark.parametrize(("status", "accepted"), [(BWRAP_OK, None), (BWRAP_OK, "bwrap"), (BWRAP_OK, "none")])
def test_a_worker_that_can_confine_always_confines_even_where_none_is_accepted(
        status: SandboxStatus, accepted: str | None) -> None:
    assert decide(status, {"sandbox": accepted} if accepted else {}, "w1") is True


@pytest.mark.parametrize("status", [NO_BWRAP, ADMIN_OFF])
def test_unconfined_only_when_the_signed_settings_accept_it(status: SandboxStatus) -> None:
    assert decide(status, {"sandbox": "none"}, "w1") is False
    for agent in ({}, {"sandbox": "bwrap"}, {"sandbox": "None"}):
        with pytest.raises(SandboxRefused) as refused:
            decide(status, agent, "w1")
        assert "workers.w1.sandbox: none" in str(refused.value) and (status.reason or "") in str(refused.value)
    fix = "drop --sandbox none" if status is ADMIN_OFF else "apt-get install bubblewrap"
    with pytest.raises(SandboxRefused, match=fix):
        decide(status, {}, "w1")


def test_an_unknown_sandbox_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="--sandbox must be one of bwrap, none"):
        Confinement(tmp_path, "off")


# ---------------------------------------------------------------- the Agent's environment


def test_an_agent_gets_path_locale_its_home_and_the_run_ids_and_nothing_else_of_the_worker(tmp_path: Path) -> None:
    worker = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC", "HOME": "/root",
              "ANTHROPIC_API_KEY": "sk-worker", "SSH_AUTH_SOCK": "/tmp/agent.sock", "SSH_CLIENT": "10.0.0.1 1 22",
              "TASKRUN_WORKER_HOME": "/srv/w", "USER": "root", "PYTHONPATH": "/opt/x"}

    env = agent_environment("r1", "t", tmp_path / "ws", tmp_path / "home", worker)

    assert env == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
                   "HOME": str(tmp_path / "home"), "TASKRUN_RUN_ID": "r1", "TASKRUN_TASK_ID": "t",
                   "TASKRUN_WORKSPACE": str(tmp_path / "ws")}
    assert agent_environment("r1", "t", tmp_path, tmp_path, {})["PATH"] == "/usr/local/bin:/usr/bin:/bin"


# ---------------------------------------------------------------- the Worker refuses, whatever it was sent


@pytest.fixture()
def unconfined_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Session]]:
    """Sessions of a Worker whose admin said `--sandbox none`, enrolled with a control plane."""
    from tests.signed import enroll

    home = tmp_path / "worker-home"
    monkeypatch.setattr(serve_module, "Confinement", lambda home: Confinement(home, "none"))
    opened: list[Session] = []
    plane = enroll(home, tmp_path / "cp")

    def open_session() -> Session:
        session = Session(home)
        session.authenticate(plane)
        session.plane = plane  # type: ignore[attr-defined]
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()


def _agent(sandbox: str | None) -> dict[str, Any]:
    agent: dict[str, Any] = {"name": "shell", "preset": "shell", "command": [], "env": []}
    if sandbox is not None:
        agent["sandbox"] = sandbox
    return agent


def test_a_worker_that_cannot_confine_fails_a_run_its_control_plane_did_not_accept_unconfined(
        unconfined_worker: Callable[[], Session]) -> None:
    session = unconfined_worker()
    plane: ControlPlane = session.plane  # type: ignore[attr-defined]
    assert session.history[0]["sandbox"] == {"kind": None, "reason": TURNED_OFF}

    assign(session, plane, "run-refused", "echo should not run", agent=_agent("bwrap"))
    messages = session.until("result", "run-refused")
    result = outcome(session, messages[-1])
    assert result["status"] == "FAILED" and "workers.w1.sandbox: none" in result["error"]
    assert [m for m in messages if m.type == "started"] == []

    assign(session, plane, "run-accepted", "echo ran unconfined", agent=_agent("none"))
    messages = session.until("result", "run-accepted")
    assert outcome(session, messages[-1])["status"] == "COMPLETED"
    assert output_of(messages, "run-accepted") == b"ran unconfined\n"


# ---------------------------------------------------------------- the control plane's side


def _worker_state(tmp_path: Path, sandbox: str, said: dict[str, Any] | None) -> tuple[Fleet, WorkerState]:
    config = parse_config(f"workers: {{local: {{transport: local, sandbox: {sandbox}}}}}\n", ".taskrun.yaml")
    keyring, _ = Keyring.ensure(tmp_path / "cp", 0.0)
    fleet = Fleet(config, tmp_path, lambda event: None, keyring)
    worker = fleet["local"]
    worker.reconnect_at = None
    worker.online = True
    worker.hello = {"agents": ["shell"], **({"sandbox": said} if said is not None else {})}
    return fleet, worker


def test_workers_sandbox_is_bwrap_unless_configured_none_and_nothing_else_is_taken() -> None:
    assert parse_config("workers: {local: {transport: local}}\n", "f").workers["local"].sandbox == "bwrap"
    assert parse_config("workers: {local: {transport: local, sandbox: none}}\n", "f").workers["local"].sandbox == "none"
    with pytest.raises(ConfigError, match=r"key 'workers.local.sandbox': expected one of bwrap, none"):
        parse_config("workers: {local: {transport: local, sandbox: firejail}}\n", "f")
    assert parse_config(INIT_TEMPLATE, "f").workers["local"].sandbox == "bwrap"


@pytest.mark.parametrize("said", [{"kind": None, "reason": "bwrap is not on the Worker's PATH"}, None])
def test_no_runs_go_to_a_worker_that_cannot_confine_unless_the_configuration_accepts_it(
        tmp_path: Path, said: dict[str, Any] | None) -> None:
    fleet, worker = _worker_state(tmp_path, "bwrap", said)
    (view,) = fleet.views()
    assert view.online is False and view.note and "workers.local.sandbox: none" in view.note
    assert "cannot confine Agents" in (worker.view()["error"] or "")
    expected = said["reason"] if said else "does not confine Agents (upgrade it)"
    assert expected in view.note
    # The scheduler says why a Task waits: that Worker's note, not just "busy or offline".
    task = scheduler.TaskView(id="t", status=TaskStatus.PENDING, priority=Priority.NORMAL, seq=1, agent="shell")
    plan = scheduler.plan([task], fleet.views(), {}, 0.0)
    assert not plan.assignments and "cannot confine Agents" in plan.waiting["t"]

    accepting, _ = _worker_state(tmp_path / "accepting", "none", said)
    assert accepting.views()[0].online is True and accepting.views()[0].note is None


def test_a_worker_that_confines_gets_runs_and_taskrun_workers_shows_its_sandbox(tmp_path: Path) -> None:
    fleet, worker = _worker_state(tmp_path, "bwrap", {"kind": "bwrap", "version": "0.8.0"})
    (view,) = fleet.views()
    assert view.online is True and view.note is None
    shown = worker.view()
    assert shown["sandbox"] == {"kind": "bwrap", "version": "0.8.0"} and shown["error"] is None
    assert sandbox_text(shown) == "bwrap 0.8.0"
    assert sandbox_text({"sandbox": {"kind": None, "reason": "x"}, "sandbox_accepted": "none"}) == "none, accepted"
    assert sandbox_text({"sandbox": None, "sandbox_accepted": "bwrap"}) == "-"


def test_the_ssh_client_cannot_choose_how_agents_run_only_the_workers_admin_can() -> None:
    with pytest.raises(GateRefused, match="unknown option"):
        parse_gate_command("taskrun-worker serve --sandbox none")
    with pytest.raises(GateRefused):
        parse_gate_command("taskrun-worker serve --protect /")


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="about Workers running as root")
def test_why_a_root_worker_switches_uid_inside_bwraps_own_uid_keeps_root_on_disk_and_bwrap_as_the_agent_sees_nothing(
        run_dir: Path) -> None:
    # `--unshare-user --uid 65534` maps the inner uid back to 0 outside: the Agent would still own
    # (and read) every root-owned file. chroot --userspec switches the real uid, after the mounts.
    view = host_view(path="/usr/bin:/bin", prefixes=())
    workspace = str(run_dir / "workspace")
    common = [view.bwrap or "bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib",
              "/lib", "--symlink", "usr/lib64", "/lib64", "--bind", workspace, workspace, "--chdir", workspace]
    subprocess.run([*common, "--unshare-user", "--uid", "65534", "--gid", "65534", "--", "touch", "mapped"],
                   check=True, timeout=30)
    os.chmod(workspace, 0o777)
    subprocess.run([*common, "--", "/usr/sbin/chroot", "--userspec=65534:65534", "--groups=", "--skip-chdir", "/",
                    "touch", "switched"], check=True, timeout=30)
    assert (run_dir / "workspace" / "mapped").stat().st_uid == 0
    assert (run_dir / "workspace" / "switched").stat().st_uid == 65534
    # bwrap started as the Agent's uid (no exec inside) cannot bind what only root may enter: the
    # Worker home (here: the 0700 directory above the Run), even handed an open fd of it.
    os.chmod(run_dir.parent.parent, 0o700)
    fd = os.open(workspace, os.O_PATH)
    try:
        denied = subprocess.run([*common[:-5], "--bind-fd", str(fd), workspace, "--", "true"], check=False,
                                pass_fds=(fd,),
                                user=AGENT, group=AGENT, extra_groups=[], capture_output=True, text=True, timeout=30)
    finally:
        os.close(fd)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


@needs_bwrap
def test_the_agent_has_no_capability_no_new_privileges_and_on_a_root_worker_only_its_own_uid(run_dir: Path) -> None:
    view = host_view()
    argv = _confined(run_dir, "cat /proc/self/status\n", view)
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30,
                          cwd=run_dir / "workspace", start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert credentials_problem(done.stdout, AGENT if view.root else None) is None
    if view.root:
        assert f"Uid:\t{AGENT}\t{AGENT}\t{AGENT}\t{AGENT}" in done.stdout


def test_credentials_that_keep_a_privilege_are_named() -> None:
    good = ("Uid:\t7\t7\t7\t7\nGid:\t7\t7\t7\t7\nGroups:\t\nCapPrm:\t0000000000000000\n"
            "CapEff:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n")
    assert credentials_problem(good, 7) is None
    assert credentials_problem(good, 8) == "Uid 7 7 7 7, Gid 7 7 7 7"
    assert credentials_problem(good.replace("Groups:\t", "Groups:\t0 27"), 7) == "Groups 0 27"
    assert credentials_problem(good.replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff"), None) == \
        "CapEff 000001ffffffffff"
    assert credentials_problem(good.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0"), None) == "NoNewPrivs 0"
    assert credentials_problem("", None) == "CapEff missing, CapPrm missing, CapAmb missing, NoNewPrivs missing"


def test_home_files_are_written_into_the_fresh_home_and_only_beneath_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    write_home_files(home, {"tmp/": "", ".gemini/settings.json": "{}\n"})
    assert (home / "tmp").is_dir() and (home / ".gemini" / "settings.json").read_text() == "{}\n"
    assert (home / ".gemini" / "settings.json").stat().st_mode & 0o777 == 0o600
    for bad in ("../escape", "/etc/x", "a/../../b"):
        with pytest.raises(ValueError, match="inside the Agent's HOME"):
            write_home_files(home, {bad: "x"})
    assert not (tmp_path / "escape").exists()
