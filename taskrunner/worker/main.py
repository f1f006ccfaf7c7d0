"""`taskrun-worker`: the command a Worker runs (locally as a subprocess, or over SSH)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from taskrunner import __version__
from taskrunner.defaults import WORKER_HOME
from taskrunner.protocol import Reader, Writer
from taskrunner.worker.rundir import held_runs
from taskrunner.worker.serve import WorkerServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taskrun-worker", description="The Worker side of taskrun.")
    parser.add_argument("--version", action="version", version=f"taskrun-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="speak the session protocol on stdin/stdout")
    serve.add_argument("--home", default=os.environ.get("TASKRUN_WORKER_HOME", WORKER_HOME),
                       help="where this Worker keeps its Runs (default: %(default)s)")
    serve.add_argument("--name", default=socket.gethostname(), help="this Worker's name")
    serve.add_argument("--slots", type=int, default=None, help="slots this Worker offers")
    status = commands.add_parser("status", help="the Runs this Worker holds, for its admin")
    status.add_argument("--home", default=os.environ.get("TASKRUN_WORKER_HOME", WORKER_HOME))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    home = Path(os.path.expanduser(args.home))
    if args.command == "serve":
        server = WorkerServer(home, args.name, Reader(sys.stdin.buffer), Writer(sys.stdout.buffer), args.slots)
        server.serve()
        return 0
    runs = []
    for run_dir in held_runs(home):
        assignment = run_dir.assignment()
        result = run_dir.result()
        runs.append({"run_id": run_dir.run_id, "task_id": assignment.get("task_id"),
                     "status": result["status"] if result else "RUNNING", "output_bytes": run_dir.output_size()})
    if args.json:
        print(json.dumps({"home": str(home), "runs": runs}, indent=2))
    else:
        print(f"Worker home {home}: {len(runs)} Run(s) held")
        for run in runs:
            print(f"  {run['run_id']}  {run['task_id']}  {run['status']}  {run['output_bytes']} bytes")
    return 0
