"""Configuration text is bounded: .taskrun.yaml, the files it names, and text edited by `taskrun worker add`.

A config file of a few megabytes of YAML comment cost the daemon seconds of
CPU per megabyte to load, and a reload blocked its event thread. Over
MAX_CONFIG_FILE_BYTES it is refused by its size: never read whole, never
parsed, and a reload keeps the configuration in force.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from taskrunner import config as config_module
from taskrunner.config import SecurityConfig, default_config, load_config, parse_config, read_config_file
from taskrunner.config_agents import MAX_TEMPLATE_BYTES
from taskrunner.config_edit import remove_worker, set_worker
from taskrunner.defaults import CONFIG_FILE, MAX_CONFIG_FILE_BYTES, MAX_KNOWN_HOSTS_BYTES
from taskrunner.errors import ConfigError
from taskrunner.gitflow import signers
from taskrunner.safefs import Beneath
from taskrunner.sshkeys import HostKeyError, pinned_keys

HEADER = b"default_agent: shell\n"


def padded(size: int) -> bytes:
    """A valid configuration of exactly `size` bytes: a setting, then one long comment."""
    return HEADER + b"#" + b"x" * (size - len(HEADER) - 2) + b"\n"


@pytest.fixture()
def unread(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fails the test if a file is read whole or YAML parsed; the sizes asked of os.read, for the test to check."""
    asked: list[int] = []
    real_read = os.read

    def counting(fd: int, size: int) -> bytes:
        asked.append(size)
        return real_read(fd, size)

    def whole(*_: Any) -> bytes:
        raise AssertionError("the file was read whole")

    def parsed(*_: Any) -> Any:
        raise AssertionError("the text was parsed as YAML")

    monkeypatch.setattr(os, "read", counting)
    monkeypatch.setattr(Beneath, "read_bytes", whole)
    monkeypatch.setattr(config_module, "load_yaml", parsed)
    return asked


def _says_limit(message: str, size: int, limit: str = "1 MiB") -> None:
    assert f"({size} bytes)" in message and f"over the {limit} limit" in message, message
    assert "shorten" in message, message


@pytest.mark.parametrize("size", [MAX_CONFIG_FILE_BYTES + 1, 8 * 1024 * 1024 + 12345])
def test_a_configuration_over_the_limit_is_refused_by_its_size_unread_and_unparsed(
        tmp_path: Path, unread: list[int], size: int) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(padded(size))
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / CONFIG_FILE}: ")
    _says_limit(str(raised.value), size)
    assert sum(unread) == 0  # its size alone refused it


def test_a_sparse_giant_configuration_is_refused_without_being_read(tmp_path: Path, unread: list[int]) -> None:
    with open(tmp_path / CONFIG_FILE, "wb") as handle:
        handle.truncate(1 << 34)
    with pytest.raises(ConfigError, match=r"is 16 GiB \(17179869184 bytes\), over the 1 MiB limit"):
        load_config(tmp_path)
    assert sum(unread) == 0


def test_a_configuration_of_exactly_the_limit_is_read_with_one_byte_to_spare(tmp_path: Path,
                                                                             unread: list[int]) -> None:
    data = padded(MAX_CONFIG_FILE_BYTES)
    (tmp_path / CONFIG_FILE).write_bytes(data)
    assert read_config_file(tmp_path) == data
    assert max(unread) <= MAX_CONFIG_FILE_BYTES + 1


def test_a_missing_configuration_is_still_the_embedded_default(tmp_path: Path) -> None:
    assert read_config_file(tmp_path) is None
    assert load_config(tmp_path) == default_config()


@pytest.mark.parametrize("text", ["#" * (MAX_CONFIG_FILE_BYTES + 1),
                                  "# " + "é" * (MAX_CONFIG_FILE_BYTES // 2)],  # fewer characters than bytes
                         ids=["ascii", "two-byte characters"])
def test_configuration_text_over_the_limit_is_refused_before_yaml_parses_it(unread: list[int], text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "given.yaml")
    _says_limit(str(raised.value), len(text.encode()))
    assert str(raised.value).startswith("given.yaml: ")


def test_a_worker_edit_refuses_a_configuration_over_the_limit(unread: list[int]) -> None:
    text = "workers:\n  local: {transport: local}\n" + "#" * MAX_CONFIG_FILE_BYTES + "\n"
    with pytest.raises(ConfigError, match="over the 1 MiB limit for configuration files"):
        set_worker(text, CONFIG_FILE, "b", {"transport": "local"}, default_config())
    with pytest.raises(ConfigError, match="over the 1 MiB limit for configuration files"):
        remove_worker(text, CONFIG_FILE, "local")


def test_worker_remove_reads_no_configuration_over_the_limit_nor_through_a_link(
        tmp_path: Path, unread: list[int], capsys: pytest.CaptureFixture[str]) -> None:
    """`taskrun worker remove` reads .taskrun.yaml as the daemon does (read_config_file): bounded, no link."""
    from taskrunner.cli.main import main

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / CONFIG_FILE).write_bytes(padded(MAX_CONFIG_FILE_BYTES + 1))
    assert main(["-C", str(tmp_path), "worker", "remove", "local"]) == 2
    _says_limit(capsys.readouterr().err, MAX_CONFIG_FILE_BYTES + 1)
    assert all(size <= MAX_CONFIG_FILE_BYTES + 1 for size in unread)
    secret = tmp_path / "secret.yaml"
    secret.write_bytes(b"workers: {local: {transport: local}}\n")
    (tmp_path / CONFIG_FILE).unlink()
    (tmp_path / CONFIG_FILE).symlink_to(secret)
    assert main(["-C", str(tmp_path), "worker", "remove", "local"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (tmp_path / CONFIG_FILE).is_symlink() and secret.read_bytes().startswith(b"workers")


class _Notices:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def notice(self, message: str) -> None:
        self.seen.append(message)


def test_a_reload_of_a_configuration_grown_over_the_limit_keeps_the_previous_one(
        tmp_path: Path, unread: list[int]) -> None:
    from taskrunner.daemon import Daemon

    previous = default_config()
    hooks = _Notices()
    daemon: Any = SimpleNamespace(root=tmp_path, config=previous, hooks=hooks,
                                  engine=SimpleNamespace(files=SimpleNamespace(git_dirs=())))
    (tmp_path / CONFIG_FILE).write_bytes(padded(MAX_CONFIG_FILE_BYTES + 1))
    Daemon._reload(daemon)
    assert daemon.config is previous
    [notice] = hooks.seen
    assert notice.startswith("configuration not reloaded, the previous one stays in force: ")
    _says_limit(notice, MAX_CONFIG_FILE_BYTES + 1)


def test_the_signing_policy_reads_no_configuration_over_the_limit(tmp_path: Path, unread: list[int]) -> None:
    # Loading says why; the signature check must not read (or hash) the whole file first.
    (tmp_path / CONFIG_FILE).write_bytes(padded(MAX_CONFIG_FILE_BYTES + 1))
    policy = SecurityConfig(allowed_signers=tmp_path.parent / "allowed_signers")
    assert signers.config_refusal(tmp_path, policy) is None
    assert sum(unread) == 0


def test_a_prompt_template_file_over_its_limit_is_refused_by_its_size(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The configuration itself is parsed here; only the template must not be read whole.
    monkeypatch.setattr(Beneath, "read_bytes", lambda *_: pytest.fail("the template was read whole"))
    (tmp_path / "prompt.md").write_bytes(b"{{ body }}\n" + b"x" * MAX_TEMPLATE_BYTES)
    text = ("default_agent: cmd\nagents:\n  cmd:\n    preset: command\n    command: [cat, '{prompt_file}']\n"
            "    prompt_template_file: prompt.md\n")
    with pytest.raises(ConfigError) as raised:
        parse_config(text, str(tmp_path / CONFIG_FILE), tmp_path)
    assert raised.value.key == "agents.cmd.prompt_template_file"
    _says_limit(raised.value.reason, MAX_TEMPLATE_BYTES + 11, "64 KiB")
    assert "prompt.md" in raised.value.reason


def test_a_prompt_template_file_within_its_limit_still_loads(tmp_path: Path) -> None:
    (tmp_path / "prompt.md").write_text("Do {{ title }}\n")
    text = ("default_agent: cmd\nagents:\n  cmd:\n    preset: command\n    command: [cat, '{prompt_file}']\n"
            "    prompt_template_file: prompt.md\n")
    assert parse_config(text, str(tmp_path / CONFIG_FILE), tmp_path).agents["cmd"].prompt_template == "Do {{ title }}\n"


def test_a_known_hosts_file_over_its_limit_is_refused_by_its_size(tmp_path: Path, unread: list[int]) -> None:
    path = tmp_path / "known_hosts"
    with open(path, "wb") as handle:
        handle.truncate(MAX_KNOWN_HOSTS_BYTES + 1)
    with pytest.raises(HostKeyError) as raised:
        pinned_keys("build-1", 22, None, str(path))
    assert str(path) in str(raised.value) and "over the 16 MiB limit for known_hosts files" in str(raised.value)
    assert "taskrun worker add" in str(raised.value)
    assert sum(unread) == 0


@pytest.fixture()
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "known_hosts"
    os.mkfifo(path)
    yield path
    try:  # a reader still blocked on it (the behaviour under test gone wrong) is let go
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_known_hosts_path_that_is_no_regular_file_is_refused_not_waited_on(
        tmp_path: Path, fifo: Path, kind: str) -> None:
    path = fifo
    if kind == "directory":
        path = tmp_path / "hosts.d"
        path.mkdir()
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            pinned_keys("build-1", 22, None, str(path))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "reading the known_hosts file blocked"
    [exc] = outcome
    assert isinstance(exc, HostKeyError), exc
    assert f"{path} is a {'FIFO' if kind == 'fifo' else 'directory'}, not a regular file" in str(exc)
