"""What makes the daemon sync: the post-receive and post-merge hooks, `git.poll`, the webhook receiver.

Real processes throughout: the daemon (`taskrun up`), real `git push`es into a
real bare repository running the installed hook, real HTTP requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner.recorder import Recorder
from tests.conftest import Daemon, git, taskrun, wait_status, wait_until, write_task

SECRET = "hook-secret-for-tests"
SECRET_ENV = "TASKRUN_TEST_WEBHOOK_SECRET"
#: Once the git thread syncs (fetch, fast-forward), a pushed Task runs; until then a trigger rescans tasks/.
SYNCS = hasattr(Recorder, "sync")


# -- helpers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def configure(root: Path, poll: str | None = None, port: int | None = None, max_body: int | None = None) -> None:
    """Switch on git.poll and/or the webhook receiver in root's .taskrun.yaml (left uncommitted)."""
    path = root / ".taskrun.yaml"
    text = path.read_text()
    if poll is not None:
        assert "  # poll: 30s\n" in text
        text = text.replace("  # poll: 30s\n", f"  poll: {poll}\n")
    if port is not None:
        text += f"webhook:\n  listen: 127.0.0.1:{port}\n  secret_env: {SECRET_ENV}\n"
        if max_body is not None:
            text += f"  max_body_bytes: {max_body}\n"
    path.write_text(text)


def make_clone(root: Path) -> Path:
    """A fresh `taskrun init` repository at `root` (any path) with one user commit."""
    root.mkdir(parents=True)
    git(root, "init", "--quiet", "--initial-branch=main")
    git(root, "config", "user.name", "Test User")
    git(root, "config", "user.email", "test@example.com")
    assert taskrun(root, "init").returncode == 0
    (root / "README.md").write_text("a project\n")
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "initial")
    return root


def with_origin(clone: Path, bare: Path) -> Path:
    """Make `bare` the origin of `clone` (its branch tracking origin's)."""
    subprocess.run(["git", "clone", "--quiet", "--bare", str(clone), str(bare)], check=True)
    git(clone, "remote", "add", "origin", str(bare))
    git(clone, "fetch", "--quiet", "origin")
    branch = git(clone, "symbolic-ref", "--short", "HEAD").strip()
    git(clone, "branch", "--quiet", f"--set-upstream-to=origin/{branch}")
    return bare


def user_clone(bare: Path, where: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(bare), str(where)], check=True)
    git(where, "config", "user.name", "Pusher")
    git(where, "config", "user.email", "pusher@example.com")
    return where


def snapshot(repo: Path) -> tuple[str, str, str]:
    """Every ref, the work tree's status and the config: what a stray git command would change."""
    refs = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    status = git(repo, "status", "--porcelain", "--ignored") if (repo / ".git").exists() else ""
    config = (repo / ".git" / "config" if (repo / ".git").exists() else repo / "config").read_text()
    return refs, status, config


def count(daemon: Daemon, text: str) -> int:
    return daemon.output().count(text)


def post(port: int, headers: dict[str, str], body: bytes, path: str = "/webhook",
         method: str = "POST") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body if method == "POST" else None,
                                     headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def hexmac(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# -- the webhook receiver ----------------------------------------------------------------

PUSH = json.dumps({"ref": "refs/heads/main"}).encode()


def _styles(delivery: str) -> list[tuple[str, dict[str, str], str, str]]:
    """(forge style, its headers without a signature, the signature header, a good value for PUSH)."""
    return [
        ("github", {"X-GitHub-Event": "push", "X-GitHub-Delivery": f"gh-{delivery}"},
         "X-Hub-Signature-256", "sha256=" + hexmac(PUSH)),
        ("gitea", {"X-Gitea-Event": "push", "X-Gitea-Delivery": f"gt-{delivery}"},
         "X-Gitea-Signature", hexmac(PUSH)),
        ("forgejo", {"X-Forgejo-Event": "push", "X-Forgejo-Delivery": f"fj-{delivery}"},
         "X-Forgejo-Signature", hexmac(PUSH)),
        ("gitlab", {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": f"gl-{delivery}"},
         "X-Gitlab-Token", SECRET),
        ("bitbucket", {"X-Event-Key": "repo:push", "X-Request-UUID": f"bb-{delivery}"},
         "X-Hub-Signature", "sha256=" + hexmac(PUSH)),
    ]


@pytest.fixture
def receiver(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    configure(daemon.root, port=port, max_body=4096)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    daemon.start()
    wait_until(lambda: "webhook receiver listening" in daemon.output(), 10, "the receiver to listen")
    yield daemon, port


@pytest.mark.slow
def test_each_forge_style_good_signature_triggers_and_bad_empty_missing_are_refused(
        receiver: tuple[Daemon, int]) -> None:
    daemon, port = receiver
    for style, headers, signature_header, good in _styles("1"):
        before = count(daemon, "sync requested (webhook")
        wrong = "client-sent-token" if style == "gitlab" else ("sha256=" if "sha256=" in good else "") + "0" * 64
        for bad in (wrong, ""):
            status, text = post(port, {**headers, signature_header: bad}, PUSH)
            assert status == 401, (style, bad, status, text)
        status, text = post(port, headers, PUSH)  # missing
        assert status == 401 and "unsigned" in text, (style, status, text)

        status, text = post(port, {**headers, signature_header: good}, PUSH)

        assert (status, text.strip()) == (200, "sync queued"), style
        # The refused ones queued nothing: the queue is in order, so exactly one more sync shows up.
        wait_until(lambda n=before + 1: count(daemon, "sync requested (webhook") == n, 10, f"{style}'s sync")
    output = daemon.output()
    assert SECRET not in output and "client-sent-token" not in output
    assert "sync requested (webhook: gitlab Push Hook (main))" in output


@pytest.mark.slow
def test_gitlab_standard_webhooks_signature_is_accepted(receiver: tuple[Daemon, int]) -> None:
    import base64
    import time

    _, port = receiver
    stamp = str(int(time.time()))
    digest = hmac.new(SECRET.encode(), f"msg_1.{stamp}.".encode() + PUSH, hashlib.sha256).digest()
    headers = {"X-Gitlab-Event": "Push Hook", "webhook-id": "msg_1", "webhook-timestamp": stamp,
               "X-Gitlab-Token": "not-the-signing-token"}

    bad = post(port, {**headers, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}, PUSH)
    good = post(port, {**headers, "webhook-signature": "v1," + base64.b64encode(digest).decode()}, PUSH)

    assert bad[0] == 401 and good == (200, "sync queued\n")


@pytest.mark.slow
def test_a_replayed_delivery_is_answered_duplicate_and_triggers_nothing_even_after_a_restart(
        receiver: tuple[Daemon, int]) -> None:
    daemon, port = receiver
    _, headers, signature_header, good = _styles("replay")[0]
    signed = {**headers, signature_header: good}
    assert post(port, signed, PUSH) == (200, "sync queued\n")
    wait_until(lambda: count(daemon, "sync requested (webhook") == 1, 10, "the first sync")

    assert post(port, signed, PUSH) == (200, "duplicate\n")
    daemon.stop()
    daemon.start()
    wait_until(lambda: count(daemon, "webhook receiver listening") == 2, 10, "the receiver to listen again")
    assert post(port, signed, PUSH) == (200, "duplicate\n")
    fresh = {**signed, "X-GitHub-Delivery": "gh-another"}
    assert post(port, fresh, PUSH) == (200, "sync queued\n")

    wait_until(lambda: count(daemon, "sync requested (webhook") == 2, 10, "the fresh delivery's sync")
    assert count(daemon, "seen before; nothing triggered") == 2


@pytest.mark.slow
def test_body_over_the_limit_other_methods_paths_and_events_trigger_nothing(receiver: tuple[Daemon, int]) -> None:
    daemon, port = receiver
    _, headers, signature_header, _ = _styles("limits")[0]
    big = b"{" + b" " * 5000 + b"}"

    assert post(port, {**headers, signature_header: "sha256=" + hexmac(big)}, big)[0] == 413
    assert post(port, {}, b"", method="GET")[0] == 405
    assert post(port, {**headers, signature_header: "sha256=" + hexmac(PUSH)}, PUSH, path="/elsewhere")[0] == 404
    issue = {**headers, "X-GitHub-Event": "issues", signature_header: "sha256=" + hexmac(PUSH)}
    assert post(port, issue, PUSH)[0] == 202
    no_id = {"X-GitHub-Event": "push", signature_header: "sha256=" + hexmac(PUSH)}
    assert post(port, no_id, PUSH)[0] == 400

    assert post(port, {**headers, signature_header: "sha256=" + hexmac(PUSH)}, PUSH)[0] == 200
    wait_until(lambda: count(daemon, "sync requested (webhook") >= 1, 10, "the one good delivery's sync")
    assert count(daemon, "sync requested (webhook") == 1


def test_the_receiver_refuses_to_start_without_its_secret(repo: Path) -> None:
    configure(repo, port=free_port())
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}

    result = subprocess.run([sys.executable, "-m", "taskrunner", "-C", str(repo), "up"], env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2 and SECRET_ENV in result.stderr, result.stderr
    assert not (repo / ".git" / "taskrun" / "daemon.json").exists()


# -- git.poll --------------------------------------------------------------------------------


@pytest.mark.slow
def test_git_poll_turned_on_by_a_reload_syncs_periodically(daemon: Daemon, tmp_path: Path) -> None:
    bare = with_origin(daemon.root, tmp_path / "origin.git")
    config = daemon.root / ".taskrun.yaml"
    # No record commits: the clone stays behind its origin, so every sync is a fast-forward.
    config.write_text(config.read_text().replace("  commit: true\n", "  commit: false\n"))
    daemon.start()

    configure(daemon.root, poll="300ms")

    wait_until(lambda: "configuration reloaded" in daemon.output(), 15, "the reload")
    if SYNCS:
        pusher = user_clone(bare, tmp_path / "user")
        for name in ("first", "second"):
            write_task(pusher, name, f"echo {name}")
            git(pusher, "add", "-A")
            git(pusher, "commit", "--quiet", "-m", f"Task {name}")
            git(pusher, "push", "--quiet", "origin", "HEAD")
            wait_status(daemon.root, name, "COMPLETED")
    else:
        wait_until(lambda: count(daemon, "sync requested (poll)") >= 3, 15, "three polls")


# -- the hooks ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_hooks_install_refuses_a_clone_and_a_hook_it_did_not_write(repo: Path, tmp_path: Path) -> None:
    other = make_clone(tmp_path / "not-bare")
    bare = with_origin(repo, tmp_path / "origin.git")
    (bare / "hooks" / "post-receive").write_text("#!/bin/sh\necho mine\n")

    not_bare = taskrun(repo, "hooks", "install", str(other))
    foreign = taskrun(repo, "hooks", "install", str(bare))

    assert not_bare.returncode == 2 and "not a bare repository" in not_bare.stderr
    assert foreign.returncode == 2 and "taskrun did not write it" in foreign.stderr and "--force" in foreign.stderr
    assert (bare / "hooks" / "post-receive").read_text() == "#!/bin/sh\necho mine\n"
    forced = taskrun(repo, "hooks", "install", "--force", str(bare))
    assert forced.returncode == 0, forced.stderr
    assert (bare / "hooks" / "post-receive.before-taskrun").read_text() == "#!/bin/sh\necho mine\n"
    again = taskrun(repo, "hooks", "install", str(bare))  # its own hook is rewritten without --force
    assert again.returncode == 0 and not (bare / "hooks" / "post-receive.before-taskrun.1").exists()
    (bare / "hooks" / "post-receive").unlink()
    (bare / "hooks" / "post-receive").symlink_to(repo / "hooks" / "post-receive")  # a link is nobody's hook
    linked = taskrun(repo, "hooks", "install", str(bare))
    assert linked.returncode == 2 and (bare / "hooks" / "post-receive").is_symlink()
    git(bare, "config", "core.hooksPath", str(tmp_path / "elsewhere"))
    elsewhere = taskrun(repo, "hooks", "install", "--force", str(bare))
    assert elsewhere.returncode == 2 and "core.hooksPath" in elsewhere.stderr


@pytest.mark.slow
def test_a_push_runs_the_hook_which_reaches_the_daemon_of_a_clone_at_an_awkward_path(tmp_path: Path) -> None:
    # GitPython expands a set variable in the path the daemon's git runs in (`$HOME`), so an unset one here;
    # the hook's quoting of `$HOME` itself is shown by the daemon-down test.
    assert "TASKRUN_UNSET" not in os.environ
    clone = make_clone(tmp_path / "it's a \"$TASKRUN_UNSET\" `clone` with spaces")
    bare = with_origin(clone, tmp_path / "origin.git")
    installed = taskrun(clone, "hooks", "install", str(bare))
    assert installed.returncode == 0, installed.stderr
    pusher = user_clone(bare, tmp_path / "user")
    daemon = Daemon(clone).start()
    try:
        bare_before, clone_before = snapshot(bare), snapshot(clone)
        write_task(pusher, "pushed", "echo pushed")
        git(pusher, "add", "-A")
        git(pusher, "commit", "--quiet", "-m", "a Task")
        # Push options put GIT_PUSH_OPTION_* in the hook's environment too.
        git(bare, "config", "receive.advertisePushOptions", "true")
        push = subprocess.run(["git", "-C", str(pusher), "push", "-o", "ci.skip", "origin", "HEAD"],
                              capture_output=True, text=True, timeout=60)

        assert push.returncode == 0 and "was not told" not in push.stderr, push.stderr
        wait_until(lambda: "sync requested (trigger)" in daemon.output(), 15, "the hook's trigger")
        if SYNCS:
            wait_status(clone, "pushed", "COMPLETED")
        else:
            # Nothing of the bare repository moved but the pushed branch; nothing of the clone at all.
            pushed = git(pusher, "rev-parse", "HEAD").strip()
            assert snapshot(bare)[0] != bare_before[0] and pushed in snapshot(bare)[0]
            assert snapshot(bare)[1:] == bare_before[1:]
            assert snapshot(clone) == clone_before
    finally:
        daemon.stop()


@pytest.mark.slow
def test_the_hook_run_with_gits_environment_set_acts_on_the_clone_only(repo: Path, tmp_path: Path) -> None:
    bare = with_origin(repo, tmp_path / "origin.git")
    assert taskrun(repo, "hooks", "install", str(bare)).returncode == 0
    daemon = Daemon(repo).start()
    try:
        before_bare, before_clone = snapshot(bare), snapshot(repo)
        # As git runs post-receive, and worse: every variable that would send a git command elsewhere.
        env = {**os.environ, "GIT_DIR": str(bare), "GIT_WORK_TREE": str(tmp_path), "GIT_INDEX_FILE":
               str(tmp_path / "index"), "GIT_OBJECT_DIRECTORY": str(bare / "objects"),
               "GIT_QUARANTINE_PATH": str(bare / "objects"), "GIT_PUSH_OPTION_COUNT": "0",
               "GIT_CONFIG_PARAMETERS": "'core.bare'='true'"}
        hook = subprocess.run([str(bare / "hooks" / "post-receive")], cwd=bare, env=env, capture_output=True,
                              text=True, input="0" * 40 + " " + "1" * 40 + " refs/heads/main\n", timeout=60)

        assert hook.returncode == 0 and hook.stderr == "", hook.stderr
        wait_until(lambda: "sync requested (trigger)" in daemon.output(), 15, "the hook's trigger")
        assert snapshot(bare) == before_bare and not (tmp_path / "index").exists()
        if not SYNCS:
            assert snapshot(repo) == before_clone
    finally:
        daemon.stop()


@pytest.mark.slow
def test_the_hook_neither_fails_nor_blocks_a_push_when_the_daemon_is_down(tmp_path: Path) -> None:
    repo = make_clone(tmp_path / "it's \"$HOME\" `pwd`")
    bare = with_origin(repo, tmp_path / "origin.git")
    assert taskrun(repo, "hooks", "install", str(bare)).returncode == 0
    pusher = user_clone(bare, tmp_path / "user")
    (pusher / "file").write_text("x\n")
    git(pusher, "add", "-A")
    git(pusher, "commit", "--quiet", "-m", "a change")

    push = subprocess.run(["git", "-C", str(pusher), "push", "origin", "HEAD"], capture_output=True, text=True,
                          timeout=60)

    assert push.returncode == 0, push.stderr
    assert f"remote: taskrun: the daemon of {repo} was not told to sync" in push.stderr, push.stderr
    assert "no taskrun daemon is running" in push.stderr
    assert git(bare, "rev-parse", "HEAD").strip() == git(pusher, "rev-parse", "HEAD").strip()


@pytest.mark.slow
def test_post_merge_hook_installed_in_the_clone_reaches_its_daemon_after_a_pull(daemon: Daemon,
                                                                               tmp_path: Path) -> None:
    bare = with_origin(daemon.root, tmp_path / "origin.git")
    installed = taskrun(daemon.root, "hooks", "install")
    assert installed.returncode == 0, installed.stderr
    pusher = user_clone(bare, tmp_path / "user")
    (pusher / "file").write_text("x\n")
    git(pusher, "add", "-A")
    git(pusher, "commit", "--quiet", "-m", "a change")
    git(pusher, "push", "--quiet", "origin", "HEAD")
    daemon.start()

    pull = subprocess.run(["git", "-C", str(daemon.root), "pull", "--ff-only", "--quiet"], capture_output=True,
                          text=True, timeout=60)

    assert pull.returncode == 0 and "not told" not in pull.stderr, pull.stderr
    wait_until(lambda: "sync requested (trigger)" in daemon.output(), 15, "the hook's trigger")
