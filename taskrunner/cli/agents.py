"""`taskrun agents [--json]`: each Agent, where it is available (Worker, CLI version), and any pause.

With a daemon running, availability comes from the Workers' `ready`
(the daemon's `workers` request); without one, only the configuration is
known. Pauses are read from the state directory either way (pauses.py).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from taskrunner import control, gitops
from taskrunner.cli.render import literal
from taskrunner.errors import DaemonNotRunning
from taskrunner.textsafe import clean


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("agents", help="Agents, where they are available, and any usage-limit pause",
                       description="Agents, where they are available (Worker, CLI version), and any usage-limit "
                                   "pause")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_agents)


def cmd_agents(args: argparse.Namespace, out: Console) -> int:
    from taskrunner import pauses  # with the Agents' stream readers: only for this command
    from taskrunner.availability import agent_rows
    from taskrunner.cli.main import EXIT_OK, find_root
    from taskrunner.config import load_config

    root = find_root(args)
    config = load_config(root)
    state = gitops.state_dir(root)
    try:
        workers = control.request(state, {"command": "workers"}, wait_start=False)["workers"]
        daemon = True
    except DaemonNotRunning:
        workers = [{"name": w.name, "online": None, "agents": list(w.agents), "presets": None}
                   for w in config.workers.values()]
        daemon = False
    rows = agent_rows(config.agents, workers if isinstance(workers, list) else [], pauses.load(state), time.time())
    if args.json:
        print(json.dumps({"daemon": daemon, "agents": rows}, indent=2, sort_keys=True))
        return EXIT_OK
    out.print(agents_table(rows))
    for row in rows:
        if row.get("fix"):  # the table cuts long cells: the fix is shown whole
            out.print(clean(f"{row['name']}: {_where(row)}: {row['fix']}"), markup=False, soft_wrap=True)
    if not daemon:
        out.print("daemon not running: where each CLI is installed is known once Workers connect "
                  "(`taskrun up`)", markup=False)
    return EXIT_OK


def agents_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("AGENT", "PRESET", "MODEL", "AVAILABLE ON", "PAUSED"):
        table.add_column(column, overflow="fold" if column in ("AVAILABLE ON", "PAUSED") else "ellipsis")
    for row in rows:
        table.add_row(literal(row["name"]), literal(row["preset"]), literal(row.get("model") or "-"),
                      literal(_where(row)), literal(_paused(row["pauses"])))
    return table


def _where(row: dict[str, Any]) -> str:
    """The AVAILABLE ON cell: each Worker offering the Agent, with its CLI's version or why it cannot run it."""
    parts = []
    for place in row["workers"]:
        if place["status"] == "configured":
            parts.append(f"{place['worker']}: configured path {row.get('path')} (checked when a Run starts)")
        elif place["status"] == "available":
            version = f" {place['version']}" if place.get("version") else ""
            parts.append(f"{place['worker']}{version}")
        elif place["status"] == "missing":
            parts.append(f"{place['worker']} (CLI not found)")
        else:
            parts.append(f"{place['worker']} (not seen yet)")
    return clean(", ".join(parts)) or "no Worker offers it"


def _paused(entries: list[dict[str, Any]]) -> str:
    return ", ".join(f"until {p['until_iso']}" + (f" on {p['worker']}" if p.get("worker") else "")
                     for p in entries) or "-"
