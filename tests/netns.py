"""Workers behind a real network link that tests can break: a network namespace per Worker.

    from tests.netns import Netns, start_netns_sshd

    with Netns.create() as ns:                      # 10.200.N.1 here, 10.200.N.2 in the namespace
        host = start_netns_sshd(ns, tmp_path / "w1", client_public_line)
        ns.blackhole()                              # every packet on the link dropped
        ns.heal()                                   # every rule and qdisc gone again

Each namespace gets a veth pair: `trN-h` stays on this machine with
10.200.N.1/24, `trN-w` goes into the namespace with 10.200.N.2/24. The daemon
reaches the Worker's sshd at 10.200.N.2:22; the Worker's processes (its sshd,
`taskrun-worker serve`, the Agents) run inside the namespace, so a rule there
cuts all of them off the daemon and nothing else. N is the first subnet whose
interface name is free (`ip link add` is the lock), so concurrent test
processes do not collide.

Faults are iptables rules in the namespace's filter table, matched on the
Worker-side interface only (`-i trN-w` for INPUT, daemon to Worker; `-o trN-w`
for OUTPUT, Worker to daemon), and a `tbf` qdisc on the Worker-side interface
for a bandwidth limit (its egress: Worker to daemon). `tc netem` is not
available on these kernels; iptables' `statistic` match gives random loss.
`heal()` flushes both chains and removes the qdisc; `close()` kills every
process left in the namespace and deletes it, which takes the veth pair, its
rules and its qdisc with it, so a failing test leaves nothing behind.

Needs root and `ip`, `iptables` and `tc` (Debian: iproute2, iptables); when
one is missing the caller's test fails, saying what to install.

The traffic stays on this machine: 10.200.N.0/24 exists only on the veth
pairs made here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.sshd import SSHD, SshdHost

#: Subnets 10.200.N.0/24 tried, in order.
SUBNETS = range(1, 250)
#: The port the Worker's sshd listens on inside its own namespace.
SSH_PORT = 22
#: Namespaces made here are named with this prefix and the creating process's pid.
PREFIX = "taskrun-test"
#: How long a command of `ip`, `iptables` or `tc` may take.
COMMAND_SECONDS = 30.0


def require_root_tools() -> None:
    """Fail (never skip) when this process cannot make namespaces or rules."""
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root (they create veth pairs and iptables rules)")
    for program, package in (("ip", "iproute2"), ("iptables", "iptables"), ("tc", "iproute2")):
        if subprocess.run(["sh", "-c", f"command -v {program}"], check=False, capture_output=True).returncode != 0:
            pytest.fail(f"{program} is not installed: these tests need it (apt-get install {package})")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class Netns:
    """One network namespace joined to this machine by a veth pair, with the means to break the link."""

    def __init__(self, name: str, subnet: int) -> None:
        self.name = name
        self.subnet = subnet
        self.host_if = f"tr{subnet}-h"
        self.worker_if = f"tr{subnet}-w"
        #: This machine's address on the link (what the Worker sees the daemon as).
        self.host_addr = f"10.200.{subnet}.1"
        #: The Worker's address, inside the namespace.
        self.addr = f"10.200.{subnet}.2"
        self.closed = False

    # -- making and removing ---------------------------------------------------

    @classmethod
    def create(cls) -> Netns:
        """A new namespace with its link up; AssertionError when none can be made."""
        require_root_tools()
        _remove_orphans()
        for subnet in SUBNETS:
            made = _run("ip", "link", "add", f"tr{subnet}-h", "type", "veth", "peer", "name", f"tr{subnet}-w",
                        check=False)
            if made.returncode == 0:
                break
        else:
            raise AssertionError(f"no free veth name tr1-h ... tr{SUBNETS[-1]}-h")
        ns = cls(f"{PREFIX}-{os.getpid()}-{subnet}", subnet)
        try:
            ns._set_up()
        except BaseException:
            ns.close()
            raise
        return ns

    def _set_up(self) -> None:
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "set", self.worker_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        self.ip("addr", "add", f"{self.addr}/24", "dev", self.worker_if)
        self.ip("link", "set", self.worker_if, "up")
        self.ip("link", "set", "lo", "up")

    def close(self) -> None:
        """Kill every process in the namespace, delete it and the veth pair. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        pids = _run("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run("ip", "netns", "del", self.name, check=False)
        # The pair goes with the namespace; a half-made one may still be here.
        _run("ip", "link", "del", self.host_if, check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # -- commands in the namespace ---------------------------------------------

    def exec_argv(self, *argv: str) -> list[str]:
        """`argv` run inside the namespace (`ip netns exec`, which execs: the pid stays the same)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def ip(self, *args: str) -> None:
        _run("ip", "-n", self.name, *args)

    def iptables(self, *rule: str) -> None:
        """One iptables command in the namespace (`-w`: waits for the xtables lock)."""
        _run(*self.exec_argv("iptables", "-w", *rule))

    def rules(self) -> str:
        """The namespace's filter rules, as `iptables -S` prints them."""
        return _run(*self.exec_argv("iptables", "-w", "-S")).stdout

    # -- faults ----------------------------------------------------------------

    def _match(self, direction: str) -> list[str]:
        if direction == "in":  # daemon -> Worker
            return ["INPUT", "-i", self.worker_if]
        if direction == "out":  # Worker -> daemon
            return ["OUTPUT", "-o", self.worker_if]
        raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")

    def _directions(self, direction: str) -> tuple[str, ...]:
        return ("in", "out") if direction == "both" else (direction,)

    def blackhole(self, direction: str = "both") -> None:
        """Drop every packet on the link (`in`: daemon to Worker, `out`: Worker to daemon, or `both`)."""
        for way in self._directions(direction):
            self.iptables("-A", *self._match(way), "-j", "DROP")

    def reset(self) -> None:
        """Answer every TCP segment on the link, either way, with a TCP reset.

        The resets REJECT itself sends to the daemon leave through OUTPUT: segments that are
        resets are let out, or the daemon would see a blackhole instead.
        """
        self.iptables("-A", *self._match("in"), "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
        self.iptables("-A", *self._match("out"), "-p", "tcp", "!", "--tcp-flags", "RST", "RST",
                      "-j", "REJECT", "--reject-with", "tcp-reset")

    def loss(self, probability: float, direction: str = "both") -> None:
        """Drop each packet with `probability` (0 < p < 1), independently, in `direction`."""
        if not 0.0 < probability < 1.0:
            raise ValueError(f"probability must be between 0 and 1, not {probability}")
        for way in self._directions(direction):
            self.iptables("-A", *self._match(way), "-m", "statistic", "--mode", "random",
                          "--probability", f"{probability:.4f}", "-j", "DROP")

    def limit_rate(self, rate: str, burst: str = "8kb", latency: str = "2s") -> None:
        """A token bucket on the Worker's side of the link (Worker to daemon): `tc qdisc ... tbf`.

        `rate` as tc takes it ("64kbit"); packets waiting longer than `latency` are dropped.
        """
        _run(*self.exec_argv("tc", "qdisc", "replace", "dev", self.worker_if, "root", "tbf",
                             "rate", rate, "burst", burst, "latency", latency))

    def overlimits(self) -> int:
        """How often the rate limit held a packet back (`tc -s qdisc`'s overlimits; 0 without a limit)."""
        shown = _run(*self.exec_argv("tc", "-s", "qdisc", "show", "dev", self.worker_if)).stdout
        words = shown.replace(")", " ").split()
        return sum(int(words[i + 1]) for i, word in enumerate(words[:-1])
                   if word == "overlimits" and words[i + 1].isdigit())

    def heal(self) -> None:
        """Remove every rule and the rate limit: the link is whole again."""
        self.iptables("-F", "INPUT")
        self.iptables("-F", "OUTPUT")
        _run(*self.exec_argv("tc", "qdisc", "del", "dev", self.worker_if, "root"), check=False)

    def dropped(self) -> int:
        """Packets the namespace's rules have dropped or rejected so far (a fault that took effect)."""
        counted = _run(*self.exec_argv("iptables", "-w", "-L", "-v", "-n", "-x")).stdout
        total = 0
        for line in counted.splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[0].isdigit() and fields[2] in ("DROP", "REJECT"):
                total += int(fields[0])
        return total


def _remove_orphans() -> None:
    """Namespaces of test processes that died without tearing down (SIGKILL): deleted."""
    listed = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        parts = name.split("-")
        if not name.startswith(PREFIX + "-") or len(parts) != 4 or not parts[2].isdigit():
            continue
        if Path(f"/proc/{parts[2]}").exists():
            continue  # its test process is alive: not ours to remove
        orphan = Netns(name, int(parts[3]) if parts[3].isdigit() else 0)
        orphan.close()


class NetnsSshdHost(SshdHost):
    """A tests/sshd.py host whose sshd runs inside `ns`, listening on `ns.addr`:22."""

    def __init__(self, ns: Netns, root: Path, client_public_line: str) -> None:
        self.ns = ns
        super().__init__(root, client_public_line, SSH_PORT)
        # sshd wants an absolute argv[0] to re-exec itself; `ip netns exec` keeps it and the pid.
        wrapper = root / "sshd-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec {" ".join(ns.exec_argv(SSHD))} "$@"\n')
        wrapper.chmod(0o700)
        self._sshd = str(wrapper)

    @property
    def known_hosts_line(self) -> str:
        where = self.ns.addr if self.port == 22 else f"[{self.ns.addr}]:{self.port}"  # as ssh and paramiko look it up
        return f"{where} {self.host_key_line}"

    def ssh_argv(self, identity: Path, *remote: str, options: tuple[str, ...] = (),
                 known_hosts: Path | None = None) -> list[str]:
        return ["ssh", *self.ssh_options(identity, known_hosts), "-p", str(self.port), *options,
                f"{self.user}@{self.ns.addr}", *remote]

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text()
        self.config_path.write_text(text.replace(f"ListenAddress 127.0.0.1:{self.port}",
                                                 f"ListenAddress {self.ns.addr}:{self.port}"))

    def _wait_listening(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                if probe.connect_ex((self.ns.addr, self.port)) == 0:
                    return True
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"sshd did not listen on {self.ns.addr}:{self.port}:\n{self.log_text()}")


def start_netns_sshd(ns: Netns, root: Path, client_public_line: str) -> NetnsSshdHost:
    """A running sshd inside `ns` (directory `root`) that lets `client_public_line` in through the gate only."""
    host = NetnsSshdHost(ns, root, client_public_line)
    host.start()
    return host
