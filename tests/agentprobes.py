"""What a test can still see of an Agent that runs confined (DESIGN.md §5.10).

A confined Agent sees no file of the test's (a gate file in tmp_path does
not exist for it), and inside its PID namespace `$$` and `$!` are not host
pids. It keeps the network and its argv, and so:

- `Gate`: a loopback port, closed until the test opens it; the Agent waits
  with `until {gate.check}; do sleep 0.05; done` (bash's /dev/tcp). An Agent
  in another network namespace cannot reach this machine's loopback: its gate
  listens on an address of this machine that the namespace routes to
  (`Gate(bind=...)`, say the host side of its veth pair).
- `Counter`: a loopback server that answers each connection with its number
  (1, 2, ...); an Agent reads it with `{counter.read}` into $n: a trace of
  each time it ran, and state across Runs (a retry that behaves otherwise).
- `processes_named(marker)`: the host pids of live processes whose argv[0] is
  `marker` (bash's `exec -a MARKER ...`), wherever their PID namespace.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid

from tests.sshd import free_port


class Gate:
    """A gate an Agent can wait on: closed until `open()`; `check` is its shell test."""

    def __init__(self, bind: str = "127.0.0.1") -> None:
        #: The address the gate listens on once open, and the Agent connects to.
        self.bind = bind
        self.port = free_port()
        self._sock: socket.socket | None = None

    @property
    def check(self) -> str:
        """A shell command that succeeds once the gate is open."""
        return f"(exec 3<>/dev/tcp/{self.bind}/{self.port}) 2>/dev/null"

    def open(self) -> None:
        """Open the gate; once open it stays open (a test's `finally` may open it again, so no Agent waits on)."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind, self.port))
        sock.listen(128)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Counter:
    """A loopback server answering connection n with the line `n`; `count` is how many came."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.count = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, name="counter", daemon=True).start()

    @property
    def read(self) -> str:
        """A shell command that connects once and sets $n to this connection's number."""
        return f"exec 3<>/dev/tcp/127.0.0.1/{self.port}; read -r n <&3; exec 3<&-"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.count += 1
                number = self.count
            with conn:
                conn.sendall(f"{number}\n".encode())

    def close(self) -> None:
        self._sock.close()


def marker() -> str:
    """A unique argv[0] for an Agent's processes."""
    return f"taskrun-test-{uuid.uuid4().hex[:12]}"


def processes_named(name: str) -> list[int]:
    """Host pids of live (not zombie) processes whose argv[0] is `name`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv0 = handle.read().split(b"\0", 1)[0]
            if argv0 != name.encode():
                continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            found.append(int(entry))
    return found
