"""`taskrun completion bash|zsh`: a static shell completion script, generated from the parser by shtab.

shtab (https://github.com/iterative/shtab) turns an argparse parser into a
bash or zsh script: every command, subcommand and option, with its choices.
Task ids are completed from the Task files of the repository the shell is in
(`tasks/**/*.md`, relative to `git rev-parse --show-toplevel`), by a shell
command in the script: completing calls no Python and asks no daemon.
The only module that imports shtab.
"""

from __future__ import annotations

import argparse
from typing import Any

import shtab

from taskrunner.cli.examples import walk

#: The shells `taskrun completion` writes a script for.
SHELLS = ("bash", "zsh")
#: The positional arguments (argparse `dest`) that name Tasks.
TASK_DESTS = frozenset({"task", "tasks"})
#: Prints the repository's Task ids, one a line: tasks/auth/login.md -> auth/login.
TASK_IDS_COMMAND = ("cd \"$(git rev-parse --show-toplevel 2>/dev/null || echo .)\" 2>/dev/null && "
                    "find tasks -type f -name '*.md' 2>/dev/null | sed -e 's|^tasks/||' -e 's|\\.md$||'")
#: The shell function each script defines to complete a Task id (shtab calls it by name).
TASK_IDS_FUNCTION = "_taskrun_task_ids"


def task_ids_complete() -> dict[str, Any]:
    """shtab's custom completion (the `.complete` of an argparse action) for a Task id: a shell function,
    defined in the script's preamble, that lists the Task ids when the user presses Tab (not when the
    script is loaded)."""
    name, ids = TASK_IDS_FUNCTION, f"$( ( {TASK_IDS_COMMAND} ) )"
    return {
        "bash": name,
        "zsh": name,
        "preamble": {
            "bash": f'{name}() {{\n  compgen -W "{ids}" -- "$1"\n}}\n',
            "zsh": f'{name}() {{\n  local -a ids\n  ids=(${{(f)"{ids}"}})\n  compadd -a ids\n}}\n',
        },
    }


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser` for `shell` (one of SHELLS), ending in a newline.

    Marks every Task-id argument for completion from the Task files first.
    Raises ValueError for a shell not in SHELLS.
    """
    if shell not in SHELLS:
        raise ValueError(f"no completion for the shell {shell!r}; one of {', '.join(SHELLS)}")
    for _, each in walk(parser):
        for action in each._actions:
            if not action.option_strings and action.dest in TASK_DESTS:
                action.complete = task_ids_complete()  # type: ignore[attr-defined]  # read by shtab
    text = shtab.complete(parser, shell=shell)
    return text if text.endswith("\n") else text + "\n"
