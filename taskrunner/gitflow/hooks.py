"""The git hooks that tell a daemon to sync: their scripts, and `taskrun hooks install`.

    post-receive   in a bare repository on the daemon's machine: after a push,
                   the daemon of the clone named in the script syncs.
    post-merge     in a clone people pull into: after `git pull`, its daemon syncs.

Every script clears git's environment before it calls taskrun (`env -i`, only
PATH and HOME kept): git runs hooks with GIT_DIR, GIT_INDEX_FILE,
GIT_OBJECT_DIRECTORY, GIT_QUARANTINE_PATH, GIT_PUSH_OPTION_* and more set
for the repository it is working on, and a git command run with them in the
clone would read or write that repository instead. Paths and the command
written into a script are quoted for sh (`shlex.quote`). A script never fails
or holds up the git command that ran it: a daemon that is down or slow is
reported on stderr (the pusher sees it as `remote: ...`) and the hook exits 0.

The first lines of a script carry MARKER, by which `install` knows a hook it
wrote (and rewrites it) from one a person wrote (refused unless forced).
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from taskrunner import gitops
from taskrunner.atomic import write_bytes
from taskrunner.errors import TaskrunError

#: Marks a hook taskrun wrote.
MARKER = "# taskrun-hook"
#: What `taskrun init` wrote before scripts carried MARKER; such a hook is taskrun's too.
_OLD_MARKER = "# Written by `taskrun init`"
#: Seconds a hook waits for the daemon's answer before it gives up (and exits 0).
HOOK_TIMEOUT = 20
#: The variables a hook keeps when it clears the environment.
KEPT_VARIABLES = ("PATH", "HOME")
HOOK_NAMES = ("post-receive", "post-merge")

_HEADER = """#!/bin/sh
{marker} {name}: written by `taskrun {how}`.
# {what}
# git's environment (GIT_DIR, GIT_INDEX_FILE, GIT_QUARANTINE_PATH, ...) is cleared
# before taskrun runs, so nothing here can act on the repository git is working on
# in place of the clone. A daemon that is down neither blocks nor fails {action}.
"""
_CALL = """limit=
command -v timeout >/dev/null 2>&1 && limit='timeout {timeout}'
if ! said=$($limit env -i {kept} {command} -C "$clone" trigger </dev/null 2>&1); then
    printf 'taskrun: the daemon of %s was not told to sync (it syncs when it starts): %s\\n' "$clone" "$said" >&2
fi
exit 0
"""


def taskrun_command() -> list[str]:
    """The argv that runs this taskrun: the `taskrun` script beside this Python, else `python -m taskrunner`."""
    script = Path(sys.executable).parent / "taskrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "taskrunner"]


def post_receive_script(clone: Path, command: Sequence[str]) -> str:
    """A post-receive hook for a bare repository: `command -C CLONE trigger`, with git's environment cleared."""
    return (_HEADER.format(marker=MARKER, name="post-receive", how="hooks install BARE_REPO",
                           what="After a push, the taskrun daemon of the clone below syncs.", action="the push")
            + f"clone={shlex.quote(str(clone))}\n"
            + "cat >/dev/null 2>&1  # the updated refs (the hook's input) are not needed\n"
            + _call(command))


def post_merge_script(clone: Path | None, command: Sequence[str] | None) -> str:
    """A post-merge hook for a clone; with clone None the clone is the repository git runs it in,
    with command None `taskrun` is looked up on PATH (the template `taskrun init` writes)."""
    what = "After `git pull` brings commits, the taskrun daemon of this clone syncs."
    if clone is None:
        what += ("\n# To enable it, run `taskrun hooks install` in the clone (it writes a copy naming the\n"
                 "# clone), or read it and copy it (a copy, not a link) into the clone's git directory:\n"
                 '#     cp hooks/post-merge "$(git rev-parse --git-path hooks/post-merge)"\n'
                 "# Do not run `git config core.hooksPath hooks`, and do not link to this file:\n"
                 "# anyone who can push to this repository changes what is in hooks/, and git\n"
                 "# would run their version as you, on your own git commands.")
    text = _HEADER.format(marker=MARKER, name="post-merge", how="hooks install" if clone is not None else "init",
                          what=what, action="the pull")
    if clone is not None:
        text += f"clone={shlex.quote(str(clone))}\n"
    else:
        text += ('clone=$(git rev-parse --show-toplevel) || exit 0  # asked while git\'s environment says where\n')
    if command is None:
        text += ("if ! command -v taskrun >/dev/null 2>&1; then\n"
                 "    echo 'taskrun: not on PATH; the daemon was not told to sync' >&2\n"
                 "    exit 0\n"
                 "fi\n")
        return text + _call(["taskrun"])
    return text + _call(command)


def post_receive_template() -> str:
    """What `taskrun init` writes as hooks/post-receive: how to install the real one (it names the clone)."""
    return (_HEADER.format(marker=MARKER, name="post-receive", how="init",
                           what="The hook must name the clone, so this file is not it: in the clone, run\n"
                                "#     taskrun hooks install /path/to/bare.git\n"
                                "# which writes the bare repository's hooks/post-receive (a copy made with\n"
                                "# `cp hooks/post-receive` would not know the clone), and not a link to this\n"
                                "# file. Do not run `git config core.hooksPath hooks` either: anyone who can\n"
                                "# push changes what is in hooks/, and git would run their version as you.",
                           action="the push")
            + "echo 'taskrun: this is the template; run `taskrun hooks install BARE_REPO` in the clone' >&2\n"
            + "exit 0\n")


def is_taskrun_hook(text: str) -> bool:
    """True when a hook's text is one taskrun wrote (MARKER or the older init line near the top)."""
    head = text.splitlines()[:4]
    return any(line.startswith((MARKER + " ", _OLD_MARKER)) for line in head)


@dataclass(frozen=True)
class Installed:
    """What install did: the hook's path, and where a hook it replaced was moved (None if none)."""

    path: Path
    kept: Path | None = None


def install(git_dir: Path, name: str, script: str, force: bool = False) -> Installed:
    """Write `git_dir/hooks/<name>` (mode 0755), atomically, following no link below git_dir.

    A hook there that taskrun wrote is rewritten; another one is refused with
    how to chain it, or with force moved aside to `<name>.before-taskrun[.N]`.
    Refused too when git would not run it: core.hooksPath is set for that
    repository. Raises TaskrunError.
    """
    hooks_path = _config(git_dir, "core.hooksPath")
    if hooks_path:
        raise TaskrunError(f"{git_dir}: core.hooksPath is set ({hooks_path}), so git does not run hooks from "
                           f"{git_dir / 'hooks'}; install the hook there by hand or unset core.hooksPath")
    path = git_dir / "hooks" / name
    kept: Path | None = None
    existing = _read_plain(path)
    if existing is not None and not is_taskrun_hook(existing):
        if not force:
            raise TaskrunError(
                f"{path} exists and taskrun did not write it. To keep it and add taskrun, append the "
                f"call of a hook taskrun writes (`taskrun hooks install --print ...` shows one) to it; "
                f"or run again with --force: yours is moved to {path.name}.before-taskrun and "
                "the new hook does not call it")
        kept = _free_name(path.with_name(f"{name}.before-taskrun"))
        os.rename(path, kept)
    write_bytes(path, script.encode(), mode=0o755, beneath=git_dir)
    return Installed(path, kept)


def bare_git_dir(path: Path) -> Path:
    """`path` as a bare repository's directory (absolute); TaskrunError when it is not one."""
    answer = _git(path, "rev-parse", "--is-bare-repository")
    if answer is None:
        raise TaskrunError(f"{path} is not a git repository")
    if answer != "true":
        raise TaskrunError(f"{path} is not a bare repository: a post-receive hook belongs in the bare repository "
                           "people push to (for a clone people pull into, run `taskrun hooks install` with no "
                           "argument: it writes a post-merge hook)")
    return path.resolve()


def common_git_dir(clone: Path) -> Path:
    """The git directory whose hooks/ a clone runs (the common one for a `git worktree`)."""
    answer = _git(clone, "rev-parse", "--path-format=absolute", "--git-common-dir")
    if answer is None:
        raise TaskrunError(f"{clone} is not a git repository")
    return Path(answer)


def _call(command: Sequence[str]) -> str:
    kept = " ".join(f'{name}="${name}"' for name in KEPT_VARIABLES)
    return _CALL.format(timeout=HOOK_TIMEOUT, kept=kept, command=" ".join(shlex.quote(word) for word in command))


def _clean_env() -> dict[str, str]:
    """The environment without GIT_* (a caller inside a hook must not point git elsewhere)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


def _git(where: Path, *args: str) -> str | None:
    result = subprocess.run(gitops.command("-C", str(where), *args), capture_output=True, text=True,
                            env=_clean_env(), stdin=subprocess.DEVNULL)
    return result.stdout.strip() if result.returncode == 0 else None


def _config(git_dir: Path, key: str) -> str | None:
    """`key` as the repository's own, the user's and the system's configuration set it (the first found).

    Scope by scope: git's plain `--get` would answer with gitops.command's own
    `-c core.hooksPath=/dev/null`.
    """
    for scope in ("--local", "--global", "--system"):
        result = subprocess.run(gitops.command("--git-dir", str(git_dir), "config", scope, "--get", key),
                                capture_output=True, text=True, env=_clean_env(), stdin=subprocess.DEVNULL)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    return None


def _read_plain(path: Path) -> str | None:
    """The hook's text; None when there is none. A link or special file there counts as a hook taskrun did not write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return "" if os.path.lexists(path) else None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(64 * 1024).decode(errors="replace")
    finally:
        os.close(fd)


def _free_name(path: Path) -> Path:
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def init_templates() -> dict[str, str]:
    """What `taskrun init` writes under hooks/: name -> script text."""
    return {"post-merge": post_merge_script(None, None), "post-receive": post_receive_template()}
