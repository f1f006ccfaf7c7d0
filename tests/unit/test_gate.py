"""The gate's decision (what an SSH key may run) and the authorized_keys line `init` prints."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskrunner.enroll import trust_request
from taskrunner.errors import WorkerError
from taskrunner.keys import Keyring
from taskrunner.worker import main as worker_main
from taskrunner.worker.gate import GateCommand, GateRefused, authorized_keys_line, parse_gate_command
from taskrunner.worker.trust import TrustStore, worker_key

ONLY = 'only "taskrun-worker serve", "taskrun-worker status" and "taskrun-worker trust" are allowed'
ED25519 = "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + bytes(32)).decode()


# ---------------------------------------------------------------- allowed


@pytest.mark.parametrize(("original", "expected"), [
    ("taskrun-worker serve", GateCommand("serve")),
    ("serve", GateCommand("serve")),
    ("taskrun-worker serve --name build-1 --slots 4", GateCommand("serve", name="build-1", slots=4)),
    ("serve --slots=2 --name=w.2_x", GateCommand("serve", name="w.2_x", slots=2)),
    ("  taskrun-worker   serve  ", GateCommand("serve")),
    ("'taskrun-worker' 'serve' --name 'w1'", GateCommand("serve", name="w1")),
    ("taskrun-worker status", GateCommand("status")),
    ("status --json", GateCommand("status", json=True)),
    ("taskrun-worker status --json", GateCommand("status", json=True)),
    ("taskrun-worker trust", GateCommand("trust")),
    ("trust", GateCommand("trust")),
    ("'taskrun-worker' trust ", GateCommand("trust")),
])
def test_allowed_commands_parse(original: str, expected: GateCommand) -> None:
    assert parse_gate_command(original) == expected


# ---------------------------------------------------------------- refused


def refusal(original: str | None) -> str:
    with pytest.raises(GateRefused) as caught:
        parse_gate_command(original)
    assert isinstance(caught.value, WorkerError)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("original", [None, "", "   ", "\t\n"])
def test_an_interactive_login_is_refused(original: str | None) -> None:
    assert refusal(original) == f"refused an interactive login: {ONLY}"


@pytest.mark.parametrize("original", [
    "bash", "sh -c id", "id", "taskrun-worker", "taskrun-worker gate", "taskrun-worker gate --home /",
    "taskrun-worker init --key x", "gate", "/usr/lib/openssh/sftp-server", "internal-sftp",
    "/usr/bin/taskrun-worker serve", "python -m taskrunner.worker serve", "taskrun-worker taskrun-worker serve",
    "taskrun-worker SERVE", "scp -t /tmp", "rsync --server . /tmp", "TRUST", "trusted", "taskrun-worker reset",
])
def test_anything_but_serve_status_and_trust_is_refused(original: str) -> None:
    assert refusal(original) == f"refused {_quoted(original)}: {ONLY}"


def test_the_refusal_names_the_command_as_the_client_sent_it() -> None:
    assert refusal("sh -c id") == f'refused "sh -c id": {ONLY}'


@pytest.mark.parametrize("original", [
    "taskrun-worker serve --home /etc", "serve --home=/", "status --json --home /tmp/x", "trust --home /tmp/x",
    "taskrun-worker trust --home=/",
])
def test_a_client_cannot_choose_the_home(original: str) -> None:
    assert refusal(original) == f"refused {_quoted(original)}: --home is set by the gate; a client cannot choose it"


@pytest.mark.parametrize(("original", "option", "subcommand", "allowed"), [
    ("serve --verbose", "--verbose", "serve", "--name N, --slots N"),
    ("serve --help", "--help", "serve", "--name N, --slots N"),
    ("status --all", "--all", "status", "--json"),
    ("status --name x", "--name", "status", "--json"),
    ("serve --json", "--json", "serve", "--name N, --slots N"),
    ("serve --", "--", "serve", "--name N, --slots N"),
    ("trust --reset", "--reset", "trust", "no options"),
    ("taskrun-worker trust --json", "--json", "trust", "no options"),
])
def test_unknown_options_are_refused(original: str, option: str, subcommand: str, allowed: str) -> None:
    assert refusal(original) == (f'refused {_quoted(original)}: unknown option "{option}" '
                                 f'for "taskrun-worker {subcommand}" (allowed: {allowed})')


@pytest.mark.parametrize(("original", "word"), [
    ("taskrun-worker status --json; id", None),
    ("taskrun-worker status && id", "&&"),
    ("taskrun-worker status | sh", "|"),
    ("taskrun-worker status > /tmp/x", ">"),
    ("taskrun-worker status $(id)", "$(id)"),
    ("taskrun-worker status `id`", "`id`"),
    ("serve -x", "-x"),
    ("serve extra", "extra"),
    ("trust /tmp/statement.json", "/tmp/statement.json"),
    ("trust < /tmp/statement.json", "<"),
])
def test_shell_syntax_that_is_not_an_allowed_option_is_refused(original: str, word: str | None) -> None:
    message = refusal(original)
    assert message.startswith(f"refused {_quoted(original)}: ")
    if word is None:  # shlex keeps "--json;" as one word: an unknown option
        assert 'unknown option "--json;"' in message
    else:
        assert f'unexpected argument "{word}" to "taskrun-worker ' in message


@pytest.mark.parametrize("original", ["serve;id", "status;", "serve&", "$(id)"])
def test_metacharacters_glued_to_the_subcommand_are_refused(original: str) -> None:
    assert refusal(original) == f"refused {_quoted(original)}: {ONLY}"


@pytest.mark.parametrize("original", ["serve 'unclosed", 'status "x', "serve \\"])
def test_a_command_line_that_does_not_parse_is_refused(original: str) -> None:
    message = refusal(original)
    assert message.startswith(f"refused {_quoted(original)}: it is not a well-formed command line (")
    assert message.endswith(ONLY)


@pytest.mark.parametrize(("original", "reason"), [
    ("serve --name 'x;id'", "--name must be letters, digits, '.', '_' or '-'"),
    ("serve --name ''", "--name must be letters, digits, '.', '_' or '-'"),
    ("serve --name -x", "--name must be letters, digits, '.', '_' or '-'"),
    ("serve --slots 0", "--slots must be a whole number from 1 to 999999, not \"0\""),
    ("serve --slots -1", "--slots must be a whole number from 1 to 999999"),
    ("serve --slots two", "--slots must be a whole number from 1 to 999999"),
    ("serve --slots 1000000", "--slots must be a whole number from 1 to 999999"),
    ("serve --slots", "--slots needs a value"),
    ("serve --name", "--name needs a value"),
    ("serve --slots 1 --slots 2", "--slots is given more than once"),
    ("status --json --json", "--json is given more than once"),
    ("status --json=yes", "--json takes no value"),
])
def test_bad_option_values_are_refused(original: str, reason: str) -> None:
    assert refusal(original).startswith(f"refused {_quoted(original)}: {reason}")


def test_a_worker_name_longer_than_255_characters_is_refused() -> None:
    assert parse_gate_command("serve --name " + "x" * 255).name == "x" * 255
    assert "--name must be letters, digits, '.', '_' or '-' starting with a letter or digit, at most 255" \
        in refusal("serve --name " + "x" * 256)


def test_a_long_or_multiline_command_is_shown_on_one_short_line() -> None:
    message = refusal("bash\n" + "x" * 1000)
    assert message.startswith('refused "bash\\nxxx')
    assert '..."' in message and len(message) < 400


# ---------------------------------------------------------------- the gate entry point


def test_the_gate_runs_status_in_its_own_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main.gate(tmp_path, "taskrun-worker status --json") == 0
    assert f'"home": "{tmp_path}"' in capsys.readouterr().out


def test_the_gate_refuses_with_one_line_and_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main.gate(tmp_path, "sh -c id") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f'taskrun-worker gate: refused "sh -c id": {ONLY}\n'


def test_the_gate_command_reads_ssh_original_command(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "bash"}
    result = subprocess.run([sys.executable, "-m", "taskrunner.worker", "gate", "--home", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f'taskrun-worker gate: refused "bash": {ONLY}\n'


def _through_gate(home: Path, request: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`taskrun-worker gate` as sshd runs it: the client's request in SSH_ORIGINAL_COMMAND."""
    env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": request}
    return subprocess.run([sys.executable, "-m", "taskrunner.worker", "gate", "--home", str(home)],
                          env=env, input=stdin, capture_output=True, timeout=30)


def _pinned(home: Path, keyring: Keyring) -> None:
    """What the Worker's admin does before enrollment: pin the control plane's key, on the Worker itself."""
    assert worker_main.main(["trust", "--home", str(home), "--reset", "--trust-key", keyring.current.key_id]) == 0


def test_the_gate_takes_an_enrollment_on_stdin_and_answers_with_the_workers_key(tmp_path: Path) -> None:
    home = tmp_path / "worker"
    keyring, _ = Keyring.ensure(tmp_path / "cp", time.time())
    _pinned(home, keyring)
    request = trust_request(keyring, None, time.time())

    result = _through_gate(home, "taskrun-worker trust", json.dumps(request).encode())

    assert result.returncode == 0, result.stderr
    key = worker_key(home)
    assert json.loads(result.stdout) == {"worker_key": key.public_line, "worker_key_id": key.key_id,
                                         "trusted": [keyring.current.key_id]}
    assert [k["key_id"] for k in TrustStore(home).state()["keys"]] == [keyring.current.key_id]


def test_the_gate_refuses_a_replayed_enrollment_with_exit_code_2_and_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "worker"
    keyring, _ = Keyring.ensure(tmp_path / "cp", time.time())
    _pinned(home, keyring)
    request = json.dumps(trust_request(keyring, None, time.time())).encode()
    assert _through_gate(home, "trust", request).returncode == 0
    before = (home / "trust.json").read_bytes()

    result = _through_gate(home, "trust", request)

    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode().startswith("taskrun-worker trust: trust refused: ")
    assert (home / "trust.json").read_bytes() == before


def test_the_gate_never_lets_a_client_reset_the_trust_store(tmp_path: Path) -> None:
    home = tmp_path / "worker"
    keyring, _ = Keyring.ensure(tmp_path / "cp", time.time())
    _pinned(home, keyring)
    assert _through_gate(home, "trust", json.dumps(trust_request(keyring, None, time.time())).encode()).returncode == 0

    result = _through_gate(home, "taskrun-worker trust --reset")

    assert result.returncode == 2
    assert result.stderr.decode() == ('taskrun-worker gate: refused "taskrun-worker trust --reset": unknown option '
                                      '"--reset" for "taskrun-worker trust" (allowed: no options)\n')
    assert [k["key_id"] for k in TrustStore(home).state()["keys"]] == [keyring.current.key_id]


# ---------------------------------------------------------------- init's authorized_keys line


def test_init_prints_a_restricted_forced_command_line() -> None:
    line = authorized_keys_line(ED25519 + " ops@control", "/srv/taskrun", "/usr/local/bin/taskrun-worker")
    assert line == (f'restrict,command="/usr/local/bin/taskrun-worker gate --home /srv/taskrun" '
                    f"{ED25519} ops@control")


def test_init_quotes_a_home_with_spaces_for_the_shell() -> None:
    line = authorized_keys_line(ED25519, "/srv/task run", "/opt/tw/taskrun-worker")
    assert line == f"restrict,command=\"/opt/tw/taskrun-worker gate --home '/srv/task run'\" {ED25519}"


def test_init_defaults_to_its_own_path_and_an_absolute_home(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert worker_main.main(["init", "--key", ED25519, "--home", "w"]) == 0
    line = capsys.readouterr().out.strip()
    command = worker_main.own_path()
    assert Path(command).is_absolute() and Path(command).name == "taskrun-worker"
    assert line == f'restrict,command="{command} gate --home {tmp_path / "w"}" {ED25519}'


@pytest.mark.parametrize(("key", "reason"), [
    ("", "not a public key line"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "not a public key line"),
    (f'from="10.0.0.1" {ED25519}', "not a public key line"),
    (f'command="sh" {ED25519}', "not a public key line"),
    (f"{ED25519} evil\"comment", "not a public key line"),
    (f"{ED25519} it's", "not a public key line"),
    (f"{ED25519}\n{ED25519}", "must be one line"),
    (f"{ED25519}\r", "must be one line"),
    ("ssh-ed25519", "not a public key line"),
    ("ssh-ed25519 AAAA", "base64 data is damaged"),
    ("ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa" + bytes(8)).decode(), 'holds a "ssh-rsa" key'),
])
def test_init_refuses_what_is_not_a_plain_public_key_line(key: str, reason: str) -> None:
    with pytest.raises(WorkerError, match=reason):
        authorized_keys_line(key, "/srv/taskrun", "/usr/local/bin/taskrun-worker")


@pytest.mark.parametrize(("home", "command", "reason"), [
    ("relative", "/usr/bin/taskrun-worker", "the Worker home must be an absolute path"),
    ("/srv/x", "taskrun-worker", "the taskrun-worker command must be an absolute path"),
    ('/srv/"x', "/usr/bin/taskrun-worker", "holds a quote"),
    ("/srv/x", "/usr/bin/it's", "holds a quote"),
    ("/srv/x\nssh-rsa", "/usr/bin/taskrun-worker", "control character"),
])
def test_init_refuses_paths_that_cannot_be_written_into_the_line(home: str, command: str, reason: str) -> None:
    with pytest.raises(WorkerError, match=reason):
        authorized_keys_line(ED25519, home, command)


def test_init_refuses_a_bad_key_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main.main(["init", "--key", "ssh-ed25519 AAAA\nssh-rsa AAAA"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("taskrun-worker init: the public key must be one line")


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
