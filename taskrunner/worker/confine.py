"""How a Worker starts an Agent: in a sandbox, or unconfined only where both sides accept it (DESIGN.md §5.10).

The rule (`decide`). An Agent runs unconfined only when BOTH

- the signed manifest says the control plane accepts that for this Worker
  (`agent.sandbox: "none"`, from `workers.<name>.sandbox: none` in
  .taskrun.yaml), AND
- this Worker cannot make a sandbox (its probe failed: no bwrap, no user
  namespaces) or its admin turned the sandbox off (`taskrun-worker serve
  --sandbox none`).

Otherwise it runs in bwrap (sandbox.py), or, when no sandbox can be made, not
at all: the Run fails with SandboxRefused, which names the fix. A manifest
that accepts `none` for a Worker that can make a sandbox still gets one.

Whichever way it runs, an Agent gets a HOME of its own, `<run>/home` (0700),
and the Worker's process group and exit-status bookkeeping: confined, bwrap
writes `exit_status` (see rundir.py); unconfined, the bash wrapper writes
`exit_code`.

A confined Agent of a root Worker runs as a uid of its own (sandbox.py,
"Root"): `allocate_uid` picks one from the Agents' range, starting at a
number derived from the run id, that no other Run held in this Worker home
has, records it in `<run>/agent_uid`, and does so under a lock on
`<home>/agent_uids.lock`, so two sessions starting Runs at once never pick
the same. The workspace, HOME and input files are handed to it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from taskrunner.errors import WorkerError
from taskrunner.worker.rundir import RunDir, wrapped
from taskrunner.worker.sandbox import (
    AGENT_UID_BASE,
    AGENT_UID_COUNT,
    INSTALL_HINT,
    HostView,
    RunSandbox,
    SandboxStatus,
    bwrap_argv,
    hand_over,
    host_view,
    probe,
)

#: `taskrun-worker serve --sandbox` and `workers.<name>.sandbox`: confine Agents, or accept them unconfined.
SANDBOX_MODES = ("bwrap", "none")
#: What a Worker says when its admin gave `--sandbox none`.
TURNED_OFF = "the Worker's admin turned the sandbox off (taskrun-worker --sandbox none)"
#: In the Worker home: held while a uid is picked for an Agent.
UID_LOCK = "agent_uids.lock"


class SandboxRefused(WorkerError):
    """Raised when an Agent may not run unconfined and this Worker cannot confine it."""


@dataclass
class Launch:
    """How to start one Agent: its argv, its HOME, and the file descriptors the argv names."""

    argv: list[str]
    home: Path
    confined: bool
    pass_fds: tuple[int, ...] = ()

    def close(self) -> None:
        """Close the parent's copies of `pass_fds` once the Agent is started (or failed to)."""
        for fd in self.pass_fds:
            os.close(fd)
        self.pass_fds = ()


def decide(status: SandboxStatus, agent: Mapping[str, Any], worker: str) -> bool:
    """True to confine, False to run unconfined; SandboxRefused when neither is allowed. Pure."""
    if status.kind is not None:
        return True
    if agent.get("sandbox") == "none":
        return False
    fix = ("have the Worker's admin drop --sandbox none" if status.reason == TURNED_OFF else INSTALL_HINT)
    raise SandboxRefused(f"this Worker cannot confine Agents ({status.reason}), and the control plane does not "
                         f"accept unconfined Agents for it: {fix}, or accept them with "
                         f"`workers.{worker}.sandbox: none` in .taskrun.yaml")


class Confinement:
    """One Worker process's sandbox: its admin's mode, its protected paths, and the cached probe."""

    def __init__(self, home: Path, mode: str = "bwrap", protect: Sequence[Path] = ()) -> None:
        if mode not in SANDBOX_MODES:
            raise WorkerError(f"--sandbox must be one of {', '.join(SANDBOX_MODES)}, not {mode!r}")
        self.home = home
        self.mode = mode
        self.protected = tuple(sorted({os.path.realpath(home), *(os.path.realpath(p) for p in protect)}))
        self._host: HostView | None = None
        self._status: SandboxStatus | None = None

    def status(self) -> SandboxStatus:
        """Whether Agents can be confined here (probed once, on first use)."""
        if self._status is None:
            if self.mode == "none":
                self._status = SandboxStatus(None, reason=TURNED_OFF)
            else:
                self._host = host_view()
                self._status = probe(self._host, self.protected)
        return self._status

    def launch(self, run_dir: RunDir, argv: list[str], agent: Mapping[str, Any], worker: str) -> Launch:
        """The Agent's command for `argv` (from agents.prepare), confined or not; SandboxRefused if neither.

        Makes the Run's HOME; for a confined Run opens its exit-status file (the
        caller passes `pass_fds` to the Agent's Popen and then calls `close`).
        """
        home = run_dir.agent_home
        home.mkdir(mode=0o700)
        status = self.status()
        if not decide(status, agent, worker):
            return Launch(wrapped(run_dir.path, argv), home, confined=False)
        host = self._host
        assert host is not None  # a sandbox status other than none comes from a probe of a host view
        # The paths the Agent is told (argv, TASKRUN_WORKSPACE): bound at the same place inside.
        workspace, home_dir = os.path.abspath(run_dir.workspace), os.path.abspath(home)
        inputs = tuple(os.path.abspath(p) for p in run_dir.agent_inputs())
        uid = None
        if host.root:
            uid = allocate_uid(self.home, run_dir)
            hand_over([workspace, home_dir, *inputs], uid, uid)
        fd = os.open(run_dir.exit_status_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            command = bwrap_argv(host, RunSandbox(workspace, home_dir, inputs, self.protected, status_fd=fd, uid=uid),
                                 argv)
        except ValueError as exc:
            os.close(fd)
            raise SandboxRefused(f"cannot confine the Agent: {exc}") from None
        return Launch(command, home, confined=True, pass_fds=(fd,))


def allocate_uid(home: Path, run_dir: RunDir) -> int:
    """A uid from the Agents' range for `run_dir`'s Agent that no other Run held in `home` has; recorded
    in the Run's `agent_uid`. SandboxRefused when every one is taken."""
    start = int.from_bytes(hashlib.sha256(run_dir.run_id.encode()).digest()[:4], "big") % AGENT_UID_COUNT
    fd = os.open(home / UID_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        used = set()
        for path in (home / "runs").iterdir():
            if path != run_dir.path:
                used.add(RunDir(path).agent_uid())
        for step in range(AGENT_UID_COUNT):
            uid = AGENT_UID_BASE + (start + step) % AGENT_UID_COUNT
            if uid not in used:
                run_dir.write_agent_uid(uid)
                return uid
    finally:
        os.close(fd)  # and the lock with it
    raise SandboxRefused(f"all {AGENT_UID_COUNT} uids for Agents are taken by the Runs this Worker holds")
