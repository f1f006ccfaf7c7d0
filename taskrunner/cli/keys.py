"""`taskrun keys show|rotate` and `taskrun doctor`."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from rich.console import Console
from rich.text import Text

from taskrunner import control
from taskrunner.cli.main import find_root
from taskrunner.defaults import KEY_OVERLAP_SECONDS
from taskrunner.gitops import state_dir
from taskrunner.duration import format_duration, parse_duration
from taskrunner.errors import ConfigError, DaemonNotRunning, TaskrunError
from taskrunner.keys import KeyFileError, Keyring
from taskrunner.signing import PublicKey
from taskrunner.textsafe import clean


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="the control plane's signing keys: show, rotate")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="signing keys and the result key pinned for each Worker")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_show)
    rotate = actions.add_parser("rotate", help="make a new signing key; the old one stays trusted for --overlap")
    rotate.add_argument("--overlap", default=format_duration(KEY_OVERLAP_SECONDS),
                        help="how long Workers still trust the old key (default %(default)s)")
    rotate.set_defaults(handler=cmd_rotate)
    check = sub.add_parser("doctor", help="check keys (modes, nothing private tracked by git), Worker pins, "
                           "that nothing under runs/ is a link, and local Workers' sandbox")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_doctor)


def cmd_show(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.config import load_config

    root = find_root(args)
    ring = Keyring.load(state_dir(root))
    config = load_config(root)
    keys = [{"key_id": e.key.key_id, "public": e.key.public_line, "created_at": e.created_at,
             "retire_at": e.retire_at, "current": e.retire_at is None} for e in ring.entries]
    workers = {name: PublicKey.parse(w.worker_key).key_id if w.worker_key else None
               for name, w in config.workers.items() if w.transport == "ssh"}
    if args.json:
        print(json.dumps({"signing_keys": keys, "worker_keys": workers}, indent=2, sort_keys=True))
        return 0
    for key in keys:
        state = "current" if key["current"] else f"retiring {_when(key['retire_at'])}"
        out.print(f"signing key {key['key_id']}  ({state}, created {_when(key['created_at'])})", markup=False)
        out.print(f"  {key['public']}", markup=False)
    for name, pinned in workers.items():
        out.print(f"Worker '{name}': result key {pinned or 'not pinned: run `taskrun worker add` again'}",
                  markup=False)
    return 0


def cmd_rotate(args: argparse.Namespace, out: Console) -> int:
    root = find_root(args)
    try:
        overlap = parse_duration(args.overlap)
    except ValueError as exc:
        raise TaskrunError(f"--overlap: {exc}") from None
    now = time.time()
    ring = Keyring.load(state_dir(root))
    old = ring.current
    new = ring.rotate(overlap, now)
    out.print(f"new signing key {new.key_id}; {old.key_id} stays trusted until {_when(now + overlap)}",
              markup=False)
    try:
        control.request(state_dir(root), {"command": "keys"})
        out.print("the running daemon tells every online Worker now; the others when they next connect",
                  markup=False)
    except DaemonNotRunning:
        out.print("Workers learn the new key when the daemon next connects to them (start it before "
                  f"{_when(now + overlap)}, or Workers must be enrolled again)", markup=False)
    return 0


def cmd_doctor(args: argparse.Namespace, out: Console) -> int:
    from taskrunner import doctor  # the checks and what they import: only for this command
    from taskrunner.config import load_config

    root = find_root(args)
    findings: list[doctor.Finding] = []
    try:
        config = load_config(root)
    except ConfigError as exc:
        config = None
        findings.append(doctor.Finding("error", str(exc), "fix the file, then run taskrun doctor again"))
    findings += doctor.key_findings(root, config)  # before loading the keyring, which tightens modes
    try:
        Keyring.load(state_dir(root))
    except KeyFileError as exc:  # which file holds what instead, and what to do about it
        findings.append(doctor.Finding("error", exc.what, exc.fix))
    except TaskrunError as exc:
        findings.append(doctor.Finding("error", str(exc), "taskrun init"))
    if config is not None:
        findings += doctor.pin_findings(config)
        findings += doctor.sandbox_findings(root, config)
        findings += doctor.git_findings(root, config)
    findings += doctor.record_findings(root)
    if args.json:
        print(json.dumps({"ok": not findings, "findings": [f.__dict__ for f in findings]}, indent=2))
    elif not findings:
        out.print("no problems found: keys are private and untracked, every ssh Worker is pinned, "
                  "runs/ holds no links, local Workers confine their Agents")
    else:
        for finding in findings:
            # Findings quote file names from the repository: shown as written.
            out.print(Text.assemble((clean(finding.level), "bold red"), ": ", clean(finding.what, multiline=True)))
            out.print(f"  fix: {clean(finding.fix, multiline=True)}", markup=False)
    return 1 if findings else 0


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
