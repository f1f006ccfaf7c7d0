"""The documentation names what taskrun accepts, and its links lead somewhere.

- Every configuration key the loader accepts (each `*_KEYS` table of
  `taskrunner/config*.py`, the key sets it refuses unknown keys against, and
  the Task file's `TASK_KEYS`) is named in docs/, in code, in a paragraph,
  list item, table row or code block that (with its headings) also names the
  key's section: `listen` under `webhook`, `metrics` or `notify`.
- Every `taskrun` and `taskrun-worker` command and subcommand (their argparse
  trees) and every long option appears in docs/.
- Every relative link in README.md and docs/*.md leads to a file or
  directory, and a `#anchor` to a heading of that file, by GitHub's anchor
  rules (lowercase, punctuation dropped, spaces to `-`, `-1`, `-2` for
  repeats).
"""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from taskrunner import taskfile
from taskrunner.cli import main as cli_main
from taskrunner.worker import main as worker_main

ROOT = Path(__file__).resolve().parents[2]
#: The README's test command: CI (.ci/run) runs exactly this line.
TEST_COMMAND = "python3 -m pip install -e '.[test]' && python3 -m pytest"

_FENCE_RE = re.compile(r"^(```+|~~~+)")
_HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN_RE = re.compile(r"(`+)(.+?)\1")
_LINK_RE = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LIST_ITEM_RE = re.compile(r"^(?:[-*+]|\d+\.)\s")


# ---------------------------------------------------------------- markdown


@dataclass(frozen=True)
class Block:
    """One paragraph, top-level list item, table row or fenced code block of a page.

    `context` is the block's text with the headings above it; `code` the
    identifiers in its code (inline spans, or the whole fenced block).
    """

    page: str
    context: str
    code: frozenset[str]


def headings(text: str) -> list[tuple[int, str]]:
    """The (level, text) of every heading outside fenced code blocks, in order."""
    found, fence = [], ""
    for line in text.splitlines():
        marker = _FENCE_RE.match(line)
        if marker:
            if not fence:
                fence = marker.group(1)
            elif line.startswith(fence):
                fence = ""
            continue
        heading = _HEADING_RE.match(line) if not fence else None
        if heading:
            found.append((len(heading.group(1)), heading.group(2)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    parts = _CODE_SPAN_RE.split(text)  # [text, ticks, code, text, ...]: HTML tags count outside code only
    text = "".join(part if i % 3 == 2 else re.sub(r"<[^>]+>", "", part).replace("*", "")
                   for i, part in enumerate(parts) if i % 3 != 1)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor GitHub makes for a page's headings (`x`, then `x-1`, `x-2` for repeats)."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in headings(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def blocks(page: str, text: str) -> Iterator[Block]:
    """The page's blocks, each with the headings above it."""
    chain: list[tuple[int, str]] = []
    current: list[str] = []
    fence = ""

    def done(is_code: bool = False) -> Iterator[Block]:
        if current:
            body = "\n".join(current)
            code = body if is_code else " ".join(m.group(2) for m in _CODE_SPAN_RE.finditer(body))
            context = "\n".join([h for _, h in chain] + [body])
            yield Block(page, context, frozenset(_WORD_RE.findall(code)))
            current.clear()

    for line in text.splitlines():
        marker = _FENCE_RE.match(line)
        if fence:
            current.append(line)
            if marker and line.startswith(fence):
                fence = ""
                yield from done(is_code=True)
            continue
        if marker:
            yield from done()
            fence = marker.group(1)
            current.append(line)
            continue
        heading = _HEADING_RE.match(line)
        if heading:
            yield from done()
            level = len(heading.group(1))
            chain[:] = [h for h in chain if h[0] < level] + [(level, heading.group(2))]
        elif not line.strip():
            yield from done()
        elif line.startswith("|") or _LIST_ITEM_RE.match(line):
            yield from done()
            current.append(line)
            if line.startswith("|"):
                yield from done()
        else:
            current.append(line)
    yield from done(is_code=bool(fence))


def outside_code(text: str) -> str:
    """The page without its fenced blocks and code spans (links in code are not links)."""
    kept, fence = [], ""
    for line in text.splitlines():
        marker = _FENCE_RE.match(line)
        if marker:
            if not fence:
                fence = marker.group(1)
            elif line.startswith(fence):
                fence = ""
            continue
        if not fence:
            kept.append(_CODE_SPAN_RE.sub("", line))
    return "\n".join(kept)


def broken_links(root: Path) -> list[str]:
    """`page: target (why)` for every relative link of README.md and docs/*.md that leads nowhere."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in _LINK_RE.finditer(outside_code(text)):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            where = (page.parent / path_part).resolve() if path_part else page
            name = page.relative_to(root)
            if not where.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and where.is_file() and where.suffix == ".md":
                if anchor not in anchors(where.read_text(encoding="utf-8")):
                    broken.append(f"{name}: {target} (no heading with that anchor in {where.name})")
    return broken


def docs_text(root: Path) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted((root / "docs").glob("*.md"))}


# ---------------------------------------------------------------- what taskrun accepts


@dataclass(frozen=True)
class KeyTable:
    """A set of keys the loader accepts: its module, its name, the section word it lives under."""

    where: str
    section: str | None
    keys: tuple[str, ...]


def key_tables() -> list[KeyTable]:
    """Every `*_KEYS` tuple of strings in taskrunner/config*.py, and the Task file's keys.

    The section word comes from the table's name (`_PULL_REQUEST_KEYS` -> "pull request");
    `_TOP_KEYS` are the sections themselves, and Task file keys need no section.
    """
    tables = []
    for path in sorted((ROOT / "taskrunner").glob("config*.py")):
        module = importlib.import_module(f"taskrunner.{path.stem}")
        for name, value in sorted(vars(module).items()):
            if not re.fullmatch(r"_?[A-Z][A-Z_]*_KEYS", name) or not isinstance(value, tuple):
                continue
            if not value or not all(isinstance(key, str) for key in value):
                continue
            word = name.strip("_").lower().removesuffix("_keys")
            tables.append(KeyTable(f"{path.stem}.{name}", None if word == "top" else word, value))
    tables.append(KeyTable("taskfile.TASK_KEYS", None, taskfile.TASK_KEYS))
    return tables


def undocumented_keys(root: Path) -> list[str]:
    every = [block for page, text in docs_text(root).items() for block in blocks(page, text)]
    missing = []
    for table in key_tables():
        section = None
        if table.section:  # "pull_request" matches "pull_requests", "pull request", "Pull requests"
            section = re.compile(r"\b" + r"[ _.-]?".join(map(re.escape, table.section.split("_"))), re.I)
        for key in table.keys:
            if not any(key in block.code and (section is None or section.search(block.context))
                       for block in every):
                under = f" under '{table.section}'" if table.section else ""
                missing.append(f"{key} ({table.where}{under})")
    return missing


def command_tree(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) for a parser and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_tree(sub, (*path, name))


def undocumented_commands(root: Path) -> list[str]:
    text = "\n".join(docs_text(root).values())
    missing = []
    for program, parser in (("taskrun", cli_main.build_parser()), ("taskrun-worker", worker_main.build_parser())):
        for words, sub in command_tree(parser, (program,)):
            command = " ".join(words)
            spaced = r"\s+".join(map(re.escape, words))  # a command may wrap at a line end
            if len(words) > 1 and not re.search(rf"(?<![\w-]){spaced}(?![\w-])", text):
                missing.append(command)
            for action in sub._actions:
                for option in action.option_strings:
                    if not option.startswith("--") or option == "--help" or action.help == argparse.SUPPRESS:
                        continue
                    if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                        missing.append(f"{command} {option}")
    return sorted(set(missing))


# ---------------------------------------------------------------- tests


def test_every_configuration_key_is_documented_under_its_section() -> None:
    missing = undocumented_keys(ROOT)
    assert not missing, ("configuration keys taskrun accepts but docs/*.md does not name (in code, in a block "
                         "that names their section): " + ", ".join(missing))


def test_every_command_and_long_option_is_documented() -> None:
    missing = undocumented_commands(ROOT)
    assert not missing, "commands and options not named in docs/*.md: " + ", ".join(missing)


def test_every_relative_link_leads_to_a_file_and_heading() -> None:
    broken = broken_links(ROOT)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_key_tables_are_the_loaders() -> None:
    """The tables found are the ones the loader checks: a key known to be accepted is in them."""
    found = {table.where: table for table in key_tables()}
    assert "worker_key" in found["config._SSH_ONLY_KEYS"].keys
    assert found["config._RECORDS_KEYS"].section == "records"
    assert "prompt_template_file" in found["config_agents.AGENT_KEYS"].keys
    assert set(found["config._TOP_KEYS"].keys) >= {"agents", "workers", "scheduler", "git", "records"}
    assert "depends_on" in found["taskfile.TASK_KEYS"].keys


def test_an_undocumented_key_command_and_broken_link_are_found(tmp_path: Path) -> None:
    """The checks fail on documentation that lacks a key, a command, a file or a heading."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# t\n\n## Two words\n\n[ok](#two-words) [gone](#nope) "
                                        "[file](docs/missing.md) [page](docs/a.md#configuration-recordsx-keys)\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## Configuration: `records.<x>` keys\n\n| `max_log_bytes` | the cap |\n\n"
        "## Other\n\nHere `keep_full_logs` is without its section word.\n\n`taskrun\nstatus --json`\n")
    assert broken_links(tmp_path) == ["README.md: #nope (no heading with that anchor in README.md)",
                                      "README.md: docs/missing.md (no such file)"]
    keys = undocumented_keys(tmp_path)
    assert "keep_full_logs (config._RECORDS_KEYS under 'records')" in keys
    assert not any(key.startswith("max_log_bytes ") for key in keys)
    commands = undocumented_commands(tmp_path)
    assert "taskrun status" not in commands and "taskrun status --json" not in commands
    assert "taskrun keys rotate" in commands and "taskrun keys rotate --overlap" in commands


def test_github_anchors() -> None:
    assert slug("Configuration: `.taskrun.yaml`") == "configuration-taskrunyaml"
    assert slug("Configuration: `agents.<name>` keys") == "configuration-agentsname-keys"
    assert slug("The sandbox's share: `throughput_local --sandbox-cost`") == \
        "the-sandboxs-share-throughput_local---sandbox-cost"
    assert anchors("# A\n\n## Same\n\n```\n## Not a heading\n```\n\n## Same\n") == {"a", "same", "same-1"}


def test_the_readme_keeps_the_test_command_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"```sh\n{TEST_COMMAND}\n```" in readme
    assert TEST_COMMAND in ci
