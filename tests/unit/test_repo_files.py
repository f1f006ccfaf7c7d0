"""What the daemon reads for a Task (intake.RepoFiles), what it commits (gitops), and what doctor reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from taskrunner import doctor, gitops, intake
from taskrunner.config import default_config, load_config
from taskrunner.errors import ConfigError, TaskFileError
from taskrunner.defaults import MAX_CONTEXT_BYTES
from taskrunner.intake import RepoFiles, _read_at_most, read_task, task_paths
from taskrunner.leaks import holds_private_key
from taskrunner.taskfile import is_git_name, parse_task
from tests.unit.test_safefs import finishes

TASK = b"# A Task\n\n```sh\necho hi\n```\n"
KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def isolated_git_config(isolated_git: Path) -> Path:
    return isolated_git


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "--initial-branch=main")
    git(root, "config", "user.name", "U")
    git(root, "config", "user.email", "u@example.com")
    (root / "tasks").mkdir()
    (root / "README.md").write_text("readme\n")
    git(root, "add", "README.md")
    git(root, "commit", "-qm", "initial")
    (root / ".git" / "taskrun" / "keys").mkdir(parents=True)
    (root / ".git" / "taskrun" / "keys" / "1.pem").write_bytes(KEY)
    return root


@pytest.fixture()
def files(repo: Path) -> RepoFiles:
    return RepoFiles(repo, gitops.git_dirs(repo))


def intake_error(files: RepoFiles, rel: str) -> str:
    intake = read_task(files, "x", rel, default_config())
    assert intake.spec is None and intake.error
    return intake.error


# ---------------------------------------------------------------- Task files


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside.md", "../README.md", "real.md", "nowhere.md"])
def test_a_task_file_that_is_a_link_is_invalid_and_never_read(files: RepoFiles, repo: Path, target: str) -> None:
    (repo.parent / "outside.md").write_bytes(TASK)
    (repo / "tasks" / "real.md").write_bytes(TASK)
    (repo / "tasks" / "x.md").symlink_to(target)
    assert intake_error(files, "tasks/x.md") == (
        "tasks/x.md: the file is a symbolic link; taskrun reads only regular files and follows no links")


def test_a_task_file_under_a_linked_directory_is_invalid(files: RepoFiles, repo: Path) -> None:
    elsewhere = repo.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.md").write_bytes(TASK)
    (repo / "tasks" / "sub").symlink_to(elsewhere)
    assert intake_error(files, "tasks/sub/x.md") == (
        "tasks/sub/x.md: tasks/sub is a symbolic link; taskrun reads only regular files and follows no links")


def test_tasks_itself_a_link_makes_every_task_invalid(files: RepoFiles, repo: Path) -> None:
    (repo / "tasks").rmdir()
    elsewhere = repo.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.md").write_bytes(TASK)
    (repo / "tasks").symlink_to(elsewhere)
    assert "tasks is a symbolic link" in intake_error(files, "tasks/x.md")
    refused: list[str] = []
    assert list(task_paths(files, refused)) == [] and refused and refused[0].startswith("tasks is a symbolic link")


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "device"])
def test_a_task_file_that_is_not_a_regular_file_is_invalid_without_blocking(
        files: RepoFiles, repo: Path, kind: str) -> None:
    path = repo / "tasks" / "x.md"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "directory":
        path.mkdir()
    else:
        try:
            os.mknod(path, 0o020666, os.makedev(1, 3))
        except PermissionError:
            if os.environ.get("CI") == "true":
                raise  # CI runs as root: there the test must run, not skip
            pytest.skip("making a device node needs privileges")
    error = finishes(lambda: intake_error(files, "tasks/x.md"))
    assert error.startswith("tasks/x.md: the file is a ") and "reads only regular files" in error


def test_task_paths_lists_links_and_special_files_but_enters_no_linked_directory(files: RepoFiles,
                                                                                 repo: Path) -> None:
    (repo / "tasks" / "a.md").write_bytes(TASK)
    (repo / "tasks" / "l.md").symlink_to("/etc/passwd")
    os.mkfifo(repo / "tasks" / "f.md")
    (repo / "tasks" / "d.md").mkdir()
    (repo / "tasks" / "d.md" / "inner.md").write_bytes(TASK)
    (repo / "tasks" / ".hidden.md").write_bytes(TASK)
    (repo / "tasks" / "sub").symlink_to(repo.parent)
    refused: list[str] = []
    assert sorted(task_paths(files, refused)) == [
        "tasks/a.md", "tasks/d.md", "tasks/d.md/inner.md", "tasks/f.md", "tasks/l.md"]
    assert refused == ["tasks/sub is a symbolic link; taskrun reads only regular files and follows no links: "
                       "no Task is read through it"]


# ---------------------------------------------------------------- context files


@pytest.mark.parametrize("path", [".git/taskrun/keys/1.pem", ".git/taskrun/ssh_key", ".git/config",
                                  ".git/taskrun/workers/local/keys/worker.pem", ".GIT/config", "sub/.git/config",
                                  "sub/.git", ".git./config", "GIT~1/config"])
def test_context_inside_a_git_directory_is_refused_when_the_task_is_parsed(path: str) -> None:
    assert is_git_name(path.split("/")[0]) or is_git_name(path.split("/")[1])
    with pytest.raises(TaskFileError, match="key 'context'.*git directory"):
        parse_task("x", "tasks/x.md", f"---\ncontext: ['{path}']\n---\n".encode() + TASK)


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a\0b"])
def test_context_outside_the_work_tree_is_refused_when_the_task_is_parsed(path: str) -> None:
    with pytest.raises(TaskFileError, match="key 'context'"):
        parse_task("x", "tasks/x.md", f"---\ncontext: [{json.dumps(path)}]\n---\n".encode() + TASK)


def test_context_inside_a_git_directory_elsewhere_in_the_work_tree_is_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    git(tmp_path, "init", "-q", f"--separate-git-dir={work / 'meta'}", str(work))
    files = RepoFiles(work, gitops.git_dirs(work))
    assert gitops.git_dirs(work) == (work / "meta",)
    (work / "tasks").mkdir()
    (work / "tasks" / "x.md").write_bytes(b"---\ncontext: [meta/config]\n---\n" + TASK)
    error = intake_error(files, "tasks/x.md")
    assert "key 'context'" in error and f"inside the git directory {work / 'meta'}" in error
    with pytest.raises(TaskFileError, match="inside the git directory"):
        files.context("tasks/x.md", "meta/config")


@pytest.mark.parametrize("kind", ["link to a key", "link to a file in the repository", "linked directory", "fifo",
                                  "directory"])
def test_context_that_is_a_link_or_special_file_makes_the_task_invalid(files: RepoFiles, repo: Path,
                                                                       kind: str) -> None:
    (repo / "docs").mkdir()
    (repo / "docs" / "real.md").write_text("real\n")
    target = repo / "docs" / "spec.md"
    if kind == "link to a key":
        target.symlink_to("../.git/taskrun/keys/1.pem")
    elif kind == "link to a file in the repository":
        target.symlink_to("real.md")
    elif kind == "linked directory":
        (repo / "docs" / "sub").symlink_to(repo / ".git" / "taskrun" / "keys")
        target = repo / "docs" / "sub" / "1.pem"
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    rel = target.relative_to(repo).as_posix()
    (repo / "tasks" / "x.md").write_bytes(f"---\ncontext: [{rel}]\n---\n".encode() + TASK)
    error = finishes(lambda: intake_error(files, "tasks/x.md"))
    assert error.startswith(f"tasks/x.md: key 'context': context file '{rel}': ") and "follows no links" in error
    with pytest.raises(TaskFileError, match="key 'context'"):
        finishes(lambda: files.context("tasks/x.md", rel))


def test_a_regular_context_file_is_read_and_a_missing_one_fails_at_bundle_time(files: RepoFiles, repo: Path) -> None:
    (repo / "docs").mkdir()
    (repo / "docs" / "spec.md").write_text("spec\n")
    git(repo, "add", "docs/spec.md")
    (repo / "tasks" / "x.md").write_bytes(b"---\ncontext: [docs/spec.md, docs/later.md]\n---\n" + TASK)
    intake = read_task(files, "x", "tasks/x.md", default_config())
    assert intake.spec is not None and intake.spec.context == ("docs/spec.md", "docs/later.md")
    assert files.context("tasks/x.md", "docs/spec.md") == b"spec\n"
    with pytest.raises(TaskFileError, match="context file 'docs/later.md' does not exist"):
        files.context("tasks/x.md", "docs/later.md")


@pytest.mark.parametrize("how", ["ignored", "untracked"])
def test_a_context_file_git_does_not_track_is_never_sent_and_the_reason_names_the_fix(
        files: RepoFiles, repo: Path, how: str) -> None:
    (repo / ".env").write_text("API_TOKEN=hunter2\n")
    if how == "ignored":
        (repo / ".gitignore").write_text(".env\n")
        git(repo, "add", ".gitignore")
    (repo / "tasks" / "x.md").write_bytes(b"---\ncontext: [.env]\n---\n" + TASK)
    # Read at intake, refused when the bundle is built: it may still be added.
    assert read_task(files, "x", "tasks/x.md", default_config()).spec is not None

    with pytest.raises(TaskFileError) as caught:
        files.contexts("tasks/x.md", [".env"])

    assert str(caught.value) == (
        "tasks/x.md: key 'context': context file '.env' is not tracked by git: taskrun sends only files git "
        "tracks, so an ignored or untracked file (a .env, say) never leaves this machine; if it is meant to be "
        "shared, `git add .env`, then `taskrun retry x`")
    git(repo, "add", "--force", ".env")
    assert files.contexts("tasks/x.md", [".env"]) == {".env": b"API_TOKEN=hunter2\n"}


def test_context_files_cost_one_git_ls_files_per_bundle_and_none_without_context(
        files: RepoFiles, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a.md", "b.md", "c d*.md"):
        (repo / name).write_text(name)
    git(repo, "add", ".")
    asked: list[list[str]] = []
    tracked = intake.tracked_files
    monkeypatch.setattr(intake, "tracked_files",
                        lambda root, paths: asked.append(list(paths)) or tracked(root, paths))

    assert files.contexts("tasks/x.md", []) == {}
    assert files.contexts("tasks/x.md", ["a.md", "b.md", "c d*.md"]) == {
        "a.md": b"a.md", "b.md": b"b.md", "c d*.md": b"c d*.md"}
    assert asked == [["a.md", "b.md", "c d*.md"]]
    # A name is no pattern: 'c*' matches no tracked file by that name.
    assert intake.tracked_files(repo, ["c*", "a.md"]) == {"a.md"}


def test_context_files_over_the_cap_fail_before_a_byte_is_read(
        files: RepoFiles, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (repo / "small.txt").write_text("small\n")
    with open(repo / "huge.bin", "wb") as handle:
        handle.truncate(MAX_CONTEXT_BYTES)  # sparse: 64 MiB by its size, nothing on disk
    git(repo, "add", "small.txt")
    reads: list[int] = []
    monkeypatch.setattr("taskrunner.intake._read_at_most", lambda *args: reads.append(1))

    with pytest.raises(TaskFileError) as caught:
        files.contexts("tasks/x.md", ["small.txt", "huge.bin"])

    assert str(caught.value) == (
        f"tasks/x.md: key 'context': context file 'huge.bin' brings the Task's context files to "
        f"{MAX_CONTEXT_BYTES + 6} bytes, over the 64 MiB of context files taskrun sends with one Task "
        "(MAX_CONTEXT_BYTES): name fewer or smaller files")
    assert reads == []


def test_a_context_file_that_grows_while_it_is_read_is_cut_off_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _read_at_most(fd, 2, 5) is None  # its size said 2 when it was looked at
        os.lseek(fd, 0, os.SEEK_SET)
        assert _read_at_most(fd, 2, 10) == b"x" * 10
    finally:
        os.close(fd)


@pytest.mark.parametrize("which", ["task file", "context file"])
def test_a_task_or_context_file_with_other_hard_links_is_refused(files: RepoFiles, repo: Path, which: str) -> None:
    # `ln .git/config docs/cfg`: git's configuration under a name in the work tree.
    (repo / "docs").mkdir()
    os.link(repo / ".git" / "config", repo / "docs" / "cfg")
    reason = ("the file is a hard link (the file has other names too); taskrun reads only files that are "
              "nowhere else")
    if which == "task file":
        (repo / "tasks" / "real.md").write_bytes(TASK)
        os.link(repo / "tasks" / "real.md", repo / "tasks" / "x.md")
        assert intake_error(files, "tasks/x.md") == f"tasks/x.md: {reason}"
        return
    (repo / "tasks" / "x.md").write_bytes(b"---\ncontext: [docs/cfg]\n---\n" + TASK)
    assert intake_error(files, "tasks/x.md") == f"tasks/x.md: key 'context': context file 'docs/cfg': {reason}"
    git(repo, "add", "docs/cfg")
    with pytest.raises(TaskFileError, match="nowhere else"):
        files.contexts("tasks/x.md", ["docs/cfg"])


# ---------------------------------------------------------------- the configuration


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_configuration_that_is_a_link_or_fifo_is_refused_without_blocking(repo: Path, kind: str) -> None:
    config = repo / ".taskrun.yaml"
    if kind == "link":
        config.symlink_to(".git/taskrun/keys/1.pem")
    else:
        os.mkfifo(config)
    with pytest.raises(ConfigError, match="reads only regular files"):
        finishes(lambda: load_config(repo))


def test_a_configuration_with_other_hard_links_is_refused(repo: Path) -> None:
    os.link(repo / ".git" / "config", repo / ".taskrun.yaml")
    with pytest.raises(ConfigError, match="reads only files that are nowhere else"):
        load_config(repo)


# ---------------------------------------------------------------- commits


def test_a_committed_path_that_is_a_link_is_committed_as_deleted_and_never_read(repo: Path) -> None:
    notices: list[str] = []
    (repo / "runs" / "x" / "run-1").mkdir(parents=True)
    (repo / "runs" / "x" / "status.json").write_text("{}\n")
    (repo / "runs" / "x" / "run-1" / "summary.md").symlink_to("../../../.git/taskrun/keys/1.pem")
    (repo / "runs" / "y").symlink_to("../.git/taskrun/keys")
    paths = ["runs/x/status.json", "runs/x/run-1/summary.md", "runs/y/1.pem"]

    sha = gitops.Git(repo, notice=notices.append).commit_paths(paths, "records")

    assert sha is not None
    assert git(repo, "ls-tree", "-r", "--name-only", sha).split() == ["README.md", "runs/x/status.json"]
    assert "PRIVATE KEY" not in git(repo, "log", "-p", "--all")
    assert "runs/x/run-1/summary.md" in notices[0] and "committed as deleted" in notices[0]
    assert notices[1].startswith("runs/y is a symbolic link")
    # The index agrees with HEAD: no link was added to it.
    assert git(repo, "diff", "--cached", "--name-only") == ""


def test_a_committed_path_with_other_hard_links_is_committed_as_deleted(repo: Path) -> None:
    notices: list[str] = []
    (repo / "runs" / "x" / "run-1").mkdir(parents=True)
    os.link(repo / ".git" / "config", repo / "runs" / "x" / "run-1" / "output.log")

    sha = gitops.Git(repo, notice=notices.append).commit_paths(["runs/x/run-1/output.log"], "records")

    assert sha is None  # nothing to commit: the only path is refused
    assert "repositoryformatversion" not in git(repo, "log", "-p", "--all")
    assert notices == ["runs/x/run-1/output.log is a hard link (the file has other names too); taskrun reads only "
                       "files that are nowhere else: runs/x/run-1/output.log is committed as deleted"]


def test_a_record_holding_a_private_key_is_left_out_of_the_commit(repo: Path) -> None:
    notices: list[str] = []
    (repo / "runs" / "x" / "run-1").mkdir(parents=True)
    (repo / "runs" / "x" / "status.json").write_text("{}\n")
    (repo / "runs" / "x" / "run-1" / "output.log").write_bytes(b"the Agent printed\n" + KEY)

    sha = gitops.Git(repo, notice=notices.append).commit_paths(
        ["runs/x/status.json", "runs/x/run-1/output.log"], "records")

    assert sha is not None
    assert git(repo, "ls-tree", "-r", "--name-only", sha).split() == ["README.md", "runs/x/status.json"]
    assert notices == ["runs/x/run-1/output.log holds a private key block: left out of the commit (delete the "
                       "file, and replace the key if it was a real one)"]
    assert "runs/x/run-1/output.log" not in git(repo, "ls-files")  # nor staged in the user's index


@pytest.mark.parametrize("block", [b"-----BEGIN RSA PRIVATE KEY-----", b"-----BEGIN PRIVATE KEY-----",
                                   b"-----BEGIN EC PRIVATE KEY-----", b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
                                   b"-----BEGIN OPENSSH PRIVATE KEY-----", b"-----BEGIN PGP PRIVATE KEY BLOCK-----",
                                   b"PuTTY-User-Key-File-3: ssh-ed25519"])
def test_every_kind_of_private_key_block_is_recognised(block: bytes) -> None:
    assert holds_private_key(b"output\n" + block + b"\nAAAA\n")


@pytest.mark.parametrize("text", [b"-----BEGIN PUBLIC KEY-----", b"-----BEGIN CERTIFICATE-----",
                                  b"a private key was rotated", b""])
def test_public_material_and_prose_are_not_private_keys(text: bytes) -> None:
    assert not holds_private_key(text)


# ---------------------------------------------------------------- doctor


def test_doctor_finds_links_and_special_files_under_runs_with_the_fix(repo: Path) -> None:
    (repo / "runs" / "x" / "run-1").mkdir(parents=True)
    (repo / "runs" / "x" / "run-1" / "output.log").symlink_to("../../../.git/config")
    os.mkfifo(repo / "runs" / "x" / "fifo")
    (repo / "runs" / "ok.json").write_text("{}")
    git(repo, "add", "runs/x/run-1/output.log")
    (repo / "runs" / "x" / "run-1" / "output.log").unlink()  # tracked as a link, gone from the work tree

    found = doctor.record_findings(repo)

    assert [f.what.split(" is ")[0] for f in found] == ["runs/x/fifo", "runs/x/run-1/output.log"]
    assert "a FIFO" in found[0].what and "symbolic link in git's index" in found[1].what
    assert all(f.level == "error" and "git rm --cached" in f.fix for f in found)


def test_doctor_finds_runs_itself_a_link_and_nothing_in_a_clean_tree(repo: Path) -> None:
    assert doctor.record_findings(repo) == []
    (repo / "runs").symlink_to(".git")
    [finding] = doctor.record_findings(repo)
    assert finding.what.startswith("runs is a symbolic link")


def test_doctor_still_finds_a_tracked_private_key(repo: Path) -> None:
    (repo / "id_pgp.asc").write_bytes(b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n")
    git(repo, "add", "id_pgp.asc")
    assert [f.what for f in doctor.key_findings(repo, None) if "tracked" in f.what] == [
        "id_pgp.asc is tracked by git and holds a private key"]


def test_a_shell_task_without_a_shell_block_is_invalid_at_intake_not_a_failed_run(files: RepoFiles,
                                                                                    repo: Path) -> None:
    (repo / "tasks" / "x.md").write_text("# Only prose\n\n```python\nprint(1)\n```\n")
    assert intake_error(files, "tasks/x.md") == (
        "tasks/x.md: the shell Agent 'shell' runs the body's ```sh or ```bash blocks, and this Task has none")


def test_a_tree_deeper_than_any_task_id_is_not_walked_and_is_named(files: RepoFiles, repo: Path) -> None:
    """A pushed `tasks/nest/a/a/…` 990 directories deep ended the scan with a RecursionError (the daemon
    exited, and every start after): no Task id can be that deep, so the walk stops at the deepest one can."""
    from taskrunner.intake import MAX_TASK_DIR_DEPTH

    deep = repo / "tasks" / "nest"
    path = deep
    deep.mkdir()
    for _ in range(990):
        path = path / "a"
        os.mkdir(path)
    (path / "x.md").write_bytes(TASK)
    edge = deep / "/".join(["a"] * (MAX_TASK_DIR_DEPTH - 2))  # tasks/nest/a/…: the deepest a Task id can be
    (edge / "ok.md").write_bytes(TASK)
    (repo / "tasks" / "top.md").write_bytes(TASK)
    refused: list[str] = []
    found = list(task_paths(files, refused))
    assert f"{edge.relative_to(repo)}/ok.md" in found and "tasks/top.md" in found
    assert not any(p.endswith("/x.md") for p in found)
    (said,) = [m for m in refused if "deeper than a Task id can go" in m]
    assert said.startswith("tasks/nest/a/a/") and "move its Task files up" in said
    subprocess.run(["rm", "-rf", "--", str(deep)], check=True)  # too deep for pytest's own clean-up later


def test_many_directories_too_deep_make_one_notice(files: RepoFiles, repo: Path) -> None:
    from taskrunner.intake import MAX_TASK_DIR_DEPTH

    base = repo / "tasks" / "/".join(["a"] * (MAX_TASK_DIR_DEPTH - 1))
    for n in range(50):  # 50 directories at the deepest level, each with one more below it
        (base / f"s{n}" / "deeper").mkdir(parents=True)
    refused: list[str] = []
    list(task_paths(files, refused))
    (said,) = [m for m in refused if "deeper than a Task id can go" in m]
    assert "and 49 more hold directories" in said and "move their Task files up" in said
