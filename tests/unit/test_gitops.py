"""gitops.Git on real repositories: commits that never touch the user's work."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

import taskrunner
from taskrunner import gitops
from taskrunner.errors import GitError
from taskrunner.gitops import FALLBACK_IDENTITY, Git, command, toplevel

USER = ("Repo User", "user@example.com")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture(autouse=True)
def isolated_git_config(isolated_git: Path) -> Path:
    """Every test here runs with the shared isolated git configuration."""
    return isolated_git


def make_repo(path: Path, identity: bool = True) -> Path:
    path.mkdir()
    git(path, "init", "--quiet", "--initial-branch=main")
    if identity:
        git(path, "config", "user.name", USER[0])
        git(path, "config", "user.email", USER[1])
    return path


@pytest.fixture()
def empty_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture()
def repo(empty_repo: Path) -> Path:
    (empty_repo / "README.md").write_text("readme\n")
    (empty_repo / "src.py").write_text("print(1)\n")
    git(empty_repo, "add", "README.md", "src.py")
    git(empty_repo, "commit", "--quiet", "-m", "initial")
    return empty_repo


def write(repo: Path, rel: str, text: str) -> str:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return rel


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def changed_in(repo: Path, commit: str) -> list[str]:
    return sorted(git(repo, "diff-tree", "--root", "--no-commit-id", "-r", "--name-only", commit).split())


def commit_count(repo: Path) -> int:
    return int(git(repo, "rev-list", "--count", "HEAD").strip())


# ---------------------------------------------------------------- what is committed


def test_commit_paths_commits_exactly_the_given_paths(repo: Path) -> None:
    ours = [write(repo, "runs/t/status.json", "{}\n"), write(repo, "runs/t/run-1/output.log", "hi\n")]
    write(repo, "runs/other/status.json", "{}\n")  # written, but not ours to commit now
    write(repo, "notes.txt", "user file\n")
    sha = Git(repo).commit_paths(ours, "taskrun: record t")
    assert sha == head(repo)
    assert changed_in(repo, sha) == sorted(ours)
    assert git(repo, "show", f"{sha}:runs/t/run-1/output.log") == "hi\n"
    assert git(repo, "log", "-1", "--format=%B", sha).strip() == "taskrun: record t"
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    assert "?? notes.txt" in status
    assert "?? runs/other/status.json" in status


def test_the_commit_keeps_every_other_file_of_the_previous_head(repo: Path) -> None:
    sha = Git(repo).commit_paths([write(repo, "runs/t/status.json", "{}\n")], "m")
    assert sorted(git(repo, "ls-tree", "-r", "--name-only", sha).split()) == [
        "README.md", "runs/t/status.json", "src.py"]


def test_users_staged_and_unstaged_changes_stay_exactly_as_they_were(repo: Path) -> None:
    (repo / "README.md").write_text("readme, staged edit\n")
    git(repo, "add", "README.md")
    (repo / "README.md").write_text("readme, staged edit\nplus an unstaged line\n")
    (repo / "src.py").write_text("print(2)  # unstaged\n")
    write(repo, "new_staged.py", "x = 1\n")
    git(repo, "add", "new_staged.py")
    cached_before, diff_before = git(repo, "diff", "--cached"), git(repo, "diff")
    tracked_before = git(repo, "status", "--porcelain", "--untracked-files=no")

    paths = [write(repo, "runs/t/status.json", '{"status": "COMPLETED"}\n'),
             write(repo, "runs/t/run-1/output.log", "out\n")]
    sha = Git(repo).commit_paths(paths, "taskrun: t COMPLETED")

    assert sha is not None
    assert git(repo, "diff", "--cached") == cached_before
    assert git(repo, "diff") == diff_before
    assert changed_in(repo, sha) == sorted(paths)
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    assert not [line for line in status.splitlines() if "runs/" in line], status
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == tracked_before
    assert sorted(tracked_before.splitlines()) == [" M src.py", "A  new_staged.py", "MM README.md"]


def test_the_users_staged_change_is_not_part_of_the_daemons_commit(repo: Path) -> None:
    (repo / "src.py").write_text("print('staged')\n")
    git(repo, "add", "src.py")
    sha = Git(repo).commit_paths([write(repo, "runs/t/status.json", "{}\n")], "m")
    assert git(repo, "show", f"{sha}:src.py") == "print(1)\n"
    assert git(repo, "diff", "--cached", "--name-only").split() == ["src.py"]


def test_git_status_shows_nothing_for_committed_paths_after_several_commits(repo: Path) -> None:
    g = Git(repo)
    path = "runs/t/run-1/output.log"
    for text in ("a\n", "a\nb\n", "a\nb\nc\n"):
        write(repo, path, text)
        assert g.commit_paths([path], f"log {len(text)}") is not None
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(repo, "show", f"HEAD:{path}") == "a\nb\nc\n"


def test_a_deleted_path_is_committed_as_a_deletion(repo: Path) -> None:
    g = Git(repo)
    path = write(repo, "runs/t/run-1/summary.md", "sum\n")
    g.commit_paths([path], "add")
    (repo / path).unlink()
    sha = g.commit_paths([path], "remove")
    assert sha is not None
    assert path not in git(repo, "ls-tree", "-r", "--name-only", sha).split()
    assert git(repo, "status", "--porcelain") == ""


def test_commit_paths_works_in_a_repository_with_no_commits_yet(empty_repo: Path) -> None:
    write(empty_repo, "user.txt", "staged by the user\n")
    git(empty_repo, "add", "user.txt")
    cached_before = git(empty_repo, "diff", "--cached", "--name-status")
    g = Git(empty_repo)
    assert g.head() is None
    sha = g.commit_paths([write(empty_repo, "runs/t/status.json", "{}\n")], "first record")
    assert sha is not None and sha == head(empty_repo)
    assert git(empty_repo, "rev-list", "--parents", "-n", "1", sha).split() == [sha]  # a root commit
    assert git(empty_repo, "ls-tree", "-r", "--name-only", sha).split() == ["runs/t/status.json"]
    assert git(empty_repo, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    # The user's staged file is still staged (now as an addition against the new HEAD).
    assert git(empty_repo, "diff", "--cached", "--name-status") == cached_before
    status = git(empty_repo, "status", "--porcelain")
    assert "runs/" not in status


def test_commit_paths_returns_none_when_nothing_changed(repo: Path) -> None:
    g = Git(repo)
    path = write(repo, "runs/t/status.json", "{}\n")
    first = g.commit_paths([path], "first")
    assert first is not None
    assert g.commit_paths([path], "again") is None
    assert head(repo) == first
    assert g.commit_paths(["README.md"], "committed file untouched") is None
    assert head(repo) == first


# ---------------------------------------------------------------- compare-and-swap


def test_the_commit_parent_is_the_previous_head(repo: Path) -> None:
    before = head(repo)
    sha = Git(repo).commit_paths([write(repo, "runs/t/status.json", "{}\n")], "m")
    assert git(repo, "rev-parse", f"{sha}^").strip() == before


def test_no_commit_is_lost_when_the_user_commits_between_two_daemon_commits(repo: Path) -> None:
    g = Git(repo)
    first = g.commit_paths([write(repo, "runs/a/status.json", "{}\n")], "daemon 1")
    (repo / "src.py").write_text("print('user')\n")
    git(repo, "commit", "--quiet", "-am", "user work")
    user_commit = head(repo)
    second = g.commit_paths([write(repo, "runs/b/status.json", "{}\n")], "daemon 2")
    assert second == head(repo)
    assert git(repo, "rev-parse", f"{second}^").strip() == user_commit
    assert git(repo, "rev-parse", f"{user_commit}^").strip() == first
    assert git(repo, "log", "--format=%s").split("\n")[:3] == ["daemon 2", "user work", "daemon 1"]
    assert git(repo, "show", f"{second}:src.py") == "print('user')\n"
    assert git(repo, "show", f"{second}:runs/a/status.json") == "{}\n"


def test_a_head_that_moves_during_the_commit_is_not_overwritten(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HEAD moves after commit_paths read it but before update-ref: the CAS refuses, it rebuilds."""
    g = Git(repo)
    original_run = g.run
    moved = []

    def run(*args: str, env: dict[str, str] | None = None) -> str:
        if args[0] == "update-ref" and not moved:
            moved.append(True)
            (repo / "src.py").write_text("print('racing user')\n")
            git(repo, "commit", "--quiet", "-am", "racing user commit")
        return original_run(*args, env=env)

    monkeypatch.setattr(g, "run", run)
    sha = g.commit_paths([write(repo, "runs/t/status.json", "{}\n")], "daemon")
    assert moved
    assert sha == head(repo)
    assert git(repo, "log", "--format=%s").split("\n")[:3] == ["daemon", "racing user commit", "initial"]
    assert git(repo, "show", f"{sha}:src.py") == "print('racing user')\n"


def test_the_reflog_names_taskrun_as_the_mover_of_head(repo: Path) -> None:
    Git(repo).commit_paths([write(repo, "runs/t/status.json", "{}\n")], "m")
    assert "taskrun: record Runs" in git(repo, "reflog", "-1", "--format=%gs", "main")


# ---------------------------------------------------------------- identity


def test_a_repository_user_identity_is_used_when_configured(repo: Path) -> None:
    sha = Git(repo).commit_paths([write(repo, "runs/t/status.json", "{}\n")], "m")
    assert git(repo, "log", "-1", "--format=%an <%ae>|%cn <%ce>", sha).strip() == (
        f"{USER[0]} <{USER[1]}>|{USER[0]} <{USER[1]}>")


def test_a_repository_without_user_identity_falls_back_to_the_taskrun_identity(
        tmp_path: Path, isolated_git_config: Path) -> None:
    bare = make_repo(tmp_path / "noident", identity=False)
    assert subprocess.run(["git", "config", "user.name"], cwd=bare, capture_output=True).returncode != 0
    sha = Git(bare).commit_paths([write(bare, "runs/t/status.json", "{}\n")], "m")
    assert sha is not None
    expected = f"{FALLBACK_IDENTITY['name']} <{FALLBACK_IDENTITY['email']}>"
    assert git(bare, "log", "-1", "--format=%an <%ae>|%cn <%ce>", sha).strip() == f"{expected}|{expected}"
    assert list(isolated_git_config.iterdir()) == []  # nothing written to the user's global config
    assert subprocess.run(["git", "config", "user.name"], cwd=bare, capture_output=True).returncode != 0


# ---------------------------------------------------------------- errors and helpers


def test_git_failures_are_raised_as_git_error(repo: Path) -> None:
    with pytest.raises(GitError, match="git rev-parse failed"):
        Git(repo).run("rev-parse", "--verify", "no-such-ref")


def test_commit_paths_outside_a_repository_raises_git_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_text("x")
    with pytest.raises(GitError):
        Git(plain).commit_paths(["f"], "m")


def test_toplevel_finds_the_repository_root_from_a_subdirectory(repo: Path, tmp_path: Path) -> None:
    sub = repo / "a" / "b"
    sub.mkdir(parents=True)
    assert toplevel(sub) == repo.resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    assert toplevel(outside) is None


def test_log_lists_recent_subjects_and_is_empty_without_commits(empty_repo: Path) -> None:
    g = Git(empty_repo)
    assert g.log() == []
    g.commit_paths([write(empty_repo, "runs/t/status.json", "{}\n")], "subject line\n\nbody")
    [line] = g.log()
    assert line.endswith(" subject line")



def test_a_listed_path_with_no_file_is_left_out_of_the_commit(repo: Path) -> None:
    write(repo, "runs/t/status.json", "{}\n")
    sha = Git(repo).commit_paths(["runs/t/status.json", "runs/t/run-1/summary.md"], "records")
    assert sha is not None
    assert changed_in(repo, sha) == ["runs/t/status.json"]


# ---------------------------------------------------------------- how objects are stored


def loose_objects(repo: Path) -> int:
    return int(dict(line.split(": ") for line in git(repo, "count-objects", "-v").splitlines())["count"])


def test_a_commit_writes_one_pack_not_a_loose_file_per_object(repo: Path) -> None:
    before = loose_objects(repo)
    paths = [write(repo, f"runs/t{n}/{name}", f"{n} {name}\n") for n in range(20)
             for name in ("status.json", "run-1/status.json", "run-1/output.log")]
    sha = Git(repo).commit_paths(paths, "twenty Runs")
    assert sha is not None
    assert loose_objects(repo) == before  # 60 blobs, 41 trees and a commit, none of them loose
    assert git(repo, "cat-file", "-t", sha).strip() == "commit"
    assert git(repo, "show", f"{sha}:runs/t7/run-1/output.log") == "7 run-1/output.log\n"
    assert git(repo, "fsck", "--no-dangling").strip() == ""


def test_paths_with_spaces_quotes_backslashes_and_non_ascii_are_committed_as_named(repo: Path) -> None:
    names = ['runs/a b/status.json', 'runs/"q"/status.json', 'runs/back\\slash/status.json', "runs/ü/status.json"]
    paths = [write(repo, name, f"{name}\n") for name in names]
    sha = Git(repo).commit_paths(paths, "odd names")
    committed = git(repo, "-c", "core.quotePath=false", "ls-tree", "-r", "-z", "--name-only", sha).split("\0")
    assert sorted(p for p in committed if p.startswith("runs/")) == sorted(names)
    assert git(repo, "show", f"{sha}:runs/ü/status.json") == "runs/ü/status.json\n"


def test_gc_auto_folds_the_packs_of_many_commits_together(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("taskrunner.gitops.GC_EVERY_COMMITS", 1)
    git(repo, "config", "gc.autoPackLimit", "4")
    git(repo, "config", "gc.autoDetach", "false")
    g = Git(repo)
    for n in range(8):
        assert g.commit_paths([write(repo, f"runs/t{n}/status.json", f"{n}\n")], f"commit {n}") is not None
    packs = list((repo / ".git" / "objects" / "pack").glob("*.pack"))
    assert 1 <= len(packs) <= 4, packs
    assert git(repo, "show", "HEAD~7:runs/t0/status.json") == "0\n"


# ---------------------------------------------------------------- the repository's hooks and programs


HOOKED = ("reference-transaction", "pre-auto-gc", "post-index-change", "fsmonitor")


def test_no_hook_or_monitor_program_the_repository_names_runs_for_the_daemons_git(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `core.hooksPath hooks` points git at the work tree, which anyone who can push controls.
    marks = tmp_path / "ran"
    marks.mkdir()
    (repo / "hooks").mkdir()
    for name in HOOKED:
        hook = repo / "hooks" / name
        # A monitor that fails makes git look at every file itself; a hook that fails would stop the git command.
        hook.write_text(f"#!/bin/sh\ntouch {marks / name}\ncat >/dev/null\nexit {1 if name == 'fsmonitor' else 0}\n")
        hook.chmod(0o755)
    git(repo, "config", "core.hooksPath", "hooks")
    git(repo, "config", "core.fsmonitor", str(repo / "hooks" / "fsmonitor"))
    git(repo, "config", "gc.autoPackLimit", "1")
    git(repo, "config", "gc.autoDetach", "false")
    monkeypatch.setattr("taskrunner.gitops.GC_EVERY_COMMITS", 1)
    g = Git(repo)

    for n in range(3):  # update-ref, update-index, and gc --auto once packs pile up
        assert g.commit_paths([write(repo, f"runs/t{n}/status.json", f"{n}\n")], f"commit {n}") is not None
    g.log()
    g.head()

    assert sorted(p.name for p in marks.iterdir()) == []
    assert git(repo, "show", "HEAD:runs/t2/status.json") == "2\n"
    # git itself runs them: the same repository with a plain `git` call proves the hooks work.
    git(repo, "update-ref", "refs/heads/probe", "HEAD")
    assert (marks / "reference-transaction").exists()


def test_every_git_command_of_the_package_goes_through_the_safe_argv() -> None:
    # A new `["git", ...]` argv anywhere in the package would run the repository's hooks again.
    package = Path(taskrunner.__file__).parent
    argv = re.compile(r"""[\[(]\s*["']git["']\s*[,\]]""")
    offenders = [f"{path.relative_to(package)}:{n}" for path in sorted(package.rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if argv.search(line) and "SAFE_CONFIG" not in line]
    assert offenders == []
    assert command("status")[:5] == ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]


# ---------------------------------------------------------------- the user's index.lock (issue 11, finding 1)


def porcelain(repo: Path, *paths: str) -> str:
    return git(repo, "status", "--porcelain", "--", *paths)


def test_commits_left_unrefreshed_are_set_in_the_index_by_one_later_refresh(repo: Path) -> None:
    # The recorder's batches in a row: git rewrites the whole index for any change, so one refresh for several.
    g = Git(repo)
    first = g.commit_paths([write(repo, "runs/a/status.json", "{}\n")], "a", refresh=False)
    second = g.commit_paths([write(repo, "runs/b/status.json", "{}\n")], "b", refresh=False)
    assert second == head(repo) and first is not None
    assert git(repo, "ls-files", "runs/") == ""  # untouched until the refresh
    assert set(g.index_pending) == {"runs/a/status.json", "runs/b/status.json"}
    assert g.refresh_index() is True
    assert g.index_pending == {} and g.recommit == set()
    assert porcelain(repo, "runs/") == ""
    assert git(repo, "ls-files", "runs/").split() == ["runs/a/status.json", "runs/b/status.json"]


def test_a_held_index_lock_keeps_the_refresh_pending_and_a_later_refresh_sets_what_was_committed(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "INDEX_LOCK_WAIT_SECONDS", 0.05)
    g = Git(repo)
    lock = repo / ".git" / "index.lock"
    lock.write_text("")  # an IDE holding the index
    sha = g.commit_paths([write(repo, "runs/t/status.json", "{}\n"), write(repo, "runs/t/run-1/output.log", "x\n")],
                         "m")
    assert sha == head(repo)
    assert set(g.index_pending) == {"runs/t/status.json", "runs/t/run-1/output.log"}
    lock.unlink()
    # What was committed goes into the index, not what the work tree holds now.
    write(repo, "runs/t/run-1/output.log", "x\nmore\n")
    assert g.refresh_index() is True
    assert g.index_pending == {}
    assert porcelain(repo, "runs/") == " M runs/t/run-1/output.log\n"
    assert git(repo, "ls-files", "-s", "runs/t/status.json").split()[1] == git(
        repo, "rev-parse", f"{sha}:runs/t/status.json").strip()


def test_a_lock_held_longer_than_any_wait_loses_nothing_and_a_user_commit_after_it_keeps_the_records(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "INDEX_LOCK_WAIT_SECONDS", 0.02)
    g = Git(repo)
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    g.commit_paths([write(repo, "runs/a/status.json", "{}\n")], "m1")
    for _ in range(5):
        assert g.refresh_index() is False  # still held: pending, never given up
    assert "runs/a/status.json" in g.index_pending
    lock.unlink()
    assert g.refresh_index() is True
    assert porcelain(repo, "runs/") == ""
    write(repo, "notes.txt", "mine\n")
    git(repo, "add", "notes.txt")
    git(repo, "commit", "--quiet", "-m", "user commit")
    assert git(repo, "show", "HEAD:runs/a/status.json") == "{}\n"


def test_a_lock_appearing_between_the_commit_and_the_refresh_keeps_the_refresh_pending(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "INDEX_LOCK_WAIT_SECONDS", 0.02)
    g = Git(repo)
    original_run = g.run
    lock = repo / ".git" / "index.lock"

    def run(*args: str, env: dict[str, str] | None = None) -> str:
        out = original_run(*args, env=env)
        if args[0] == "update-ref":
            lock.write_text("")  # the user's git takes the index right after HEAD moved
        return out

    monkeypatch.setattr(g, "run", run)
    g.commit_paths([write(repo, "runs/b/status.json", "{}\n")], "m")
    assert "runs/b/status.json" in g.index_pending
    lock.unlink()
    assert g.refresh_index() is True
    assert porcelain(repo, "runs/") == ""


def test_records_a_user_commit_removed_while_the_refresh_was_pending_are_listed_to_commit_again(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "INDEX_LOCK_WAIT_SECONDS", 0.02)
    g = Git(repo)
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    g.commit_paths([write(repo, "runs/c/status.json", "{}\n")], "m")
    lock.unlink()
    # The user's commit, from an index that lacks the record, deletes it from HEAD.
    write(repo, "notes.txt", "mine\n")
    git(repo, "add", "notes.txt")
    git(repo, "commit", "--quiet", "-m", "user commit")
    assert "runs/c/status.json" not in git(repo, "ls-tree", "-r", "--name-only", "HEAD")
    assert g.refresh_index() is True
    assert g.recommit == {"runs/c/status.json"}
    g.commit_paths(sorted(g.recommit), "restore")
    assert git(repo, "show", "HEAD:runs/c/status.json") == "{}\n"
    assert git(repo, "show", "HEAD:notes.txt") == "mine\n"
    assert porcelain(repo) == ""


def test_head_moving_on_every_attempt_raises_git_error_and_changes_nothing(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitops, "COMMIT_ATTEMPTS", 3)
    g = Git(repo)
    original_run = g.run

    def run(*args: str, env: dict[str, str] | None = None) -> str:
        if args[0] == "update-ref":
            (repo / "src.py").write_text(f"print({time.monotonic()})\n")
            git(repo, "commit", "--quiet", "-am", "racing user commit")
        return original_run(*args, env=env)

    monkeypatch.setattr(g, "run", run)
    before = head(repo)
    with pytest.raises(GitError, match="HEAD kept moving"):
        g.commit_paths([write(repo, "runs/t/status.json", "{}\n")], "daemon")
    assert git(repo, "rev-list", "--count", f"{before}..HEAD").strip() == "3"
    assert "runs/t/status.json" not in git(repo, "ls-tree", "-r", "--name-only", "HEAD")
    assert g.index_pending == {}


def test_a_clone_whose_path_holds_a_set_variable_or_a_tilde_is_the_repository_git_runs_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_ELSEWHERE", str(tmp_path / "elsewhere"))
    for name in ("$TASKRUN_ELSEWHERE", "~"):
        root = tmp_path / name / "repo"
        root.mkdir(parents=True)
        gitops.init(root)
        assert (root / ".git").is_dir()
        sha = Git(root).commit_paths([write(root, "runs/t/status.json", "{}\n")], "m")
        assert sha is not None and git(root, "rev-parse", "HEAD").strip() == sha
    assert not (tmp_path / "elsewhere").exists()


def test_a_work_tree_whose_path_ends_in_a_space_is_found_as_it_is(tmp_path: Path) -> None:
    root = tmp_path / "trail "
    root.mkdir()
    subprocess.run(["git", "init", "--quiet", str(root)], check=True)
    assert toplevel(root) == root.resolve()
    assert gitops.git_dirs(root) == (root.resolve() / ".git",)
    assert gitops.state_dir(root) == root.resolve() / ".git" / "taskrun"


def test_head_that_cannot_be_moved_on_a_full_disk_says_so_at_once(repo: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # git's words for a ref lock with no room name no errno; HEAD not moving is no race to try 20 times.
    from taskrunner import diskspace
    write(repo, "a.txt", "a\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-qm", "a")
    branch = git(repo, "symbolic-ref", "HEAD").strip()
    lock = repo / ".git" / f"{branch}.lock"
    lock.write_text("")
    path = write(repo, "runs/t/status.json", "{}\n")
    monkeypatch.setattr(diskspace, "has_room", lambda where, need=0: False)
    with pytest.raises(GitError, match="cannot move HEAD: the disk holding the repository is full"):
        Git(repo).commit_paths([path], "m")
    monkeypatch.setattr(diskspace, "has_room", lambda where, need=0: True)
    lock.unlink()
    assert Git(repo).commit_paths([path], "m")  # room again: committed


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_own_commits_that_is_not_a_regular_file_is_neither_waited_on_nor_written_through(
        repo: Path, tmp_path: Path, kind: str) -> None:
    import os

    from taskrunner.gitops import OWN_COMMITS
    state = repo / ".git" / "taskrun"
    state.mkdir(parents=True, exist_ok=True)
    path = state / OWN_COMMITS
    outside = tmp_path / "outside"
    outside.write_text("")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(outside)
    repository = Git(repo)
    assert repository.own_commits() == set()
    repository.remember_own(["a" * 40])  # a file of its own instead: nothing written through the link
    assert path.is_file() and not path.is_symlink() and outside.read_text() == ""
    assert repository.own_commits() == {"a" * 40}


def test_records_a_user_commit_dropped_between_two_daemon_commits_are_committed_again(repo: Path) -> None:
    # One index refresh for several commits (the recorder's batching): a user's commit made from an index
    # that lacked the first commit's records sits between two of ours; HEAD is then our own second commit.
    write(repo, "a.txt", "a\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-qm", "a")
    daemon = Git(repo)
    first = write(repo, "runs/t1/status.json", "{}\n")
    daemon.commit_paths([first], "t1", refresh=False)
    write(repo, "mine.txt", "mine\n")
    git(repo, "add", "mine.txt")
    git(repo, "commit", "-qm", "mine")  # its index never held runs/t1: the commit removes it
    second = write(repo, "runs/t2/status.json", "{}\n")
    daemon.commit_paths([second], "t2", refresh=False)
    assert "runs/t1/status.json" not in git(repo, "ls-tree", "-r", "--name-only", "HEAD")
    assert daemon.refresh_index()
    assert daemon.recommit == {first}
