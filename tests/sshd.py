"""Real OpenSSH `sshd` processes on 127.0.0.1 as Workers for tests.

    from tests.sshd import SshdHost, client_key, start_sshd

    key = client_key(tmp_path)
    with start_sshd(tmp_path / "w1", key.public_line) as host:
        subprocess.run(host.ssh_argv(key.path, "taskrun-worker status --json"), timeout=30)

Each host has its own directory: an ed25519 host key, an sshd_config, a log,
a Worker home, and an authorized_keys holding exactly the line that
`taskrun-worker init` prints for the client key (restrict + the gate as forced
command). `init` also issues the Worker's one-time enrollment token, which
the host keeps as `host.token` for `taskrun worker add --token`. Forwarding
and the sftp subsystem keep sshd's defaults on purpose, so tests prove that
`restrict` and the gate are what refuse them.

sshd runs as the current user (root here, logging in as root) in the
foreground (`-D -e`), its log in `host.log_path`. When sshd or ssh-keygen is
missing the caller's test fails, saying what to install.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from taskrunner.enroll import trust_request
from taskrunner.keys import Keyring
from taskrunner.signing import SigningKey
from taskrunner.worker.trust import WORKER_KEY_FILE

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
#: How long sshd may take to accept TCP connections after it starts.
START_SECONDS = 10.0
#: How long stop() waits after SIGTERM before it kills.
STOP_SECONDS = 5.0
#: sshd's privilege-separation directory, which it insists exists when run as root.
PRIVSEP_DIR = Path("/run/sshd")


def require(program: str) -> str:
    """The path of `program`; the test fails loudly when it is missing (never skips)."""
    path = program if os.path.isabs(program) and os.access(program, os.X_OK) else shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: these tests need OpenSSH (apt-get install openssh-server)")
    return path


@dataclass(frozen=True)
class ClientKey:
    """An ed25519 key pair for the SSH client: the private key file and its public line."""

    path: Path
    public_line: str


def client_key(tmp_path: Path, name: str = "client_ed25519") -> ClientKey:
    """Generate an unencrypted ed25519 client key pair in `tmp_path`."""
    path = tmp_path / name
    _keygen(path, f"taskrun-test-{name}")
    return ClientKey(path, path.with_suffix(".pub").read_text().strip())


def worker_command() -> str:
    """The taskrun-worker the forced command runs: the one next to this interpreter, else PATH's."""
    sibling = Path(sys.executable).parent / "taskrun-worker"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        # shutil.which may find a version-manager shim, which picks its Python by working
        # directory and environment; sshd's session has neither of ours.
        return str(sibling)
    return require("taskrun-worker")


#: How `taskrun-worker init` and `trust --reset` show the enrollment token.
TOKEN_RE = re.compile(r"enrollment token ([0-9a-f]{32})")


def enroll(home: Path, control_state: Path) -> str:
    """Make the Worker home trust the control plane's keys by running the real commands: its admin
    pins the control plane's key (`taskrun-worker trust --reset --trust-key`), then `taskrun-worker
    trust` takes the statement `taskrun worker add` sends through the gate. The Worker's result key line."""
    now = time.time()
    ring, _ = Keyring.ensure(control_state, now)
    pin = subprocess.run([worker_command(), "trust", "--home", str(home), "--reset", "--trust-key",
                          ring.current.key_id], capture_output=True)
    assert pin.returncode == 0, pin.stderr.decode()
    audience = SigningKey.from_pem((home / WORKER_KEY_FILE).read_bytes()).key_id \
        if (home / WORKER_KEY_FILE).exists() else None
    result = subprocess.run([worker_command(), "trust", "--home", str(home)],
                            input=json.dumps(trust_request(ring, audience, now)).encode(), capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    return str(json.loads(result.stdout)["worker_key"])


class SshdHost:
    """One real sshd on 127.0.0.1 with its own host key, config, log and Worker home."""

    def __init__(self, root: Path, client_public_line: str, port: int | None = None) -> None:
        self.root = root
        self.home = root / "worker-home"
        self.host_key_path = root / "ssh_host_ed25519_key"
        self.config_path = root / "sshd_config"
        self.authorized_keys = root / "authorized_keys"
        self.known_hosts = root / "known_hosts"
        self.log_path = root / "sshd.log"
        self.pid_file = root / "sshd.pid"
        self.user = getpass.getuser()
        self.port = port or 0
        #: The one-time enrollment token `taskrun-worker init` issued (None once the home is enrolled).
        self.token: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._sshd = require(SSHD)
        root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        if not self.host_key_path.exists():  # a directory used again keeps its host key
            _keygen(self.host_key_path, "taskrun-test-host")
        self.authorize(client_public_line, replace=True)

    # -- what tests read -------------------------------------------------------

    @property
    def host_key_line(self) -> str:
        """The host's public key as `ssh-ed25519 AAAA...` (no comment), as a config pins it."""
        key_type, blob = self.host_key_path.with_suffix(".pub").read_text().split()[:2]
        return f"{key_type} {blob}"

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key_line}"

    @property
    def fingerprint(self) -> str:
        """`SHA256:...` of the host key, as `ssh-keygen -lf` shows it."""
        out = subprocess.run([require("ssh-keygen"), "-l", "-E", "sha256", "-f", str(self.host_key_path)],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        return out.split()[1]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ssh_argv(self, identity: Path, *remote: str, options: tuple[str, ...] = (),
                 known_hosts: Path | None = None) -> list[str]:
        """An `ssh` command line to this host that trusts only a pinned key and uses only `identity`.

        `known_hosts` defaults to `self.known_hosts`, which start() rewrites with
        the current host key; a test about a changed key pins its own copy.
        """
        return ["ssh", *self.ssh_options(identity, known_hosts), "-p", str(self.port), *options,
                f"{self.user}@127.0.0.1", *remote]

    def ssh_options(self, identity: Path, known_hosts: Path | None = None) -> list[str]:
        """Options shared by ssh and sftp: no user config, a pinned host key, one identity, no prompts."""
        return ["-F", "/dev/null", "-i", str(identity),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
                "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2"]

    # -- changing the host -----------------------------------------------------

    def authorize(self, public_line: str, replace: bool = False) -> str:
        """Add the `taskrun-worker init` line for `public_line` to authorized_keys; return it."""
        result = subprocess.run(
            [worker_command(), "init", "--key", public_line, "--home", str(self.home),
             "--command", worker_command()],
            capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"taskrun-worker init failed ({result.returncode}): {result.stderr}")
        issued = TOKEN_RE.search(result.stderr)
        if issued is not None:
            self.token = issued.group(1)
        line = result.stdout.strip()
        with open(self.authorized_keys, "w" if replace else "a") as handle:
            handle.write(line + "\n")
        return line

    def reset_trust(self) -> str:
        """What the Worker's admin runs on it: `taskrun-worker trust --reset`; keeps and returns the new token."""
        result = subprocess.run([worker_command(), "trust", "--home", str(self.home), "--reset"],
                                capture_output=True, text=True, timeout=60)
        issued = TOKEN_RE.search(result.stdout)
        if result.returncode != 0 or issued is None:
            raise AssertionError(f"taskrun-worker trust --reset failed ({result.returncode}): {result.stderr}")
        self.token = issued.group(1)
        return self.token

    def regenerate_host_key(self) -> str:
        """Replace the host key (restarting a running sshd so it serves the new one); return its line."""
        for path in (self.host_key_path, self.host_key_path.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        _keygen(self.host_key_path, "taskrun-test-host")
        if self.running:
            self.restart()
        return self.host_key_line

    # -- the process -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> SshdHost:
        """Start sshd and wait until its port accepts TCP connections.

        Without a fixed port, a free one is picked; if another process takes it
        before sshd binds, another port is tried.
        """
        if self.running:
            raise AssertionError("sshd is already running")
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        fixed = self.port != 0
        for _attempt in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port()
            self._write_config()
            mark = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([self._sshd, "-D", "-e", "-f", str(self.config_path)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_listening():
                self._write_known_hosts()
                return self
            self.proc.wait(timeout=STOP_SECONDS)
            self.proc = None
            if "Address already in use" not in self.log_text()[mark:]:
                break
        raise AssertionError(f"sshd did not start on port {self.port}; its log:\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM sshd and wait for it (SIGKILL after STOP_SECONDS). Open sessions keep their own processes."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_SECONDS)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL sshd, as a crash would."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_SECONDS)
        self.proc = None

    def restart(self) -> SshdHost:
        """Stop sshd and start a new process on the same port with the same keys."""
        self.stop()
        return self.start()

    def __enter__(self) -> SshdHost:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------

    def _write_config(self) -> None:
        self.config_path.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",  # tmp_path directories are not what StrictModes expects
            "LogLevel VERBOSE",
            "MaxStartups 100",
            "PrintMotd no",
            "PrintLastLog no",
            # Left at their defaults on purpose: `restrict` and the gate must refuse these.
            f"Subsystem sftp {SFTP_SERVER}",
            "",
        ]))

    def _write_known_hosts(self) -> None:
        self.known_hosts.write_text(self.known_hosts_line + "\n")

    def _wait_listening(self) -> bool:
        """True once the port accepts a TCP connection; False if sshd exits first."""
        assert self.proc is not None
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return True
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"sshd did not listen on port {self.port} within {START_SECONDS}s:\n{self.log_text()}")


def start_sshd(root: Path, client_public_line: str, port: int | None = None) -> SshdHost:
    """A running sshd in directory `root` that lets `client_public_line` in through the gate only."""
    return SshdHost(root, client_public_line, port).start()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    keygen = require("ssh-keygen")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
