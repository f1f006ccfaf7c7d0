"""`taskrun doctor`: what is wrong with this control plane's keys and pins, and what to do.

Checks, each a Finding (level "error" or "warning", what, and the fix):

- every private key under .git/taskrun/ (signing keys, the SSH key, the
  record key) and every Worker's `identity` file is mode 0600 (no access for
  group or others) and belongs to the user taskrun runs as, and so do
  .git/taskrun/ and its keys/ directory, which not every user may write in:
  whoever can write the record key (or read it) can seal records the daemon
  takes for its own, and whoever can write a signing key can replace it;
- no file tracked by git holds a private key (a `-----BEGIN ... PRIVATE KEY-----`
  block, as PEM and OpenSSH write them, an OpenPGP or PuTTY one: leaks.py);
- every ssh Worker has a pinned host key and a pinned result key;
- under `security.allowed_signers`, its file (and the revocation file) can
  be read and lies outside the work tree: otherwise every Task is refused;
- nothing under runs/ is a symbolic link or a special file, in the work tree
  or tracked by git (`record_findings`): the daemon never follows one (it
  replaces those in its own paths and ignores the others), but a link that
  is there was put there by someone, and other tools may follow it.
- no index.lock in the clone's git directory is INDEX_LOCK_STALE_SECONDS old
  or older (`index_lock_findings`, with the records): one a killed git or
  editor left behind keeps the daemon's records out of the index (`git status`
  shows them as staged deletions) and fails every git command that writes it.

- with `git.push: true`, the clone has the remote `git.remote` and HEAD is
  on a branch (`git_findings`);

- every local Worker can confine Agents (`sandbox_findings`: the same probe
  its `taskrun-worker serve` runs, as the same user with the same PATH), or
  the configuration accepts that it cannot (`sandbox: none`, a warning).

The daemon runs the key and sandbox checks at start and reports each finding as a notice.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from taskrunner import gitops
from taskrunner.config import Config
from taskrunner.defaults import CONFIG_FILE, RUNS_DIR
from taskrunner.gitflow import signers
from taskrunner.keys import KEYS_DIR, RECORD_KEY_FILE, SSH_KEY_FILE
from taskrunner.leaks import PRIVATE_KEY_PATTERN
from taskrunner.recorder import INDEX_LOCK_STALE_SECONDS, age_words, remove_lock_advice
from taskrunner.safefs import kind_of, refused


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    what: str
    fix: str


def key_findings(root: Path, config: Config | None) -> list[Finding]:
    found: list[Finding] = []
    state = gitops.state_dir(root)
    keys = sorted((state / KEYS_DIR).glob("*.pem")) + [state / SSH_KEY_FILE, state / RECORD_KEY_FILE]
    own = len(keys)  # the state dir's own, never followed; a Worker's identity may be a link of the user's
    names: dict[int, str] = {}  # index in `keys` -> the Worker whose identity it is
    if config is not None:
        for worker in config.workers.values():
            if worker.identity:
                names[len(keys)] = worker.name
                keys.append(Path(worker.identity).expanduser())
    me = os.geteuid()
    for directory in (state, state / KEYS_DIR):
        found.extend(_directory_findings(directory, me))
    for n, path in enumerate(keys):
        try:
            info = path.lstat() if n < own else path.stat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            found.append(Finding("error", f"private key {path} is not a regular file", f"remove {path} and "
                                 "restore the file from a backup"))
            continue
        if n in names:
            from taskrunner.errors import WorkerError
            from taskrunner.links.ssh import load_identity

            try:
                load_identity(names[n], config.workers[names[n]].identity or path)  # as written
            except WorkerError as exc:  # a public key, a passphrase: its modes are not the problem
                what, _, fix = str(exc).partition("; ")
                found.append(Finding("error", what, fix))
                continue
        found.extend(_key_findings(path, info, me, record=n < own and path.name == RECORD_KEY_FILE))
    found.extend(_tracked_keys(root))
    problem = None
    if config is not None and config.security.allowed_signers is not None:
        problem = signers.policy_problem(root, config.security, gitops.git_dirs(root))
    if problem:
        found.append(Finding("error", problem, "make security.allowed_signers (and security.revocation_file) "
                             "readable regular files outside the work tree"))
    return found


def _key_findings(path: Path, info: os.stat_result, me: int, record: bool) -> list[Finding]:
    """A key file that belongs to another user, or whose mode lets its group or every user at it."""
    found = []
    # Anyone holding the record key can seal records; anyone who can write a key can replace it.
    forge = "seal records that this daemon takes for its own" if record else "replace the key"
    quoted = shlex.quote(str(path))
    if info.st_uid != me:
        found.append(Finding("error", f"private key {path} belongs to {_user(info.st_uid)}, not to {_user(me)}, "
                             f"the user taskrun runs as: that user can {forge}",
                             f"check that nobody replaced it, then as root: chown {_owner(me)} {quoted} && "
                             f"chmod 600 {quoted}"))
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        access = _access(mode)
        writable = bool(mode & 0o022)
        why = (f": whoever can {'write' if writable else 'read'} it can {forge}" if record or writable else
               ": it is no longer private to the user taskrun runs as")
        found.append(Finding("error", f"private key {path} can be {access} (mode {mode:04o}){why}",
                             f"chmod 600 {quoted}"))
    return found


def _directory_findings(directory: Path, me: int) -> list[Finding]:
    """.git/taskrun/ or its keys/ when another user owns it or every user may write in it."""
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(info.st_mode):
        return []  # what loading the keys says about it is enough
    found = []
    quoted = shlex.quote(str(directory))
    if info.st_uid != me:
        found.append(Finding("error", f"{directory} belongs to {_user(info.st_uid)}, not to {_user(me)}, the user "
                             "taskrun runs as: that user can replace the keys in it",
                             f"check its keys, then as root: chown {_owner(me)} {quoted} && chmod 700 {quoted}"))
    mode = stat.S_IMODE(info.st_mode)
    # Group write alone is left alone: with umask 002 (a group of one's own) .git/taskrun/ is made so, like .git/.
    if mode & 0o002:
        found.append(Finding("error", f"{directory} can be {_access(mode & 0o022)} (mode {mode:04o}): whoever "
                             "can write in it can replace the keys it holds (the record key, the signing keys)",
                             f"chmod go-w {quoted}"))
    return found


def _access(mode: int) -> str:
    """Who may do what by a file's group and other permission bits: 'read and written by every user'."""
    verbs = {}
    for whom, read, write in (("its group", 0o040, 0o020), ("every user", 0o004, 0o002)):
        done = " and ".join(verb for verb, bit in (("read", read), ("written", write)) if mode & bit)
        if done:
            verbs[whom] = done
    if not verbs:
        return "executed by its group or every user"
    if len(verbs) == 2 and len(set(verbs.values())) == 1:
        return f"{verbs['its group']} by its group and every user"
    return " and ".join(f"{done} by {whom}" for whom, done in verbs.items())


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no name on this machine (a file from an archive, another machine's user)
        return f"uid {uid}"


def _owner(uid: int) -> str:
    """`uid` as chown takes it: the user's name, else the number."""
    name = _user(uid)
    return str(uid) if name.startswith("uid ") else name


def _tracked_keys(root: Path) -> list[Finding]:
    # `git grep` searches what is tracked (the index), fast and without reading ignored files.
    result = subprocess.run(gitops.command("grep", "-l", "-I", "--cached", "-E", "-e", PRIVATE_KEY_PATTERN),
                            cwd=root, capture_output=True, text=True)
    return [Finding("error", f"{path} is tracked by git and holds a private key",
                    f"git rm --cached {path}, commit, and replace the key: it is in the history")
            for path in result.stdout.splitlines() if path]


def pin_findings(config: Config) -> list[Finding]:
    found = []
    for worker in config.workers.values():
        if worker.transport != "ssh":
            continue
        if worker.worker_key is None:
            found.append(Finding("error", f"Worker '{worker.name}' has no pinned result key in {CONFIG_FILE}: "
                                 "its results cannot be verified, so it gets no Runs",
                                 f"taskrun worker add {worker.name} --host {worker.host}"))
    return found


def sandbox_findings(root: Path, config: Config) -> list[Finding]:
    """Local Workers that cannot confine Agents: an error, or a warning where `sandbox: none` accepts it."""
    # Imported here: the Worker's modules (and, through taskrunner.links, paramiko) are not for every `taskrun`.
    from taskrunner.links.local import default_home
    from taskrunner.worker.confine import Confinement
    from taskrunner.worker.sandbox import INSTALL_HINT

    found = []
    for worker in config.workers.values():
        if worker.transport != "local":
            continue
        home = Path(worker.home).expanduser() if worker.home else default_home(gitops.state_dir(root), worker.name)
        status = Confinement(home, protect=[root]).status()
        if status.kind is not None:
            continue
        if worker.sandbox == "none":
            found.append(Finding("warning", f"Worker '{worker.name}' runs Agents unconfined: {status.reason} "
                                 f"({CONFIG_FILE} accepts that: sandbox: none)",
                                 f"{INSTALL_HINT}; Agents then run confined whatever sandbox: says"))
        else:
            found.append(Finding("error", f"Worker '{worker.name}' cannot confine Agents, so it gets no Runs: "
                                 f"{status.reason}",
                                 f"{INSTALL_HINT}, or accept unconfined Agents on it with "
                                 f"`workers.{worker.name}.sandbox: none` in {CONFIG_FILE}"))
    return found


def git_findings(root: Path, config: Config) -> list[Finding]:
    """`git.push: true` without a usable remote, or on a detached HEAD: the daemon could push nothing."""
    if not config.git.push:
        return []
    found: list[Finding] = []
    remote = config.git.remote
    url = subprocess.run(gitops.command("config", "--get", f"remote.{remote}.url"), cwd=root, capture_output=True,
                         text=True)
    if url.returncode != 0 or not url.stdout.strip():
        found.append(Finding("error", f"git.push is true but this clone has no remote '{remote}' (git.remote): "
                             "records and result branches stay local",
                             f"git remote add {remote} URL, or set git.remote in {CONFIG_FILE}"))
    head = subprocess.run(gitops.command("symbolic-ref", "--quiet", "HEAD"), cwd=root, capture_output=True)
    if head.returncode != 0:
        found.append(Finding("warning", "git.push is true but HEAD is detached: there is no branch to push",
                             "git switch BRANCH"))
    return found


def record_findings(root: Path) -> list[Finding]:
    """Links, hard links and special files under runs/: in the work tree (walked without following) and in
    git's index. A hard link is a file that is somewhere else too (`ln .git/taskrun/record.key runs/x/…`):
    a person's `git add -A` would commit that file. Then a stale index.lock (`index_lock_findings`), which
    keeps the newest records out of that index."""
    found: list[Finding] = []
    runs = root / RUNS_DIR
    seen: set[str] = set()

    def report(rel: str, what: str) -> None:
        if rel in seen:
            return
        seen.add(rel)
        found.append(Finding("error", f"{rel} is {what}; records are regular files and directories, and taskrun "
                             "never follows a link there",
                             f"git rm --cached -q --ignore-unmatch -- {shlex.quote(rel)}; "
                             f"rm -f -- {shlex.quote(rel)}; then commit"))

    try:
        top = os.lstat(runs)
    except FileNotFoundError:
        top = None
    if top is not None and not stat.S_ISDIR(top.st_mode):
        report(RUNS_DIR, kind_of(top.st_mode))
    elif top is not None:
        for dirpath, dirnames, filenames in os.walk(runs):  # never descends through a link
            for name in sorted([*dirnames, *filenames]):
                path = os.path.join(dirpath, name)
                entry = os.lstat(path)
                problem = None if stat.S_ISDIR(entry.st_mode) else refused(entry)
                if problem is not None:  # a hard link too: the file is elsewhere as well (a key, say)
                    report(Path(path).relative_to(root).as_posix(), problem[0])
    # Tracked as a link (mode 120000) or a submodule (160000), whatever the work tree holds now.
    result = subprocess.run(gitops.command("ls-files", "-s", "-z", "--", RUNS_DIR), cwd=root, capture_output=True)
    for entry in result.stdout.decode(errors="replace").split("\0"):
        meta, _, rel = entry.partition("\t")
        mode = meta.split(" ", 1)[0]
        if mode in ("120000", "160000"):
            report(rel, "a symbolic link in git's index" if mode == "120000" else "a submodule in git's index")
    found.extend(index_lock_findings(root))
    return found


def index_lock_findings(root: Path) -> list[Finding]:
    """The index.lock of the clone's git directory (wherever that is: a worktree, `--separate-git-dir`) when it
    is INDEX_LOCK_STALE_SECONDS old or older; a younger one is most likely a git command at work."""
    dirs = gitops.git_dirs(root)
    if not dirs:
        return []
    lock = dirs[0] / "index.lock"
    try:
        info = os.lstat(lock)  # the lock itself: a link there is never followed
    except OSError:
        return []
    age = time.time() - info.st_mtime
    if 0 <= age < INDEX_LOCK_STALE_SECONDS:
        return []
    return [Finding("warning", f"{lock} has been there for {age_words(age)}: git's index is locked, so every git "
                    "command that writes it fails, and the records the daemon commits stay out of it (`git status` "
                    "shows them as staged deletions)", remove_lock_advice(lock, info))]
