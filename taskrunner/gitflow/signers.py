"""Who may start work: `security.allowed_signers` (DESIGN.md §5.7).

With the policy on, a Task runs only if the commit that introduced the
revision of its file that is in the work tree carries a good SSH signature
by a principal of git's allowed_signers file. Everything is asked of git
itself, so the rules are git's (`git help config`, gpg.ssh.*; the file format
is ssh-keygen(1) "ALLOWED SIGNERS"):

1. The commit: `git log -1 -- <path>` on HEAD (git's history simplification,
   so a merge that takes the file unchanged from one side names the commit
   on that side that changed it), and the blob that commit holds at the
   path must be the file's bytes as read (no filters). A file in no commit
   (untracked, or HEAD unborn) or that differs from its last commit
   (modified, not committed) is refused: there is nothing signed to check.
2. The signature: `git log -1 --format=%G?%x00%GS%x00%GK` with
   gpg.ssh.allowedSignersFile (and gpg.ssh.revocationFile) set on the
   command line, through gitops.command, in a clean environment (no GIT_*
   variable of the caller; replace refs off). Only `G` with an SSH key
   (a `SHA256:` fingerprint) counts; the OpenPGP and X.509 programs are
   pointed at a path that does not exist, so a signature by some key in the
   daemon user's GnuPG keyring is never taken for an allowed signer.
   git reports a revoked SSH key as `B` (bad); when `B` comes with a
   revocation file, the check is asked again without it, to say "revoked"
   instead of "bad signature".

The same rule guards the configuration (`config_refusal`): while the policy
is in force, a changed .taskrun.yaml is reloaded only if an allowed signer
signed the commit that made it so; it names the commands Agents run and
the policy itself.

The policy fails closed: an allowed_signers or revocation file that is
missing, unreadable or not a regular file refuses every Task with that
reason (git itself would only warn about a missing revocation file and
accept every key). So does an allowed_signers file inside the work tree:
anyone who can push could add their own key to it.

Nothing here is cached: an edit of either file counts for the next Task read.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from taskrunner.config import SecurityConfig, read_config_file
from taskrunner.defaults import CONFIG_FILE
from taskrunner.errors import ConfigError, GitError
from taskrunner.gitops import command

#: Longest a git call of the check may take (it runs ssh-keygen once per signature), in seconds.
GIT_TIMEOUT_SECONDS = 30.0
#: Where the OpenPGP and X.509 signature programs are pointed: nowhere, so only SSH signatures verify.
NO_PROGRAM = "/nonexistent/taskrun-verifies-ssh-signatures-only"
#: git's %G? letters (git-log(1), PRETTY FORMATS) in words, for the reason a Task is refused.
LETTERS = {
    "N": "is not signed",
    "B": "has a bad signature (the commit was changed after it was signed)",
    "U": "is signed by a key that is not in the allowed signers file",
    "E": "has a signature that cannot be checked (an unknown kind of signature, or ssh-keygen failed)",
    "X": "has a signature that has expired",
    "Y": "is signed by a key that has expired",
    "R": "is signed by a revoked key",
}
#: How to fix a refusal, ending every reason; `then` is what makes the daemon look again.
FIX = ("commit it with a signature by an allowed signer (`git commit -S` with gpg.format=ssh and a key listed in "
       "{allowed}), then {then}")
#: What makes the daemon read a Task file again.
TASK_AGAIN = "`taskrun trigger`"
#: What makes the daemon read .taskrun.yaml again, once it was refused.
CONFIG_AGAIN = "restart the daemon (a reload takes a configuration that arrives signed)"


@dataclass(frozen=True)
class Verdict:
    """The answer for one Task file: `principal` when it may run, else `reason` (a sentence with the fix)."""

    principal: str | None = None
    reason: str | None = None
    commit: str | None = None  # the commit that introduced the file's bytes, when one was found


def policy_problem(root: Path, security: SecurityConfig, git_dirs: Sequence[Path] = ()) -> str | None:
    """Why the policy cannot be checked at all (every Task is refused), or None.

    `git_dirs`: the repository's git directories, where an allowed_signers
    file may live although they are inside the work tree (not pushable).
    """
    allowed = resolve(root, security.allowed_signers)
    if allowed is None:
        return None
    for key, path in (("allowed_signers", allowed), ("revocation_file", resolve(root, security.revocation_file))):
        if path is None:
            continue
        problem = _unreadable(path)
        if problem:
            return f"security.{key} {path} {problem}; every Task is refused until it can be read"
    real = os.path.realpath(allowed)
    tree = os.path.realpath(root)
    inside_git = any(real.startswith(os.path.realpath(d) + "/") for d in git_dirs)
    if real.startswith(tree + "/") and not inside_git:
        return (f"security.allowed_signers {allowed} is inside the work tree, where anyone who can push can add "
                "their own key to it; move it outside (for example ~/.config/taskrun/allowed_signers); every "
                "Task is refused until then")
    return None


def authorize(root: Path, path: str, data: bytes | None, security: SecurityConfig,
              git_dirs: Sequence[Path] = (), then: str = TASK_AGAIN) -> Verdict:
    """May the file `path` (relative to the work tree `root`), whose bytes are `data`, be taken?

    `data` None: the file is absent, and the commit that deleted it is the
    one checked. `then` ends the fix in a refusal's reason. Call only with
    `security.allowed_signers` set. Never raises for a git failure: that
    refuses the file, naming it (fail closed).
    """
    allowed = resolve(root, security.allowed_signers)
    assert allowed is not None, "authorize() is for a configured allowed_signers policy"
    fix = FIX.format(allowed=allowed, then=then)
    problem = policy_problem(root, security, git_dirs)
    if problem:
        return Verdict(reason=problem)
    revocation = resolve(root, security.revocation_file)
    try:
        found = _last_commit(root, path, allowed, revocation)
        if found is None:
            return Verdict(reason=f"{path} is in no commit (an untracked file, or nothing is committed yet); "
                                  f"under security.allowed_signers only signed changes count: {fix}")
        commit, letter, principal, key = found
        short = commit[:12]
        if _in_shallow_boundary(commit, git_dirs):
            return Verdict(commit=commit, reason=f"{path} was last changed in {short}, at the edge of this shallow "
                                                 "clone's history, so who introduced it cannot be told; "
                                                 f"`git fetch --unshallow`, then {then}")
        blob = _blob(root, commit, path)
        same = blob is None if data is None else blob is not None and blob == _blob_id(data, len(blob))
        if not same:
            state = "is deleted but" if data is None else "differs from"
            return Verdict(commit=commit, reason=f"{path} {state} its last commit {short} (a change not committed); "
                                                 f"under security.allowed_signers only signed changes count: {fix}")
        if letter == "G" and principal and key.startswith("SHA256:"):
            return Verdict(principal=principal, commit=commit)
        if letter == "G" or (letter in ("N", "E") and _signed_otherwise(root, commit)):
            words = "is signed with an OpenPGP or X.509 key; only SSH signatures are checked against allowed_signers"
        elif letter == "B" and revocation is not None and (revoked := _revoked(root, commit, allowed)):
            words = f"is signed by a revoked key {revoked} (listed in security.revocation_file {revocation})"
        else:
            words = LETTERS.get(letter, f"has a signature git reports as {letter!r}")
            if letter == "U" and key:
                words += f" ({key})"
    except GitError as exc:
        return Verdict(reason=f"{path}: its signature could not be checked: {exc}")
    return Verdict(commit=commit, reason=f"the commit that introduced {path}, {short}, {words}: {fix}")


def config_refusal(root: Path, security: SecurityConfig, git_dirs: Sequence[Path] = ()) -> str | None:
    """Why a changed .taskrun.yaml is not taken under the policy in force (`security`), or None.

    None without a policy, and for a file that cannot be read or is over
    MAX_CONFIG_FILE_BYTES (loading it says why; nothing past the limit is
    read). With one, the file as it is now (or its deletion) must come
    from a commit an allowed signer signed: the configuration names the
    commands Agents run and the policy itself, so an unsigned push must not
    change either.
    """
    if security.allowed_signers is None:
        return None
    try:
        data = read_config_file(root)
    except ConfigError:
        return None
    verdict = authorize(root, CONFIG_FILE, data, security, git_dirs, then=CONFIG_AGAIN)
    return None if verdict.principal else f"refused: {verdict.reason}"


def resolve(root: Path, path: Path | None) -> Path | None:
    """A policy file's path: `~` expanded by the configuration, a relative one taken from the repository root."""
    if path is None:
        return None
    return path if path.is_absolute() else root / path


def _unreadable(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "is not a regular file"
        os.read(fd, 1)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


def _env() -> dict[str, str]:
    """The environment of the check's git: none of the caller's GIT_* (a hook's GIT_DIR, GIT_CONFIG_*)."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.environ.get("HOME", "/"), "LC_ALL": "C",
            "GIT_NO_REPLACE_OBJECTS": "1"}


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command(*args), cwd=root, env=_env(), capture_output=True, text=True,
                              errors="replace", timeout=GIT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {args[-1] if args else ''} took longer than {GIT_TIMEOUT_SECONDS:.0f}s") from exc
    except OSError as exc:
        raise GitError(f"git failed to start: {exc}") from exc


def _verify_args(allowed: Path, revocation: Path | None) -> list[str]:
    args = ["-c", "gpg.format=ssh", "-c", "gpg.ssh.program=ssh-keygen", "-c", f"gpg.ssh.allowedSignersFile={allowed}",
            "-c", f"gpg.program={NO_PROGRAM}", "-c", f"gpg.openpgp.program={NO_PROGRAM}",
            "-c", f"gpg.x509.program={NO_PROGRAM}", "-c", "log.showSignature=false", "-c", "log.follow=false"]
    if revocation is not None:
        args += ["-c", f"gpg.ssh.revocationFile={revocation}"]
    return args


_FORMAT = "--format=%H%x00%G?%x00%GS%x00%GK"


def _last_commit(root: Path, path: str, allowed: Path,
                 revocation: Path | None) -> tuple[str, str, str, str] | None:
    """(commit, %G? letter, principal, key fingerprint) of the last commit on HEAD changing `path`; None: none."""
    done = _git(root, *_verify_args(allowed, revocation), "--literal-pathspecs", "log", "-1", _FORMAT,
                "HEAD", "--", path)
    if done.returncode != 0:
        if any(words in done.stderr for words in ("does not have any commits", "unknown revision", "bad revision")):
            return None
        raise GitError(f"git log failed: {done.stderr.strip() or done.returncode}")
    line = done.stdout.strip("\n")
    if not line:
        return None
    fields = line.split("\0")
    if len(fields) != 4:
        raise GitError(f"git log answered {line!r}, not the four fields asked for")
    commit, letter, principal, key = fields
    return commit, letter, principal, key


def _revoked(root: Path, commit: str, allowed: Path) -> str | None:
    """The key's fingerprint when `commit`'s signature is good without the revocation file, else None.

    Good without it means the key is revoked and the bytes are fine.
    """
    done = _git(root, *_verify_args(allowed, None), "log", "-1", _FORMAT, commit)
    fields = done.stdout.strip("\n").split("\0")
    good = done.returncode == 0 and len(fields) == 4 and fields[1] == "G"
    return (fields[3] or "(no fingerprint)") if good else None


def _signed_otherwise(root: Path, commit: str) -> bool:
    """True when `commit` carries a signature that is not an SSH one (git cannot check those here: NO_PROGRAM)."""
    done = _git(root, "cat-file", "commit", commit)
    header = done.stdout.split("\n\n", 1)[0]
    return done.returncode == 0 and any(line.startswith(("gpgsig ", "gpgsig-sha256 ")) and "SSH SIGNATURE" not in line
                                        for line in header.splitlines())


def _blob(root: Path, commit: str, path: str) -> str | None:
    """The blob id `commit` holds at `path`, or None (the commit deleted it)."""
    done = _git(root, "rev-parse", "--verify", "--quiet", f"{commit}:{path}")
    return done.stdout.strip() or None if done.returncode == 0 else None


def _blob_id(data: bytes, hex_length: int) -> str:
    """git's id of a blob holding `data`: SHA-1, or SHA-256 in a repository of that object format."""
    algorithm = "sha256" if hex_length == 64 else "sha1"
    return hashlib.new(algorithm, b"blob %d\0" % len(data) + data).hexdigest()


def _in_shallow_boundary(commit: str, git_dirs: Sequence[Path]) -> bool:
    """True when `commit` is a shallow clone's boundary: git shows it as adding every file it holds."""
    for directory in git_dirs:
        try:
            if commit in (directory / "shallow").read_text().split():
                return True
        except OSError:
            continue
    return False
