"""The Worker's audit log: what it refused, for its admin, even when the peer hides the reply.

    <home>/audit.jsonl     one JSON object a line, oldest first (0600)
    <home>/audit.jsonl.1   the previous file, once audit.jsonl passed MAX_AUDIT_BYTES

Each entry is

    {"time": "2026-11-29T23:00:00.123Z", "event": EVENT, "reason": TEXT, ...detail}

`time` is UTC; `event` one of EVENTS; `reason` the refusal the peer was given
(or would have been); the detail names what the refusal was about: `run_id`,
`signers` (the key ids an envelope claims), `request` (the record type or
the command asked for), `peer` (the client's address and port, from sshd's
SSH_CONNECTION, when the session came through SSH).

The peer chose much of this text. Every string is cut at MAX_FIELD_CHARS and
written by `json.dumps` with ASCII escapes: an entry is one line whatever it
holds, and no control character, escape sequence or bidi override reaches the
file. `format_entry` makes an entry safe to print (textsafe.clean).

Writing never raises into the caller: an entry that cannot be written (a full
disk, an unwritable home, audit.jsonl replaced by a link or a FIFO) is dropped
with one line on stderr, and the refusal it describes goes ahead. The file is
opened with O_NOFOLLOW and O_NONBLOCK, used only if it is a regular file, and
kept 0600; each entry is one `write` on an O_APPEND descriptor, so sessions
writing at once never interleave their lines. Rotation happens under an
exclusive `flock` on the file, once per size cap: audit.jsonl.1 is replaced,
so the log holds at most about twice MAX_AUDIT_BYTES.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from taskrunner import diskspace
from taskrunner.textsafe import clean

AUDIT_FILE = "audit.jsonl"
#: Past this size (bytes) audit.jsonl is renamed to audit.jsonl.1 before the next entry.
MAX_AUDIT_BYTES = 4 * 1024 * 1024
#: Longest string (characters) an entry keeps in any field; longer ones are cut and end in "...".
MAX_FIELD_CHARS = 500
#: Longest list an entry keeps (key ids, say); the rest are left out.
MAX_LIST_ITEMS = 20
#: Entries one session writes about records refused before it is authenticated; then one more says so.
MAX_SESSION_ENTRIES = 50

BUNDLE_REFUSED = "bundle_refused"  # an assign: signature, manifest, audience, times, limits, archive, replay
TRUST_REFUSED = "trust_refused"  # a trust statement to a Worker that trusts a control plane key
ENROLLMENT_REFUSED = "enrollment_refused"  # a trust statement to a Worker that trusts none yet
GATE_REFUSED = "gate_refused"  # a command the SSH forced command does not allow
AUTH_REFUSED = "auth_refused"  # a session's `auth` did not verify: the session ends
UNAUTHENTICATED_REQUEST = "unauthenticated_request"  # a record before `auth`: refused, the session goes on
SESSION_UNAUTHENTICATED = "session_unauthenticated"  # a session ended before it was authenticated
EVENTS = (BUNDLE_REFUSED, TRUST_REFUSED, ENROLLMENT_REFUSED, GATE_REFUSED, AUTH_REFUSED, UNAUTHENTICATED_REQUEST,
          SESSION_UNAUTHENTICATED)


def record(home: Path, event: str, reason: str, *, now: float | None = None, **detail: Any) -> None:
    """Append one entry to `<home>/audit.jsonl` (see the module doc); never raises.

    `detail` values may be str, int, float, bool, None, or lists and dicts of
    those; anything else is written as its str(). `peer` is added from
    SSH_CONNECTION unless given.
    """
    try:
        line = entry_line(event, reason, time.time() if now is None else now, {**_peer(), **detail})
        _append(home / AUDIT_FILE, line)
    except Exception as exc:  # an audit entry never costs the refusal it describes
        _dropped(home, exc)


def entry_line(event: str, reason: str, now: float, detail: dict[str, Any]) -> bytes:
    """One entry as a JSON line (ASCII, ending in a newline), every field cut and made inert."""
    stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    entry: dict[str, Any] = {"time": stamp, "event": _inert(event), "reason": _inert(reason)}
    for key, value in detail.items():
        if key not in entry:
            entry[_cut(str(key))] = _inert(value)
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def signers(envelope: Any) -> list[str]:
    """The key ids a DSSE envelope (signing.py) claims to be signed by, as given (not verified)."""
    entries = envelope.get("signatures") if isinstance(envelope, dict) else None
    if not isinstance(entries, list):
        return []
    return [e["keyid"] for e in entries[:MAX_LIST_ITEMS] if isinstance(e, dict) and isinstance(e.get("keyid"), str)]


def read(home: Path, tail: int | None = None) -> list[dict[str, Any]]:
    """The entries of audit.jsonl.1 then audit.jsonl, the last `tail` of them (all when None).

    A line that is not a JSON object (cut by a full disk, say) is skipped.
    Raises OSError when a file exists but cannot be read.
    """
    entries: list[dict[str, Any]] = []
    for path in (home / (AUDIT_FILE + ".1"), home / AUDIT_FILE):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
            data = handle.read(2 * MAX_AUDIT_BYTES)
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries if tail is None else entries[-tail:] if tail > 0 else []


def format_entry(entry: dict[str, Any]) -> str:
    """One entry as one printable line: `TIME EVENT: REASON (key=value, ...)`."""
    rest = ", ".join(f"{k}={_shown(v)}" for k, v in entry.items() if k not in ("time", "event", "reason"))
    line = f"{entry.get('time', '?')} {entry.get('event', '?')}: {entry.get('reason', '')}"
    return clean(line + (f" ({rest})" if rest else ""))


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + "..."


def _inert(value: Any, depth: int = 0) -> Any:
    """`value` with every string cut, lists and dicts bounded, and anything else made a string."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, str):
        return _cut(value)
    if depth < 3 and isinstance(value, (list, tuple)):
        return [_inert(v, depth + 1) for v in value[:MAX_LIST_ITEMS]]
    if depth < 3 and isinstance(value, dict):
        return {_cut(str(k)): _inert(v, depth + 1) for k, v in list(value.items())[:MAX_LIST_ITEMS]}
    return _cut(str(value))


def _peer() -> dict[str, str]:
    """`peer` from sshd's SSH_CONNECTION ("CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT"), if set."""
    words = os.environ.get("SSH_CONNECTION", "").split()
    if len(words) < 2:
        return {}
    host, port = words[0], words[1]
    return {"peer": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}


def _open(path: Path) -> int:
    """A locked O_APPEND descriptor on the audit file (created 0600), never through a link or to a FIFO."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        if stat.S_IMODE(info.st_mode) != 0o600 and info.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _append(path: Path, line: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        if size and size + len(line) > MAX_AUDIT_BYTES:
            if _same_file(path, fd):  # else another session rotated it while this one waited for the lock
                os.replace(path, path.with_name(path.name + ".1"))
            os.close(fd)
            fd = -1
            fd = _open(path)
        start = os.fstat(fd).st_size
        if os.write(fd, line) != len(line):
            # Out of room part way (a full disk): no half line stays for the next entry to run into.
            os.ftruncate(fd, start)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    finally:
        if fd >= 0:
            os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _dropped(home: Path, exc: BaseException) -> None:
    try:
        why = clean(diskspace.reason("the Worker home", home, exc) if diskspace.is_full(exc) else str(exc)) \
            or type(exc).__name__
        print(f"taskrun-worker: audit entry not written to {home / AUDIT_FILE}: {why}", file=sys.stderr)
    except Exception:  # stderr closed: nothing left to tell
        pass

