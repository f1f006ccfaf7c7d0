"""Every `--help` ends with an example: the `epilog` of each parser, by command path.

`add_examples(parser)` walks `taskrun`'s parser and its subparsers (argparse
`_SubParsersAction.choices`), gives each the example below for its path
(`("worker", "add")`), and a formatter that prints the example as written.
A parser whose module already set an epilog (prose) keeps it, the example after it;
one whose epilog already has an example keeps that. The CLI reference,
docs/cli.md, shows the same examples.
"""

from __future__ import annotations

import argparse
from typing import Iterator

#: What starts every example epilog; the formatter prints such text line by line, as written.
EXAMPLE_HEAD = "example"

#: Command path -> its example lines (each a shell line; a "# ..." comment may follow it).
EXAMPLES: dict[tuple[str, ...], tuple[str, ...]] = {
    (): ("taskrun status", "taskrun -C ~/src/app logs fix-login -f"),
    ("init",): ("taskrun init", "taskrun -C ~/src/app init"),
    ("up",): ("taskrun up                 # the daemon, until Ctrl-C",
              "taskrun up --once          # every pending Task to a final state, then exit"),
    ("demo",): ("taskrun demo",),
    ("status",): ("taskrun status", "taskrun status fix-login", "taskrun status 'auth/*' --status FAILED --json"),
    ("logs",): ("taskrun logs fix-login --run 2", "taskrun logs fix-login -f      # across retries until it ends",
                "taskrun logs fix-login --json | jq -r 'select(.event == \"output\") | .text'"),
    ("history",): ("taskrun history fix-login", "taskrun history fix-login --json"),
    ("completion",): ("taskrun completion bash > ~/.local/share/bash-completion/completions/taskrun",
                      "taskrun completion zsh > ~/.zfunc/_taskrun"),
    ("submit",): ("taskrun submit ci/lint.md ci/tests.md --wait --timeout 1800 --junit report.xml",),
    ("wait",): ("taskrun wait lint tests --timeout 1800 --json",),
    ("cancel",): ("taskrun cancel fix-login",),
    ("retry",): ("taskrun retry fix-login",),
    ("prune",): ("taskrun prune --older-than 30d --dry-run", "taskrun prune 'ci/*' --older-than 7d --status COMPLETED"),
    ("workers",): ("taskrun workers", "taskrun workers --json"),
    ("worker",): ("taskrun worker add build1 --host build1.example.com --token TOKEN --agents shell,claude",),
    ("worker", "key"): ("taskrun worker key",),
    ("worker", "add"): ("taskrun worker add build1 --host build1.example.com --token TOKEN --agents shell,claude",),
    ("worker", "check"): ("taskrun worker check build1",),
    ("worker", "remove"): ("taskrun worker remove build1",),
    ("keys",): ("taskrun keys show",),
    ("keys", "show"): ("taskrun keys show --json",),
    ("keys", "rotate"): ("taskrun keys rotate --overlap 7d",),
    ("doctor",): ("taskrun doctor", "taskrun doctor --json"),
    ("agents",): ("taskrun agents", "taskrun agents --json"),
    ("trigger",): ("taskrun trigger --quiet",),
    ("hooks",): ("taskrun hooks install /srv/git/app.git",),
    ("hooks", "install"): ("taskrun hooks install /srv/git/app.git", "taskrun hooks install --print"),
    ("top",): ("taskrun top",),
    ("service",): ("taskrun service install --user",),
    ("service", "install"): ("taskrun service install --user", "taskrun service install --print"),
    ("service", "uninstall"): ("taskrun service uninstall --user",),
}


class ExampleFormatter(argparse.RawDescriptionHelpFormatter):
    """Prose wrapped to the terminal as usual; an example (an epilog's part from EXAMPLE_HEAD on) printed
    line by line, as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLE_HEAD):
            prose, example = "", text
        else:
            prose, sep, rest = text.partition(f"\n\n{EXAMPLE_HEAD}")
            example = EXAMPLE_HEAD + rest if sep else ""
        parts = [argparse.HelpFormatter._fill_text(self, prose, width, indent)] if prose else []
        if example:
            parts.append(super()._fill_text(example, width, indent))
        return "\n\n".join(parts)


def epilog(lines: tuple[str, ...]) -> str:
    """"example:\\n  taskrun ..." (or "examples:" for several lines)."""
    head = EXAMPLE_HEAD + ("s:" if len(lines) > 1 else ":")
    return "\n".join([head, *(f"  {line}" for line in lines)])


def walk(parser: argparse.ArgumentParser,
         path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) for `parser` and every subparser under it, depth first; aliases once."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, child in action.choices.items():
                if id(child) not in seen:
                    seen.add(id(child))
                    yield from walk(child, (*path, name))


def add_examples(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> None:
    """Give every parser under `parser` (whose command path is `prefix`: `("worker",)`) its example epilog
    (EXAMPLES) and the ExampleFormatter."""
    for path, each in walk(parser, prefix):
        lines = EXAMPLES.get(path)
        if lines and not (each.epilog or "").startswith(EXAMPLE_HEAD) and f"\n\n{EXAMPLE_HEAD}" not in \
                (each.epilog or ""):
            # A module's own epilog (prose) comes first, the example last.
            each.epilog = f"{each.epilog}\n\n{epilog(lines)}" if each.epilog else epilog(lines)
        if each.formatter_class is argparse.HelpFormatter:
            each.formatter_class = ExampleFormatter
