"""`taskrun doctor`: what is wrong with this control plane's keys and pins, and what to do.

Checks, each a Finding (level "error" or "warning", what, and the fix):

- every private key under .git/taskrun/ (signing keys, the SSH key) and every
  Worker's `identity` file is mode 0600 (no access for group or others);
- no file tracked by git holds a private key (a `-----BEGIN ... PRIVATE KEY-----`
  block, as PEM and OpenSSH write them);
- every ssh Worker has a pinned host key and a pinned result key.

The daemon runs the key checks at start and reports each finding as a notice.
"""

from __future__ import annotations

import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from taskrunner.config import Config
from taskrunner.defaults import CONFIG_FILE, STATE_DIR
from taskrunner.keys import KEYS_DIR, SSH_KEY_FILE

PRIVATE_KEY_MARK = "PRIVATE KEY-----"


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    what: str
    fix: str


def key_findings(root: Path, config: Config | None) -> list[Finding]:
    found: list[Finding] = []
    state = root / STATE_DIR
    keys = sorted((state / KEYS_DIR).glob("*.pem")) + [state / SSH_KEY_FILE]
    if config is not None:
        keys += [Path(w.identity).expanduser() for w in config.workers.values() if w.identity]
    for path in keys:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            found.append(Finding("error", f"private key {path} is readable by others (mode {mode:04o})",
                                 f"chmod 600 {path}"))
    found.extend(_tracked_keys(root))
    return found


def _tracked_keys(root: Path) -> list[Finding]:
    # `git grep` searches what is tracked (the index), fast and without reading ignored files.
    result = subprocess.run(["git", "grep", "-l", "-I", "--cached", "-F", "-e", PRIVATE_KEY_MARK],
                            cwd=root, capture_output=True, text=True)
    return [Finding("error", f"{path} is tracked by git and holds a private key",
                    f"git rm --cached {path}, commit, and replace the key: it is in the history")
            for path in result.stdout.splitlines() if path]


def pin_findings(config: Config) -> list[Finding]:
    found = []
    for worker in config.workers.values():
        if worker.transport != "ssh":
            continue
        if worker.worker_key is None:
            found.append(Finding("error", f"Worker '{worker.name}' has no pinned result key in {CONFIG_FILE}: "
                                 "its results cannot be verified, so it gets no Runs",
                                 f"taskrun worker add {worker.name} --host {worker.host}"))
    return found
