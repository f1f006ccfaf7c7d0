"""What a control plane's SSH key may run on a Worker: the gate and its authorized_keys line.

A Worker trusts a control plane by installing the control plane's public key in
the Worker account's authorized_keys behind a forced command (DESIGN.md §5.2):

    restrict,command="/usr/local/bin/taskrun-worker gate --home /srv/taskrun" ssh-ed25519 AAAA... taskrun

`taskrun-worker init --key "ssh-ed25519 AAAA... comment" [--home DIR] [--command PATH]`
prints exactly that line and writes nothing; the Worker's admin appends it to
authorized_keys. PATH defaults to the absolute path of the running
`taskrun-worker` (sshd's session PATH is not the admin's shell PATH, so a bare
name is refused), DIR to the Worker home. Only `ssh-ed25519`, `ssh-rsa` and
`ecdsa-sha2-*` keys are accepted, as one line without options, quotes or
newlines, whose base64 blob names the same key type.

`restrict` turns off port, agent and X11 forwarding, PTY allocation and
~/.ssh/rc; `command=` makes sshd run the gate whatever the client asked for.
sshd puts the client's request in SSH_ORIGINAL_COMMAND: unset for an
interactive login, the subsystem's program for `sftp`.

`taskrun-worker gate [--home DIR]` allows exactly these requests, the program
word being optional:

    [taskrun-worker] serve [--name N] [--slots N]
    [taskrun-worker] status [--json]
    [taskrun-worker] trust          a trust statement on stdin (see trust.py); never --reset

and runs the subcommand in-process with `--home DIR` (a request that names
`--home` itself is refused: the key's holder cannot pick another home).
Everything else — an interactive login, `bash`, `sh -c id`, `taskrun-worker
gate`, an unknown option, a word such as `;`, `|` or `$(id)` that is not an
allowed option — is refused with one line on stderr and exit code 2. The
request is split with `shlex` and never given to a shell. (sshd itself starts
the forced command through the account's login shell, which is why the line
above is shell-quoted.)

This module is the pure part: `parse_gate_command` decides, and
`authorized_keys_line` formats; `taskrunner.worker.main` does the I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath

from taskrunner.errors import WorkerError
from taskrunner.model import NAME_RE

#: The program word a request may start with.
PROGRAM = "taskrun-worker"
#: Subcommands the gate allows, and what the rest of the message says about them.
ALLOWED_SUBCOMMANDS = ("serve", "status", "trust")
ALLOWED = f'only "{PROGRAM} serve", "{PROGRAM} status" and "{PROGRAM} trust" are allowed'
#: A requested command is shown at most this long in a refusal.
SHOWN_CHARS = 200
#: Longest Worker name a client may give with --name (the characters are model.NAME_RE's).
MAX_NAME_CHARS = 255
#: Upper bound for --slots: six digits.
MAX_SLOTS = 999_999
#: Key types `init` accepts, and the shape of the line.
KEY_LINE = re.compile(r"(?P<type>ssh-ed25519|ssh-rsa|ecdsa-sha2-[a-z0-9]+)[ \t]+(?P<blob>[A-Za-z0-9+/]+={0,2})"
                      r"(?:[ \t]+(?P<comment>[^\x00-\x1f\x7f\"']*))?")
#: Characters that cannot appear in a path inside command="...".
_UNQUOTABLE = re.compile(r"[\x00-\x1f\x7f\"'\\]")


class GateRefused(WorkerError):
    """Raised when the gate refuses what an SSH client asked to run."""


@dataclass(frozen=True)
class GateCommand:
    """An allowed request: `serve` (with `name`, `slots`), `status` (with `json`) or `trust`."""

    subcommand: str
    name: str | None = None
    slots: int | None = None
    json: bool = False


def parse_gate_command(original: str | None) -> GateCommand:
    """Decide what SSH_ORIGINAL_COMMAND asks for; raise GateRefused unless it is allowed."""
    if original is None or not original.strip():
        raise GateRefused(f"refused an interactive login: {ALLOWED}")
    shown = _show(original)
    try:
        words = shlex.split(original)  # never None here: shlex.split(None) would read stdin
    except ValueError as exc:
        raise GateRefused(f"refused {shown}: it is not a well-formed command line ({exc}); {ALLOWED}") from None
    if words and words[0] == PROGRAM:
        words = words[1:]
    if not words or words[0] not in ALLOWED_SUBCOMMANDS:
        raise GateRefused(f"refused {shown}: {ALLOWED}")
    subcommand, rest = words[0], words[1:]
    if subcommand == "serve":
        return _parse_serve(shown, rest)
    if subcommand == "trust":
        _options(shown, "trust", rest, takes_value={})
        return GateCommand("trust")
    return _parse_status(shown, rest)


def _parse_serve(shown: str, words: list[str]) -> GateCommand:
    options = _options(shown, "serve", words, takes_value={"--name": True, "--slots": True})
    name = options.get("--name")
    if name is not None and not (NAME_RE.fullmatch(name) and len(name) <= MAX_NAME_CHARS):
        raise GateRefused(f"refused {shown}: --name must be letters, digits, '.', '_' or '-' starting with "
                          f"a letter or digit, at most {MAX_NAME_CHARS} of them, not {_show(name)}")
    slots = options.get("--slots")
    if slots is not None and not (re.fullmatch(r"[0-9]{1,6}", slots) and 1 <= int(slots) <= MAX_SLOTS):
        raise GateRefused(f"refused {shown}: --slots must be a whole number from 1 to {MAX_SLOTS}, "
                          f"not {_show(slots)}")
    return GateCommand("serve", name=name, slots=int(slots) if slots is not None else None)


def _parse_status(shown: str, words: list[str]) -> GateCommand:
    options = _options(shown, "status", words, takes_value={"--json": False})
    return GateCommand("status", json="--json" in options)


def _options(shown: str, subcommand: str, words: list[str], takes_value: dict[str, bool]) -> dict[str, str]:
    """`--opt VALUE`, `--opt=VALUE` and flags, each at most once; anything else refused."""
    allowed = ", ".join(f"{o} N" if v else o for o, v in takes_value.items()) or "no options"
    found: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        option, equals, inline = word.partition("=")
        if option == "--home":
            raise GateRefused(f"refused {shown}: --home is set by the gate; a client cannot choose it")
        if not word.startswith("--"):
            raise GateRefused(f"refused {shown}: unexpected argument {_show(word)} "
                              f'to "{PROGRAM} {subcommand}" (allowed: {allowed})')
        if option not in takes_value:
            raise GateRefused(f"refused {shown}: unknown option {_show(option)} "
                              f'for "{PROGRAM} {subcommand}" (allowed: {allowed})')
        if option in found:
            raise GateRefused(f"refused {shown}: {option} is given more than once")
        if takes_value[option]:
            if equals:
                value = inline
            elif i + 1 < len(words):
                i += 1
                value = words[i]
            else:
                raise GateRefused(f"refused {shown}: {option} needs a value")
        elif equals:
            raise GateRefused(f"refused {shown}: {option} takes no value")
        else:
            value = ""
        found[option] = value
        i += 1
    return found


def _show(text: str) -> str:
    """A client's text as one double-quoted line: escaped, and cut if long."""
    if len(text) > SHOWN_CHARS:
        text = text[:SHOWN_CHARS] + "..."
    return json.dumps(text, ensure_ascii=False)


# -- init: the authorized_keys line ----------------------------------------------


def authorized_keys_line(key_line: str, home: str, command: str) -> str:
    """The line that lets `key_line` run only `command gate --home home` on this account.

    `home` and `command` must be absolute paths; `key_line` is a public key as
    ssh-keygen writes it (`TYPE BASE64 [comment]`). Raises WorkerError otherwise.
    """
    key = _checked_key(key_line)
    for what, path in (("the taskrun-worker command", command), ("the Worker home", home)):
        if not PurePosixPath(path).is_absolute():
            raise WorkerError(f"{what} must be an absolute path (sshd does not use your shell's "
                              f"PATH or working directory), not {_show(path)}")
        if _UNQUOTABLE.search(path):
            raise WorkerError(f"{what} {_show(path)} holds a quote, backslash or control character, "
                              "which cannot be written inside command=\"...\"")
    forced = f"{shlex.quote(command)} gate --home {shlex.quote(home)}"
    return f'restrict,command="{forced}" {key}'


def _checked_key(key_line: str) -> str:
    if "\n" in key_line or "\r" in key_line:
        raise WorkerError("the public key must be one line; this one holds a line break")
    line = key_line.strip(" \t")
    match = KEY_LINE.fullmatch(line)
    if match is None:
        raise WorkerError(f"not a public key line: {_show(line)}; expected 'ssh-ed25519|ssh-rsa|ecdsa-sha2-* "
                          "BASE64 [comment]' as in a .pub file, without options or quotes")
    key_type, blob = match["type"], match["blob"]
    try:
        raw = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", raw[:4])
        inner = raw[4:4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise WorkerError(f"the {key_type} key's base64 data is damaged (a truncated copy?)") from None
    if inner != key_type:
        raise WorkerError(f"the key line says {key_type} but its data holds a {_show(inner)} key")
    return line
