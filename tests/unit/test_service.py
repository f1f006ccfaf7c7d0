"""`taskrun service install|uninstall`: the systemd unit, and its ExecStart run for real."""

from __future__ import annotations

import argparse
import configparser
import io
import json
import os
import pwd
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from taskrunner.cli import service
from tests.conftest import need_program, taskrun, wait_until

#: The PATH systemd gives a service (systemd.exec, "Environment variables in spawned processes").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(text)
    return unit


@pytest.fixture
def user_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """--user units go under this test's XDG_CONFIG_HOME (for the CLI run as a subprocess too)."""
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    return config / "systemd" / "user"


def test_the_unit_runs_the_daemon_in_the_repository_and_drains_on_sigterm(repo: Path) -> None:
    result = taskrun(repo, "service", "install", "--print")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(service.MARKER + "\n")
    unit = parse(result.stdout)
    run = unit["Service"]
    assert run["WorkingDirectory"] == str(repo)
    argv = shlex.split(run["ExecStart"])
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)
    assert argv[-3:] == ["up", "--log-format", "json"]
    assert (run["Restart"], run["KillSignal"], run["KillMode"]) == ("on-failure", "SIGTERM", "process")
    assert run["TimeoutStopSec"] == str(service.DRAIN_TIMEOUT_SECONDS)
    assert run["User"] == pwd.getpwuid(repo.stat().st_uid).pw_name
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_print_writes_no_file_and_a_user_unit_has_no_user_line(repo: Path, user_units: Path) -> None:
    result = taskrun(repo, "service", "install", "--user", "--print")
    assert result.returncode == 0, result.stderr
    unit = parse(result.stdout)
    assert "User" not in unit["Service"]
    assert unit["Install"]["WantedBy"] == "default.target"
    assert not user_units.exists()


def test_the_unit_holds_no_secret_from_the_environment(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "ghp_" + "Qq9" * 12
    monkeypatch.setenv("TASKRUN_WEBHOOK_SECRET", secret)
    monkeypatch.setenv("GITHUB_TOKEN", secret)
    result = taskrun(repo, "service", "install", "--print")
    assert result.returncode == 0 and secret not in result.stdout


def test_install_writes_the_user_unit_and_says_what_to_run_next(repo: Path, user_units: Path) -> None:
    name = service.unit_name(repo)
    assert name.startswith(f"taskrun-{repo.name}-") and name.endswith(".service")
    result = taskrun(repo, "service", "install", "--user")
    assert result.returncode == 0, result.stderr
    path = user_units / name
    assert parse(path.read_text())["Service"]["WorkingDirectory"] == str(repo)
    for step in ("systemctl --user daemon-reload", f"systemctl --user enable --now {name}",
                 f"journalctl --user -u {name}"):
        assert step in result.stdout
    again = taskrun(repo, "service", "install", "--user")  # its own unit: replaced
    assert again.returncode == 0, again.stderr
    removed = taskrun(repo, "service", "uninstall", "--user")
    assert removed.returncode == 0, removed.stderr
    assert not path.exists()


def test_two_clones_with_one_name_get_two_units(tmp_path: Path) -> None:
    assert service.unit_name(tmp_path / "a" / "repo") != service.unit_name(tmp_path / "b" / "repo")
    assert service.unit_name(tmp_path / "my repo%x").startswith("taskrun-my-repo-x-")


def test_a_unit_it_did_not_write_is_neither_replaced_nor_removed(repo: Path, user_units: Path) -> None:
    path = user_units / service.unit_name(repo)
    path.parent.mkdir(parents=True)
    path.write_text("[Service]\nExecStart=/usr/bin/someone-elses\n")
    result = taskrun(repo, "service", "install", "--user")
    assert result.returncode == 2
    assert "not written by `taskrun service install`" in result.stderr
    assert taskrun(repo, "service", "uninstall", "--user").returncode == 2
    assert path.read_text() == "[Service]\nExecStart=/usr/bin/someone-elses\n"


def test_uninstall_refuses_an_enabled_unit(repo: Path, user_units: Path) -> None:
    assert taskrun(repo, "service", "install", "--user").returncode == 0
    name = service.unit_name(repo)
    wants = user_units / "default.target.wants"
    wants.mkdir()
    (wants / name).symlink_to(user_units / name)
    result = taskrun(repo, "service", "uninstall", "--user")
    assert result.returncode == 2 and f"systemctl --user disable --now {name}" in result.stderr
    assert (user_units / name).exists()


def test_a_path_that_needs_quoting_is_quoted_for_systemd() -> None:
    assert service.quote("/opt/task run/bin/taskrun") == '"/opt/task run/bin/taskrun"'
    assert service.quote("/srv/100%") == "/srv/100%%"
    assert service.quote("/srv/$HOME") == "/srv/$$HOME"
    with pytest.raises(Exception, match="line break"):
        service.quote("/srv/a\nb")


@pytest.mark.parametrize(("name", "reason"), [
    ("repo\\", "backslash"), ("re\\po", "backslash"), ("repo ", "whitespace"), ("repo\t", "control character"),
    ("re\x1bpo", "control character"), ("re\npo", "line break"), ("re\udcffpo", "not UTF-8"),
])
def test_a_repository_path_a_unit_cannot_carry_is_refused(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(service.UsageError, match=f"{reason}.*move or rename it"):
        service.render_unit(tmp_path / name, ["/usr/bin/taskrun"], "build")


def test_install_refuses_a_repository_ending_in_a_backslash_and_writes_nothing(tmp_path: Path,
                                                                                user_units: Path) -> None:
    root = tmp_path / "repo\\"  # in a unit it would join WorkingDirectory= with the ExecStart= line
    root.mkdir()
    subprocess.run(["git", "init", "--quiet", str(root)], check=True)
    for argv in (["--print"], ["--user"]):
        result = taskrun(root, "service", "install", *argv)
        assert result.returncode == 2 and "backslash" in result.stderr, result.stderr
        assert result.stdout == ""
    assert not user_units.exists()


def test_an_executable_path_with_a_backslash_is_escaped_inside_quotes() -> None:
    assert service.quote("/opt/a\\b/taskrun") == '"/opt/a\\\\b/taskrun"'
    with pytest.raises(service.UsageError, match="control character"):
        service.quote("/opt/a\x1bb/taskrun")


def test_install_reports_what_systemd_analyze_refuses(repo: Path, user_units: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    need_program("systemd-analyze", "systemd")
    monkeypatch.setattr(service, "taskrun_argv", lambda: ["/nonexistent/bin/taskrun"])
    out = io.StringIO()
    code = service.cmd_install(argparse.Namespace(repo=str(repo), user=True, print=False),
                               Console(file=out, width=200))
    text = out.getvalue()
    assert code == 1, text
    assert f"systemd-analyze verify {user_units / service.unit_name(repo)} refuses it" in text
    assert "/nonexistent/bin/taskrun" in text and "not executable" in text
    assert "next:" not in text


def test_systemd_analyze_accepts_the_unit(repo: Path, tmp_path: Path) -> None:
    analyze = need_program("systemd-analyze", "systemd")
    result = taskrun(repo, "service", "install", "--print")
    unit = tmp_path / service.unit_name(repo)
    unit.write_text(result.stdout)
    checked = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_the_units_command_serves_and_stops_cleanly_on_sigterm(repo: Path, tmp_path: Path) -> None:
    result = taskrun(repo, "service", "install", "--print")
    run = parse(result.stdout)["Service"]
    log = tmp_path / "journal"
    with open(log, "wb") as out:
        # As systemd would start it: the unit's argv, in its WorkingDirectory, stdout to the journal.
        # systemd's environment: its default PATH, HOME of the User=, and what the unit sets.
        env = {"PATH": SYSTEMD_PATH, "HOME": os.environ.get("HOME", "/root"), "PYTHONUNBUFFERED": "1",
               "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]}  # the test session's local Worker homes
        proc = subprocess.Popen(shlex.split(run["ExecStart"]), cwd=run["WorkingDirectory"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {proc.returncode}:\n{log.read_text()}")
            workers = taskrun(repo, "workers", "--json")
            return workers.returncode == 0 and json.loads(workers.stdout)["daemon"]

        wait_until(answers, 30, "the unit's daemon to answer on its control socket")
        status = taskrun(repo, "status")
        assert status.returncode == 0, status.stderr
        proc.send_signal(getattr(signal, run["KillSignal"]))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events[0] == "daemon_started" and events[-1] == "daemon_stopped"
