"""`taskrun worker key|add|check|remove`: from "sshd reachable" to "Worker usable".

`add` pins the host key, reads the Worker's hello (not yet authenticated, so
it lists no Runs), enrolls it through the gate's `trust` request (a first
enrollment needs the one-time token the Worker's admin got from
`taskrun-worker init`, given with `--token`, unless they pinned this control
plane's key), then proves the chain with an authenticated session: the
Worker answers `ready` only to a control plane key it trusts. `check` does
that last step alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.prompt import Confirm

from taskrunner import keys
from taskrunner.enroll import trust_request
from taskrunner.keys import Keyring
from taskrunner.sessionauth import auth_envelope
from taskrunner.signing import PublicKey, SignatureRejected
from taskrunner.atomic import write_bytes
from taskrunner.cli.main import find_root
from taskrunner.defaults import CONFIG_FILE
from taskrunner.gitops import state_dir
from taskrunner.errors import ConfigError, TaskrunError
from taskrunner.model import WorkerSpec
from taskrunner.protocol import FROM_WORKER_LIMITS, BytesBeforeHello, FromWorker, Message, Reader, encode
from taskrunner.taskfile import parse_labels
from taskrunner.textsafe import clean

if TYPE_CHECKING:  # paramiko (SSH) is imported by the commands that connect, not by every `taskrun`
    import paramiko


FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


class EnrollError(TaskrunError):
    """Raised when a Worker cannot be enrolled or checked; nothing is written."""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    worker = sub.add_parser("worker", help="add, check or remove an ssh Worker")
    actions = worker.add_subparsers(dest="action", required=True, metavar="ACTION")
    key = actions.add_parser("key", help="print the daemon's SSH public key (at a terminal, with the command "
                             "that authorizes it on a Worker)")
    key.set_defaults(handler=cmd_key)
    add = actions.add_parser("add", help="pin the host key, enroll through the gate, write .taskrun.yaml")
    add.add_argument("name")
    add.add_argument("--host", default=None, help="required for a new Worker")
    add.add_argument("--port", type=int, default=None, help="default 22")
    add.add_argument("--user", default=None, help="the login on the Worker (default: your local user name)")
    add.add_argument("--identity", default=None, help="private key file (default: the daemon's own .git/taskrun/ssh_key)")
    add.add_argument("--fingerprint", default=None, metavar="SHA256:...", help="the host key fingerprint you expect")
    add.add_argument("--agents", default=None, help="comma-separated Agent names (default: the default Agent)")
    add.add_argument("--labels", default=None, help="k=v,k=v")
    add.add_argument("--slots", type=int, default=None, help="default 1")
    add.add_argument("--token", default=None, metavar="TOKEN",
                     help="the one-time enrollment token `taskrun-worker init` (or `trust --reset`) printed on the "
                          "Worker; needed for its first enrollment unless its admin pinned this control plane's "
                          "key with --trust-key. `-` reads it from stdin (out of the process list and shell history)")
    add.epilog = ("Adding a Worker that is already configured (to enroll it again with --token, change its "
                  "--agents, or re-pin a changed key with --fingerprint) keeps every setting not given again, its "
                  "pinned host key included: a host key equal to the pinned one needs no --fingerprint.")
    add.set_defaults(handler=cmd_add)
    check = actions.add_parser("check", help="connect to a configured Worker through its pinned key")
    check.add_argument("name")
    check.set_defaults(handler=cmd_check)
    remove = actions.add_parser("remove", help="remove a Worker from .taskrun.yaml")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_remove)


def cmd_key(args: argparse.Namespace, out: Console) -> int:
    state = state_dir(find_root(args))
    _, public = keys.ensure_ssh_key(state)
    if out.is_terminal:
        signing = Keyring.ensure(state, time.time())[0].current.key_id
        out.print("On each Worker, as the user the daemon logs in as, run:", style="bold")
        # Plain print: rich would wrap the line, and a wrapped key cannot be pasted.
        print(f"  mkdir -m 700 -p ~/.ssh && taskrun-worker init --key '{public}' --trust-key '{signing}' "
              ">> ~/.ssh/authorized_keys")
        out.print("(If taskrun-worker is not on that user's PATH, give its full path, e.g. ~/venv/bin/taskrun-worker; "
                  "the line it prints names its own absolute path.) --trust-key pins this control plane's signing key: "
                  "only it can enroll the Worker. Without it, init prints a one-time enrollment token for "
                  "`taskrun worker add --token`.", markup=False)
    else:
        print(public)  # bare, for scripts
    return 0


def cmd_add(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.config import load_config, parse_config
    from taskrunner.config_edit import set_worker
    from taskrunner.links.ssh import connect, identity_path
    from taskrunner.sshkeys import (HostKeyError, check_host_key, fingerprint, host_entry, is_pinned, key_line,
                                    scan_host_key)

    root = find_root(args)
    config = load_config(root)
    current = config.workers.get(args.name)
    kept = current if current is not None and current.transport == "ssh" else None
    _keep_settings(args, kept)
    if args.host is None:
        raise EnrollError(f"--host is required: there is no ssh Worker '{args.name}' in {CONFIG_FILE} to take "
                          "it from; nothing was written")
    if args.fingerprint is not None and not FINGERPRINT_RE.match(args.fingerprint.strip()):
        raise EnrollError(f"--fingerprint {args.fingerprint!r} is not a SHA256 fingerprint: expected "
                          "SHA256: and 43 base64 characters, as `ssh-keygen -lf KEY.pub` prints it; nothing was written")
    key = scan_host_key(args.host, args.port)
    seen = fingerprint(key)
    where = host_entry(args.host, args.port)
    out.print(f"{where} presents {key.get_name()} {seen}", markup=False)
    pinned = _pinned(kept, args.host, args.port)
    unchanged = is_pinned(key, pinned)
    if args.fingerprint is not None:
        if args.fingerprint.strip() != seen:
            raise EnrollError(f"host key fingerprint mismatch for {where}: expected {args.fingerprint}, "
                              f"seen {seen}; nothing was written. Read the fingerprint on the Worker itself "
                              "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`, or the key type it presents) and "
                              "check --host and --port: a different host, or something between, answered")
    elif unchanged:
        out.print(f"It matches the host key pinned for Worker '{args.name}' in {CONFIG_FILE}.", markup=False)
    elif pinned:
        # A changed key is never taken without --fingerprint, not even at a terminal.
        try:
            check_host_key(key, pinned, args.host, args.port, args.name)
        except HostKeyError as exc:
            raise EnrollError(f"{exc}; nothing was written") from None
    elif not (sys.stdin.isatty() and Confirm.ask("Pin this host key?", console=out, default=False)):
        raise EnrollError(f"host key not pinned: pass --fingerprint {seen} once you have checked it on the "
                          "Worker (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`); nothing was written")
    if not args.identity:
        keys.ensure_ssh_key(state_dir(root))
    agents = [a for a in (args.agents or config.default_agent).split(",") if a]
    labels = _labels(args.labels)
    fields: dict[str, object] = {"transport": "ssh", "host": args.host, "port": args.port}
    if args.user:
        fields["user"] = args.user
    if args.identity:
        fields["identity"] = args.identity
    if kept is not None and kept.known_hosts and unchanged:
        # Kept while it still vouches for this key; a re-pinned (changed) key drops it and the old key it holds.
        fields["known_hosts"] = kept.known_hosts
    fields.update({"host_key": key_line(key), "slots": args.slots, "agents": agents})
    if labels:
        fields["labels"] = labels
    if kept is not None and kept.home is not None:
        fields["home"] = kept.home
    if kept is not None and kept.sandbox != WorkerSpec.sandbox:
        fields["sandbox"] = kept.sandbox
    path = root / CONFIG_FILE
    before = _config_text(root)
    # The Worker is checked exactly as the configuration about to be written describes it.
    spec = parse_config(set_worker(before, CONFIG_FILE, args.name, fields, config), CONFIG_FILE).workers[args.name]
    # One connection for both steps: the hello proves the gate answers, then the enrollment.
    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    client = connect(spec, identity_path(spec, state_dir(root)))
    try:
        hello, _ = _session(client, spec, root)
        worker_key = _enroll(client, spec, root, hello, token)
        _proof(client, spec, root, worker_key)  # the Worker now answers this control plane's proof
    finally:
        client.close()
    fields["worker_key"] = worker_key.public_line
    write_bytes(path, set_worker(before, CONFIG_FILE, args.name, fields, config).encode())
    # The hello's fields are the Worker's word: shown, never obeyed by the terminal.
    agents = ", ".join(hello.get("agents") or [])
    out.print(clean(f"Worker '{args.name}' enrolled: taskrun-worker {hello.get('version')} "
                    f"(agents {agents}), result key {worker_key.key_id}; written to {CONFIG_FILE}"), markup=False)
    return 0


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.config import load_config
    from taskrunner.links.ssh import connect, identity_path

    root = find_root(args)
    config = load_config(root)
    spec = config.workers.get(args.name)
    if spec is None or spec.transport != "ssh":
        raise EnrollError(f"no ssh Worker '{args.name}' in {CONFIG_FILE}")
    if spec.worker_key is None:
        raise EnrollError(f"Worker '{args.name}' has no pinned result key: enroll it with `taskrun worker add "
                          f"{args.name} --host {spec.host}`")
    client = connect(spec, identity_path(spec, state_dir(root)))
    try:
        hello, ready = _session(client, spec, root, PublicKey.parse(spec.worker_key))
    finally:
        client.close()
    held = (ready or {}).get("runs")
    out.print(clean(f"Worker '{args.name}' ok: host key matches its pin, session authenticated, taskrun-worker "
                    f"{hello.get('version')}, {len(held) if isinstance(held, list) else 0} Run(s) held"),
              markup=False)
    return 0


def cmd_remove(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.config_edit import remove_worker

    root = find_root(args)
    text = _config_text(root)
    write_bytes(root / CONFIG_FILE, remove_worker(text, CONFIG_FILE, args.name).encode())
    out.print(f"Worker '{args.name}' removed from {CONFIG_FILE}", markup=False)
    return 0


def _config_text(root: Path) -> str:
    """The text of .taskrun.yaml ("" when there is none), read as the daemon reads it: no link followed,
    at most MAX_CONFIG_FILE_BYTES (config.read_config_file); ConfigError otherwise."""
    from taskrunner.config import read_config_file

    data = read_config_file(root)
    try:
        return "" if data is None else data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(root / CONFIG_FILE), f"not UTF-8 text (invalid byte at offset {exc.start})") from None


def _keep_settings(args: argparse.Namespace, kept: WorkerSpec | None) -> None:
    """Options not given again keep the configured ssh Worker's values (re-pinning must not drop labels)."""
    for option, default in (("host", None), ("port", WorkerSpec.port), ("user", None), ("identity", None),
                            ("slots", 1)):
        if getattr(args, option) is None:
            setattr(args, option, getattr(kept, option) if kept else default)
    if args.agents is None and kept:
        args.agents = ",".join(kept.agents)
    if args.labels is None and kept and kept.labels:
        args.labels = ",".join(f"{k}={v}" for k, v in kept.labels.items())


def _pinned(kept: WorkerSpec | None, host: str, port: int) -> list[paramiko.PKey]:
    """The host keys pinned for the configured Worker being added again; none for a new Worker."""
    from taskrunner.sshkeys import HostKeyError, pinned_keys

    if kept is None:
        return []
    try:
        return pinned_keys(host, port, kept.host_key, kept.known_hosts)
    except HostKeyError:
        return []  # no usable pin (say an unreadable known_hosts): pinned anew, as for a new Worker


#: A new enrollment's first authenticated session is tried this often: the Worker may end one
#: that overlaps the running daemon's reconnecting session (its reason is in the message).
PROOF_ATTEMPTS = 3


def _proof(client: paramiko.SSHClient, spec: WorkerSpec, root: Path, worker_key: PublicKey) -> None:
    for attempt in range(1, PROOF_ATTEMPTS + 1):
        try:
            _session(client, spec, root, worker_key)
            return
        except EnrollError as exc:
            if "ended the session before" not in str(exc) or attempt == PROOF_ATTEMPTS:
                raise
            time.sleep(0.5 * attempt)


def _session(client: paramiko.SSHClient, spec: WorkerSpec, root: Path,
             audience: PublicKey | None = None) -> tuple[dict[str, object], dict[str, object] | None]:
    """Open one session through the gate and read its hello: proof the gate answers.

    With `audience` (the Worker's pinned result key) also answer the hello's
    challenge with this control plane's keys and read `ready`: proof the Worker
    trusts this control plane. Returns (hello fields, ready fields or None).
    """
    from taskrunner.links.ssh import open_serve

    channel = open_serve(client, spec)
    try:
        reader = Reader(FromWorker(channel.makefile("rb")), FROM_WORKER_LIMITS)  # type: ignore[arg-type]
        try:
            message = reader.read()
        except BytesBeforeHello as exc:
            raise EnrollError(f"Worker '{spec.name}': {exc}") from None
        if message is None or message.type != "hello":
            stderr = channel.makefile_stderr("rb").read().decode(errors="replace").strip()  # type: ignore[no-untyped-call]
            public = keys.ensure_ssh_key(state_dir(root))[1] if not spec.identity else "<your public key>"
            raise EnrollError(
                f"Worker '{spec.name}' did not answer through the gate ({stderr or 'no hello'}). On the Worker, "
                f"install taskrun and add the line printed by `taskrun-worker init --key '{public}'` "
                "to ~/.ssh/authorized_keys"
            )
        if audience is None:
            return message.fields, None
        if message.get("worker_key") != audience.public_line:
            raise EnrollError(f"Worker '{spec.name}' presents another result key than the pinned {audience.key_id}: "
                              f"if it was reinstalled, enroll it again with `taskrun worker add {spec.name} "
                              f"--host {spec.host} --token TOKEN`")
        now = time.time()
        ring = Keyring.load(state_dir(root))
        envelope = auth_envelope(ring.signers(now), str(message.get("challenge")), audience.key_id, now)
        channel.sendall(encode(Message("auth", {"envelope": envelope})))
        while (reply := reader.read()) is not None:
            if reply.type == "ready":
                return message.fields, reply.fields
            if reply.type == "error":
                raise EnrollError(f"Worker '{spec.name}' refused this control plane's session: {reply.get('message')}")
        said = channel.makefile_stderr("rb").read().decode(errors="replace").strip()  # type: ignore[no-untyped-call]
        raise EnrollError(f"Worker '{spec.name}' ended the session before it was authenticated"
                          + (f": {said.splitlines()[-1]}" if said else ""))
    except OSError as exc:
        raise EnrollError(f"Worker '{spec.name}': session failed: {str(exc) or type(exc).__name__}") from exc
    finally:
        channel.close()


def _enroll(client: paramiko.SSHClient, spec: WorkerSpec, root: Path, hello: dict[str, object],
            token: str | None) -> PublicKey:
    """Install the control plane's keys in the Worker's trust store through the gate; its result key.

    `token` (the Worker's one-time enrollment token) is bound into the signed statement as a MAC;
    the token itself is not sent.
    """
    import paramiko

    from taskrunner.sshkeys import CONNECT_TIMEOUT

    try:
        presented = PublicKey.parse(str(hello.get("worker_key")))
    except SignatureRejected as exc:
        raise EnrollError(f"Worker '{spec.name}' presents no result key ({exc}): upgrade taskrun-worker "
                          "on it; nothing was written") from None
    now = time.time()
    ring = Keyring.ensure(state_dir(root), now)[0]
    request = json.dumps(trust_request(ring, presented.key_id, now, token)).encode()
    try:
        channel = client.get_transport().open_session(timeout=CONNECT_TIMEOUT)  # type: ignore[union-attr]
        channel.settimeout(CONNECT_TIMEOUT)
        channel.exec_command("taskrun-worker trust")
        channel.sendall(request)
        channel.shutdown_write()
        answer = channel.makefile("rb").read()
        stderr = channel.makefile_stderr("rb").read().decode(errors="replace").strip()  # type: ignore[no-untyped-call]
        status = channel.recv_exit_status()
    except (OSError, paramiko.SSHException) as exc:
        raise EnrollError(f"Worker '{spec.name}': enrollment session failed: {exc}; nothing was written") from exc
    if status != 0:
        hint = ""
        if "already trusts" in stderr:
            hint = (". If this Worker should now serve this control plane, its admin runs "
                    "`taskrun-worker trust --reset` on it, then add it again with the token that prints")
        elif "trust --reset" in stderr:
            # The Worker already said what its admin runs (enrollment.HOW_TO_NAME): add only what it cannot know.
            hint = f" (this control plane's key id, for --trust-key: {ring.current.key_id})"
        elif "enrollment token" in stderr or "named none" in stderr or "pinned" in stderr:
            hint = (". Ask the Worker's admin for its one-time enrollment token (`taskrun-worker init` or "
                    "`taskrun-worker trust --reset` prints one) and pass it with --token, or have them pin this "
                    f"control plane's key: `taskrun-worker trust --reset --trust-key {ring.current.key_id}`")
        raise EnrollError(f"Worker '{spec.name}' refused the enrollment: {stderr or f'exit code {status}'}{hint}; "
                          "nothing was written")
    try:
        reply = json.loads(answer)
        enrolled = PublicKey.parse(reply["worker_key"])
    except (ValueError, KeyError, TypeError, SignatureRejected) as exc:
        raise EnrollError(f"Worker '{spec.name}' answered the enrollment with {answer[:200]!r} ({exc})") from None
    if enrolled != presented:
        raise EnrollError(f"Worker '{spec.name}' presented result key {presented.key_id} but enrolled "
                          f"{enrolled.key_id}; nothing was written")
    return enrolled


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise EnrollError(f"--labels: expected k=v, got {item!r}")
        pairs[key.strip()] = value.strip()
    return parse_labels(pairs)
