"""A Worker account whose login shell prints: `worker add`, `worker check` and the daemon say what arrived
before the hello, that the account's shell startup files printed it, and the fix, which then works."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from taskrunner import keys
from tests.conftest import status_of, taskrun, write_task
from tests.sshd import SshdHost

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

FIX = '[ -z "$PS1" ] && return'


class _LoginHomeHost(SshdHost):
    """An sshd whose login gets HOME=`login_home` (authorized_keys environment=), so a test owns its ~/.bashrc."""

    def __init__(self, root: Path, client_public_line: str) -> None:
        self.login_home = root / "login-home"
        self.login_home.mkdir(parents=True, exist_ok=True)
        super().__init__(root, client_public_line)

    def authorize(self, public_line: str, replace: bool = False) -> str:
        line = f'environment="HOME={self.login_home}",' + super().authorize(public_line, replace)
        text = self.authorized_keys.read_text().splitlines()
        self.authorized_keys.write_text("\n".join(text[:-1] + [line]) + "\n")
        return line

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.config_path, "a") as config:
            config.write("PermitUserEnvironment HOME\n")

    def bashrc(self, text: str) -> None:
        (self.login_home / ".bashrc").write_text(text)


@pytest.fixture
def host(repo: Path, tmp_path: Path) -> Iterator[_LoginHomeHost]:
    _, public = keys.ensure_ssh_key(repo / ".git" / "taskrun")
    started = _LoginHomeHost(tmp_path / "noisy", public).start()
    yield started
    started.stop()


def _add(repo: Path, host: SshdHost) -> tuple[int, str]:
    token = ("--token", host.token) if host.token else ()
    result = taskrun(repo, "worker", "add", "w1", "--host", "127.0.0.1", "--port", str(host.port),
                     "--fingerprint", host.fingerprint, *token, timeout=120)
    return result.returncode, result.stdout + result.stderr


def _says_what_and_where(text: str) -> None:
    assert 'printed "welcome to $HOST' in text, text
    assert "~/.bashrc" in text and "/etc/bash.bashrc" in text and FIX in text
    assert "Expecting value" not in text and "\x1b" not in text


def test_worker_add_and_check_name_the_greeting_and_the_fix_works(repo: Path, host: _LoginHomeHost) -> None:
    host.bashrc("printf 'welcome to $HOST\\033[2J\\n'\n")
    before = (repo / ".taskrun.yaml").read_text()

    code, said = _add(repo, host)

    assert code == 2, said
    _says_what_and_where(said)
    assert (repo / ".taskrun.yaml").read_text() == before

    host.bashrc(f"{FIX}\nprintf 'welcome to $HOST\\n'\n")  # the fix the message gives
    code, said = _add(repo, host)
    assert code == 0, said

    host.bashrc("printf 'welcome to $HOST\\n'\n")
    check = taskrun(repo, "worker", "check", "w1", timeout=120)
    assert check.returncode == 2
    _says_what_and_where(check.stdout + check.stderr)


def test_the_daemon_notice_names_the_greeting(repo: Path, host: _LoginHomeHost) -> None:
    code, said = _add(repo, host)
    assert code == 0, said
    host.bashrc("echo 'welcome to $HOST'\n")
    write_task(repo, "elsewhere", "echo ran")

    result = taskrun(repo, "up", "--once", timeout=120)

    assert status_of(repo, "elsewhere") == "COMPLETED"  # on the local Worker
    notice = [line for line in result.stdout.splitlines() if "Worker 'w1' offline" in line]
    assert notice, result.stdout + result.stderr
    _says_what_and_where("\n".join(notice))
