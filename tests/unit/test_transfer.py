"""The repository to the Worker and changes back, on real git repositories: transfer, cache, change, import."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import subprocess
from pathlib import Path
from typing import Any

import pytest

from taskrunner import bundle
from taskrunner.agents import workspace
from taskrunner.gitflow import change
from taskrunner.gitflow.cache import ObjectCache, cached_commits, missing_objects
from taskrunner.gitflow.importer import ChangeRejected, import_change
from taskrunner.gitflow.transfer import Transfer
from taskrunner.protocol import Message, Reader, encode
from taskrunner.results import verified_result
from taskrunner.sessionauth import new_challenge
from taskrunner.signing import RESULT_TYPE, sign
from taskrunner.taskfile import parse_task
from taskrunner.worker.inbound import Assignment, Inbound
from taskrunner.worker.sandbox import HostView, RunSandbox, bwrap_argv
from taskrunner.worker.trust import TrustStore, worker_key
from tests.conftest import git
from tests.signed import enroll

ZERO = "0" * 40


def _repo(path: Path, files: dict[str, str]) -> str:
    path.mkdir(parents=True)
    git(path, "init", "--quiet")
    git(path, "config", "user.name", "U")
    git(path, "config", "user.email", "u@example.com")
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "base")
    return git(path, "rev-parse", "HEAD").strip()


def _commit(path: Path, rel: str, text: str) -> str:
    (path / rel).parent.mkdir(parents=True, exist_ok=True)
    (path / rel).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", f"change {rel}")
    return git(path, "rev-parse", "HEAD").strip()


def _pack(repo: Path, revs: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), "pack-objects", "--stdout", "--revs", "-q"], input=revs.encode(),
                          capture_output=True, check=True).stdout


def _manifest(base: str, repo_id: str, files: list[dict[str, Any]] | None = None, **git_fields: Any) -> dict[str, Any]:
    return {"run_id": "run-1", "task_id": "t", "agent": {"name": "shell"}, "base_commit": base, "files": files or [],
            "repo": {"id": repo_id, "base": base, "sha256": "", "size": 0, "prerequisites": []},
            "git": {"author_name": "Bot", "author_email": "bot@example.com", "max_result_bytes": 1 << 20,
                    "branch": "taskrun/t", "title": "Do the thing", **git_fields}}


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "daemon"
    base = _repo(root, {"README.md": "hello\n", "src/app.txt": "v1\n"})
    return root, base


def _checkout(tmp_path: Path, source: tuple[Path, str]) -> tuple[Path, Path, ObjectCache, str]:
    root, base = source
    home = tmp_path / "worker"
    cache = ObjectCache(home, "a" * 32)
    cache.receive(_pack(root, f"{base}\n"), base)
    run_dir = home / "runs" / "run-1"
    run_dir.mkdir(parents=True)
    cache.checkout(run_dir / "index", run_dir / "workspace", base, "taskrun/t")
    return home, run_dir, cache, base


# -- transfer -------------------------------------------------------------------------------


def test_a_worker_holding_the_base_gets_no_git_data_and_one_after_a_change_gets_only_it(
        source: tuple[Path, str]) -> None:
    root, base = source
    for i in range(50):
        (root / "data" / f"{i}.bin").parent.mkdir(exist_ok=True)
        (root / "data" / f"{i}.bin").write_text(os.urandom(1024).hex())
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "data")
    first_base = git(root, "rev-parse", "HEAD").strip()
    transfer = Transfer(root)
    first, first_pack = transfer.repo_part("w", first_base)
    assert first is not None and first["prerequisites"] == [] and first["size"] == len(first_pack) > 50_000
    transfer._sent("w", first_base)
    again, again_pack = transfer.repo_part("w", first_base)
    assert again is not None and again_pack == b"" and again["prerequisites"] == [first_base]
    second_base = _commit(root, "data/7.bin", "changed")
    second, second_pack = transfer.repo_part("w", second_base)
    assert second is not None and second["prerequisites"] == [first_base]
    assert 0 < len(second_pack) < len(first_pack) / 100
    assert second["sha256"] == hashlib.sha256(second_pack).hexdigest()


def test_a_clone_with_no_commit_yet_sends_the_archive_alone(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    git(root, "init", "--quiet")
    assert Transfer(root).repo_part("w", None) == (None, b"")


def test_the_repository_id_is_made_once_and_kept(source: tuple[Path, str]) -> None:
    root, _ = source
    made = Transfer(root).repo_id()
    assert len(made) == 32 and Transfer(root).repo_id() == made
    assert (root / ".git" / "taskrun" / "repo-id").read_text().strip() == made


def test_a_shallow_clone_is_refused_with_a_message(tmp_path: Path, source: tuple[Path, str]) -> None:
    root, _ = source
    _commit(root, "second.txt", "2")
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{root}", str(shallow)], check=True)
    head = git(shallow, "rev-parse", "HEAD").strip()
    with pytest.raises(Exception, match="git fetch --unshallow"):
        Transfer(shallow).repo_part("w", head)


# -- the Worker's cache and checkout ------------------------------------------------------


def test_the_checkout_is_a_normal_git_working_tree_without_a_remote(tmp_path: Path,
                                                                    source: tuple[Path, str]) -> None:
    home, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    assert (workspace / "src" / "app.txt").read_text() == "v1\n"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}
    status = subprocess.run(["git", "status", "--porcelain"], cwd=workspace, capture_output=True, text=True,
                            env=env, check=True)
    assert status.stdout == ""
    log = subprocess.run(["git", "log", "--format=%H %D"], cwd=workspace, capture_output=True, text=True, env=env,
                         check=True)
    assert log.stdout.strip() == f"{base} HEAD -> taskrun/t"
    assert subprocess.run(["git", "remote"], cwd=workspace, capture_output=True, text=True, env=env).stdout == ""
    assert oct(os.stat(cache.path).st_mode & 0o777) == "0o700"
    assert cached_commits(home) == {"a" * 32: [base]}


def test_an_assignment_whose_prerequisites_are_missing_is_refused_with_a_reason(tmp_path: Path) -> None:
    manifest = _manifest("b" * 40, "c" * 32)
    manifest["repo"]["prerequisites"] = ["b" * 40]
    assert "lacks 1 of the commits" in (missing_objects(tmp_path, manifest) or "")


def test_a_damaged_pack_is_refused_by_the_cache(tmp_path: Path, source: tuple[Path, str]) -> None:
    root, base = source
    pack = bytearray(_pack(root, f"{base}\n"))
    pack[len(pack) // 2] ^= 0xFF
    with pytest.raises(Exception, match="refused"):
        ObjectCache(tmp_path / "w", "d" * 32).receive(bytes(pack), base)


# -- changes back (Worker) -------------------------------------------------------------------


def test_the_workspace_change_becomes_one_commit_with_trailers(tmp_path: Path, source: tuple[Path, str]) -> None:
    home, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    (workspace / "src" / "app.txt").write_text("v2\n")
    (workspace / "new.txt").write_text("new\n")
    (workspace / "runs").mkdir()
    (workspace / "runs" / "forged.json").write_text("{}")
    os.symlink("/etc/passwd", workspace / "link")
    os.mkfifo(workspace / "fifo")
    found = change.collect(run_dir, workspace, _manifest(base, cache.repo_id), [], "w1")
    assert found is not None
    pack = change.read_pack(run_dir)
    assert found["size"] == len(pack) and found["sha256"] == hashlib.sha256(pack).hexdigest()
    root, _ = source
    subprocess.run(["git", "-C", str(root), "index-pack", "--stdin", "--strict"], input=pack, check=True,
                   capture_output=True)
    commit = found["commit"]
    assert git(root, "rev-parse", f"{commit}^").strip() == base
    names = git(root, "diff", "--name-status", base, commit).split("\n")
    assert sorted(filter(None, names)) == ["A\tlink", "A\tnew.txt", "M\tsrc/app.txt"]
    assert git(root, "cat-file", "-p", f"{commit}:link") == "/etc/passwd"  # a link, never followed
    body = git(root, "log", "-1", "--format=%an <%ae>%n%B", commit)
    assert body.startswith("Bot <bot@example.com>\nDo the thing\n\nTask-Id: t\nRun-Id: run-1\nWorker: w1\nAgent: shell")


def test_an_unchanged_workspace_and_untouched_task_files_are_no_change(tmp_path: Path,
                                                                        source: tuple[Path, str]) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    task = b"---\n---\n# T\n"
    (workspace / "tasks").mkdir()
    (workspace / "tasks" / "t.md").write_bytes(task)  # laid over the checkout by the bundle
    laid = [{"path": "tasks/t.md", "sha256": hashlib.sha256(task).hexdigest(), "size": len(task)}]
    assert change.collect(run_dir, workspace, _manifest(base, cache.repo_id, laid), [], "w1") is None


def test_a_change_holding_a_secret_value_is_refused(tmp_path: Path, source: tuple[Path, str]) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    (workspace / "config.txt").write_text("token = s3cr3t-value-123\n")
    with pytest.raises(change.ChangeRefused, match="secrets"):
        change.collect(run_dir, workspace, _manifest(base, cache.repo_id), [b"s3cr3t-value-123"], "w1")
    assert not (run_dir / change.CHANGE_PACK).exists()


def test_a_change_over_max_result_bytes_is_refused(tmp_path: Path, source: tuple[Path, str]) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    (workspace / "big.bin").write_text(os.urandom(20_000).hex())
    with pytest.raises(change.ChangeRefused, match="max_result_bytes"):
        change.collect(run_dir, workspace, _manifest(base, cache.repo_id, max_result_bytes=1000), [], "w1")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_a_sparse_file_of_gigabytes_is_refused_by_its_size_before_anything_reads_it(
        tmp_path: Path, source: tuple[Path, str]) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    with open(workspace / "big.bin", "wb") as handle:  # `truncate -s 1500M big.bin`: no block written
        handle.truncate(1500 * 1024 * 1024)
    before = _peak_rss_bytes()
    with pytest.raises(change.ChangeRefused) as refused:
        change.collect(run_dir, workspace, _manifest(base, cache.repo_id), [b"s3cr3t-value-123"], "w1")
    assert _peak_rss_bytes() - before < 200 * 1024 * 1024
    reason = str(refused.value)
    assert f"{1500 * 1024 * 1024} bytes" in reason and f"git.max_result_bytes ({1 << 20} bytes)" in reason
    # Refused before git hashed it (no `git add`, not even its dry run): no object directory was made.
    assert not (run_dir / "objects").exists()
    assert not (run_dir / change.CHANGE_PACK).exists()


def test_a_file_of_zeros_is_refused_by_its_uncompressed_size_not_its_tiny_pack(
        tmp_path: Path, source: tuple[Path, str]) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    block = bytes(1024 * 1024)
    with open(workspace / "big.bin", "wb") as handle:  # `head -c 200000000 /dev/zero > big.bin`
        for _ in range(200_000_000 // len(block)):
            handle.write(block)
        handle.write(bytes(200_000_000 % len(block)))
    before = _peak_rss_bytes()
    with pytest.raises(change.ChangeRefused, match=r"200000000 bytes .*over git\.max_result_bytes \(1048576 bytes\)"):
        change.collect(run_dir, workspace, _manifest(base, cache.repo_id, max_result_bytes=1048576),
                       [b"s3cr3t-value-123"], "w1")
    assert _peak_rss_bytes() - before < 200 * 1024 * 1024
    assert not (run_dir / change.CHANGE_PACK).exists()


def test_blobs_larger_than_their_files_are_refused_by_the_blob_sizes_before_any_is_read(
        tmp_path: Path, source: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    # working-tree-encoding: 2000 bytes of UTF-16 on disk become a 3000-byte UTF-8 blob when git adds them.
    (workspace / ".gitattributes").write_text("*.wide working-tree-encoding=UTF-16LE\n")
    (workspace / "text.wide").write_bytes(("\u4e2d" * 1000).encode("utf-16-le"))
    read: list[tuple[str, ...]] = []
    real_git = change.git
    monkeypatch.setattr(change, "git", lambda *args, **kw: read.append(args[1:]) or real_git(*args, **kw))
    with pytest.raises(change.ChangeRefused, match=r"bytes uncompressed, over git\.max_result_bytes \(2500 bytes\)"):
        change.collect(run_dir, workspace, _manifest(base, cache.repo_id, max_result_bytes=2500),
                       [b"s3cr3t-value-123"], "w1")
    assert ("cat-file", "--batch") not in [args[:2] for args in read]  # no blob content was read
    assert not (run_dir / change.CHANGE_PACK).exists()


def test_a_secret_split_across_path_components_is_refused(tmp_path: Path, source: tuple[Path, str]) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    (workspace / "d" / "change-secret-").mkdir(parents=True)
    (workspace / "d" / "change-secret-" / "0123456789").write_text("harmless\n")
    with pytest.raises(change.ChangeRefused, match="secrets .*file name"):
        change.collect(run_dir, workspace, _manifest(base, cache.repo_id), [b"change-secret-0123456789"], "w1")
    assert not (run_dir / change.CHANGE_PACK).exists()


def test_a_secret_in_any_batch_of_blobs_is_found(tmp_path: Path, source: tuple[Path, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    monkeypatch.setattr(change, "SCAN_BATCH_BYTES", 64)  # one blob a batch
    for i in range(5):
        (workspace / f"f{i}.txt").write_text(f"file {i} " + "x" * 100 + "\n")
    (workspace / "f3.txt").write_text("token = s3cr3t-value-123\n")
    with pytest.raises(change.ChangeRefused, match="secrets .*f3.txt"):
        change.collect(run_dir, workspace, _manifest(base, cache.repo_id), [b"s3cr3t-value-123"], "w1")


def test_a_small_change_within_max_result_bytes_and_without_secrets_is_returned(
        tmp_path: Path, source: tuple[Path, str]) -> None:
    root, _ = source
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    (workspace / "src" / "app.txt").write_text("v2\n")
    (workspace / "d" / "change-secret-").mkdir(parents=True)  # a part of the secret's value is no secret
    (workspace / "d" / "change-secret-" / "notes.txt").write_text("small\n" * 100)
    found = change.collect(run_dir, workspace, _manifest(base, cache.repo_id, max_result_bytes=4096),
                           [b"change-secret-0123456789"], "w1")
    assert found is not None
    pack = change.read_pack(run_dir)
    assert found["size"] == len(pack) <= 4096 and found["sha256"] == hashlib.sha256(pack).hexdigest()
    assert os.stat(run_dir / change.CHANGE_PACK).st_mode & 0o777 == 0o600
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".change-pack-")] == []
    subprocess.run(["git", "-C", str(root), "index-pack", "--stdin", "--strict"], input=pack, check=True,
                   capture_output=True)
    assert git(root, "show", f"{found['commit']}:src/app.txt") == "v2\n"


def test_a_planted_git_config_runs_nothing_when_the_change_is_collected(tmp_path: Path,
                                                                        source: tuple[Path, str]) -> None:
    _, run_dir, cache, base = _checkout(tmp_path, source)
    workspace = run_dir / "workspace"
    pwned = tmp_path / "pwned"
    evil = f"#!/bin/sh\ntouch {pwned}\ncat\n"
    (workspace / "evil.sh").write_text(evil)
    os.chmod(workspace / "evil.sh", 0o755)
    hooks = workspace / ".git" / "hooks"
    hooks.mkdir()
    for hook in ("pre-commit", "post-index-change", "reference-transaction", "pre-auto-gc"):
        (hooks / hook).write_text(evil)
        os.chmod(hooks / hook, 0o755)
    with open(workspace / ".git" / "config", "a") as handle:
        handle.write(f"[core]\n\tfsmonitor = {workspace}/evil.sh\n\thooksPath = {hooks}\n"
                     f"[filter \"x\"]\n\tclean = {workspace}/evil.sh\n\tsmudge = {workspace}/evil.sh\n"
                     f"[diff \"x\"]\n\ttextconv = {workspace}/evil.sh\n")
    (workspace / ".gitattributes").write_text("* filter=x diff=x\n")
    (workspace / "src" / "app.txt").write_text("v2\n")
    found = change.collect(run_dir, workspace, _manifest(base, cache.repo_id), [], "w1")
    assert found is not None
    assert not pwned.exists(), "the Agent's .git configuration ran a program as the Worker"


# -- changes back (control plane) ----------------------------------------------------------


def _signed(home: Path, found: dict[str, Any] | None, status: str = "COMPLETED") -> dict[str, Any]:
    """A result signed with the Worker's real result key, as serve.py makes it."""
    result = {"run_id": "run-1", "status": status, "exit_code": 0, "error": None, "started_at": 1.0,
              "finished_at": 2.0, "output_size": 0, "output_sha256": hashlib.sha256(b"").hexdigest(),
              "nonce": "n", "change": found}
    key = worker_key(home)
    envelope = sign(RESULT_TYPE, json.dumps(result, sort_keys=True, separators=(",", ":")).encode(), [key])
    return verified_result(envelope, key.public, "run-1", (0, hashlib.sha256(b"").hexdigest()))


def _import(root: Path, found: Any, pack: bytes, base: str, max_bytes: int = 1 << 20) -> Any:
    return import_change(root / ".git", found, pack, run_id="run-1", task_id="t", base=base, prefix="taskrun/",
                         max_bytes=max_bytes)


def _agent_commit(tmp_path: Path, source: tuple[Path, str]) -> tuple[Path, dict[str, Any], bytes]:
    home, run_dir, cache, base = _checkout(tmp_path, source)
    (run_dir / "workspace" / "src" / "app.txt").write_text("v2\n")
    found = change.collect(run_dir, run_dir / "workspace", _manifest(base, cache.repo_id), [], "w1")
    assert found is not None
    return home, found, change.read_pack(run_dir)


def _refs(root: Path) -> str:
    return git(root, "for-each-ref", "--format=%(refname) %(objectname)")


def _objects(root: Path) -> list[str]:
    """Every path under the clone's objects directory: a refused pack must add none, not even a temp pack."""
    objects = root / ".git" / "objects"
    return sorted(str(path.relative_to(objects)) for path in objects.rglob("*"))


def test_a_signed_change_is_imported_under_its_run_ref_and_result_branch(tmp_path: Path,
                                                                        source: tuple[Path, str]) -> None:
    root, base = source
    home, found, pack = _agent_commit(tmp_path, source)
    result = _signed(home, found)
    imported = _import(root, result["change"], pack, base)
    assert imported.branch == "taskrun/t" and imported.note is None
    assert not [name for name in _objects(root) if name.startswith("incoming-")]  # the quarantine is gone
    assert git(root, "rev-parse", "refs/taskrun/runs/run-1").strip() == found["commit"]
    assert git(root, "rev-parse", "refs/heads/taskrun/t").strip() == found["commit"]


def test_a_pack_whose_digest_or_size_is_not_the_signed_one_is_refused_unread(tmp_path: Path,
                                                                             source: tuple[Path, str]) -> None:
    root, base = source
    home, found, pack = _agent_commit(tmp_path, source)
    before = _refs(root)
    with pytest.raises(ChangeRejected, match="does not match"):
        _import(root, _signed(home, found)["change"], pack[:-1] + bytes([pack[-1] ^ 1]), base)
    with pytest.raises(ChangeRejected, match="does not match"):
        _import(root, _signed(home, found)["change"], pack + b"x", base)
    assert _refs(root) == before


def test_an_oversized_change_is_refused(tmp_path: Path, source: tuple[Path, str]) -> None:
    root, base = source
    home, found, pack = _agent_commit(tmp_path, source)
    with pytest.raises(ChangeRejected, match="max_result_bytes"):
        _import(root, _signed(home, found)["change"], pack, base, max_bytes=len(pack) - 1)


def test_a_corrupt_object_is_refused_and_nothing_is_referenced(tmp_path: Path, source: tuple[Path, str]) -> None:
    root, base = source
    scratch = tmp_path / "scratch"
    subprocess.run(["git", "clone", "-q", str(root), str(scratch)], check=True)
    blob = git(scratch, "rev-parse", "HEAD:README.md").strip()
    raw = bytes.fromhex(blob)
    # A tree naming one entry twice: git's object checks (duplicateEntries) refuse it.
    bad_tree = subprocess.run(["git", "-C", str(scratch), "hash-object", "-w", "-t", "tree", "--literally", "--stdin"],
                              input=b"100644 a\0" + raw + b"100644 a\0" + raw, capture_output=True,
                              check=True).stdout.decode().strip()
    commit = subprocess.run(["git", "-C", str(scratch), "commit-tree", bad_tree, "-p", base, "-m", "bad"],
                            capture_output=True, check=True, text=True).stdout.strip()
    pack = _pack(scratch, f"{commit}\n^{base}\n")
    home = tmp_path / "w"
    found = {"commit": commit, "base": base, "sha256": hashlib.sha256(pack).hexdigest(), "size": len(pack)}
    before, objects = _refs(root), _objects(root)
    with pytest.raises(ChangeRejected, match="object checks"):
        _import(root, _signed(home, found)["change"], pack, base)
    assert _refs(root) == before and _objects(root) == objects


def test_a_commit_whose_parent_is_not_the_base_is_refused(tmp_path: Path, source: tuple[Path, str]) -> None:
    root, base = source
    scratch = tmp_path / "scratch"
    subprocess.run(["git", "clone", "-q", str(root), str(scratch)], check=True)
    git(scratch, "config", "user.name", "U")
    git(scratch, "config", "user.email", "u@example.com")
    middle = _commit(scratch, "a.txt", "a")
    top = _commit(scratch, "b.txt", "b")
    pack = _pack(scratch, f"{top}\n^{base}\n")
    found = {"commit": top, "base": base, "sha256": hashlib.sha256(pack).hexdigest(), "size": len(pack)}
    before, objects = _refs(root), _objects(root)
    with pytest.raises(ChangeRejected, match="not the base commit"):
        _import(root, _signed(tmp_path / "w", found)["change"], pack, base)
    assert _refs(root) == before and middle
    assert _objects(root) == objects  # the refused pack's objects never joined the clone's


def test_only_the_signed_commit_is_referenced_whatever_else_the_pack_holds(tmp_path: Path,
                                                                          source: tuple[Path, str]) -> None:
    root, base = source
    scratch = tmp_path / "scratch"
    subprocess.run(["git", "clone", "-q", str(root), str(scratch)], check=True)
    git(scratch, "config", "user.name", "U")
    git(scratch, "config", "user.email", "u@example.com")
    signed = _commit(scratch, "a.txt", "a")
    git(scratch, "checkout", "-q", "-b", "other", base)
    extra = _commit(scratch, "main-takeover.txt", "x")  # would a Worker like it on main?
    pack = _pack(scratch, f"{signed}\n{extra}\n^{base}\n")
    found = {"commit": signed, "base": base, "sha256": hashlib.sha256(pack).hexdigest(), "size": len(pack)}
    imported = _import(root, _signed(tmp_path / "w", found)["change"], pack, base)
    assert imported.commit == signed
    refs = _refs(root)
    assert extra not in refs
    assert git(root, "rev-parse", "HEAD").strip() == base


def test_a_change_on_a_failed_result_or_a_base_that_is_not_the_runs_is_refused(tmp_path: Path,
                                                                              source: tuple[Path, str]) -> None:
    root, base = source
    home, found, pack = _agent_commit(tmp_path, source)
    with pytest.raises(ChangeRejected, match="builds on"):
        _import(root, _signed(home, {**found, "base": "f" * 40})["change"], pack, base)


def test_a_persons_commit_on_the_result_branch_stays(tmp_path: Path, source: tuple[Path, str]) -> None:
    root, base = source
    git(root, "branch", "taskrun/t", base)
    person = _commit(root, "person.txt", "mine")
    git(root, "update-ref", "refs/heads/taskrun/t", person)
    home, found, pack = _agent_commit(tmp_path, source)
    imported = _import(root, _signed(home, found)["change"], pack, base)
    assert imported.branch is None and "someone pushed" in (imported.note or "")
    assert git(root, "rev-parse", "refs/heads/taskrun/t").strip() == person
    assert git(root, "rev-parse", "refs/taskrun/runs/run-1").strip() == found["commit"]



def test_a_run_ref_that_cannot_be_written_is_a_git_error_not_a_refusal_of_the_change(
        tmp_path: Path, source: tuple[Path, str]) -> None:
    # git says only "couldn't write '<ref>.lock'" when the disk is full (or a lock is left): nothing names
    # another commit, so the change is not judged; the caller looks at the disk (sessions._take_change).
    from taskrunner.errors import GitError
    root, base = source
    home, found, pack = _agent_commit(tmp_path, source)
    lock = root / ".git" / "refs" / "taskrun" / "runs" / "run-1.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    with pytest.raises(GitError) as raised:
        _import(root, _signed(home, found)["change"], pack, base)
    assert not isinstance(raised.value, ChangeRejected) and "already names" not in str(raised.value)
    lock.unlink()
    imported = _import(root, _signed(home, found)["change"], pack, base)  # taken again: it lands
    assert imported.branch == "taskrun/t"
    assert git(root, "rev-parse", "refs/taskrun/runs/run-1").strip() == found["commit"]


def test_a_result_branch_that_cannot_be_written_is_said_so_or_waits_for_room(
        tmp_path: Path, source: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A branch nobody moved whose lock cannot be written is not "kept moving": on a full disk the import
    # waits for room (GitError to the caller); otherwise the note says what git said.
    from taskrunner import diskspace
    from taskrunner.errors import GitError
    root, base = source
    home, found, pack = _agent_commit(tmp_path, source)
    lock = root / ".git" / "refs" / "heads" / "taskrun" / "t.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    with monkeypatch.context() as full:
        full.setattr(diskspace, "has_room", lambda path, need=0: False)
        with pytest.raises(GitError) as raised:
            _import(root, _signed(home, found)["change"], pack, base)
        assert not isinstance(raised.value, ChangeRejected)
    imported = _import(root, _signed(home, found)["change"], pack, base)  # taken again, with room: a note
    assert imported.branch is None and "could not be moved" in (imported.note or ""), imported
    assert "kept moving" not in (imported.note or "")
    lock.unlink()
    imported = _import(root, _signed(home, found)["change"], pack, base)  # the lock gone: the branch moves
    assert imported.branch == "taskrun/t"
    assert git(root, "rev-parse", "refs/heads/taskrun/t").strip() == found["commit"]

def test_the_cache_objects_are_bound_read_only_into_the_sandbox() -> None:
    host = HostView("/usr/bin/bwrap", None, (), root=False)
    argv = bwrap_argv(host, RunSandbox("/w/ws", "/w/home", shared=("/h/repos/x.git/objects",)), ["true"])
    at = argv.index("/h/repos/x.git/objects")
    assert argv[at - 1] == "--ro-bind" and argv[at + 1] == "/h/repos/x.git/objects"


# -- the Worker's screen of an assignment carrying a pack ----------------------------------------


def _screen(home: Path, message: bytes) -> tuple[list[dict[str, Any]], list[object]]:
    """What the Worker's reader thread makes of `message` (an authenticated session)."""
    sent: list[dict[str, Any]] = []
    passed: list[object] = []
    inbound = Inbound(Reader(io.BytesIO(message)), lambda kind, **f: sent.append({"type": kind, **f}),
                      home, TrustStore(home), worker_key(home).key_id, new_challenge(), bundle.Limits())
    inbound.authenticated = True
    inbound.run(passed.append)
    return sent, passed


@pytest.mark.parametrize("tamper, reason", [
    (None, None),
    (lambda payload: payload[:-1] + bytes([payload[-1] ^ 1]), "repository pack does not match"),
    (lambda payload: payload + b"x", "payload bytes sent, the signed manifest says"),
])
def test_an_assignment_carries_its_pack_after_the_archive_and_the_worker_checks_its_signed_hash(
        tmp_path: Path, source: tuple[Path, str], tamper: Any, reason: str | None) -> None:
    root, base = source
    home = tmp_path / "worker"
    plane = enroll(home, tmp_path / "cp")
    pack = _pack(root, f"{base}\n")
    repo = {"id": "a" * 32, "base": base, "sha256": hashlib.sha256(pack).hexdigest(), "size": len(pack),
            "prerequisites": []}
    built = plane.bundle("run-pack", base_commit=base, repo=repo)
    payload = built.archive + pack
    sent, passed = _screen(home, encode(Message("assign", {"run_id": "run-pack", "envelope": built.envelope},
                                                tamper(payload) if tamper else payload)))
    if reason is None:
        assert sent == [] and isinstance(passed[0], Assignment)
        assert passed[0].archive == built.archive and passed[0].pack == pack
    else:
        assert passed == [] and len(sent) == 1 and reason in sent[0]["message"]


def test_no_repack_replaces_the_caches_packs_while_a_checkout_or_a_collection_reads_them(tmp_path: Path,
                                                                                           monkeypatch: pytest.MonkeyPatch
                                                                                           ) -> None:
    cache = ObjectCache(tmp_path, "0" * 32)
    cache.ensure()
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr("taskrunner.gitflow.cache.REPACK_AT", 0)
    monkeypatch.setattr("taskrunner.gitflow.cache.git", lambda path, *args, **kw: calls.append(args) or b"")
    with cache.lock():  # a checkout in another session of this Worker
        with cache.lock(exclusive=True) as held:
            assert held is False
        cache._consolidate()
        assert calls == []
    cache._consolidate()
    assert calls and calls[0][:2] == ("repack", "-a")


# -- the Task's directory and the context index never come back (agents/workspace.py) ---------

_TASK = b"---\nagent: claude\ncontext: [src/app.txt]\n---\n# Do the thing\n\nChange it.\n"


def _with_task_dir(tmp_path: Path, source: tuple[Path, str], preset: str = "claude",
                   own_index: str | None = None) -> tuple[Path, Path, dict[str, Any]]:
    """A checkout with the Task file laid over it and `write_task_dir` done, as the Worker does before
    the Agent starts; `own_index`: the repository's own index file, committed at the base."""
    root, base = source
    if own_index is not None:
        base = _commit(root, workspace.INDEX_FILES[preset], own_index)
    _, run_dir, cache, base = _checkout(tmp_path, (root, base))
    checkout = run_dir / "workspace"
    (checkout / "tasks").mkdir()
    (checkout / "tasks" / "t.md").write_bytes(_TASK)
    laid = [{"path": "tasks/t.md", "sha256": hashlib.sha256(_TASK).hexdigest(), "size": len(_TASK)}]
    manifest = {**_manifest(base, cache.repo_id, laid), "agent": {"name": preset, "preset": preset},
                "run_number": 3, "attempt": 2}
    workspace.write_task_dir(checkout, manifest, parse_task("t", "tasks/t.md", _TASK), preset)
    return run_dir, checkout, manifest


def _names(root: Path, found: dict[str, Any], run_dir: Path) -> list[str]:
    subprocess.run(["git", "-C", str(root), "index-pack", "--stdin", "--strict"], input=change.read_pack(run_dir),
                   check=True, capture_output=True)
    return sorted(filter(None, git(root, "diff", "--name-status", found["base"], found["commit"]).split("\n")))


@pytest.mark.parametrize("preset", ["claude", "codex", "gemini", "aider"])
def test_a_run_that_changed_nothing_but_what_taskrun_wrote_returns_no_change(
        tmp_path: Path, source: tuple[Path, str], preset: str) -> None:
    run_dir, checkout, manifest = _with_task_dir(tmp_path, source, preset)
    assert (checkout / ".task" / "t" / "run-3" / "prompt.md").is_file()
    assert change.collect(run_dir, checkout, manifest, [], "w1") is None


def test_the_task_directory_and_a_created_index_file_are_never_in_the_change(
        tmp_path: Path, source: tuple[Path, str]) -> None:
    run_dir, checkout, manifest = _with_task_dir(tmp_path, source)
    assert (checkout / "CLAUDE.md").is_file()
    (checkout / "new.txt").write_text("new\n")
    (checkout / ".task" / "t" / "run-3" / "notes.md").write_text("the Agent's scratch\n")
    found = change.collect(run_dir, checkout, manifest, [], "w1")
    assert found is not None
    assert _names(source[0], found, run_dir) == ["A\tnew.txt"]


def test_the_repositorys_own_claude_md_comes_back_untouched(tmp_path: Path, source: tuple[Path, str]) -> None:
    run_dir, checkout, manifest = _with_task_dir(tmp_path, source, own_index="# Our rules\n")
    assert (checkout / "CLAUDE.md").read_text().startswith("# Our rules\n\n" + workspace.BEGIN)
    (checkout / "src" / "app.txt").write_text("v2\n")
    found = change.collect(run_dir, checkout, manifest, [], "w1")
    assert found is not None
    assert _names(source[0], found, run_dir) == ["M\tsrc/app.txt"]


def test_an_agents_own_edit_of_claude_md_is_kept_without_taskruns_section(
        tmp_path: Path, source: tuple[Path, str]) -> None:
    run_dir, checkout, manifest = _with_task_dir(tmp_path, source, own_index="# Our rules\n")
    text = (checkout / "CLAUDE.md").read_text()
    (checkout / "CLAUDE.md").write_text("# Our rules\n- test first\n" + text[len("# Our rules\n"):]
                                        + "- then lint\n")
    found = change.collect(run_dir, checkout, manifest, [], "w1")
    assert found is not None
    root = source[0]
    assert _names(root, found, run_dir) == ["M\tCLAUDE.md"]
    assert git(root, "show", f"{found['commit']}:CLAUDE.md") == "# Our rules\n- test first\n- then lint\n"


def test_an_index_file_the_agent_wrote_into_when_the_repository_had_none_comes_back_without_the_section(
        tmp_path: Path, source: tuple[Path, str]) -> None:
    run_dir, checkout, manifest = _with_task_dir(tmp_path, source, preset="codex")
    with open(checkout / "AGENTS.md", "a") as handle:
        handle.write("Build with `make`.\n")
    found = change.collect(run_dir, checkout, manifest, [], "w1")
    assert found is not None
    root = source[0]
    assert _names(root, found, run_dir) == ["A\tAGENTS.md"]
    assert git(root, "show", f"{found['commit']}:AGENTS.md") == "Build with `make`.\n"
