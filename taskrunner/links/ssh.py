"""An SSH Worker: one paramiko connection, one session channel running `taskrun-worker serve`.

paramiko's RejectPolicy with only the pinned key(s) loaded: an unknown or
changed host key fails the handshake before any command is sent. Every read on
the channel is bounded (the link's `read_timeout`, a little longer than
`scheduler.worker_offline_after`), and transport keepalives run, so a dead
peer ends the session instead of blocking a thread forever.

Each connection costs the daemon two threads: the link's (it opens the
session, then reads it) and paramiko's Transport thread. paramiko wakes that
thread every 0.1 s to look for a close and a keepalive to send; once the
connection is up its socket waits TRANSPORT_POLL_SECONDS instead, which cuts
the idle wakeups of a hundred Workers from 1,000 to 100 a second. A closed
connection's thread then ends within that time.

The Worker's stream is read through protocol.FromWorker: text the account's
shell prints before the hello ends the session with what it was and how to
silence it, not with a JSON parse error.
"""

from __future__ import annotations

import getpass
import io
import os
import shlex
import socket
from pathlib import Path
from typing import BinaryIO, Callable

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from taskrunner.defaults import CONFIG_FILE, OFFLINE_AFTER_SECONDS, READ_MARGIN_SECONDS
from taskrunner.atomic import read_file
from taskrunner.keys import MAX_KEY_FILE_BYTES, SSH_KEY_FILE, SSH_KEY_FIX, holds, unreadable
from taskrunner.errors import WorkerError
from taskrunner.links.base import LinkEvent, WorkerLink
from taskrunner.model import WorkerSpec
from taskrunner.protocol import FromWorker
from taskrunner.sshkeys import (
    CONNECT_TIMEOUT,
    HostKeyError,
    check_host_key,
    fingerprint,
    host_entry,
    open_socket,
    pinned_keys,
    scan_host_key,
)

KEEPALIVE_SECONDS = 5
#: The channel's largest SSH packet (paramiko's default is 32 KiB): its per-packet work (the MAC check in
#: Python) dominated a big output's cost on the control plane; the window stays paramiko's 2 MiB.
MAX_PACKET_BYTES = 256 * 1024
#: How long paramiko's Transport thread waits on an idle socket before it looks again (its default: 0.1 s).
TRANSPORT_POLL_SECONDS = 1.0
#: A session that says nothing for this long is dead, unless the caller bounds
#: reads otherwise (a daemon's links follow `scheduler.worker_offline_after`).
READ_TIMEOUT = OFFLINE_AFTER_SECONDS + READ_MARGIN_SECONDS


class SshLink(WorkerLink):
    def __init__(self, spec: WorkerSpec, state_dir: Path, post: Callable[[LinkEvent], None]) -> None:
        super().__init__(spec, post)
        self._identity = identity_path(spec, state_dir)
        self._client: paramiko.SSHClient | None = None

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        client = connect(self.spec, self._identity)
        channel = open_serve(client, self.spec, self.read_timeout)
        self._client = client
        return FromWorker(channel.makefile("rb")), channel.makefile_stdin("wb")  # type: ignore[return-value]

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def identity_path(spec: WorkerSpec, state_dir: Path) -> Path:
    """The private key a Worker is reached with: its `identity`, else the daemon's own SSH key."""
    return Path(spec.identity).expanduser() if spec.identity else state_dir / SSH_KEY_FILE


def open_serve(client: paramiko.SSHClient, spec: WorkerSpec, read_timeout: float = READ_TIMEOUT) -> paramiko.Channel:
    """Start `taskrun-worker serve` on a session channel whose reads wait at most `read_timeout`.

    Closes `client` on failure.
    """
    transport = client.get_transport()
    assert transport is not None
    try:
        channel = transport.open_session(timeout=CONNECT_TIMEOUT, max_packet_size=MAX_PACKET_BYTES)
        channel.settimeout(read_timeout)
        channel.exec_command(shlex.join(["taskrun-worker", "serve", "--name", spec.name, "--slots", str(spec.slots)]))
    except (paramiko.SSHException, OSError) as exc:
        client.close()
        raise WorkerError(f"Worker '{spec.name}': cannot start taskrun-worker serve: {exc}") from exc
    return channel


def load_identity(name: str, identity: str | Path, configured: bool = True) -> paramiko.PKey:
    """The private key at `identity` (links followed, as ssh -i does; then a regular file of at most
    MAX_KEY_FILE_BYTES, no FIFO waited on), made from the bytes read once: no other file is opened (an OpenSSH
    certificate beside it is not used). WorkerError saying what the file holds instead, and what to do:
    `configured`, the Worker's `identity`; else the daemon's own key (keys.ensure_ssh_key)."""
    fix = (f"point workers.{name}.identity in {CONFIG_FILE} at an SSH private key without a passphrase "
           "(OpenSSH or PEM format), or leave it out to use the daemon's own key" if configured
           else SSH_KEY_FIX.format(path=identity))
    if str(identity).endswith("/"):  # `ssh -i key/` refuses it too: a file's name has no trailing slash
        raise WorkerError(f"Worker '{name}': cannot load the SSH identity: {identity} ends in '/', so it names no "
                          f"file; {fix}")
    path = Path(os.path.realpath(os.path.expanduser(identity)))
    if path.is_symlink():
        raise WorkerError(f"Worker '{name}': cannot load the SSH identity: {identity} is a symbolic link that "
                          f"leads nowhere (a loop); {fix}")
    try:
        data = read_file(path, MAX_KEY_FILE_BYTES)
    except OSError as exc:
        said = unreadable(path, exc)
        shown = said if str(path) == str(identity) else f"{identity} (that is, {said})"
        raise WorkerError(f"Worker '{name}': cannot load the SSH identity: {shown}, not a key file; {fix}") from None
    try:
        try:
            loaded = serialization.load_ssh_private_key(data, password=None)
        except ValueError:
            loaded = serialization.load_pem_private_key(data, password=None)
        kind = next(cls for types, cls in _KEY_CLASSES if isinstance(loaded, types))
        return kind.from_private_key(io.StringIO(data.decode("ascii")))
    except (StopIteration, paramiko.SSHException, ValueError, TypeError, UnsupportedAlgorithm):
        raise WorkerError(f"Worker '{name}': the SSH identity {identity} should hold an SSH private key (RSA, "
                          f"ECDSA or Ed25519), but holds {holds(data)}; {fix}") from None


#: The key types paramiko signs with, and its class for each.
_KEY_CLASSES: tuple[tuple[type, type[paramiko.PKey]], ...] = (
    (rsa.RSAPrivateKey, paramiko.RSAKey), (ec.EllipticCurvePrivateKey, paramiko.ECDSAKey),
    (ed25519.Ed25519PrivateKey, paramiko.Ed25519Key))


def connect(spec: WorkerSpec, identity: Path) -> paramiko.SSHClient:
    """An authenticated connection to an ssh Worker whose host key matches the pin."""
    assert spec.host is not None
    where = host_entry(spec.host, spec.port)
    pinned = pinned_keys(spec.host, spec.port, spec.host_key, spec.known_hosts)
    pkey = load_identity(spec.name, spec.identity or identity, configured=bool(spec.identity))  # as written
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    for key in pinned:
        client.get_host_keys().add(where, key.get_name(), key)
    sock = open_socket(spec.host, spec.port)
    user = spec.user or getpass.getuser()
    try:
        client.connect(spec.host, spec.port, username=user, pkey=pkey, sock=sock,
                       timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
                       look_for_keys=False, allow_agent=False)
    except paramiko.BadHostKeyException as exc:
        client.close()
        check_host_key(exc.key, pinned, spec.host, spec.port, spec.name)
        raise HostKeyError(f"host key of {where} was refused") from exc
    except paramiko.AuthenticationException as exc:
        client.close()
        raise WorkerError(auth_refused(spec, user, identity, pkey)) from exc
    except paramiko.SSHException as exc:
        client.close()
        if "known_hosts" in str(exc):  # a key of a type we have no pin for
            check_host_key(scan_host_key(spec.host, spec.port), pinned, spec.host, spec.port, spec.name)
        raise WorkerError(f"Worker '{spec.name}': ssh to {where} failed: {exc}") from exc
    except OSError as exc:
        client.close()
        raise WorkerError(f"Worker '{spec.name}': ssh to {where} failed: {exc}") from exc
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(KEEPALIVE_SECONDS)
    try:
        # The first channel otherwise waits out one delayed ACK on the server.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (AttributeError, OSError):
        pass
    sock.settimeout(TRANSPORT_POLL_SECONDS)  # fewer idle wakeups (see the module's docstring)
    return client


def auth_refused(spec: WorkerSpec, user: str, identity: Path, pkey: paramiko.PKey) -> str:
    """Why sshd refused the login, as far as the client can tell, and what to check."""
    assert spec.host is not None
    # The login defaults to the local user name, which often is not the Worker's: say which was tried.
    default = "" if spec.user else " (no user given, so your local user name)"
    return (f"Worker '{spec.name}': ssh to {host_entry(spec.host, spec.port)} as user '{user}'{default} with key "
            f"{identity} ({pkey.get_name()} {fingerprint(pkey)}) failed: authentication refused. If the Worker's "
            f"login is another user, give it with --user USER (workers.{spec.name}.user in {CONFIG_FILE}). On the "
            f"Worker, check that ~{user}/.ssh/authorized_keys holds the line that "
            f"`taskrun-worker init --key '{pkey.get_name()} {pkey.get_base64()}'` printed")
