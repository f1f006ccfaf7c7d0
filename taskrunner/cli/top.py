"""`taskrun top`: the live dashboard of the running daemon (taskrunner/tui/).

Textual is imported only when the dashboard starts: every other command
starts without it.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from taskrunner import control, gitops
from taskrunner.cli.main import EXIT_NOT_COMPLETED, EXIT_OK, UsageError, find_root
from taskrunner.errors import DaemonNotRunning

#: How long `taskrun top` waits for the daemon's first answer, in seconds.
PING_TIMEOUT = 5.0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    help = ("a live dashboard of the running daemon: Workers, Tasks, Runs and output "
            "(c cancel, r retry, f follow, / filter, s sort, q quit)")
    top = sub.add_parser("top", help=help, description=help)
    top.set_defaults(handler=cmd_top)


def cmd_top(args: argparse.Namespace, out: Console) -> int:
    """Exit 0 after q; 1 (EXIT_NOT_COMPLETED) when no daemon runs; 2 when not at a terminal."""
    root = find_root(args)
    try:
        control.request(gitops.state_dir(root), {"command": "ping"}, PING_TIMEOUT)
    except DaemonNotRunning:
        print(f"taskrun: no daemon is running in {root}: start one with `taskrun up`", file=sys.stderr)
        return EXIT_NOT_COMPLETED
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("taskrun top needs a terminal; `taskrun status` and `taskrun workers` print the same")
    from taskrunner.tui.app import TopApp
    from taskrunner.tui.source import Source

    code = TopApp(Source(root)).run()
    return EXIT_OK if code is None else int(code)
