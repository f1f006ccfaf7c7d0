"""SSH host keys: pinning, fingerprints, scanning. Never auto-accepted.

A Worker's host key is pinned in `.taskrun.yaml` (`host_key: "ssh-ed25519 AAAA..."`)
or in a known_hosts file the Worker names (`known_hosts:`). Only those keys are
loaded into paramiko, which keeps its RejectPolicy: an unknown or changed key
means nothing is sent. paramiko does not enforce `@cert-authority` or `@revoked`
markers, so a known_hosts file holding them is refused rather than half-enforced.
The configuration chooses the known_hosts path: a file that is not a regular
one (a FIFO would block, /dev/zero never end) or over MAX_KNOWN_HOSTS_BYTES
is refused before it is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskrunner.textsafe import over_limit
from taskrunner.defaults import MAX_KNOWN_HOSTS_BYTES
from taskrunner.errors import WorkerError
from taskrunner.lazymodule import lazy
from taskrunner.safefs import kind_of

if TYPE_CHECKING:
    import paramiko
else:  # imported at the first key parsed or host scanned: a daemon without ssh Workers never loads it
    paramiko = lazy("paramiko")

# paramiko logs a failed negotiation (a banner that never came, say) with its traceback on its own logger;
# with no handler there, Python's last-resort handler printed it into `taskrun up`'s output, beside the
# notice that says the same in words and what to do.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

CONNECT_TIMEOUT = 10.0


class HostKeyError(WorkerError):
    """Raised when a Worker's host key is unknown, changed, or cannot be pinned."""

    def __init__(self, message: str, expected: list[str] | None = None, seen: str | None = None) -> None:
        super().__init__(message)
        self.expected = expected or []
        self.seen = seen


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def host_entry(host: str, port: int) -> str:
    """How known_hosts names a host: bare on port 22, `[host]:port` elsewhere."""
    return host if port == 22 else f"[{host}]:{port}"


def parse_key_line(line: str) -> paramiko.PKey:
    """`ssh-ed25519 AAAA... [comment]` -> a public key."""
    parts = line.split()
    if len(parts) < 2:
        raise HostKeyError(f"not a public key line: {line!r} (expected 'TYPE BASE64')")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (binascii.Error, ValueError, paramiko.SSHException) as exc:
        raise HostKeyError(f"not a usable {parts[0]} public key: {exc}") from exc


def pinned_keys(host: str, port: int, host_key: str | None, known_hosts: str | None) -> list[paramiko.PKey]:
    """The keys a Worker may present; raises HostKeyError when none can be loaded."""
    keys: list[paramiko.PKey] = []
    if host_key:
        keys.append(parse_key_line(host_key))
    if known_hosts:
        path = Path(known_hosts).expanduser()
        text = _known_hosts_text(path)
        store = paramiko.HostKeys()
        for number, line in enumerate(text.splitlines(), 1):
            entry = _known_hosts_entry(path, number, line)
            for name in entry.hostnames if entry is not None else ():
                store.add(name, entry.key.get_name(), entry.key)
        found = store.lookup(host_entry(host, port))
        keys.extend(found.values() if found else [])
    if not keys:
        raise HostKeyError(f"no host key pinned for {host_entry(host, port)}; run `taskrun worker add` to pin one")
    return keys


def _known_hosts_entry(path: Path, number: int, line: str) -> Any:
    """Line `number` of the known_hosts file `path` (its text, already read): a paramiko HostKeyEntry, or None
    for a blank line, a comment or a key type paramiko does not know. HostKeyError for a marker line or one
    that is no known_hosts line; the message never quotes the line (the file may be anything: ~/.netrc)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("@"):
        raise HostKeyError(f"{path}:{number}: a line with a marker (@cert-authority, @revoked) is not supported "
                           "(paramiko cannot enforce them); pin plain host keys instead")
    try:
        return paramiko.hostkeys.HostKeyEntry.from_line(line, number)
    except Exception:  # InvalidHostKey carries the line itself: never shown
        raise HostKeyError(f"{path}:{number} is not a known_hosts line (what it holds is not shown); point "
                           "known_hosts at a file of host keys, or pin the Worker's key with `taskrun worker add`"
                           ) from None


def _known_hosts_text(path: Path) -> str:
    """The text of the known_hosts file `path` (a link the user made is followed, as ssh does); HostKeyError
    when it cannot be read, is no regular file, or holds more than MAX_KNOWN_HOSTS_BYTES (nothing past that
    is read)."""
    fix = "point known_hosts at a file of host keys, or pin the Worker's key with `taskrun worker add`"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, and is refused
    except OSError as exc:
        raise HostKeyError(f"cannot read known_hosts file {path}: {exc.strerror or exc}; {fix}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise HostKeyError(f"known_hosts file {path} is {kind_of(info.st_mode)}, not a regular file; {fix}")
        parts: list[bytes] = []
        got = 0
        if info.st_size <= MAX_KNOWN_HOSTS_BYTES:  # a file over the limit by its size is not read at all
            want = info.st_size + 1
            while got <= MAX_KNOWN_HOSTS_BYTES and (chunk := os.read(fd, want)):
                parts.append(chunk)
                got += len(chunk)
                want = min(1024 * 1024, MAX_KNOWN_HOSTS_BYTES - got + 1)  # what a file that grew may still add
    except OSError as exc:
        raise HostKeyError(f"cannot read known_hosts file {path}: {exc.strerror or exc}; {fix}") from None
    finally:
        os.close(fd)
    if max(got, info.st_size) > MAX_KNOWN_HOSTS_BYTES:
        size = over_limit(max(got, info.st_size), MAX_KNOWN_HOSTS_BYTES, "known_hosts files")
        raise HostKeyError(f"known_hosts file {path} is {size} (MAX_KNOWN_HOSTS_BYTES); {fix}")
    return b"".join(parts).decode("utf-8", errors="replace")


def is_pinned(seen: paramiko.PKey, pinned: list[paramiko.PKey]) -> bool:
    """Whether `seen` is one of the `pinned` keys (same type, same key)."""
    return any(seen.get_name() == key.get_name() and seen.asbytes() == key.asbytes() for key in pinned)


def check_host_key(seen: paramiko.PKey, pinned: list[paramiko.PKey], host: str, port: int,
                   name: str = "NAME") -> None:
    """HostKeyError, with the expected and seen fingerprints and how to re-pin Worker `name`, unless pinned."""
    if is_pinned(seen, pinned):
        return
    where = host_entry(host, port)
    port_option = "" if port == 22 else f" --port {port}"
    expected = [f"{key.get_name()} {fingerprint(key)}" for key in pinned]
    seen_text = f"{seen.get_name()} {fingerprint(seen)}"
    raise HostKeyError(
        f"host key of {where} does not match the pinned key: expected {', '.join(expected)}, "
        f"seen {seen_text}. If the Worker's key really changed (check on the Worker with "
        f"`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub`), re-pin it: `taskrun worker add {name} --host {host}"
        f"{port_option} --fingerprint {fingerprint(seen)}` (its other settings are kept)",
        expected, seen_text,
    )


def open_socket(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise WorkerError(f"cannot connect to {host}:{port}: {exc.strerror or exc}; check that sshd runs on the "
                          "Worker and listens there (the address and --port / workers.<name>.port), and that no "
                          "firewall is in the way") from exc
    # paramiko leaves Nagle on: every request would wait ~40 ms for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def scan_host_key(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> paramiko.PKey:
    """The key the host presents, without authenticating; pinning it is the caller's decision."""
    sock = open_socket(host, port, timeout)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        said = "it closed the connection" if isinstance(exc, EOFError) or "session" in str(exc).lower() else str(exc)
        raise WorkerError(f"cannot read the host key of {host}:{port}: {said} before an SSH key exchange; is it an "
                          "SSH server? Check the port (--port / workers.<name>.port): "
                          f"`ssh-keyscan -p {port} {host}` shows what answers there") from exc
    finally:
        transport.close()
