"""tasks/*.md -> TaskSpec, and what else reads a Task file's text. Pure.

A Task file is optional YAML front matter between two `---` lines at the very
top, then the markdown body (the requirement). Anything wrong raises
`TaskFileError` naming the file, the key and what was expected; the caller
records the Task as INVALID and carries on.

Front matter is read by yamlload.py (strict YAML, errors with line and column).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from taskrunner.defaults import MAX_TASK_FILE_BYTES, TASKS_DIR
from taskrunner.duration import parse_duration
from taskrunner.errors import TaskFileError
from taskrunner.yamlload import load_yaml
from taskrunner.model import (MAX_TASK_ID_CHARS, MAX_TASK_ID_PART_CHARS, NAME_RE, RECORD_NAMES, RUN_DIR_RE,
                              TASK_ID_RE, Priority, TaskSpec)

#: Front matter keys, in the order the documentation lists them.
TASK_KEYS = ("agent", "priority", "depends_on", "labels", "group", "timeout", "retries", "context", "max_turns",
             "max_cost_usd")

_PRIORITIES = {p.label: p for p in Priority}
#: The largest whole number a Task file may give (JSON records; `0xfff...` converts at any length).
MAX_WHOLE = 2 ** 63 - 1
_IGNORED_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".tmp", ".part")


# --------------------------------------------------------------------------- paths


def task_id_for(relpath: str) -> str | None:
    """Map "tasks/a/b.md" to the Task id "a/b"; None when it cannot be a Task file.

    `relpath` is relative to the repository root with posix separators.
    Segments that are empty or start with '.' ('.', '..', '.hidden') are
    refused even where TASK_ID_RE would let them through, so an id is always a
    plain path and editor files like tasks/.#a.md never become Tasks.
    """
    prefix = TASKS_DIR + "/"
    if not relpath.startswith(prefix) or not relpath.endswith(".md"):
        return None
    if is_ignored_name(relpath.rsplit("/", 1)[-1]):
        return None
    task_id = relpath[len(prefix) : -len(".md")]
    return task_id if _is_task_id(task_id) else None


def not_a_task_name(relpath: str) -> str:
    """Why the file `relpath` under tasks/ is no Task, and the name to give it (when one can be made)."""
    why = "a Task file's name is its id, [a-z0-9][a-z0-9._/-]* (lower case, no spaces), then .md"
    stem = relpath[len(TASKS_DIR) + 1 : -len(".md")] if relpath.endswith(".md") else relpath[len(TASKS_DIR) + 1 :]
    name = "/".join(re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", re.sub(r"[^a-z0-9._-]+", "-", part.lower()))
                    for part in stem.split("/"))
    if name and task_id_for(f"{TASKS_DIR}/{name}.md") == name:
        return f"{why}; rename it, e.g. to {TASKS_DIR}/{name}.md"
    return f"{why}; rename it"


def _is_task_id(text: str) -> bool:
    return bool(TASK_ID_RE.fullmatch(text)) and all(seg and not seg.startswith(".") for seg in text.split("/"))


def task_id_problem(task_id: str) -> str | None:
    """Why a Task id (one task_id_for gave) cannot be a path under runs/, or None when it can.

    The records layout must map Task ids to records one to one: no part may
    be a name the layout uses inside a Task or Run directory (RECORD_NAMES,
    run-<n>), or `tasks/a/status.json.md` would have its record inside Task
    `a`'s record file and `tasks/a/run-1.md` would overwrite Task `a`'s Run 1;
    and the id must fit the length limits, or the file system refuses the
    path (ENAMETOOLONG). Such a file is INVALID, with this reason.
    """
    if len(task_id) > MAX_TASK_ID_CHARS:
        return (f"the Task id is {len(task_id)} characters long, over the limit of {MAX_TASK_ID_CHARS}; "
                "rename the file")
    for part in task_id.split("/"):
        if len(part) > MAX_TASK_ID_PART_CHARS:
            return (f"the Task id part '{part[:20]}...' is {len(part)} characters long, over the limit of "
                    f"{MAX_TASK_ID_PART_CHARS}; rename the file")
        if part in RECORD_NAMES or RUN_DIR_RE.match(part):
            return (f"the Task id part '{part}' is reserved: the records layout uses that name inside "
                    "runs/<id>/; rename the file")
    return None


def is_git_name(name: str) -> bool:
    """True for a path part that is, or that some file system takes for, `.git`.

    As git's own verify_path: any case (`.GIT` on a case-insensitive file
    system), with trailing dots or spaces (NTFS drops them), and the NTFS
    short name `git~1`. A submodule's `.git` file is such a part too.
    """
    folded = name.casefold()
    return folded.rstrip(". ") == ".git" or folded == "git~1"


def is_ignored_name(name: str) -> bool:
    """True for the temporary and backup files editors leave next to a file.

    Vim writes `.x.swp` and probes with `4913`, Emacs writes `.#x` and `#x#`,
    many tools write `x~`, `x.tmp` or `x.part` before renaming into place.
    `name` is a file name; a path is reduced to its last segment.
    """
    name = name.rsplit("/", 1)[-1]
    return (
        name.startswith(".")
        or name.endswith(_IGNORED_SUFFIXES)
        or (len(name) >= 2 and name.startswith("#") and name.endswith("#"))
        or name == "4913"
    )


def describe(value: object) -> str:
    """A short, human rendering of a YAML value for 'got ...' in messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"a number of {value.bit_length()} bits"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value})"


def parse_labels(value: object) -> dict[str, str]:
    """Validate a labels mapping; values become strings ("true"/"false" for booleans).

    Raises ValueError. Floats are refused rather than stringified because YAML
    has already lost how they were written (`cuda: 12.10` reads as 12.1).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of label names to values, got {describe(value)}")
    labels: dict[str, str] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"label name {describe(name)} is not a name ({NAME_RE.pattern})")
        if isinstance(raw, bool):
            labels[name] = "true" if raw else "false"
        elif isinstance(raw, (str, int)):
            labels[name] = str(raw)
        elif isinstance(raw, float):
            raise ValueError(f"label '{name}': got the number {raw}; quote it to keep it as written")
        else:
            raise ValueError(f"label '{name}': expected a string, integer or boolean, got {describe(raw)}")
    return labels


# --------------------------------------------------------------------------- Task files


def parse_task(task_id: str, path: str, data: bytes, max_size: int = MAX_TASK_FILE_BYTES) -> TaskSpec:
    """Parse one Task file's bytes into a TaskSpec, or raise TaskFileError."""
    if len(data) > max_size:
        # Callers read at most max_size + 1 bytes: the size read is no size of the file's.
        raise TaskFileError(path, f"file is over the limit of {max_size} bytes")
    if b"\x00" in data:
        raise TaskFileError(path, "binary file (contains a NUL byte); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskFileError(path, f"not UTF-8 text (invalid byte at offset {exc.start})") from exc
    text = text.removeprefix("\ufeff")  # editors on Windows prepend a BOM
    if not text.strip():
        raise TaskFileError(path, "the file is empty")

    front, body = _split_front_matter(text, path)
    if not body.strip():
        raise TaskFileError(path, "the requirement (markdown body) is empty")
    open_block = unclosed_shell_block(body)
    if open_block is not None:
        if text.endswith(body):  # the body's line numbers as the file's
            open_block += text.count("\n", 0, len(text) - len(body))
        raise TaskFileError(path, f"the shell block opened on line {open_block} has no closing fence (is the file "
                                  "still being written?): end it with a line of ```")
    fields = _front_matter_fields(front, task_id, path) if front is not None else {}
    return TaskSpec(
        id=task_id,
        path=path,
        revision=hashlib.sha256(data).hexdigest(),
        title=_title(body) or task_id,
        body=body,
        **fields,
    )


def _split_front_matter(text: str, path: str) -> tuple[str | None, str]:
    """(front matter text or None, body). Front matter needs '---' as line 1."""
    lines = text.split("\n")
    if lines[0].rstrip() != "---":
        return None, text
    for i in range(1, len(lines)):
        if lines[i].rstrip() in ("---", "..."):
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :])
    raise TaskFileError(path, "front matter opened with '---' on line 1 has no closing '---' line")


def _front_matter_fields(front: str, task_id: str, path: str) -> dict[str, Any]:
    data = load_yaml(front, path, TaskFileError, first_line=2)
    if data is None:  # `---\n---`: empty front matter is no front matter
        return {}
    if not isinstance(data, dict):
        raise TaskFileError(path, f"front matter must be a mapping of keys to values, got {describe(data)}")
    unknown = [k for k in data if k not in TASK_KEYS]
    if unknown:
        names = ", ".join(f"'{k}'" for k in unknown)
        what = "unknown key" if len(unknown) == 1 else f"unknown keys {names}"
        raise TaskFileError(path, f"{what}; allowed keys are {', '.join(TASK_KEYS)}", key=str(unknown[0]))

    fields: dict[str, Any] = {}
    for key, value in data.items():
        # An explicit null (`agent:`) means "not set", the same as leaving it out.
        if value is None:
            continue
        try:
            fields[key] = _FIELD_PARSERS[key](value, task_id)
        except ValueError as exc:
            raise TaskFileError(path, str(exc), key=key) from exc
    return fields


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(f"expected {what} (letters, digits, '.', '_', '-'), got {describe(value)}")
    return value


def _priority(value: object, _task_id: str) -> Priority:
    if isinstance(value, str) and value.lower() in _PRIORITIES:
        return _PRIORITIES[value.lower()]
    raise ValueError(f"expected one of {', '.join(_PRIORITIES)}, got {describe(value)}")


def _str_list(value: object, what: str) -> list[object]:
    """A list, or a single string meaning a list of one."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {what}, got {describe(value)}")
    return value


def _depends_on(value: object, task_id: str) -> tuple[str, ...]:
    ids: list[str] = []
    for item in _str_list(value, "task ids"):
        if not isinstance(item, str) or not _is_task_id(item) or item.endswith(".md"):
            raise ValueError(
                f"expected task ids (a file's path under tasks/ without .md, like db-schema), got {describe(item)}"
            )
        problem = task_id_problem(item)
        if problem:
            raise ValueError(f"'{item[:60]}' can never be a Task: {problem.removesuffix('; rename the file')}")
        if item == task_id:
            raise ValueError(f"a task cannot depend on itself ('{item}')")
        if item not in ids:
            ids.append(item)
    return tuple(ids)


def _timeout(value: object, _task_id: str) -> float:
    return parse_duration(value)


def _retries(value: object, _task_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WHOLE:
        raise ValueError(f"expected a whole number >= 0, got {describe(value)}")
    return value


def _max_turns(value: object, _task_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WHOLE:
        raise ValueError(f"expected a whole number >= 1 (turns the Agent may take), got {describe(value)}")
    return value


def _max_cost_usd(value: object, _task_id: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"expected an amount in USD above 0, such as 2.50, got {describe(value)}")
    return float(value)


def _context(value: object, _task_id: str) -> tuple[str, ...]:
    paths: list[str] = []
    for item in _str_list(value, "repository paths"):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"expected paths relative to the repository root, got {describe(item)}")
        if item.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", item):
            raise ValueError(f"expected a path relative to the repository root, got {item!r}")
        if ".." in item.replace("\\", "/").split("/"):
            raise ValueError(f"expected a path inside the repository, got {item!r} (contains '..')")
        if "\0" in item:
            raise ValueError(f"expected a path, got {item!r} (contains a NUL character)")
        if any(is_git_name(part) for part in item.replace("\\", "/").split("/")):
            raise ValueError(f"{item!r} is inside a git directory (a '.git' part): taskrun never sends "
                             "git's files (its configuration, the daemon's keys) to a Worker")
        norm = posixpath.normpath(item)
        if norm == ".":
            raise ValueError(f"expected a file or directory in the repository, got {item!r}")
        if norm not in paths:
            paths.append(norm)
    return tuple(paths)


_FIELD_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "agent": lambda v, _t: _name(v, "an agent name"),
    "priority": _priority,
    "depends_on": _depends_on,
    "labels": lambda v, _t: parse_labels(v),
    "group": lambda v, _t: _name(v, "a group name"),
    "timeout": _timeout,
    "retries": _retries,
    "context": _context,
    "max_turns": _max_turns,
    "max_cost_usd": _max_cost_usd,
}


# --------------------------------------------------------------------------- markdown


_FENCE_OPEN = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?[ \t]*$")


def _scan(body: str) -> Iterator[tuple[str | None, list[str], int]]:
    """Yield (None, [line], 0) for each text line and (info, lines, n) for each fenced block: n is the line
    number (from 1) of its opening fence when nothing closes it, else 0.

    CommonMark fences at the top level: up to 3 spaces of indent, 3+ backticks
    or tildes; the closing fence uses the same character, is at least as long,
    and carries nothing but spaces; an unclosed fence runs to the end. Content
    loses as much indentation as the opening fence had. Fences inside list
    items or block quotes indented past 3 spaces are not recognised.
    """
    lines = [line.removesuffix("\r") for line in body.split("\n")]
    i = 0
    while i < len(lines):
        opening = _FENCE_OPEN.match(lines[i])
        # A backtick fence's info string may not contain backticks (CommonMark 4.5).
        if not opening or (opening.group(2)[0] == "`" and "`" in opening.group(3)):
            yield None, [lines[i]], 0
            i += 1
            continue
        indent, fence, info = len(opening.group(1)), opening.group(2), opening.group(3).strip()
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        content: list[str] = []
        start = i + 1
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            line = lines[i]
            strip = len(line) - len(line.lstrip(" "))
            content.append(line[min(indent, strip) :])
            i += 1
        unclosed = start if i >= len(lines) else 0
        i += 1  # past the closing fence (or the end)
        yield info, content, unclosed


def _title(body: str) -> str | None:
    """The text of the first ATX heading outside code blocks, if any.

    Kept exactly as written (`status --json` shows it so): it may hold control characters, terminal
    escapes and bidi controls (only a line feed ends it). Where it lands for people to read (the CLI,
    summary.md, the result commit's message, a pull request's title) it is made inert with
    textsafe.clean.
    """
    for info, lines, _ in _scan(body):
        if info is not None:
            continue
        match = _ATX_HEADING.match(lines[0])
        if match and match.group(1):
            # A closing sequence of '#'s (after a space) is not part of the text.
            text = re.sub(r"(?:^|[ \t]+)#+$", "", match.group(1)).strip()
            if text:
                return text
    return None


_SHELL_LANGUAGES = ("sh", "bash", "shell")


def shell_script(body: str) -> str | None:
    """The built-in shell Agent's script: the body's sh/bash/shell code blocks.

    The language is the first word of the info string (```bash title="x"
    counts). Blocks are joined in order, one newline apart, and the script
    ends with a newline. None when the body has no such block.
    """
    blocks = ["\n".join(lines) for info, lines, _ in _scan(body) if info and _language(info) in _SHELL_LANGUAGES]
    if not blocks:
        return None
    return "\n".join(blocks) + "\n"


def unclosed_shell_block(body: str) -> int | None:
    """The line (from 1, in the body) of a sh/bash/shell block's opening fence that nothing closes, or None.
    CommonMark runs such a block to the end, but a script cut short there is most likely a file still being
    written: the Task is INVALID until it is closed."""
    for info, _, unclosed in _scan(body):
        if unclosed and info and _language(info) in _SHELL_LANGUAGES:
            return unclosed
    return None


def _language(info: str) -> str:
    return info.split(maxsplit=1)[0].lower()


# --------------------------------------------------------------------------- dependencies


def dependency_cycles(deps: Mapping[str, Sequence[str]]) -> list[tuple[str, ...]]:
    """The dependency cycles among the Tasks in `deps` (task id -> its depends_on).

    Each cycle is closed and starts at its smallest id: ('a', 'b', 'a') means a
    depends on b and b on a; ('a', 'a') is a self-dependency. Ids that are not
    keys of `deps` are ignored (a missing dependency is not a cycle).

    Enumerating every elementary cycle can take exponential time, so this
    returns, for every Task that lies on some cycle, a shortest cycle through
    it; each distinct cycle appears once and the list is sorted. So every Task
    on a cycle appears in at least one returned cycle, and a caller can name a
    concrete cycle in each such Task's INVALID message.
    """
    graph = {node: sorted({d for d in targets if d in deps}) for node, targets in deps.items()}
    found: set[tuple[str, ...]] = set()
    covered: set[str] = set()
    for component in _strongly_connected(graph):
        members = set(component)
        for node in sorted(component):
            if node in covered:
                continue
            if len(component) == 1 and node not in graph[node]:
                continue  # a lone node without a self-edge is on no cycle
            cycle = _shortest_cycle_through(node, graph, members)
            found.add(_canonical(cycle))
            covered.update(cycle)
    return sorted(found)


def _strongly_connected(graph: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Tarjan's algorithm with an explicit stack (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            targets = graph[node]
            if child < len(targets):
                work.append((node, child + 1))
                target = targets[child]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            # All children done: fold their low-links in, close the component.
            for target in targets:
                if target in on_stack:
                    low[node] = min(low[node], low[target])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _shortest_cycle_through(start: str, graph: Mapping[str, Sequence[str]], members: set[str]) -> list[str]:
    """Breadth-first from `start` back to itself, staying inside its component."""
    if start in graph[start]:
        return [start, start]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target in graph[node]:
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if target in members and target not in parent:
                    parent[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _canonical(cycle: list[str]) -> tuple[str, ...]:
    """Rotate a closed cycle to start (and end) at its smallest id."""
    ring = cycle[:-1]
    first = ring.index(min(ring))
    ring = ring[first:] + ring[:first]
    return (*ring, ring[0])
