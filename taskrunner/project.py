"""`taskrun init`: make a directory a managed repository. Idempotent."""

from __future__ import annotations

import os
import time
from pathlib import Path

from taskrunner import gitops, keys
from taskrunner.atomic import write_bytes
from taskrunner.errors import TaskrunError
from taskrunner.config_template import INIT_TEMPLATE
from taskrunner.defaults import CONFIG_FILE, HOOKS_DIR, RUNS_DIR, STATE_DIR, TASKS_DIR

#: What git hooks run: tell the daemon to sync now; never fail the git command.
#: How to enable it says to copy the file: hooks/ is content anyone who can push
#: changes, so git must never be pointed at it (core.hooksPath) or at a link into it.
HOOK_SCRIPT = """#!/bin/sh
# Written by `taskrun init`: after git brings new commits, the daemon syncs.
# To enable it, read it, then copy it (a copy, not a link) {where}
# Do not run `git config core.hooksPath hooks`, and do not link to this file:
# anyone who can push to this repository changes what is in hooks/, and git
# would run their version as you, on your own git commands.
command -v taskrun >/dev/null 2>&1 && taskrun trigger --quiet || true
"""
#: Where each hook goes, as its HOOK_SCRIPT says.
HOOK_WHERE = {
    "post-merge": "into this clone's\n"
                  '# git directory:  cp hooks/post-merge "$(git rev-parse --git-path hooks/post-merge)"',
    "post-receive": "into the\n"
                    "# bare repository you push to:  cp hooks/post-receive /path/to/bare.git/hooks/post-receive",
}
HOOK_NAMES = tuple(HOOK_WHERE)


def init_repository(root: Path) -> list[str]:
    """Create what is missing; returns one line per thing created."""
    done: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    if gitops.toplevel(root) is None:
        gitops.init(root)
        done.append(f"initialised a git repository in {root}")
    # A cloned repository's content decides what is at these paths: nothing
    # here follows a link (a dangling one would otherwise be written through).
    config = root / CONFIG_FILE
    if not os.path.lexists(config):
        write_bytes(config, INIT_TEMPLATE.encode(), beneath=root)
        done.append(f"wrote {CONFIG_FILE} (local Worker, shell Agent)")
    for name in (TASKS_DIR, RUNS_DIR, HOOKS_DIR):
        directory = root / name
        if directory.is_symlink() or (os.path.lexists(directory) and not directory.is_dir()):
            raise TaskrunError(f"{directory} is not a directory (a link or a file); taskrun follows no links: "
                               "remove it, then run `taskrun init` again")
        if not directory.is_dir():
            directory.mkdir()
            done.append(f"created {name}/")
        keep = directory / ".gitkeep"
        if name != HOOKS_DIR and not any(directory.iterdir()):
            write_bytes(keep, b"", beneath=root)
    for hook in HOOK_NAMES:
        path = root / HOOKS_DIR / hook
        if not os.path.lexists(path):
            write_bytes(path, HOOK_SCRIPT.format(where=HOOK_WHERE[hook]).encode(), mode=0o755, beneath=root)
            done.append(f"wrote {HOOKS_DIR}/{hook}")
    ring, created = keys.Keyring.ensure(root / STATE_DIR, time.time())
    if created:
        done.append(f"created the control plane's signing key {ring.current.key_id} in "
                    f"{ring.directory.relative_to(root)}/ (mode 0600, never committed)")
    return done
