"""`taskrun service install|uninstall`: this repository's daemon as a systemd service (docs/service.md).

The unit runs `taskrun up --log-format json` in the repository, so the
journal gets one JSON object per line (logs.py). It is named
`taskrun-<repository>-<hash>.service`, where <hash> is 8 hex digits of the
sha256 of the repository's absolute path (two clones named alike get two
units), and goes to /etc/systemd/system/ (a system unit, run as the
repository's owner) or, with --user, to ~/.config/systemd/user/.

The first line of every unit written here is MARKER: a unit without it was
not written by taskrun, and is neither replaced nor removed. The unit holds
no secret: what the daemon reads from the environment (a webhook secret, a
forge token) goes into an `EnvironmentFile=` readable only by root, named in
a drop-in, never into this file or a drop-in's `Environment=` (any local user
can read those with `systemctl show`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

from rich.console import Console

from taskrunner.atomic import write_bytes
from taskrunner.cli.main import EXIT_NOT_COMPLETED, EXIT_OK, UsageError, find_root
from taskrunner.gitops import REMOTE_TIMEOUT_SECONDS
from taskrunner.recorder import STOP_GRACE_SECONDS
from taskrunner.textsafe import clean

#: The first line of a unit `taskrun service install` wrote.
MARKER = "# Written by `taskrun service install`; `taskrun service uninstall` removes it."
#: Where system units go.
SYSTEM_DIR = Path("/etc/systemd/system")
#: How long (seconds) systemd waits after SIGTERM before it kills the daemon: the recorder's last
#: commits (recorder.STOP_GRACE_SECONDS), one push to the remote (gitops.REMOTE_TIMEOUT_SECONDS) and a margin.
DRAIN_TIMEOUT_SECONDS = int(STOP_GRACE_SECONDS + REMOTE_TIMEOUT_SECONDS + 30)
#: Pause (seconds) before systemd starts a daemon that failed again.
RESTART_SECONDS = 5
#: How long (seconds) `install` waits for `systemd-analyze verify` of the unit it wrote.
VERIFY_TIMEOUT_SECONDS = 60
_UNIT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    service = sub.add_parser("service", help="run this repository's daemon as a systemd service")
    actions = service.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser("install", help="write the systemd unit of this repository's daemon "
                                 "(/etc/systemd/system, or ~/.config/systemd/user with --user)")
    install.add_argument("--user", action="store_true", help="a user unit (systemctl --user) instead of a system one")
    install.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    install.set_defaults(handler=cmd_install)
    uninstall = actions.add_parser("uninstall", help="remove the unit `service install` wrote")
    uninstall.add_argument("--user", action="store_true", help="the user unit")
    uninstall.set_defaults(handler=cmd_uninstall)


def unit_name(root: Path) -> str:
    """`taskrun-<repository name>-<8 hex digits of sha256(path)>.service` (characters systemd allows)."""
    name = _UNIT_NAME_UNSAFE.sub("-", root.name).strip("-.") or "repository"
    digest = hashlib.sha256(str(root).encode(errors="surrogateescape")).hexdigest()[:8]
    return f"taskrun-{name[:60]}-{digest}.service"


def unit_dir(user: bool) -> Path:
    """Where units go: SYSTEM_DIR, or for --user `${XDG_CONFIG_HOME:-~/.config}/systemd/user`."""
    if not user:
        return SYSTEM_DIR
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def taskrun_argv() -> list[str]:
    """The absolute command that runs this taskrun: its `taskrun` script (the one running, or the one
    beside this Python), else this Python with `-m taskrunner`."""
    running = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if running is not None and running.name == "taskrun" and running.is_file():
        return [os.path.abspath(running)]
    beside = Path(os.path.abspath(sys.executable)).parent / "taskrun"  # not resolved: a venv's python is a link
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [os.path.abspath(sys.executable), "-m", "taskrunner"]


def unit_safe(text: str, what: str) -> None:
    """Refuse (UsageError) `text` when a unit file cannot carry it faithfully (systemd.syntax): a
    backslash (a trailing one joins the next line; WorkingDirectory= has no escape for it), a line
    break or other control character, leading or trailing whitespace (systemd strips it), or bytes
    that are not UTF-8. `what` names it in the message ("the repository path")."""
    reason = None
    if "\\" in text:
        reason = "a backslash"
    elif any(unicodedata.category(c) == "Cc" for c in text):
        reason = "a line break or another control character"
    elif text != text.strip():
        reason = "leading or trailing whitespace, which systemd strips"
    elif any("\udc80" <= c <= "\udcff" for c in text):
        reason = "bytes that are not UTF-8"
    if reason is not None:
        raise UsageError(f"{what} {text!r} holds {reason}: a systemd unit cannot name it faithfully; "
                         "move or rename it to a plain path and run `taskrun service install` again")


def quote(word: str) -> str:
    """`word` as one argument of a systemd command line (systemd.service "Command lines"): quoted when it
    holds a space, a quote or a backslash (escaped inside the quotes), with `%` and `$` doubled so they
    are not specifiers or variables. UsageError for a line break or another control character."""
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in word):
        raise UsageError(f"{word!r} holds a line break, another control character or bytes that are not "
                         "UTF-8: a systemd unit cannot name it; install taskrun at a plain path")
    word = word.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", word) or not word:
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_unit(root: Path, argv: list[str], user: str | None) -> str:
    """The unit text: `root` is the repository, `argv` the taskrun command (`taskrun_argv`), `user` the
    account of a system unit (None for a user unit). UsageError for a path systemd cannot hold."""
    path = str(root)
    unit_safe(path, "the repository path")
    command = " ".join(quote(word) for word in [*argv, "up", "--log-format", "json"])
    lines = [
        MARKER,
        f"# The taskrun daemon of {path.replace('%', '%%')}. Secrets (webhook, forge tokens) go into an",
        "# EnvironmentFile= (root:root, 0600) or LoadCredential=, never into this file (docs/service.md).",
        "[Unit]",
        f"Description=taskrun daemon for {path.replace('%', '%%')}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={path.replace('%', '%%')}",
        f"ExecStart={command}",
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        # SIGTERM drains (cli/main.py cmd_up): no new work, records committed, exit 0.
        "KillSignal=SIGTERM",
        # Only the daemon: Agents of the embedded local Worker outlive it by design, and the next daemon
        # reattaches to them (daemon.py); the default control-group mode would kill them on every restart.
        "KillMode=process",
        f"TimeoutStopSec={DRAIN_TIMEOUT_SECONDS}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if user is not None:
        lines.append(f"User={user}")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if user is not None else 'default.target'}", ""]
    return "\n".join(lines)


def owner(root: Path) -> str:
    """The name of the account that owns `root` (a system unit runs the daemon as it)."""
    uid = root.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def written_by_us(path: Path) -> bool:
    """True when the file at `path` starts with MARKER (False for a link or anything else)."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.readline().rstrip("\n") == MARKER


def verify(path: Path) -> tuple[bool, list[str]]:
    """`systemd-analyze verify PATH` (system mode: `--user` needs a running user manager; it accepts user
    units too): (refused, complaints). refused is True when it exits non-zero; complaints are its output
    lines (all of them when refused, else those naming the unit). (False, []) without the tool, and
    (False, [why]) when it cannot run."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return False, []
    try:
        done = subprocess.run([analyze, "verify", str(path)], check=False, capture_output=True, text=True,
                              errors="replace", timeout=VERIFY_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, [f"systemd-analyze verify did not run: {exc}"]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0:
        return True, lines or [f"systemd-analyze verify exited with {done.returncode}"]
    return False, [line for line in lines if path.name in line]


def next_steps(name: str, user: bool) -> list[str]:
    """The commands that start the unit and show its log."""
    ctl = "systemctl --user" if user else "systemctl"
    journal = f"journalctl --user -u {name}" if user else f"journalctl -u {name}"
    steps = [f"{ctl} daemon-reload", f"{ctl} enable --now {name}", f"{ctl} status {name}", f"{journal} -f"]
    if user:
        steps.append("loginctl enable-linger $USER   # keep it running while you are logged out")
    return steps


def cmd_install(args: argparse.Namespace, out: Console) -> int:
    root = find_root(args)
    text = render_unit(root, taskrun_argv(), None if args.user else owner(root))
    if args.print:
        sys.stdout.write(text)
        return EXIT_OK
    name = unit_name(root)
    path = unit_dir(args.user) / name
    if (path.exists() or path.is_symlink()) and not written_by_us(path):
        raise UsageError(f"{path} exists and was not written by `taskrun service install`: not replaced "
                         "(move it away first, or see `taskrun service install --print`)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, text.encode(), mode=0o644)
    except PermissionError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror} (a system unit needs root; or use --user)") from exc
    out.print(f"wrote {path}", markup=False)
    refused, complaints = verify(path)
    if complaints:
        out.print(f"systemd-analyze verify {path}{' refuses it' if refused else ' warns'}:", markup=False)
        for line in complaints:
            out.print(f"  {clean(line)}", markup=False)
    if refused:
        out.print("fix what it says (then install again) before you enable the unit", markup=False)
        return EXIT_NOT_COMPLETED
    out.print("next:", markup=False)
    for step in next_steps(name, args.user):
        out.print(f"  {step}", markup=False)
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace, out: Console) -> int:
    root = find_root(args)
    name = unit_name(root)
    path = unit_dir(args.user) / name
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"{path} does not exist: nothing to remove")
    if not written_by_us(path):
        raise UsageError(f"{path} was not written by `taskrun service install`: not removed")
    ctl = "systemctl --user" if args.user else "systemctl"
    enabled = sorted(str(link) for link in path.parent.glob(f"*.wants/{name}"))
    if enabled:  # systemctl finds the links to remove through the unit file: disable first
        raise UsageError(f"{name} is enabled ({', '.join(enabled)}): run `{ctl} disable --now {name}` first")
    try:
        path.unlink()
    except PermissionError as exc:
        raise UsageError(f"cannot remove {path}: {exc.strerror}") from exc
    out.print(f"removed {path}", markup=False)
    out.print(f"next: {ctl} daemon-reload", markup=False)
    return EXIT_OK
