"""Which Agent CLIs this Worker can run, with their versions: the `agents` of its `ready` record.

    {"claude": {"version": "2.1.332 (Claude Code)", "path": "/usr/bin/claude"},
     "shell": {"version": None, "path": ""}, "command": {"version": None, "path": ""}}

A reader preset (Claude Code, Codex, Gemini CLI, Aider) is listed when its
program (agents.cli_program) is on the Worker's PATH; its version is the
first line `<program> --version` prints (None when it prints nothing, exits
non-zero or takes longer than VERSION_TIMEOUT_SECONDS). `shell` and `command` need no
program of their own and are always listed, with path "".

Asking takes time (a Node.js CLI starts in 0.2 to 6 s), so every program is
asked at once, each in a thread, and the answers are cached, in memory for
this Worker process and in `<home>/agent_versions.json`, keyed by the
program's real path, size and mtime_ns: an upgrade (a new file) is asked
again. A cache file that cannot be read is ignored and written anew. A
program that failed to answer is not asked again by this Worker process
(each session would wait for it), and asked again by the next.

The program runs with the Worker's PATH, locale and HOME only (none of its
credentials), no stdin, in its own process group (killed on timeout), and
only the first OUTPUT_BYTES of what it prints are read.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from taskrunner import agents
from taskrunner.atomic import write_bytes

CACHE_FILE = "agent_versions.json"
#: `<program> --version` is given this long.
VERSION_TIMEOUT_SECONDS = 10.0
#: Of what `--version` prints, this much is read.
OUTPUT_BYTES = 4096
#: A version line is kept up to this many characters.
MAX_VERSION_CHARS = 200
#: Presets that need no program of their own.
ALWAYS = ("shell", "command")
#: The variables of the Worker's environment `--version` sees.
PROBE_VARIABLES = ("PATH", "LANG", "TZ", "HOME")

_memory: dict[str, dict[str, Any]] = {}
_memory_lock = threading.Lock()


def available(home: Path, presets: Iterable[str], program: Callable[[str], str] | None = None,
              environ: Mapping[str, str] = os.environ) -> dict[str, dict[str, Any]]:
    """{preset: {"version": str | None, "path": str}} for `presets` this Worker can run (see the module doc).

    `program(preset)` names a preset's CLI (default agents.cli_program).
    Never raises for what a program or the cache file holds.
    """
    program = program or agents.cli_program
    found: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    for preset in presets:
        if preset in ALWAYS:
            found[preset] = {"version": None, "path": ""}
            continue
        try:
            name = program(preset)
        except (KeyError, ValueError, TypeError):
            continue
        where = shutil.which(name, path=environ.get("PATH", os.defpath)) if name else None
        if where is not None:
            paths[preset] = os.path.abspath(where)
    versions = _versions(home, sorted(set(paths.values())), environ)
    for preset, where in paths.items():
        found[preset] = {"version": versions.get(where), "path": where}
    return dict(sorted(found.items()))


def available_presets() -> list[str]:
    """The hello's `agents`: presets whose program (named as the preset) is on PATH, shell and command always."""
    return [preset for preset in agents.PRESETS if preset in ALWAYS or shutil.which(preset)]


def _versions(home: Path, programs: list[str], environ: Mapping[str, str]) -> dict[str, str | None]:
    """path -> version for each program, from the caches or asked (in parallel)."""
    cache_path = home / CACHE_FILE
    cache, readable = _read_cache(cache_path)
    before = dict(cache)
    keys = {path: _key(path) for path in programs}
    answers: dict[str, str | None] = {}
    ask: list[str] = []
    for path, key in keys.items():
        if key is None:
            answers[path] = None
            continue
        with _memory_lock:
            known = _memory.get(key[0])
        if known is not None and _matches(known, key) and known.get("version") is None:
            answers[path] = None  # it failed to answer in this Worker process already
            continue
        entry = known if known is not None and _matches(known, key) else cache.get(key[0])
        if isinstance(entry, dict) and _matches(entry, key) and isinstance(entry.get("version"), str):
            answers[path] = entry["version"]
            cache[key[0]] = {"size": key[1], "mtime_ns": key[2], "version": entry["version"]}
        else:
            ask.append(path)
    asked: dict[str, str | None] = {}
    threads = [threading.Thread(target=lambda p=path: asked.__setitem__(p, version_of(p, environ)),
                                name="agent-version", daemon=True) for path in ask]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(VERSION_TIMEOUT_SECONDS + 5.0)
    for path in ask:
        answers[path] = version = asked.get(path)
        key = keys[path]
        if key is not None:
            entry = {"size": key[1], "mtime_ns": key[2], "version": version}
            with _memory_lock:
                _memory[key[0]] = entry
            if version is not None:
                cache[key[0]] = entry
    if cache != before or not readable:
        try:
            write_bytes(cache_path, json.dumps(cache, indent=2, sort_keys=True).encode() + b"\n", mode=0o600,
                        durable=False)
        except OSError:
            pass  # the cache only saves time
    return answers


def version_of(path: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The first non-empty line `path --version` prints (stdout and stderr), or None when it fails or hangs."""
    env = {k: v for k, v in environ.items() if k in PROBE_VARIABLES or k.startswith("LC_")}
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen([path, "--version"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=env, cwd=tempfile.gettempdir(), start_new_session=True)
        except OSError:
            return None
        try:
            code = proc.wait(VERSION_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        _kill_group(proc.pid)  # on timeout, and what it left behind
        proc.wait()
        if code != 0:
            return None
        out.seek(0)
        text = out.read(OUTPUT_BYTES).decode("utf-8", "replace")
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:MAX_VERSION_CHARS]
    return None


def _key(path: str) -> tuple[str, int, int] | None:
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return real, stat.st_size, stat.st_mtime_ns


def _matches(entry: Mapping[str, Any], key: tuple[str, int, int]) -> bool:
    return entry.get("size") == key[1] and entry.get("mtime_ns") == key[2]


def _read_cache(path: Path) -> tuple[dict[str, Any], bool]:
    """The cache file's entries, and whether it could be read (a missing file counts as read, empty)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}, True
    except (OSError, ValueError):
        return {}, False
    if not isinstance(data, dict):
        return {}, False
    return {k: v for k, v in data.items() if isinstance(v, dict)}, True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
