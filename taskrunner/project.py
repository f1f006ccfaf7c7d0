"""`taskrun init`: make a directory a managed repository. Idempotent."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from taskrunner import gitops, keys
from taskrunner.atomic import write_bytes
from taskrunner.config_template import INIT_TEMPLATE
from taskrunner.defaults import CONFIG_FILE, HOOKS_DIR, RUNS_DIR, TASKS_DIR
from taskrunner.errors import TaskrunError
from taskrunner.gitflow import hooks


def init_repository(root: Path) -> list[str]:
    """Create what is missing; returns one line per thing created.

    All or nothing: when a step fails, what this call created (files,
    directories, a git repository it initialised, the state directory) is
    removed again before the error is raised, so a second `taskrun init`
    starts from where the first one did.
    """
    made: list[Path] = []
    try:
        return _init(root, made)
    except BaseException:
        for path in reversed(made):
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                pass
        raise


def _init(root: Path, made: list[Path]) -> list[str]:
    done: list[str] = []
    if not root.exists():
        root.mkdir(parents=True)
        made.append(root)
    if gitops.toplevel(root) is None:
        gitops.init(root)
        made.append(root / ".git")
        done.append(f"initialised a git repository in {root}")
    # git says where its directory is: `.git` is a file in a linked worktree or a submodule.
    state = gitops.state_dir(root)
    if not state.exists():
        state.mkdir(parents=True)
        made.append(state)
    ring, created = keys.Keyring.ensure(state, time.time())
    if created:
        where = state.relative_to(root) if state.is_relative_to(root) else state
        done.append(f"created the control plane's signing key {ring.current.key_id} in "
                    f"{where}/{keys.KEYS_DIR}/ (mode 0600, never committed)")
    # A cloned repository's content decides what is at these paths: nothing
    # here follows a link (a dangling one would otherwise be written through).
    config = root / CONFIG_FILE
    if not os.path.lexists(config):
        write_bytes(config, INIT_TEMPLATE.encode(), beneath=root)
        made.append(config)
        done.append(f"wrote {CONFIG_FILE} (local Worker, shell Agent)")
    for name in (TASKS_DIR, RUNS_DIR, HOOKS_DIR):
        directory = root / name
        if directory.is_symlink() or (os.path.lexists(directory) and not directory.is_dir()):
            raise TaskrunError(f"{directory} is not a directory (a link or a file); taskrun follows no links: "
                               "remove it, then run `taskrun init` again")
        if not directory.is_dir():
            directory.mkdir()
            made.append(directory)
            done.append(f"created {name}/")
        keep = directory / ".gitkeep"
        if name != HOOKS_DIR and not any(directory.iterdir()):
            write_bytes(keep, b"", beneath=root)
            made.append(keep)
    # What git hooks run: tell the daemon to sync now, never failing the git command (gitflow/hooks.py).
    for hook, script in hooks.init_templates().items():
        path = root / HOOKS_DIR / hook
        if not os.path.lexists(path):
            write_bytes(path, script.encode(), mode=0o755, beneath=root)
            made.append(path)
            done.append(f"wrote {HOOKS_DIR}/{hook}")
    return done
