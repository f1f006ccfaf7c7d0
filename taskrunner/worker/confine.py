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
has. Two sessions starting Runs at once never pick the same: each uid in use
is claimed by a symlink `<home>/agent_uids/<uid>` naming its Run, made with
one symlink(2) (atomic, and no scan of the held Runs), which is also the
record of which uid the Run has; a claim whose Run is no longer held is taken
over under a lock on `<home>/agent_uids.lock`. (Workers before the claims
kept the uid in `<run>/agent_uid`; the claims directory is made from those
once.) The workspace, HOME and input files are handed to it. Every file
operation here counts: on a busy disk each create or rename waits for the
journal, so a Run's start makes one link, not a file and a rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from taskrunner import safefs
from taskrunner.errors import WorkerError
from taskrunner.worker.rundir import RUN_ID_RE, RunDir, wrapped
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
#: In the Worker home: held while a claim is taken over or the claims directory is made.
UID_LOCK = "agent_uids.lock"
#: In the Worker home: the uids Agents of held Runs have, one symlink `<uid>` -> run id each (allocate_uid).
UID_CLAIMS = "agent_uids"


#: The Worker's variables an Agent keeps: where programs are, and the locale.
AGENT_VARIABLES = ("PATH", "LANG", "TZ")
#: PATH for an Agent when the Worker has none.
DEFAULT_AGENT_PATH = "/usr/local/bin:/usr/bin:/bin"


def agent_environment(run_id: str, task_id: str, workspace: Path, home: Path,
                      environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """An Agent's whole environment, before the secrets its Agent names are added.

    PATH, LANG, LC_* and TZ from the Worker (those set), HOME (the Run's own)
    and TASKRUN_RUN_ID, TASKRUN_TASK_ID, TASKRUN_WORKSPACE; nothing else of the
    Worker's environment, whose credentials, SSH_AUTH_SOCK and the like are
    not the Agent's. (Nor are sshd's SSH_CLIENT and friends: Debian's bash
    sources ~/.bashrc for a `bash -c` that sees them.)
    """
    env = {k: v for k, v in environ.items() if k in AGENT_VARIABLES or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_AGENT_PATH)
    env.update(HOME=str(home), TASKRUN_RUN_ID=run_id, TASKRUN_TASK_ID=task_id, TASKRUN_WORKSPACE=str(workspace))
    return env


def missing_program(argv: Sequence[str], path: str, agent: str = "<name>") -> str | None:
    """Why the Agent's program (argv[0]) cannot be started here, or None when it can: not on `path` (the
    Agent's PATH), or a configured path (`agent.path`) that is not an executable file on this Worker."""
    program = argv[0] if argv else ""
    if not program:
        return "the Agent has no program to run"
    if shutil.which(program, path=path) is not None:
        return None
    if "/" in program:
        return (f"the Agent's program {program} is not an executable file on this Worker: fix agents.{agent}.path "
                "in .taskrun.yaml, or install the CLI there")
    return (f"the Agent's program {program!r} is not on this Worker's PATH ({path}): install it there, or set "
            f"agents.{agent}.path in .taskrun.yaml")


def open_input(path: Path, workspace: Path) -> int:
    """An fd of the regular file `path` for the Agent's stdin. Within `workspace` (content a repository
    controls) it is opened beneath it without following any link (safefs); elsewhere (the Run's
    directory) without following a link at its end. OSError (UnsafePath) otherwise."""
    absolute, top = os.path.abspath(path), os.path.abspath(workspace)
    if absolute.startswith(top + os.sep):
        tree = safefs.Beneath(Path(top))
        try:
            return tree.open_file(os.path.relpath(absolute, top))
        finally:
            tree.close()
    fd = os.open(absolute, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"the Agent's input {absolute} is not a regular file")
    return fd


class SandboxRefused(WorkerError):
    """Raised when an Agent may not run unconfined and this Worker cannot confine it."""


@dataclass
class Launch:
    """How to start one Agent: its argv, its HOME, and the file descriptors the argv names."""

    argv: list[str]
    home: Path
    confined: bool
    pass_fds: tuple[int, ...] = ()

    def start(self, cwd: Path, env: Mapping[str, str], stdout: int, stdin: Path | None) -> subprocess.Popen[bytes]:
        """Start the Agent in `cwd` (its workspace): stdout and stderr to the fd `stdout`, stdin from the file
        `stdin` (opened here by the Worker, see `open_input`) or /dev/null. OSError when it cannot start.

        Its own session: no controlling terminal (TIOCSTI), its own process
        group to kill. umask 077: what the Agent and its wrapper create is
        theirs alone. The caller still calls `close`.
        """
        source = open_input(stdin, cwd) if stdin is not None else None
        try:
            return subprocess.Popen(self.argv, cwd=cwd, stdin=subprocess.DEVNULL if source is None else source,
                                    stdout=stdout, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True,
                                    umask=0o077, pass_fds=self.pass_fds)
        finally:
            if source is not None:
                os.close(source)

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

    def launch(self, run_dir: RunDir, argv: list[str], agent: Mapping[str, Any], worker: str,
               inputs: Sequence[Path] = (), home_files: Mapping[str, str] = {}) -> Launch:
        """The Agent's command for `argv` (from agents.prepare), confined or not; SandboxRefused if neither.

        Makes the Run's HOME; for a confined Run opens its exit-status file (the
        caller passes `pass_fds` to the Agent's Popen and then calls `close`).
        `inputs` (Prepared.inputs) are bound read-only in the sandbox, with the
        Run's own input files (rundir.agent_inputs). `home_files` (Prepared.home_files:
        path relative to HOME -> text; a path ending in "/" is a directory) are
        written into the fresh HOME before it is handed to the Agent.
        """
        home = run_dir.agent_home
        home.mkdir(mode=0o700)
        write_home_files(home, home_files)
        status = self.status()
        if not decide(status, agent, worker):
            return Launch(wrapped(run_dir.path, argv), home, confined=False)
        host = self._host
        assert host is not None  # a sandbox status other than none comes from a probe of a host view
        # The paths the Agent is told (argv, TASKRUN_WORKSPACE): bound at the same place inside.
        workspace, home_dir = os.path.abspath(run_dir.workspace), os.path.abspath(home)
        files = tuple(dict.fromkeys(p for p in (os.path.abspath(f) for f in (*run_dir.agent_inputs(), *inputs))
                                    if os.path.exists(p)))
        uid = None
        if host.root:
            uid = allocate_uid(self.home, run_dir)
            # Only what is the Run's own: an input elsewhere (a configured program) keeps its owner.
            own = [p for p in files if p.startswith(os.path.abspath(run_dir.path) + os.sep)]
            hand_over([workspace, home_dir, *own], uid, uid)
        fd = os.open(run_dir.exit_status_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            command = bwrap_argv(host, RunSandbox(workspace, home_dir, files, self.protected, status_fd=fd, uid=uid,
                                                  shared=run_dir.shared_paths()),
                                 argv)
        except ValueError as exc:
            os.close(fd)
            raise SandboxRefused(f"cannot confine the Agent: {exc}") from None
        return Launch(command, home, confined=True, pass_fds=(fd,))


def write_home_files(home: Path, files: Mapping[str, str]) -> None:
    """Write `files` (relative path -> text, "dir/" for a directory) into a HOME the Worker just made.

    ValueError for a path that is absolute or climbs out (`..`): the names come from the preset
    modules, never from a Task, but a HOME is written only beneath itself.
    """
    for name, text in files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"not a path inside the Agent's HOME: {name!r}")
        target = home.joinpath(*parts)
        if name.endswith("/"):
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            continue
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)


def allocate_uid(home: Path, run_dir: RunDir) -> int:
    """A uid from the Agents' range for `run_dir`'s Agent that no other Run held in `home` has, recorded by
    its claim. SandboxRefused when every one is taken.

    Claims (`<home>/agent_uids/<uid>`, a symlink naming the Run's id, never
    followed) make this one symlink(2) per Run, whatever the number of held
    Runs: creating one is atomic across sessions. A claim whose Run is no
    longer held (its directory is gone) is taken over under the lock.
    """
    claims = _claims(home)
    runs = os.path.join(home, "runs")
    run_id = run_dir.run_id
    start = uid_search_start(run_id) - AGENT_UID_BASE
    for step in range(AGENT_UID_COUNT):
        uid = AGENT_UID_BASE + (start + step) % AGENT_UID_COUNT
        claim = os.path.join(claims, str(uid))
        try:
            os.symlink(run_id, claim)
        except FileExistsError:
            owner = _owner(claim)
            if owner != run_id and (_held(runs, owner) or not _take_over(home, runs, claim, run_id)):
                continue
        return uid
    raise SandboxRefused(f"all {AGENT_UID_COUNT} uids for Agents are taken by the Runs this Worker holds")


def uid_search_start(run_id: str) -> int:
    """The uid `allocate_uid` tries first for `run_id` (derived from it, spread over the range)."""
    return AGENT_UID_BASE + int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "big") % AGENT_UID_COUNT


def _owner(claim: str) -> str | None:
    try:
        return os.readlink(claim)
    except OSError:
        return None  # gone meanwhile, or not a link: not a held Run's


def _held(runs: str, owner: str | None) -> bool:
    return owner is not None and RUN_ID_RE.match(owner) is not None and os.path.isdir(os.path.join(runs, owner))


def _take_over(home: Path, runs: str, claim: str, run_id: str) -> bool:
    """Point `claim`, whose Run is no longer held, at `run_id`; False when another session took it first."""
    fd = os.open(home / UID_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _held(runs, _owner(claim)):
            return False
        fresh = f"{claim}.{run_id}"
        try:
            os.unlink(fresh)
        except FileNotFoundError:
            pass
        os.symlink(run_id, fresh)
        os.replace(fresh, claim)  # atomic: a claim is never missing
        return True
    finally:
        os.close(fd)  # and the lock with it


def _claims(home: Path) -> str:
    """The claims directory; made once, under the lock, from the uids held Runs of an older Worker recorded
    (`<run>/agent_uid`)."""
    claims = os.path.join(home, UID_CLAIMS)
    if os.path.isdir(claims):
        return claims
    fd = os.open(home / UID_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.isdir(claims):
            fresh = claims + ".new"
            shutil.rmtree(fresh, ignore_errors=True)
            os.mkdir(fresh, 0o700)
            runs = home / "runs"
            for path in runs.iterdir() if runs.is_dir() else ():
                uid = RunDir(path).agent_uid()
                if uid is not None:
                    try:
                        os.symlink(path.name, os.path.join(fresh, str(uid)))
                    except FileExistsError:
                        pass
            os.rename(fresh, claims)
    finally:
        os.close(fd)
    return claims
