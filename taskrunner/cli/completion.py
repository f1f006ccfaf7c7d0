"""`taskrun completion bash|zsh`: a static shell completion script, generated from the parser by shtab.

shtab (https://github.com/iterative/shtab) turns an argparse parser into a
bash or zsh script: every command, subcommand and option, with its choices.
Task ids are completed from the Task files of the repository the shell is in
(`tasks/**/*.md`, relative to `git rev-parse --show-toplevel`), by a shell
function in the script: completing calls no Python and asks no daemon.

A file name is repository data, so the function never hands one to anything
that expands it again (bash's `compgen -W` expands `$(...)` in its word list,
zsh globs a word under GLOB_SUBST): only names that are Task ids (the shape
of taskfile.task_id_for: TASK_ID_RE with no empty or dot-led part, at most
MAX_TASK_ID_CHARS) are offered, and bash matches them against the typed
prefix literally and prints them, one a line, for shtab to read into COMPREPLY.
The only module that imports shtab.
"""

from __future__ import annotations

import argparse
from typing import Any

import shtab

from taskrunner.cli.examples import walk
from taskrunner.model import MAX_TASK_ID_CHARS

#: The shells `taskrun completion` writes a script for.
SHELLS = ("bash", "zsh")
#: The positional arguments (argparse `dest`) that name Tasks.
TASK_DESTS = frozenset({"task", "tasks"})
#: The characters of a Task id part (model.TASK_ID_RE), spelled out: a range like a-z can match other
#: letters in some locales.
_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
#: A Task id as a POSIX extended regular expression (bash `=~`, zsh `=~`): taskfile.task_id_for's rule.
TASK_ID_ERE = f"^[{_ID_CHARS}][{_ID_CHARS}._-]*(/[{_ID_CHARS}][{_ID_CHARS}._-]*)*$"
#: The Task files of the repository, NUL-separated: tasks/auth/login.md (a name may hold any byte but NUL).
TASK_FILES_COMMAND = ("cd -- \"$(git rev-parse --show-toplevel 2>/dev/null || echo .)\" 2>/dev/null && "
                      "find tasks -type f -name '*.md' -print0 2>/dev/null")
#: The shell function each script defines to complete a Task id (shtab calls it by name).
TASK_IDS_FUNCTION = "_taskrun_task_ids"

# bash: shtab calls the function with the word typed so far and reads its output, one completion a
# line, into COMPREPLY. The prefix match is `[[ == "$1"* ]]` (quoted: literal), never compgen -W.
_BASH = f"""{TASK_IDS_FUNCTION}() {{
  local id re='{TASK_ID_ERE}'
  while IFS= read -r -d '' id; do
    id=${{id#tasks/}}; id=${{id%.md}}
    [[ ${{#id}} -le {MAX_TASK_ID_CHARS} && $id =~ $re && $id == "$1"* ]] && printf '%s\\n' "$id"
  done < <({TASK_FILES_COMMAND})
  return 0
}}
"""
# zsh: called by _arguments; compadd adds the words as they are (and quotes them on insertion).
# `emulate -L zsh` so no user option (GLOB_SUBST, SH_WORD_SPLIT) treats a name as a pattern.
_ZSH = f"""{TASK_IDS_FUNCTION}() {{
  emulate -L zsh
  local id
  local -a ids
  for id in ${{(0)"$({TASK_FILES_COMMAND})"}}; do
    id=${{id#tasks/}}; id=${{id%.md}}
    [[ ${{#id}} -le {MAX_TASK_ID_CHARS} && $id =~ '{TASK_ID_ERE}' ]] && ids+=("$id")
  done
  compadd -a -- ids
}}
"""


def task_ids_complete() -> dict[str, Any]:
    """shtab's custom completion (the `.complete` of an argparse action) for a Task id: a shell function,
    defined in the script's preamble, that lists the Task ids when the user presses Tab (not when the
    script is loaded)."""
    return {"bash": TASK_IDS_FUNCTION, "zsh": TASK_IDS_FUNCTION, "preamble": {"bash": _BASH, "zsh": _ZSH}}


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
