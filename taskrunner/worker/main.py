"""`taskrun-worker`: the command a Worker runs (locally as a subprocess, or over SSH).

    taskrun-worker serve [--home DIR] [--name N] [--slots N] [--sandbox bwrap|none] [--protect DIR]...
                                                                the session protocol on stdin/stdout
    taskrun-worker status [--home DIR] [--json]                 the Runs this Worker holds (left out
                                                                through the gate), what it trusts
    taskrun-worker trust [--home DIR] [--reset [--trust-key KEY]... [--token-ttl D]]
                                                                take a trust statement from stdin (see
                                                                trust.py); --reset forgets every key and
                                                                names the next enroller
    taskrun-worker gate [--home DIR] [LIMITS] [--sandbox bwrap|none]   the SSH forced command (see gate.py)
    taskrun-worker init --key PUBKEY_LINE [--home DIR] [--command PATH] [--trust-key KEY]... [--token-ttl D]
                                                                print the authorized_keys line; name who
                                                                may enroll this Worker
    taskrun-worker audit [--home DIR] [--json] [--tail N]      what this Worker refused (audit.py), for
                                                                its admin; the gate does not allow it

`gate` reads SSH_ORIGINAL_COMMAND, allows only `[taskrun-worker] serve
[--name N] [--slots N]`, `[taskrun-worker] status [--json]` and
`[taskrun-worker] trust`, and runs them here, in-process, with its own --home
and bundle limits; anything else is refused with one line on stderr and exit
code 2. LIMITS (`--max-files N --max-file-bytes N --max-total-bytes N`, on
`serve` and `gate`) bound what one bundle may hold; set them in the forced
command, where the SSH client cannot change them. `init` prints
`restrict,command="<PATH> gate --home <DIR>" <PUBKEY_LINE>` for the Worker's
authorized_keys on stdout. While the Worker trusts no control plane key, it
also names who may enroll it (worker/enrollment.py): the key(s) given with
`--trust-key` (a key id or public line, as `taskrun keys show` prints them),
else a one-time enrollment token it prints on stderr, for `taskrun worker add
--token`, valid for --token-ttl (24h). `trust --reset` does the same after
forgetting every key. Exit codes: 0 success, 2 usage error or refused request.

`--sandbox` (on `serve` and `gate`, the admin's choice; the SSH client cannot
give it) is how Agents run (worker/confine.py): `bwrap`, the default, confines
each in a bubblewrap sandbox; `none` runs them unconfined, and only the Runs
whose signed manifest accepts that (`workers.<name>.sandbox: none`). `serve
--protect DIR` keeps DIR out of every sandbox, as the Worker home always is:
the local Worker protects the daemon's repository. `serve` works with umask
077, and keeps the home's runs/ and trash/ 0700: Run directories are private.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from taskrunner import __version__
from taskrunner.bundle import MAX_MEMBER_BYTES, MAX_MEMBERS, MAX_TOTAL_BYTES, Limits
from taskrunner.defaults import ENROLL_TOKEN_TTL_SECONDS, WORKER_HOME
from taskrunner.duration import format_duration, parse_duration
from taskrunner.errors import WorkerError
from taskrunner.protocol import Reader, Writer
from taskrunner.worker import audit
from taskrunner.worker.gate import PROGRAM, GateRefused, authorized_keys_line, parse_gate_command
from taskrunner.worker.rundir import held_runs
from taskrunner.worker.confine import SANDBOX_MODES, Confinement
from taskrunner.worker.serve import WorkerServer
from taskrunner.worker.enrollment import Enrollment, pinned_key_id
from taskrunner.worker.trust import TrustStore, reply, worker_key

EXIT_OK = 0
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = Path(os.path.expanduser(args.home))
    if args.command == "serve":
        return serve(home, args.name, args.slots, _limits(args), args.sandbox, args.protect)
    if args.command == "status":
        return status(home, args.json)
    if args.command == "trust":
        if (args.trust_key or args.token_ttl is not None) and not args.reset:
            print(f"{PROGRAM} trust: --trust-key and --token-ttl go with --reset", file=sys.stderr)
            return EXIT_USAGE
        return trust(home, args.reset, args.trust_key, args.token_ttl)
    if args.command == "gate":
        return gate(home, os.environ.get("SSH_ORIGINAL_COMMAND"), _limits(args), args.sandbox)
    if args.command == "audit":
        return show_audit(home, args.json, args.tail)
    return init(args.key, home, args.command_path, args.trust_key, args.token_ttl)


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
    _sandbox_option(serve_cmd)
    serve_cmd.add_argument("--protect", action="append", default=[], metavar="DIR",
                           help="keep DIR out of every Agent's sandbox, as the Worker home is (repeatable)")
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
    _sandbox_option(gate_cmd)
    trust_cmd = commands.add_parser(
        "trust", help="take a control plane's signed trust statement from stdin (what `taskrun worker add` sends)")
    trust_cmd.add_argument("--home", default=default_home, help=home_help)
    trust_cmd.add_argument("--reset", action="store_true",
                           help="forget every trusted key (run on the Worker itself; the gate refuses it), then "
                                "print a new one-time enrollment token, or pin --trust-key")
    _enroller_options(trust_cmd)
    init_cmd = commands.add_parser(
        "init", help="print the authorized_keys line that trusts a control plane's key",
        description="Prints restrict,command=\"PATH gate --home DIR\" PUBKEY_LINE; append it to the "
                    "Worker account's ~/.ssh/authorized_keys. Writes nothing itself.")
    init_cmd.add_argument("--key", required=True, metavar="PUBKEY_LINE",
                          help="the control plane's SSH public key line (`taskrun worker key` prints it)")
    init_cmd.add_argument("--home", default=default_home, help=home_help)
    init_cmd.add_argument("--command", dest="command_path", default=None, metavar="PATH",
                          help="absolute path of taskrun-worker on this Worker (default: this one's)")
    _enroller_options(init_cmd)
    audit_cmd = commands.add_parser("audit", help="what this Worker refused: bundles, trust statements, gate "
                                                  "requests, unauthenticated sessions (its audit log)")
    audit_cmd.add_argument("--home", default=default_home, help=home_help)
    audit_cmd.add_argument("--json", action="store_true", help="the entries as JSON lines, as stored")
    audit_cmd.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N entries")
    return parser


def _enroller_options(parser: argparse.ArgumentParser) -> None:
    """Who may enroll a Worker that trusts no key: a pinned control plane key, else a one-time token."""
    parser.add_argument("--trust-key", action="append", default=[], metavar="KEY",
                        help="the control plane signing key that may enroll this Worker: its key id (SHA256:...) "
                             "or public line, as `taskrun keys show` prints it; repeat for several. Without "
                             "it a one-time enrollment token is printed for `taskrun worker add --token`")
    parser.add_argument("--token-ttl", default=None, type=_duration, metavar="DURATION",
                        help=f"how long the enrollment token is valid "
                             f"(default {format_duration(ENROLL_TOKEN_TTL_SECONDS)})")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-files", type=int, default=MAX_MEMBERS, help="members per bundle (%(default)s)")
    parser.add_argument("--max-file-bytes", type=int, default=MAX_MEMBER_BYTES, help="bytes per file (%(default)s)")
    parser.add_argument("--max-total-bytes", type=int, default=MAX_TOTAL_BYTES,
                        help="bytes per bundle (%(default)s)")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.max_files, args.max_file_bytes, args.max_total_bytes)


def _sandbox_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sandbox", choices=SANDBOX_MODES, default="bwrap",
                        help="bwrap (default): run each Agent in a bubblewrap sandbox; none: run Agents "
                             "unconfined, and only Runs whose control plane accepts that "
                             "(workers.<name>.sandbox: none)")


def serve(home: Path, name: str | None, slots: int | None, limits: Limits = Limits(), sandbox: str = "bwrap",
          protect: list[str] | None = None) -> int:
    # Whatever serve and its Agents create is private: Run directories, output.log, exit codes.
    os.umask(0o077)
    for private in (home / "runs", home / "trash"):
        private.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(private, 0o700)  # made by an older taskrun-worker, under another umask
    confinement = Confinement(home, sandbox, [Path(p) for p in protect or ()])
    server = WorkerServer(home, name or socket.gethostname(), Reader(sys.stdin.buffer),
                          Writer(sys.stdout.buffer), slots, limits, confinement)
    server.serve()
    return EXIT_OK


def status(home: Path, as_json: bool, runs_shown: bool = True) -> int:
    """What this Worker holds and trusts. Through the gate (`runs_shown` False) the Runs are left out:
    only an authenticated session lists them (DESIGN.md §5.9), and the gate's caller has only the SSH key."""
    runs = []
    for run_dir in held_runs(home) if runs_shown else []:
        assignment = run_dir.assignment()
        result = run_dir.result()
        runs.append({"run_id": run_dir.run_id, "task_id": assignment.get("task_id"),
                     "status": result["status"] if result else "RUNNING", "output_bytes": run_dir.output_size()})
    key = worker_key(home).key_id
    trusted = [k["key_id"] for k in TrustStore(home).state()["keys"]]
    enroller = None if trusted else Enrollment(home).describe(time.time())
    if as_json:
        data: dict[str, object] = {"home": str(home), "worker_key_id": key, "trusted": trusted,
                                   "enrollment": enroller}
        if runs_shown:
            data["runs"] = runs
        print(json.dumps(data, indent=2))
    else:
        print(f"Worker home {home}: result key {key}; trusts {', '.join(trusted) or 'no control plane yet'}")
        if enroller is not None:
            print(f"May be enrolled by: {enroller}")
        if runs_shown:
            print(f"{len(runs)} Run(s) held")
            for run in runs:
                print(f"  {run['run_id']}  {run['task_id']}  {run['status']}  {run['output_bytes']} bytes")
    return EXIT_OK


def trust(home: Path, reset: bool, trust_keys: list[str] | None = None, token_ttl: float | None = None) -> int:
    store = TrustStore(home)
    if reset:
        try:
            pinned = [pinned_key_id(k) for k in trust_keys or []]
        except WorkerError as exc:
            print(f"{PROGRAM} trust: {exc}", file=sys.stderr)
            return EXIT_USAGE
        ttl = ENROLL_TOKEN_TTL_SECONDS if token_ttl is None else token_ttl
        token = store.reset(time.time(), pinned, ttl)
        print(f"{home} trusts no control plane key now.")
        print(_enroller_note(pinned, token, ttl))
        return EXIT_OK
    try:
        request = json.loads(sys.stdin.buffer.read(1024 * 1024))
        keys = store.apply(request, worker_key(home).key_id, time.time())
    except (ValueError, WorkerError) as exc:
        if isinstance(exc, ValueError):  # TrustStore.apply logs its own refusals
            audit.record(home, audit.TRUST_REFUSED, f"the trust statement is not JSON ({exc})")
        print(f"{PROGRAM} trust: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.buffer.write(reply(home, keys) + b"\n")
    return EXIT_OK


def _enroller_note(pinned: list[str], token: str | None, ttl: float) -> str:
    """What the admin passes on to the control plane's operator."""
    # `worker add` logs in as the control plane's local user unless told: name this login.
    add = f"taskrun worker add NAME --host HOST --user {_login()} --fingerprint SHA256:..."
    port = " (with --port PORT if sshd here does not listen on port 22)"
    if token is None:
        return f"Only control plane key {', '.join(pinned)} may enroll it: on the control plane, run `{add}`{port}."
    return (f"enrollment token {token} (single use, valid for {format_duration(ttl)}): on the control plane, run "
            f"`{add} --token {token}`{port}. "
            "Keep it secret until then: whoever holds it and the daemon's SSH key can enroll this Worker.")


def _login() -> str:
    """The user running this command: the login the control plane's key is authorized for, usually."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database
        return "USER"


def gate(home: Path, original: str | None, limits: Limits = Limits(), sandbox: str = "bwrap") -> int:
    """Run what the SSH client asked for if the gate allows it; the client never reaches a shell."""
    try:
        command = parse_gate_command(original)
    except GateRefused as exc:
        print(f"{PROGRAM} gate: {exc}", file=sys.stderr)
        audit.record(home, audit.GATE_REFUSED, str(exc), request=original)
        return EXIT_USAGE
    if command.subcommand == "serve":
        return serve(home, command.name, command.slots, limits, sandbox)
    if command.subcommand == "trust":
        return trust(home, reset=False)
    return status(home, command.json, runs_shown=False)


def show_audit(home: Path, as_json: bool, tail: int | None) -> int:
    """Print the audit log (audit.py), oldest first: one readable line an entry, or JSON lines."""
    try:
        entries = audit.read(home, tail)
    except OSError as exc:
        print(f"{PROGRAM} audit: cannot read {home / audit.AUDIT_FILE}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for entry in entries:
        print(json.dumps(entry) if as_json else audit.format_entry(entry))
    return EXIT_OK


def init(key_line: str, home: Path, command: str | None, trust_keys: list[str] | None = None,
         token_ttl: float | None = None) -> int:
    """Print the authorized_keys line; while the Worker trusts no key, name who may enroll it (stderr)."""
    try:
        line = authorized_keys_line(key_line, os.path.abspath(home), command or own_path())
        pinned = [pinned_key_id(k) for k in trust_keys or []]
    except WorkerError as exc:
        print(f"{PROGRAM} init: {exc}", file=sys.stderr)
        return EXIT_USAGE
    trusted = [k["key_id"] for k in TrustStore(home).state()["keys"]]
    ttl = ENROLL_TOKEN_TTL_SECONDS if token_ttl is None else token_ttl
    if trusted:
        # An enrolled Worker takes changes only from the keys it trusts: a pin or token would lie unused.
        note = (f"this Worker already trusts {', '.join(trusted)}; no enrollment token was issued (to start over: "
                f"`{PROGRAM} trust --reset`)")
    elif pinned:
        Enrollment(home).pin(pinned, time.time())
        note = _enroller_note(pinned, None, ttl)
    else:
        note = _enroller_note([], Enrollment(home).issue_token(time.time(), ttl), ttl)
    print(line)
    # stderr: stdout is usually appended to authorized_keys.
    print(f"{PROGRAM} init: {note}", file=sys.stderr)
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
