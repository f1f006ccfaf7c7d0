"""`taskrun-worker`: the command a Worker runs (locally as a subprocess, or over SSH).

    taskrun-worker serve [--home DIR] [--name N] [--slots N]   the session protocol on stdin/stdout
    taskrun-worker status [--home DIR] [--json]                 the Runs this Worker holds
    taskrun-worker trust [--home DIR] [--reset]                 take a trust statement from stdin (see
                                                                trust.py); --reset forgets every key
    taskrun-worker gate [--home DIR] [LIMITS]                   the SSH forced command (see gate.py)
    taskrun-worker init --key PUBKEY_LINE [--home DIR] [--command PATH]
                                                                print the authorized_keys line

`gate` reads SSH_ORIGINAL_COMMAND, allows only `[taskrun-worker] serve
[--name N] [--slots N]`, `[taskrun-worker] status [--json]` and
`[taskrun-worker] trust`, and runs them here, in-process, with its own --home
and bundle limits; anything else is refused with one line on stderr and exit
code 2. LIMITS (`--max-files N --max-file-bytes N --max-total-bytes N`, on
`serve` and `gate`) bound what one bundle may hold; set them in the forced
command, where the SSH client cannot change them. `init` prints
`restrict,command="<PATH> gate --home <DIR>" <PUBKEY_LINE>` for the Worker's
authorized_keys; it writes nothing. Exit codes: 0 success, 2 usage error or
refused request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from taskrunner import __version__
from taskrunner.bundle import MAX_MEMBER_BYTES, MAX_MEMBERS, MAX_TOTAL_BYTES, Limits
from taskrunner.defaults import WORKER_HOME
from taskrunner.errors import WorkerError
from taskrunner.protocol import Reader, Writer
from taskrunner.worker.gate import PROGRAM, GateRefused, authorized_keys_line, parse_gate_command
from taskrunner.worker.rundir import held_runs
from taskrunner.worker.serve import WorkerServer
from taskrunner.worker.trust import TrustStore, reply, worker_key

EXIT_OK = 0
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = Path(os.path.expanduser(args.home))
    if args.command == "serve":
        return serve(home, args.name, args.slots, _limits(args))
    if args.command == "status":
        return status(home, args.json)
    if args.command == "trust":
        return trust(home, args.reset)
    if args.command == "gate":
        return gate(home, os.environ.get("SSH_ORIGINAL_COMMAND"), _limits(args))
    return init(args.key, home, args.command_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="The Worker side of taskrun.")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    default_home = os.environ.get("TASKRUN_WORKER_HOME", WORKER_HOME)
    home_help = "where this Worker keeps its Runs (default: %(default)s)"
    serve_cmd = commands.add_parser("serve", help="speak the session protocol on stdin/stdout")
    serve_cmd.add_argument("--home", default=default_home, help=home_help)
    serve_cmd.add_argument("--name", default=None, help="this Worker's name (default: the host name)")
    serve_cmd.add_argument("--slots", type=int, default=None, help="slots this Worker offers")
    _limit_options(serve_cmd)
    status_cmd = commands.add_parser("status", help="the Runs this Worker holds, for its admin")
    status_cmd.add_argument("--home", default=default_home, help=home_help)
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    gate_cmd = commands.add_parser(
        "gate", help="the SSH forced command: run only `serve`, `status` or `trust` from SSH_ORIGINAL_COMMAND",
        description="Installed in authorized_keys as "
                    'restrict,command="taskrun-worker gate --home DIR". Allows only '
                    '"taskrun-worker serve [--name N] [--slots N]", "taskrun-worker status [--json]" and '
                    '"taskrun-worker trust", '
                    "always with this --home; refuses everything else with exit code 2.")
    gate_cmd.add_argument("--home", default=default_home, help=home_help)
    _limit_options(gate_cmd)
    trust_cmd = commands.add_parser(
        "trust", help="take a control plane's signed trust statement from stdin (what `taskrun worker add` sends)")
    trust_cmd.add_argument("--home", default=default_home, help=home_help)
    trust_cmd.add_argument("--reset", action="store_true",
                           help="forget every trusted key (run on the Worker itself; the gate refuses it)")
    init_cmd = commands.add_parser(
        "init", help="print the authorized_keys line that trusts a control plane's key",
        description="Prints restrict,command=\"PATH gate --home DIR\" PUBKEY_LINE; append it to the "
                    "Worker account's ~/.ssh/authorized_keys. Writes nothing itself.")
    init_cmd.add_argument("--key", required=True, metavar="PUBKEY_LINE",
                          help="the control plane's SSH public key line (`taskrun worker key` prints it)")
    init_cmd.add_argument("--home", default=default_home, help=home_help)
    init_cmd.add_argument("--command", dest="command_path", default=None, metavar="PATH",
                          help="absolute path of taskrun-worker on this Worker (default: this one's)")
    return parser


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-files", type=int, default=MAX_MEMBERS, help="members per bundle (%(default)s)")
    parser.add_argument("--max-file-bytes", type=int, default=MAX_MEMBER_BYTES, help="bytes per file (%(default)s)")
    parser.add_argument("--max-total-bytes", type=int, default=MAX_TOTAL_BYTES,
                        help="bytes per bundle (%(default)s)")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.max_files, args.max_file_bytes, args.max_total_bytes)


def serve(home: Path, name: str | None, slots: int | None, limits: Limits = Limits()) -> int:
    server = WorkerServer(home, name or socket.gethostname(), Reader(sys.stdin.buffer),
                          Writer(sys.stdout.buffer), slots, limits)
    server.serve()
    return EXIT_OK


def status(home: Path, as_json: bool) -> int:
    runs = []
    for run_dir in held_runs(home):
        assignment = run_dir.assignment()
        result = run_dir.result()
        runs.append({"run_id": run_dir.run_id, "task_id": assignment.get("task_id"),
                     "status": result["status"] if result else "RUNNING", "output_bytes": run_dir.output_size()})
    key = worker_key(home).key_id
    trusted = [k["key_id"] for k in TrustStore(home).state()["keys"]]
    if as_json:
        print(json.dumps({"home": str(home), "worker_key_id": key, "trusted": trusted, "runs": runs}, indent=2))
    else:
        print(f"Worker home {home}: result key {key}; trusts {', '.join(trusted) or 'no control plane yet'}")
        print(f"{len(runs)} Run(s) held")
        for run in runs:
            print(f"  {run['run_id']}  {run['task_id']}  {run['status']}  {run['output_bytes']} bytes")
    return EXIT_OK


def trust(home: Path, reset: bool) -> int:
    store = TrustStore(home)
    if reset:
        store.reset()
        print(f"{PROGRAM} trust: {home} trusts no control plane key now; enroll it again with `taskrun worker add`",
              file=sys.stderr)
        return EXIT_OK
    try:
        request = json.loads(sys.stdin.buffer.read(1024 * 1024))
        keys = store.apply(request, worker_key(home).key_id, time.time())
    except (ValueError, WorkerError) as exc:
        print(f"{PROGRAM} trust: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.buffer.write(reply(home, keys) + b"\n")
    return EXIT_OK


def gate(home: Path, original: str | None, limits: Limits = Limits()) -> int:
    """Run what the SSH client asked for if the gate allows it; the client never reaches a shell."""
    try:
        command = parse_gate_command(original)
    except GateRefused as exc:
        print(f"{PROGRAM} gate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if command.subcommand == "serve":
        return serve(home, command.name, command.slots, limits)
    if command.subcommand == "trust":
        return trust(home, reset=False)
    return status(home, command.json)


def init(key_line: str, home: Path, command: str | None) -> int:
    try:
        line = authorized_keys_line(key_line, os.path.abspath(home), command or own_path())
    except WorkerError as exc:
        print(f"{PROGRAM} init: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(line)
    return EXIT_OK


def own_path() -> str:
    """The absolute path of the taskrun-worker script that runs this interpreter's package.

    Prefer the script itself (argv[0] of a console script) or the one next to
    this interpreter over a PATH lookup, which may find a version-manager shim
    that picks its Python by the working directory.
    """
    argv0 = Path(sys.argv[0])
    if argv0.name == PROGRAM and argv0.is_file():
        return os.path.abspath(argv0)
    sibling = Path(sys.executable).parent / PROGRAM
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(PROGRAM)
    if found is None:
        raise WorkerError(f"cannot find {PROGRAM} on PATH; give its absolute path with --command")
    return os.path.abspath(found)
