"""The Task's directory in the Agent's checkout, the context index and the prompt (Worker side).

Before an Agent starts, the Worker writes, inside the checkout (the Run's
workspace), as itself and before the Agent can touch anything:

    .task/<task-id>/run-<n>/        n: manifest "run_number" (else "attempt")
        task.md                     the Task file's bytes, as the bundle laid it
        context/<path>              a copy of each of the Task's context files
        prompt.md                   the rendered prompt (agents/prompt.py)
        metadata.yaml               task id, title, run id and number, attempt, Worker, Agent name and
                                    preset, base commit, budget, timeout, the context copied and skipped

Files 0644, directories 0755. Every path is walked with safefs.Beneath: no
link in the checkout is followed, and a context path that is a link, a
special file, outside the checkout or not there is skipped with a sentence in
the prompt (`skipped`).

The context index (INDEX_FILES): Claude Code reads `CLAUDE.md`, Codex
`AGENTS.md`, Gemini CLI `GEMINI.md` at the checkout's root. The Worker appends
a section to that file, between the lines BEGIN and END, that points at the
task file and the context copies (Claude Code: `@path` import lines; the
others: plain relative paths). The file is created when the repository has
none; the repository's own content stays as it was, before the section. When
the file is a link, a special file, a hard link or over MAX_INDEX_BYTES, it is
not touched and the index becomes the prompt's prefix, as it always is for
the other presets (aider, command).

Neither `.task/<task-id>/run-<n>/` nor the section is ever part of the
returned change: gitflow/change.py leaves out the directory and calls
`strip_section` on the index file's new content. `strip_section` removes
exactly taskrun's section, byte for byte as `section` writes it: a BEGIN..END
block whose every line is one `section` writes for this Run (its heading
names the Task id and run number, then the fixed sentence, the task file's
line, then only lines naming copies under the Run's `context/`), never any
other block between the same markers. A block of the repository's own, one
the Agent appended (before or after taskrun's), and a taskrun section the
base commit already held all stay. When the Agent edited inside taskrun's
section, it is no longer taskrun's exact bytes: nothing is removed, and the
change keeps the file as the Agent left it (`section_edited` tells, and the
result commit's message notes it).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from taskrunner.agents import prompt as prompts
from taskrunner.defaults import MAX_CONTEXT_BYTES
from taskrunner.errors import UnsafePath, WorkerError
from taskrunner.model import TaskSpec
from taskrunner.safefs import Beneath, split
from taskrunner.taskfile import task_id_problem

#: The directory, at the checkout's root, that holds each Task's Run directories.
TASK_ROOT = ".task"
#: The context index file each preset's tool reads at the checkout's root.
INDEX_FILES: Mapping[str, str] = {"claude": "CLAUDE.md", "codex": "AGENTS.md", "gemini": "GEMINI.md"}
#: The lines that open and close taskrun's section of an index file.
BEGIN = "<!-- taskrun:begin -->"
END = "<!-- taskrun:end -->"
#: An index file larger than this is not read or touched (the index goes into the prompt instead).
MAX_INDEX_BYTES = 4 * 1024 * 1024
TASK_FILE = "task.md"
PROMPT_FILE = "prompt.md"
METADATA_FILE = "metadata.yaml"
CONTEXT_DIR = "context"
_CHUNK = 1024 * 1024


class TaskDirError(WorkerError):
    """Raised when the Task's directory cannot be written in the checkout (a link or file in the way)."""


@dataclass(frozen=True)
class TaskDir:
    """What `write_task_dir` wrote.

    path         absolute `<workspace>/.task/<task-id>/run-<n>`
    prompt_file  absolute `<path>/prompt.md`
    prompt       its text (the rendered template, after the index when the index is its prefix)
    rel          `.task/<task-id>/run-<n>`, relative to the checkout's root
    index_file   the index file that holds the section ("CLAUDE.md"), or None (the prompt's prefix)
    context      the copies made, relative to the checkout's root
    skipped      one sentence per context path not copied
    """

    path: Path
    prompt_file: Path
    prompt: str
    rel: str = ""
    index_file: str | None = None
    context: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


def run_number(manifest: Mapping[str, Any]) -> int:
    """n of `run-<n>`: the manifest's `run_number`, else its `attempt`, else 1."""
    for key in ("run_number", "attempt"):
        value = manifest.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return 1


def task_dir_rel(task_id: str, number: int) -> str:
    """`.task/<task-id>/run-<n>`; TaskDirError when the Task id is not a plain relative path."""
    rel = f"{TASK_ROOT}/{task_id}/run-{number}"
    problem = task_id_problem(task_id) or next(
        (f"it holds the character U+{ord(c):04X}" for c in task_id if unicodedata.category(c).startswith("C")), None)
    if problem is not None:  # the control plane never sends such an id (taskfile.task_id_for); a manifest might
        raise TaskDirError(f"the Task id {task_id!r} cannot name a directory: {problem}")
    try:
        split(rel)
    except UnsafePath as exc:
        raise TaskDirError(f"the Task id {task_id!r} cannot name a directory: {exc}") from None
    return rel


def index_file(preset: str | None) -> str | None:
    """The context index file `preset`'s tool reads ("CLAUDE.md"), or None (the index is the prompt's prefix)."""
    return INDEX_FILES.get(preset or "")


def index_lines(preset: str | None, task_file: str, context: tuple[str, ...]) -> list[str]:
    """The lines pointing at the task file and the context copies: `@path` for Claude Code, else `- path`."""
    if preset == "claude":
        return [f"@{task_file}", *(f"@{path}" for path in context)]
    return [f"- {task_file}{_REQUIREMENT}", *(f"- {path}" for path in context)]


#: The sentence after the heading of taskrun's section.
_SENTENCE = ("The requirement of the Task being worked on, and its context files (taskrun's copies; they are "
             "not part of the change):")
#: What follows the task file's path on its line, for the presets that name plain paths.
_REQUIREMENT = " (the requirement)"


def section(preset: str | None, task_id: str, number: int, task_file: str, context: tuple[str, ...]) -> str:
    """taskrun's section of an index file, from the line BEGIN to the line END, ending with a newline."""
    return "\n".join([BEGIN, _heading(task_id, number), "", _SENTENCE, "",
                      *index_lines(preset, task_file, context), END]) + "\n"


def _heading(task_id: str, number: int) -> str:
    return f"## taskrun: Task {task_id}, run {number}"


def with_section(base: bytes | None, block: bytes) -> bytes:
    """An index file's content `base` (None or b'': none) with `block` appended after a blank line."""
    if not base:
        return block
    return base + (b"\n" if base.endswith(b"\n") else b"\n\n") + block


@dataclass(frozen=True)
class Expected:
    """What taskrun's section of this Run must say: its Task id, run number and the Agent's preset.

    Given to `strip_section` by a caller that knows the Run (gitflow/change.py, from the manifest):
    only a block that is exactly `section(preset, task_id, number, <rel>/task.md, copies)` for some
    copies under `<rel>/context/` is then taskrun's.
    """

    task_id: str
    number: int
    preset: str | None


def strip_section(text: bytes, base: bytes | None, expected: Expected | None = None) -> bytes | None:
    """The index file's content as the change should hold it: None for no file.

    `text` is its content after the Run, `base` its content at the base commit (None: no such file),
    `expected` this Run's section (None: any section of the form `section` writes).

    Only a block that is byte for byte a section `section` writes (for `expected`'s Task, run and
    preset when given) is taskrun's; every other BEGIN..END block (the repository's own, one the Agent
    wrote) is content like any other. When `text` holds more copies of such a block than `base` did,
    the last extra copy is removed with the blank line `with_section` put before it; exactly `base`
    plus the section gives `base` back (None when there was none). When there is no extra copy, `text`
    is returned unchanged: nothing is removed (`section_edited` tells whether that is because the Agent
    edited inside the section). An empty result where the base had no file is no file.
    """
    spans = _sections(text, expected)
    before_counts = Counter(base[a:b] for a, b in _sections(base, expected)) if base else Counter()
    counts = Counter(text[a:b] for a, b in spans)
    extra = [(a, b) for a, b in spans if counts[text[a:b]] > before_counts[text[a:b]]]
    if not extra:
        return text
    start, end = extra[-1]
    if text == with_section(base, text[start:end]):
        return base
    before, after = text[:start], text[end:]
    if before.endswith(b"\n\n"):
        before = before[:-1]  # the blank line with_section put before the block
    kept = before + after
    return None if base is None and not kept else kept


def _lines(text: bytes) -> tuple[list[bytes], list[int]]:
    """`text`'s lines (newlines kept) and the byte offset each starts at."""
    lines = text.splitlines(keepends=True)
    offsets, at = [], 0
    for line in lines:
        offsets.append(at)
        at += len(line)
    return lines, offsets


def _sections(text: bytes, expected: Expected | None) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each block of `text` that is exactly a section `section` writes
    (for `expected` when given), its last newline included, in order."""
    lines, offsets = _lines(text)
    found = []
    i = 0
    while i < len(lines):
        end = _section_end(lines, i, expected) if lines[i] == BEGIN.encode() + b"\n" else None
        if end is None:
            i += 1
            continue
        found.append((offsets[i], offsets[end] + len(lines[end])))
        i = end + 1
    return found


_HEADING = re.compile(rb"## taskrun: Task (\S(?:.*\S)?), run ([1-9][0-9]*)\n")
_TASK_LINE = re.compile(rb"(@|- )(" + re.escape(TASK_ROOT.encode()) + rb"/.+/run-[1-9][0-9]*)/"
                        + re.escape(TASK_FILE.encode()) + rb"(.*)\n")


def _section_end(lines: list[bytes], i: int, expected: Expected | None) -> int | None:
    """The index of the END line closing the section that opens at `lines[i]` (a BEGIN line), when the
    lines from `i` are exactly one `section` writes; else None."""
    head = _HEADING.fullmatch(lines[i + 1]) if i + 1 < len(lines) else None
    if head is None or lines[i + 2:i + 5] != [b"\n", _SENTENCE.encode() + b"\n", b"\n"] or i + 5 >= len(lines):
        return None
    task = _TASK_LINE.fullmatch(lines[i + 5])
    if task is None:
        return None
    style, rel, rest = task.group(1), task.group(2), task.group(3)
    if rest != (b"" if style == b"@" else _REQUIREMENT.encode()):
        return None
    if expected is not None:
        try:
            want = task_dir_rel(expected.task_id, expected.number).encode()
        except TaskDirError:
            return None
        if (head.group(1), int(head.group(2)), rel) != (expected.task_id.encode(), expected.number, want) \
                or style != (b"@" if expected.preset == "claude" else b"- "):
            return None
    copies = style + rel + b"/" + CONTEXT_DIR.encode() + b"/"
    for j in range(i + 6, len(lines)):
        if lines[j] == END.encode() + b"\n":
            return j
        line = lines[j]
        if not (line.startswith(copies) and line.endswith(b"\n") and len(line) > len(copies) + 1):
            return None
    return None


def section_edited(text: bytes, base: bytes | None, expected: Expected) -> bool:
    """Whether `text` holds taskrun's section for `expected` in a form other than the one it wrote: more
    BEGIN lines followed by this Run's heading than `base` has, and no more exact sections than `base`
    (the Agent edited inside the section, so `strip_section` left the file as it is)."""
    heading = (_heading(expected.task_id, expected.number) + "\n").encode()

    def opened(data: bytes) -> int:
        lines, _ = _lines(data)
        return sum(1 for k in range(len(lines) - 1)
                   if lines[k].rstrip(b"\r\n") == BEGIN.encode() and lines[k + 1].replace(b"\r\n", b"\n") == heading)

    old = base or b""
    return opened(text) > opened(old) and len(_sections(text, expected)) <= len(_sections(old, expected))


def write_task_dir(workspace: Path, manifest: Mapping[str, Any], spec: TaskSpec, preset: str) -> TaskDir:
    """Write `.task/<task-id>/run-<n>/` in `workspace`, the context index, and the prompt.

    `manifest`: the verified bundle manifest (task_id, run_id, run_number or attempt, worker, title,
    base_commit, budget, timeout, files, git.branch, agent.name, agent.prompt_template).
    `spec`: the parsed Task file (its path, body, context). `preset`: the Agent's preset.
    TaskDirError when the directory cannot be written (a link or a file in its way), PromptError
    (agents/prompt.py) when the template fails, OSError on an I/O failure.
    """
    task_id = str(manifest.get("task_id") or spec.id)
    number = run_number(manifest)
    rel = task_dir_rel(task_id, number)
    tree = Beneath(workspace)
    try:
        _make_dirs(tree, rel)
        try:
            task_bytes = tree.read_bytes(spec.path)
        except (UnsafePath, OSError) as exc:
            raise TaskDirError(f"the Task file {spec.path} cannot be read in the checkout: {exc}") from None
        _write(tree, f"{rel}/{TASK_FILE}", task_bytes)
        copied, skipped = _copy_context(tree, rel, spec.context, manifest.get("files"))
        task_file = f"{rel}/{TASK_FILE}"
        block = section(preset, task_id, number, task_file, copied)
        index = _append_index(tree, index_file(preset), block.encode())
        values = _values(manifest, spec, preset, rel, number, copied, skipped, index)
        agent = manifest.get("agent") if isinstance(manifest.get("agent"), Mapping) else {}
        template = agent.get("prompt_template")
        name = f"agents.{agent.get('name') or preset}.prompt_template"
        text = prompts.render(template if isinstance(template, str) else None, values, name=name)
        if index is None:
            prefix = "\n".join(["The requirement and context files of this Task:", "",
                                *index_lines(preset, task_file, copied)])
            text = f"{prefix}\n\n{text}"
        _write(tree, f"{rel}/{PROMPT_FILE}", text.encode())
        _write(tree, f"{rel}/{METADATA_FILE}", _metadata(values).encode())
    except UnsafePath as exc:
        raise TaskDirError(f"cannot write {rel}/ in the checkout: {exc}") from None
    finally:
        tree.close()
    path = workspace / rel
    return TaskDir(path, path / PROMPT_FILE, text, rel, index, copied, skipped)


def _make_dirs(tree: Beneath, rel: str) -> None:
    """Make `.task/<task-id>/run-<n>` and its parents, mode 0755, following no link (UnsafePath)."""
    parts = split(rel)
    for i in range(1, len(parts) + 1):
        fd = tree.open_dir(parts[:i], create=True)
        try:
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)


def _write(tree: Beneath, rel: str, data: bytes, mode: int = 0o644) -> None:
    tree.write_atomic(rel, data, mode=mode)


def _copy_context(tree: Beneath, rel: str, context: tuple[str, ...],
                  files: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Copy each context path to `<rel>/context/<path>`: (copies made, sentences on those skipped)."""
    copied: list[str] = []
    skipped: list[str] = []
    left = MAX_CONTEXT_BYTES
    for path in context:
        if any(ord(ch) < 32 or ch == "\x7f" for ch in path):
            skipped.append(f"{path!r}: its name holds a control character")
            continue
        try:
            parts = split(path)
        except UnsafePath:
            skipped.append(f"{path}: not a plain path inside the repository")
            continue
        try:
            source = tree.open_file(path)
        except FileNotFoundError:
            skipped.append(f"{path}: not in the checkout")
            continue
        except UnsafePath as exc:
            skipped.append(f"{path}: {exc}")  # "docs/a.md: docs is a symbolic link; taskrun reads only ..."
            continue
        except OSError as exc:
            skipped.append(f"{path}: cannot be read ({exc.strerror or exc})")
            continue
        target = f"{rel}/{CONTEXT_DIR}/{'/'.join(parts)}"
        try:
            size = os.fstat(source).st_size
            if size > left:
                skipped.append(f"{path}: over the {MAX_CONTEXT_BYTES} bytes all context files may hold")
                continue
            _make_dirs(tree, "/".join(split(target)[:-1]))
            out = tree.open_file(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.fchmod(out, 0o644)
                left -= _copy(source, out, left)
            finally:
                os.close(out)
        finally:
            os.close(source)
        copied.append(target)
    return tuple(copied), tuple(skipped)


def _copy(source: int, out: int, most: int) -> int:
    """Copy `source` to `out`, at most `most` bytes: the bytes copied."""
    done = 0
    while done < most:
        chunk = os.read(source, min(_CHUNK, most - done))
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]
        done += len(chunk)
    return done


def _append_index(tree: Beneath, name: str | None, block: bytes) -> str | None:
    """Append `block` to the index file `name` at the checkout's root (created when absent): `name`, or None
    when there is none for the preset or the file is not a plain regular file of its own (left untouched)."""
    if name is None:
        return None
    try:
        found = tree.lstat(name)
        if found is None:
            fd = tree.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, block)
            finally:
                os.close(fd)
            return name
        if found.st_size > MAX_INDEX_BYTES:
            return None
        fd = tree.open_file(name)  # UnsafePath: a link, a special file, a hard link
        try:
            mode = os.fstat(fd).st_mode & 0o777
            with os.fdopen(os.dup(fd), "rb") as handle:
                base = handle.read(MAX_INDEX_BYTES + 1)
        finally:
            os.close(fd)
        if len(base) > MAX_INDEX_BYTES:
            return None
        tree.write_atomic(name, with_section(base, block), mode=mode)
        return name
    except (UnsafePath, FileExistsError, IsADirectoryError):
        return None


def _values(manifest: Mapping[str, Any], spec: TaskSpec, preset: str, rel: str, number: int,
            copied: tuple[str, ...], skipped: tuple[str, ...], index: str | None) -> dict[str, Any]:
    """The template's variables (agents/prompt.py lists them)."""
    agent = manifest.get("agent") if isinstance(manifest.get("agent"), Mapping) else {}
    git = manifest.get("git") if isinstance(manifest.get("git"), Mapping) else {}
    repo = manifest.get("repo") if isinstance(manifest.get("repo"), Mapping) else {}
    task_id = str(manifest.get("task_id") or spec.id)
    attempt = manifest.get("attempt")
    timeout = manifest.get("timeout")
    base = manifest.get("base_commit") or repo.get("base")
    return {
        "task_id": task_id,
        "title": _text(manifest.get("title")) or _text(git.get("title")) or spec.title,
        "body": spec.body,
        "run_id": _text(manifest.get("run_id")),
        "run_number": number,
        "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else number,
        "worker": _text(manifest.get("worker")),
        "agent": _text(agent.get("name")) or preset,
        "preset": preset,
        "branch": _text(git.get("branch")) or f"taskrun/{task_id}",
        "base_commit": base if isinstance(base, str) else None,
        "task_dir": rel,
        "task_file": f"{rel}/{TASK_FILE}",
        "metadata_file": f"{rel}/{METADATA_FILE}",
        "source_file": spec.path,
        "context": list(copied),
        "skipped": list(skipped),
        "index_file": index,
        "budget": _budget(manifest.get("budget")),
        "timeout": float(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        and timeout > 0 else None,
    }


def _budget(value: Any) -> dict[str, Any]:
    """{max_turns: int | None, max_cost_usd: float | None} from the manifest's `budget` (anything else: None)."""
    given = value if isinstance(value, Mapping) else {}
    turns, cost = given.get("max_turns"), given.get("max_cost_usd")
    return {"max_turns": turns if isinstance(turns, int) and not isinstance(turns, bool) and turns > 0 else None,
            "max_cost_usd": float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool)
            and cost > 0 else None}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _metadata(values: Mapping[str, Any]) -> str:
    """metadata.yaml: what the Agent (or a person looking at the checkout) may want to know of this Run."""
    data = {
        "task_id": values["task_id"], "title": values["title"], "task_file": values["source_file"],
        "run_id": values["run_id"], "run_number": values["run_number"], "attempt": values["attempt"],
        "worker": values["worker"], "agent": {"name": values["agent"], "preset": values["preset"]},
        "branch": values["branch"], "base_commit": values["base_commit"], "budget": values["budget"],
        "timeout": values["timeout"], "context": values["context"], "skipped": values["skipped"],
        "index_file": values["index_file"],
    }
    return "# taskrun: this Run of the Task (written by the Worker; not part of the change)\n" + \
        yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


__all__ = ["BEGIN", "END", "INDEX_FILES", "TASK_ROOT", "Expected", "TaskDir", "TaskDirError", "index_file",
           "run_number", "section", "section_edited", "strip_section", "task_dir_rel", "with_section", "write_task_dir"]
