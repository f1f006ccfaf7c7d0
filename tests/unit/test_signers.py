"""security.allowed_signers (gitflow/signers.py): real ssh-keygen keys, real signed commits, git's own verdict."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from taskrunner import gitops
from taskrunner.config import Config, SecurityConfig, default_config
from taskrunner.gitflow import signers
from taskrunner.intake import RepoFiles, read_task

TASK = b"---\n---\n# Signed work\n\n```sh\necho hi\n```\n"

# Under CI (.ci/run installs OpenSSH) a missing ssh-keygen fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None and os.environ.get("CI") != "true",
                                reason="needs OpenSSH's ssh-keygen")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Keys:
    """Private keys of an allowed signer, a stranger and a retired signer; the policy files naming them."""

    alice: Path
    mallory: Path
    retired: Path
    allowed_signers: Path
    revocation_file: Path

    def policy(self, revocation: bool = True) -> SecurityConfig:
        return SecurityConfig(allowed_signers=self.allowed_signers,
                              revocation_file=self.revocation_file if revocation else None)


def make_keys(directory: Path) -> Keys:
    """Three ed25519 keys; alice and retired are allowed signers, retired is revoked."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("alice", "mallory", "retired"):
        paths[name] = directory / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(paths[name])],
                       check=True, capture_output=True)
    public = {name: " ".join(Path(f"{path}.pub").read_text().split()[:2]) for name, path in paths.items()}
    allowed = directory / "allowed_signers"
    allowed.write_text(f"alice@example.com {public['alice']}\nretired@example.com {public['retired']}\n")
    revoked = directory / "revoked_keys"
    revoked.write_text(public["retired"] + "\n")
    return Keys(paths["alice"], paths["mallory"], paths["retired"], allowed, revoked)


def commit(root: Path, message: str, key: Path | None = None, *paths: str) -> str:
    """Commit `paths` (everything when none), SSH-signed with `key` when given; the new commit."""
    git(root, "add", "--", *(paths or (".",)))
    signing = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"] if key else []
    git(root, *signing, "commit", "-q", *(["-S"] if key else []), "-m", message)
    return git(root, "rev-parse", "HEAD").strip()


def tamper(root: Path, sha: str) -> str:
    """A copy of the signed commit `sha` with another message and the same signature, made HEAD: a bad signature."""
    raw = git(root, "cat-file", "commit", sha)
    forged = subprocess.run(["git", "-C", str(root), "hash-object", "-t", "commit", "-w", "--stdin"],
                            input=raw.replace("\n\n", "\n\nchanged after signing: ", 1), check=True,
                            capture_output=True, text=True).stdout.strip()
    git(root, "update-ref", "HEAD", forged, sha)
    return forged


@pytest.fixture(autouse=True)
def isolated_git_config(isolated_git: Path) -> Path:
    return isolated_git


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "--initial-branch=main")
    git(root, "config", "user.name", "U")
    git(root, "config", "user.email", "u@example.com")
    (root / "README.md").write_text("readme\n")
    commit(root, "initial")
    (root / "tasks").mkdir()
    return root


def add_task(root: Path, name: str, key: Path | None, data: bytes = TASK) -> str:
    path = f"tasks/{name}.md"
    (root / path).write_bytes(data)
    commit(root, f"add {name}", key, path)
    return path


def verdict(root: Path, path: str, keys: Keys, revocation: bool = True) -> signers.Verdict:
    return signers.authorize(root, path, (root / path).read_bytes(), keys.policy(revocation),
                             gitops.git_dirs(root))


def test_a_task_committed_with_a_good_signature_is_authorized_by_its_principal(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "good", keys.alice)

    found = verdict(repo, path, keys)

    assert found.principal == "alice@example.com" and found.reason is None
    assert found.commit == git(repo, "rev-parse", "HEAD").strip()


def test_an_unsigned_commit_is_refused(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "unsigned", None)

    found = verdict(repo, path, keys)

    assert found.principal is None
    assert found.reason and "is not signed" in found.reason and "git commit -S" in found.reason


def test_a_key_not_in_the_allowed_signers_file_is_refused(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "stranger", keys.mallory)

    found = verdict(repo, path, keys)

    assert found.principal is None
    assert found.reason and "not in the allowed signers file" in found.reason and "SHA256:" in found.reason


def test_a_revoked_key_is_refused_as_revoked(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "retired", keys.retired)

    found = verdict(repo, path, keys)

    assert found.principal is None
    assert found.reason and "revoked key SHA256:" in found.reason and str(keys.revocation_file) in found.reason
    # Without the revocation file the same key is an allowed signer: the revocation is what refuses it.
    assert verdict(repo, path, keys, revocation=False).principal == "retired@example.com"


def test_a_commit_changed_after_signing_has_a_bad_signature(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "tampered", keys.alice)
    tamper(repo, git(repo, "rev-parse", "HEAD").strip())

    found = verdict(repo, path, keys)

    assert found.principal is None
    assert found.reason and "bad signature" in found.reason


def test_an_untracked_file_is_refused_with_how_to_commit_it(repo: Path, keys: Keys) -> None:
    (repo / "tasks" / "dropped.md").write_bytes(TASK)

    found = verdict(repo, "tasks/dropped.md", keys)

    assert found.principal is None and found.commit is None
    assert found.reason and "in no commit" in found.reason and "git commit -S" in found.reason
    assert "taskrun trigger" in found.reason


def test_a_signed_file_changed_and_not_committed_is_refused(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "edited", keys.alice)
    (repo / path).write_bytes(TASK + b"\nmore\n")

    found = verdict(repo, path, keys)

    assert found.principal is None
    assert found.reason and "differs from its last commit" in found.reason


def test_an_unsigned_change_after_a_signed_one_is_refused(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "later", keys.alice)
    (repo / path).write_bytes(TASK + b"\nrm -rf something\n")
    commit(repo, "unsigned edit", None, path)

    assert "is not signed" in (verdict(repo, path, keys).reason or "")


def test_a_signed_task_brought_in_by_an_unsigned_merge_counts_its_own_commit(repo: Path, keys: Keys) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    path = add_task(repo, "merged", keys.alice)
    git(repo, "checkout", "-q", "main")
    (repo / "other.txt").write_text("meanwhile\n")
    commit(repo, "other work")
    git(repo, "merge", "-q", "--no-ff", "--no-edit", "feature")

    assert verdict(repo, path, keys).principal == "alice@example.com"


@pytest.mark.skipif(shutil.which("gpg") is None and os.environ.get("CI") != "true",
                    reason="needs GnuPG to make an OpenPGP signature (.ci/run installs it)")
def test_an_openpgp_signature_is_refused_even_if_the_daemons_keyring_trusts_it(
        repo: Path, keys: Keys, isolated_git: Path) -> None:
    gpg = ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "Gina <gina@example.com>", "ed25519", "sign", "never"], check=True,
                   capture_output=True)
    try:
        path = "tasks/openpgp.md"
        (repo / path).write_bytes(TASK)
        git(repo, "add", path)
        git(repo, "-c", "user.signingkey=gina@example.com", "commit", "-q", "-S", "-m", "OpenPGP-signed")
        assert git(repo, "log", "-1", "--format=%G?").strip() == "G"  # git alone trusts the daemon user's keyring

        found = verdict(repo, path, keys)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], capture_output=True)

    assert found.principal is None
    assert found.reason and "OpenPGP or X.509" in found.reason and "only SSH signatures" in found.reason


def test_nothing_committed_yet_is_refused_as_in_no_commit(tmp_path: Path, keys: Keys) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    git(root, "init", "-q")
    (root / "tasks").mkdir()
    (root / "tasks" / "first.md").write_bytes(TASK)

    found = verdict(root, "tasks/first.md", keys)

    assert found.reason and "in no commit" in found.reason


def test_a_missing_allowed_signers_file_refuses_every_task(repo: Path, keys: Keys, tmp_path: Path) -> None:
    path = add_task(repo, "good", keys.alice)
    policy = SecurityConfig(allowed_signers=tmp_path / "nowhere" / "allowed_signers")

    found = signers.authorize(repo, path, TASK, policy)

    assert found.principal is None
    assert found.reason and "security.allowed_signers" in found.reason and "cannot be read" in found.reason
    assert signers.policy_problem(repo, policy) == found.reason


def test_a_missing_revocation_file_refuses_every_task(repo: Path, keys: Keys, tmp_path: Path) -> None:
    # git itself only warns about a missing revocation file, and accepts every key: taskrun fails closed.
    path = add_task(repo, "good", keys.alice)
    policy = SecurityConfig(allowed_signers=keys.allowed_signers, revocation_file=tmp_path / "gone")

    found = signers.authorize(repo, path, TASK, policy)

    assert found.principal is None and found.reason and "security.revocation_file" in found.reason


def test_an_allowed_signers_file_in_the_work_tree_refuses_every_task(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "good", keys.alice)
    (repo / "allowed_signers").write_bytes(keys.allowed_signers.read_bytes())

    found = signers.authorize(repo, path, TASK, SecurityConfig(allowed_signers=Path("allowed_signers")),
                              gitops.git_dirs(repo))

    assert found.principal is None and found.reason and "inside the work tree" in found.reason


def test_an_allowed_signers_file_in_the_git_directory_is_fine(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "good", keys.alice)
    inside = repo / ".git" / "taskrun" / "allowed_signers"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(keys.allowed_signers.read_bytes())

    found = signers.authorize(repo, path, TASK, SecurityConfig(allowed_signers=inside), gitops.git_dirs(repo))

    assert found.principal == "alice@example.com"


def test_the_callers_git_environment_does_not_redirect_the_check(repo: Path, keys: Keys, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A post-receive hook runs with GIT_DIR set to the bare repository: the check still reads this one.
    other = tmp_path / "other.git"
    git(tmp_path, "init", "-q", "--bare", str(other))
    path = add_task(repo, "good", keys.alice)
    monkeypatch.setenv("GIT_DIR", str(other))

    assert verdict(repo, path, keys).principal == "alice@example.com"


def test_read_task_records_the_signer_on_the_spec(repo: Path, keys: Keys) -> None:
    path = add_task(repo, "good", keys.alice)
    config = _with_policy(keys)

    intake = read_task(RepoFiles(repo, gitops.git_dirs(repo)), "good", path, config)

    assert intake.error is None and intake.spec is not None
    assert intake.spec.authorized_by == "alice@example.com"


def test_read_task_makes_a_refused_task_invalid_with_its_own_revision(repo: Path, keys: Keys) -> None:
    (repo / "tasks" / "dropped.md").write_bytes(TASK)
    config = _with_policy(keys)
    files = RepoFiles(repo, gitops.git_dirs(repo))

    refused = read_task(files, "dropped", "tasks/dropped.md", config)
    commit(repo, "sign it", keys.alice, "tasks/dropped.md")
    accepted = read_task(files, "dropped", "tasks/dropped.md", config)

    assert refused.spec is None and refused.error and refused.error.startswith("refused: ")
    # The same bytes, now committed signed, are a new revision: the daemon takes them up again.
    assert accepted.spec is not None and accepted.revision != refused.revision


def test_a_new_reason_for_the_same_bytes_is_a_new_revision(repo: Path, keys: Keys) -> None:
    (repo / "tasks" / "dropped.md").write_bytes(TASK)
    config = _with_policy(keys)
    files = RepoFiles(repo, gitops.git_dirs(repo))

    untracked = read_task(files, "dropped", "tasks/dropped.md", config)
    commit(repo, "commit it, unsigned", None, "tasks/dropped.md")
    unsigned = read_task(files, "dropped", "tasks/dropped.md", config)

    assert untracked.revision != unsigned.revision and unsigned.error and "is not signed" in unsigned.error
    # Both name the file's own revision, for a reader waiting on it (`taskrun submit --wait`).
    own = hashlib.sha256(TASK).hexdigest()
    assert untracked.revision.startswith(f"refused:{own}:") and unsigned.revision.startswith(f"refused:{own}:")


def test_without_the_policy_nothing_is_asked_of_git(repo: Path) -> None:
    (repo / "tasks" / "dropped.md").write_bytes(TASK)

    intake = read_task(RepoFiles(repo), "dropped", "tasks/dropped.md", default_config())

    assert intake.spec is not None and intake.spec.authorized_by is None


def _with_policy(keys: Keys) -> Config:
    return replace(default_config(), security=keys.policy())
