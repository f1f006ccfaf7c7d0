"""The bubblewrap sandbox an Agent runs in (DESIGN.md §5.10), and the probe that says whether it works here.

What an Agent sees inside, all at the same paths as outside:

    /usr /bin /sbin /lib /lib32 /lib64 /libx32 /etc /opt
                        read-only, those that exist (SYSTEM_DIRS); /bin -> usr/bin stays a symlink
    Python, PATH        read-only: sys.prefix, sys.base_prefix (and their exec_ twins), every
                        directory on the Worker's PATH, the file /etc/resolv.conf points to
    /dev /proc /tmp     fresh: bwrap's minimal /dev (null, zero, random, urandom, tty, a new pts),
                        the /proc of the Run's own PID namespace, an empty tmpfs (mode 1777)
    <run>/workspace     read-write: the extracted bundle and the Agent's working directory
    <run>/home          read-write: its HOME, private to this Run
    <run>/script.sh, <run>/prompt.md
                        read-only: what `agents.prepare` wrote for it (INPUT_FILES)

Nothing else exists in there: not the Worker home (keys/worker.pem, trust.json,
ledger.jsonl, secrets.env, the other Runs, this Run's own output.log,
exit_status and secrets.json), not /home, /root, /srv, /var, /run or /sys.

**The protected-path rule.** A read-only candidate (a system directory, a
Python prefix, a PATH directory) that *is*, *contains* or *lies inside* a
protected path is left out, whole: the Worker home always, and whatever
`taskrun-worker serve --protect DIR` names (the local Worker protects the
daemon's repository, whose .git/taskrun/ holds the control plane's keys).
Paths are compared after resolving symlinks. So a Worker home (or the
daemon's repository) inside /opt costs the Agents /opt, and one inside an
ESSENTIAL_DIRS directory (/usr, /etc, ...) leaves no sandbox to make: the probe
says so. Keep them out of system directories.

**Namespaces.** Mount, PID, IPC and UTS are new; the network is kept (Agents
call model APIs). No `--die-with-parent`: Agents outlive the serve session.
No `--new-session` either: the Worker starts each Run in a session of its own
(setsid), so nothing in it has a controlling terminal to push input into
(TIOCSTI, CVE-2017-5226; /dev/tty answers ENXIO), and the Agent stays in the
Run's process group, where a cancel's SIGTERM reaches it.

**Every process ends with the Run.** bwrap's pid 1 in the new PID namespace
stays in the Run's process group whatever the Agent does (setsid, nohup,
double forks): the Worker's SIGKILL to the group ends pid 1, and the kernel
ends every process of the namespace with it. The outer bwrap writes the exit
status (`--json-status-fd`) outside the sandbox, where the Agent cannot reach
it, and exits when the Agent's first process does; the Worker then kills the
group, stragglers and all.

**Root.** bwrap run by root leaves uid 0 (with every capability) inside:
root-owned files in the read-only system directories (/etc/shadow, sshd's host
keys) stay readable. `--unshare-user --uid 65534` does not help: the inner
uid maps back to 0 outside, so the on-disk identity is still root. So a
Worker running as root drops the Agent to a uid of its own (`RunSandbox.uid`,
gid the same, no supplementary groups) with coreutils' `chroot --userspec=U:U
--groups= --skip-chdir /` inside the sandbox, after bwrap has made its mounts
(changing uid clears every capability; bwrap has already set no_new_privs, so
no exec can give any back). With `/` as the new root and --skip-chdir, chroot
is only the uid switch: it changes no root and no directory. It replaced
`setpriv --reuid --regid --clear-groups --inh-caps=-all --no-new-privs`,
which leaves the same credentials but costs 1-2 ms more per Run (libcap-ng,
locale and NSS lookups). The Run's workspace, HOME and input files are handed
to that uid.

Why a separate exec at all: the mounts need root's own access (the Worker
home and /root are 0700 root), and bwrap only drops to another uid through
a user namespace, whose `--uid` maps back to 0 outside. Running bwrap itself
as the Agent's uid (Popen's user=) gives a user namespace of the right
identity but then bwrap cannot reach the Run's workspace or the PATH
directories under /root to bind them; `--bind-fd` does not help, bwrap
resolves the fd's path again (bwrap 0.8).
Not `nobody`: every process of the host running as nobody could then read an
Agent's /proc/<pid>/environ (its secrets) or ptrace it. The uid is
AGENT_UID_BASE + n, n < AGENT_UID_COUNT (0x7E000000 to 0x7E00FFFF), one per
Run and unique among the Runs a Worker holds (confine.allocate_uid); the
range lies above systemd's container ranges and below its foreign-UID range,
and the probe refuses to confine when an account, a group or a subordinate
id range (/etc/subuid, /etc/subgid) of this host uses any of it
(`agent_range_problem`). Such a uid has no name: tools that look their user
up (ssh, `id -un`) say so.
Running the Worker as an unprivileged user is still better: bwrap then needs
no privilege at all (a user namespace) and there is one process less per Run.

`bwrap_argv` is a pure function of a HostView (what this machine has, found
once per Worker process by `host_view`) and a RunSandbox (one Run's paths).
`probe` runs the same argv once over a throwaway directory and says whether a
sandbox can be made here; its answer is cached per Worker process.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

#: Read-only system directories, those that exist.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
#: Those no Agent can do without: a Worker whose protected paths take one away makes no sandbox.
ESSENTIAL_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: Single files the Agent needs that may live outside those directories (systemd-resolved's stub file).
SYSTEM_FILES = ("/etc/resolv.conf",)
#: A root Worker runs each Agent as uid (and gid) AGENT_UID_BASE + n, n < AGENT_UID_COUNT, one of its own:
#: a range no account of the host may use (checked by the probe), between systemd's container ranges
#: (up to 0x6FFFFFFF) and its foreign-UID range (0x7FFE0000).
AGENT_UID_BASE = 0x7E000000
AGENT_UID_COUNT = 0x10000
#: Where the subordinate id ranges (rootless containers) are delegated.
SUBORDINATE_FILES = ("/etc/subuid", "/etc/subgid")
#: How long the probe's bwrap may take (it takes milliseconds; the hello waits for it).
PROBE_TIMEOUT_SECONDS = 5.0
#: What to tell an admin whose Worker cannot make a sandbox.
INSTALL_HINT = "install bubblewrap on the Worker (Debian/Ubuntu: apt-get install bubblewrap)"
#: Modes of the directories bwrap creates on the way to a mount: traversable by the Agent's uid.
_DIR_PERMS = "0755"
_TMP_PERMS = "01777"
#: Where chroot lives when the Worker's PATH lacks the sbin directories.
_SBIN = "/usr/sbin:/sbin"


@dataclass(frozen=True)
class Mount:
    """One read-only entry of the host's view: a bind of `source` at `dest`, or `dest` as a symlink to `link`.

    `real` is the host path whose contents it shows (symlinks resolved): what
    the protected-path rule compares.
    """

    dest: str
    real: str
    source: str | None = None
    link: str | None = None
    essential: bool = False  # one of ESSENTIAL_DIRS


@dataclass(frozen=True)
class HostView:
    """What this machine offers a sandbox: bwrap, chroot (the uid switch of a root Worker) and the read-only mounts."""

    bwrap: str | None
    chroot: str | None
    mounts: tuple[Mount, ...]
    root: bool  # the Worker runs as root: Agents are switched to a uid of their own


@dataclass(frozen=True)
class RunSandbox:
    """One Run's paths, bound at the same absolute paths inside; the protected paths (symlinks
    resolved); the file descriptor bwrap writes its status to; and, for a root Worker, the uid
    (and gid) its Agent runs as."""

    workspace: str
    home: str
    inputs: tuple[str, ...] = ()
    protected: tuple[str, ...] = ()
    status_fd: int | None = None
    uid: int | None = None
    shared: tuple[str, ...] = ()  # read-only, not the Agent's: the Worker's repository objects (gitflow/cache.py)


@dataclass(frozen=True)
class SandboxStatus:
    """The probe's answer: `kind` "bwrap" with its version, or None with the reason."""

    kind: str | None
    version: str | None = None
    reason: str | None = None
    uids: tuple[int, int] | None = None  # first and last uid Agents run as, when the Worker switches them (root)

    def hello(self) -> dict[str, Any]:
        """The `sandbox` field of the Worker's hello."""
        if self.kind is None:
            return {"kind": None, "reason": self.reason}
        found: dict[str, Any] = {"kind": self.kind, "version": self.version}
        if self.uids is not None:
            found["uids"] = list(self.uids)
        return found


def bwrap_argv(host: HostView, run: RunSandbox, argv: Sequence[str]) -> list[str]:
    """The command that runs `argv` confined; pure: no file is looked at.

    The part that is the same for every Run of a Worker (namespaces, /dev,
    /proc, /tmp, the host's read-only mounts and, for a root Worker, the
    directories leading to them) is worked out once per HostView and protected
    paths (`_prefix`, cached); per Run come only the Run's own directories and
    binds. Raises ValueError when the host has no bwrap (or, for a root Worker,
    no chroot, or no uid for the Agent).
    """
    if host.bwrap is None:
        raise ValueError("bwrap is not installed")
    if host.root:
        if host.chroot is None:
            raise ValueError("chroot is not installed")
        if run.uid is None:
            raise ValueError("a root Worker's Agent needs a uid of its own")
    prefix = _prefix(host, tuple(run.protected))
    out = list(prefix.argv)
    if host.root:
        # bwrap makes the directories on the way to a mount 0700, owned by root (the Worker's
        # umask): the Agent's uid could not pass them. An unprivileged Worker's Agent owns them.
        made: set[str] = set()
        for path in (run.workspace, run.home, *run.inputs, *run.shared):
            for directory in _to_make(prefix, os.path.dirname(path.rstrip("/"))):
                if directory not in made:
                    made.add(directory)
                    out += ["--perms", _DIR_PERMS, "--dir", directory]
    out += ["--bind", run.workspace, run.workspace, "--bind", run.home, run.home]
    for path in (*run.inputs, *run.shared):
        out += ["--ro-bind", path, path]
    out += ["--chdir", run.workspace]
    if run.status_fd is not None:
        out += ["--json-status-fd", str(run.status_fd)]
    if host.root:
        # chroot starts with root's capabilities (bwrap needs them to enter the Agent's workspace,
        # which the Agent's uid owns) and loses every one when it switches uid; new root "/" with
        # --skip-chdir: it changes nothing else.
        out += ["--", host.chroot, f"--userspec={run.uid}:{run.uid}", "--groups=", "--skip-chdir", "/"]
    else:
        out.append("--")
    return out + list(argv)


@dataclass(frozen=True, eq=False)
class _Prefix:
    """The Run-independent start of a Worker's bwrap argv, and what it leaves existing inside."""

    argv: tuple[str, ...]
    made: frozenset[str]  # directories the argv makes (root Worker)
    mounted: tuple[str, ...]  # destinations of its binds: what lies inside them exists


@functools.lru_cache(maxsize=16)
def _prefix(host: HostView, protected: tuple[str, ...]) -> _Prefix:
    mounts = _visible(host, protected)
    out = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--dev", "/dev", "--proc", "/proc"]
    binds = [m.dest for m in mounts if m.link is None]
    made: list[str] = []
    if host.root:
        # bwrap makes /tmp 0755: the Agent's uid could not write it. (Older bwraps lack --perms,
        # and an unprivileged Worker's Agent owns its /tmp.)
        out += ["--perms", _TMP_PERMS, "--tmpfs", "/tmp"]
        made = _parents_to_make(binds, [m.dest for m in mounts])
        for directory in made:
            out += ["--perms", _DIR_PERMS, "--dir", directory]
    else:
        out += ["--tmpfs", "/tmp"]
    for mount in mounts:
        if mount.link is not None:
            out += ["--symlink", mount.link, mount.dest]
        else:
            out += ["--ro-bind", mount.source or mount.real, mount.dest]
    return _Prefix((host.bwrap or "bwrap", *out), frozenset(made), tuple(binds))


@functools.lru_cache(maxsize=1024)
def _to_make(prefix: _Prefix, directory: str) -> tuple[str, ...]:
    """`directory` and its parents that the prefix leaves missing, outermost first (a Run's
    directory is new each time; its parents are the same for every Run, and cached)."""
    if directory in ("/", "", "/tmp") or directory in prefix.made or any(_within(directory, m)
                                                                          for m in prefix.mounted):
        return ()
    return _to_make(prefix, os.path.dirname(directory)) + (directory,)


def visible_mounts(host: HostView, protected: Sequence[str]) -> list[Mount]:
    """The host's mounts that the protected-path rule keeps (see the module docstring)."""
    return list(_visible(host, tuple(protected)))


@functools.lru_cache(maxsize=16)
def _visible(host: HostView, protected: tuple[str, ...]) -> tuple[Mount, ...]:
    # The same for every Run of a Worker: worked out once, not once per Run.
    return tuple(m for m in host.mounts if not any(_overlaps(m.real, p) for p in protected))


def hidden_essential_dirs(host: HostView, protected: Sequence[str]) -> list[str]:
    """Essential directories the protected-path rule takes away (a Worker home inside /usr, say)."""
    return [m.dest for m in host.mounts if m.essential and any(_overlaps(m.real, p) for p in protected)]


def _overlaps(a: str, b: str) -> bool:
    return _within(a, b) or _within(b, a)


def _within(path: str, top: str) -> bool:
    """`path` is `top` or below it; both absolute and normalised (string work: this runs per Run)."""
    return path == top or path.startswith(top if top.endswith("/") else top + "/")


def _parents_to_make(paths: Sequence[str], mounted: Sequence[str]) -> list[str]:
    """The directories on the way to `paths` that bwrap creates: not /, /tmp, a mount or inside one."""
    made: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path.rstrip("/"))
        while parent not in ("/", "") and parent not in made:
            if parent != "/tmp" and not any(_within(parent, m) for m in mounted):
                made.add(parent)
            parent = os.path.dirname(parent)
    return sorted(made, key=lambda p: (p.count("/"), p))


# -- what this machine has (I/O) ---------------------------------------------------------------


def host_view(path: str | None = None, prefixes: Sequence[str] | None = None) -> HostView:
    """The read-only mounts this machine offers an Agent, found from the filesystem.

    `path` is the Worker's PATH (default: its environment's), `prefixes` the
    Python installations to show (default: this interpreter's).
    """
    path = os.environ.get("PATH", os.defpath) if path is None else path
    if prefixes is None:
        prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    mounts: list[Mount] = []
    real_dirs = {os.path.realpath(d) for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)}
    for directory in SYSTEM_DIRS:
        if not os.path.isdir(directory):
            continue
        real = os.path.realpath(directory)
        essential = directory in ESSENTIAL_DIRS
        if os.path.islink(directory) and any(_within(real, d) for d in real_dirs):
            mounts.append(Mount(directory, real, link=os.readlink(directory), essential=essential))
        else:
            mounts.append(Mount(directory, real, source=real, essential=essential))
    extra = [*prefixes, *(p for p in path.split(os.pathsep) if os.path.isabs(p))]
    for candidate in extra:
        if not os.path.isdir(candidate):
            continue
        real = os.path.realpath(candidate)
        if any(_within(real, m.real) for m in mounts):
            continue
        mounts = [m for m in mounts if m.dest in SYSTEM_DIRS or not _within(m.real, real)]
        mounts.append(Mount(real, real, source=real))
    for name in SYSTEM_FILES:
        real = os.path.realpath(name)
        if os.path.isfile(real) and not any(_within(real, m.real) for m in mounts):
            mounts.append(Mount(real, real, source=real))
    chroot = _which("chroot", path) or _which("chroot", _SBIN)
    return HostView(bwrap=_which("bwrap", path), chroot=chroot, mounts=tuple(mounts),
                    root=os.geteuid() == 0)




def _which(program: str, path: str) -> str | None:
    found = shutil.which(program, path=path)
    return os.path.abspath(found) if found else None


def agent_range_clashes(ids: Iterable[tuple[str, int]], ranges: Iterable[tuple[str, int, int]]) -> list[str]:
    """What of this host uses Agents' uid range: `ids` are (what, id) of accounts and groups, `ranges`
    (what, first, count) of subordinate id ranges. Pure."""
    low, high = AGENT_UID_BASE, AGENT_UID_BASE + AGENT_UID_COUNT
    clashes = [f"{what} ({number})" for what, number in ids if low <= number < high]
    clashes += [f"{what} ({first}-{first + count - 1})" for what, first, count in ranges
                if first < high and first + count > low]
    return clashes


def agent_range_problem() -> str | None:
    """Why a root Worker cannot run Agents as uids of their own here, or None: an account, group or
    subordinate id range of this host (its passwd and group databases, /etc/subuid, /etc/subgid) uses
    the range."""
    ids = [(f"user {p.pw_name}", p.pw_uid) for p in pwd.getpwall()]
    ids += [(f"group {g.gr_name}", g.gr_gid) for g in grp.getgrall()]
    ranges = []
    for path in SUBORDINATE_FILES:
        try:
            with open(path) as handle:
                lines = handle.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                ranges.append((f"{path} entry of {fields[0]}", int(fields[1]), int(fields[2])))
    clashes = agent_range_clashes(ids, ranges)
    if not clashes:
        return None
    return (f"the Worker runs as root, and this host uses the uids its Agents run as "
            f"({AGENT_UID_BASE}-{AGENT_UID_BASE + AGENT_UID_COUNT - 1}): {', '.join(clashes[:3])}; move those, "
            "or run the Worker as an unprivileged user")


def hand_over(paths: Sequence[str], uid: int, gid: int) -> None:
    """Give a root Worker's Agent its files: each path, and everything under the directories among them."""
    for path in paths:
        os.lchown(path, uid, gid)
        if os.path.isdir(path) and not os.path.islink(path):
            for top, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.lchown(os.path.join(top, name), uid, gid)


# -- the probe ---------------------------------------------------------------------------------


def probe(host: HostView, protected: Sequence[str] = ()) -> SandboxStatus:
    """Whether a sandbox can be made here for a Worker protecting `protected`; cached per process."""
    return _probe(host, tuple(protected))


@functools.lru_cache(maxsize=16)
def _probe(host: HostView, protected: tuple[str, ...]) -> SandboxStatus:
    if host.bwrap is None:
        return SandboxStatus(None, reason=f"bwrap is not on the Worker's PATH: {INSTALL_HINT}")
    if host.root and host.chroot is None:
        return SandboxStatus(None, reason="the Worker runs as root and chroot (coreutils) is not on its PATH or in "
                                          "/usr/sbin, so Agents cannot be run as an unprivileged user: install "
                                          "coreutils, or run the Worker as an unprivileged user")
    if host.root:
        clash = agent_range_problem()
        if clash is not None:
            return SandboxStatus(None, reason=clash)
    hidden = hidden_essential_dirs(host, protected)
    if hidden:
        return SandboxStatus(None, reason=f"the Worker home (or a protected path: {', '.join(protected)}) lies "
                                          f"inside {', '.join(hidden)}, which Agents need read-only: move it")
    version = _version(host.bwrap)
    cat = shutil.which("cat") or "/bin/cat"
    with tempfile.TemporaryDirectory(prefix="taskrun-probe-") as scratch:
        workspace, home = os.path.join(scratch, "workspace"), os.path.join(scratch, "home")
        os.mkdir(workspace, 0o700)
        os.mkdir(home, 0o700)
        try:
            if host.root:
                hand_over([workspace, home], AGENT_UID_BASE, AGENT_UID_BASE)
            argv = bwrap_argv(host, RunSandbox(os.path.realpath(workspace), os.path.realpath(home),
                                               protected=protected, uid=AGENT_UID_BASE), [cat, "/proc/self/status"])
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=PROBE_TIMEOUT_SECONDS, start_new_session=True,
                                  env={"PATH": os.environ.get("PATH", os.defpath)})
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            return SandboxStatus(None, reason=f"bwrap cannot be run here ({exc}): {INSTALL_HINT}")
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        detail = said[-1] if said else f"exit code {done.returncode}"
        return SandboxStatus(None, reason=f"bwrap cannot make a sandbox here ({detail}); it needs user "
                                          "namespaces (or root): see docs/agents.md, 'Agents run confined'")
    wrong = credentials_problem(done.stdout.decode(errors="replace"), AGENT_UID_BASE if host.root else None)
    if wrong is not None:
        return SandboxStatus(None, reason=f"an Agent in the sandbox would keep privileges ({wrong}): run the Worker "
                                          "as an unprivileged user, or report this with the bwrap and coreutils "
                                          "versions")
    last = AGENT_UID_BASE + AGENT_UID_COUNT - 1
    return SandboxStatus("bwrap", version=version, uids=(AGENT_UID_BASE, last) if host.root else None)


def credentials_problem(status: str, uid: int | None) -> str | None:
    """What is wrong with an Agent's credentials, from its /proc/self/status text, or None. Pure.

    Always: no capability (effective, permitted, ambient) and no_new_privs set.
    For a root Worker (`uid` given): real, effective, saved and filesystem uid
    and gid are `uid`, and no supplementary group.
    """
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    words = {key: value.split() for key, value in fields.items()}
    wrong = [f"{key} {' '.join(words.get(key, ['missing']))}" for key in ("CapEff", "CapPrm", "CapAmb")
             if words.get(key) != ["0000000000000000"]]
    if words.get("NoNewPrivs") != ["1"]:
        wrong.append(f"NoNewPrivs {' '.join(words.get('NoNewPrivs', ['missing']))}")
    if uid is not None:
        wrong += [f"{key} {' '.join(words.get(key, ['missing']))}" for key in ("Uid", "Gid")
                  if words.get(key) != [str(uid)] * 4]
        if words.get("Groups", []) != []:
            wrong.append(f"Groups {' '.join(words['Groups'])}")
    return ", ".join(wrong) or None


def _version(bwrap: str) -> str | None:
    try:
        done = subprocess.run([bwrap, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=PROBE_TIMEOUT_SECONDS)
    except (OSError, subprocess.SubprocessError):
        return None
    words = done.stdout.decode(errors="replace").split()
    return words[-1] if words else None
