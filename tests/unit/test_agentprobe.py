"""agentprobe: which Agent CLIs a Worker has, with their versions, cached by the program's identity."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner.worker import agentprobe

PRESETS = ("shell", "command", "claude", "codex")


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with this process's memory of versions empty (the file cache is per home)."""
    monkeypatch.setattr(agentprobe, "_memory", {})
    yield


def program(bin_dir: Path, name: str, body: str) -> Path:
    """An executable `name` in `bin_dir` that counts its runs in `<bin_dir>/<name>.runs`, then runs `body`."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\necho run >> '{bin_dir / (name + '.runs')}'\n{body}\n")
    path.chmod(0o755)
    return path


def runs(bin_dir: Path, name: str) -> int:
    try:
        return len((bin_dir / f"{name}.runs").read_text().splitlines())
    except FileNotFoundError:
        return 0


def probe(home: Path, bin_dir: Path, **env: str) -> dict[str, dict[str, object]]:
    home.mkdir(exist_ok=True)
    return agentprobe.available(home, PRESETS, program=lambda preset: preset, environ={"PATH": str(bin_dir), **env})


def test_a_cli_on_path_is_listed_with_its_first_version_line_and_shell_and_command_always(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    claude = program(bin_dir, "claude", 'echo ""; echo "2.1.332 (Claude Code)"; echo "second line"')
    found = probe(tmp_path / "home", bin_dir)
    assert found == {"claude": {"version": "2.1.332 (Claude Code)", "path": str(claude)},
                     "command": {"version": None, "path": ""}, "shell": {"version": None, "path": ""}}


def test_a_version_is_asked_once_per_program_file_and_asked_again_when_the_file_changes(tmp_path: Path) -> None:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    claude = program(bin_dir, "claude", 'echo "1.0.0"')
    assert probe(home, bin_dir)["claude"]["version"] == "1.0.0"
    agentprobe._memory.clear()  # a new Worker process: only the file remains
    assert probe(home, bin_dir)["claude"]["version"] == "1.0.0"
    assert runs(bin_dir, "claude") == 1
    cached = json.loads((home / agentprobe.CACHE_FILE).read_text())
    assert cached[os.path.realpath(claude)]["version"] == "1.0.0"

    program(bin_dir, "claude", 'echo "1.0.1 upgraded"')
    os.utime(claude, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert probe(home, bin_dir)["claude"]["version"] == "1.0.1 upgraded"
    assert runs(bin_dir, "claude") == 2


def test_a_broken_cache_file_is_ignored_and_written_anew(tmp_path: Path) -> None:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    program(bin_dir, "claude", 'echo "3.0"')
    home.mkdir()
    (home / agentprobe.CACHE_FILE).write_bytes(b"\x00{not json")
    assert probe(home, bin_dir)["claude"]["version"] == "3.0"
    assert isinstance(json.loads((home / agentprobe.CACHE_FILE).read_text()), dict)
    assert (home / agentprobe.CACHE_FILE).stat().st_mode & 0o777 == 0o600


def test_a_program_that_hangs_or_fails_is_listed_without_a_version_and_asked_again_by_the_next_worker_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agentprobe, "VERSION_TIMEOUT_SECONDS", 0.5)
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    program(bin_dir, "claude", "exec /bin/sleep 60")
    program(bin_dir, "codex", "exit 3")
    started = time.monotonic()
    found = probe(home, bin_dir)
    assert time.monotonic() - started < 10
    assert found["claude"]["version"] is None and found["codex"]["version"] is None
    probe(home, bin_dir)
    assert runs(bin_dir, "claude") == 1, "asked again by the same Worker process"
    agentprobe._memory.clear()
    probe(home, bin_dir)
    assert runs(bin_dir, "claude") == 2


def test_the_version_probe_sees_none_of_the_workers_credentials(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    program(bin_dir, "claude", 'echo "v-${ANTHROPIC_API_KEY:-none}"')
    assert probe(tmp_path / "home", bin_dir, ANTHROPIC_API_KEY="sk-secret")["claude"]["version"] == "v-none"


def test_a_preset_whose_program_is_not_on_path_is_not_listed(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    assert sorted(probe(tmp_path / "home", bin_dir)) == ["command", "shell"]
