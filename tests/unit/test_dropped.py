"""Records a person's reset dropped (gitflow/dropped.py): the plan, and the job on a real repository."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import pytest

from taskrunner.gitflow.dropped import TITLE, DroppedRecords, Plan, plan
from taskrunner.gitflow.putback import CHANGED
from taskrunner.gitops import Git
from taskrunner.recorder import CommitItem
from taskrunner.records import Records

P = "runs/t/run-1/output.log"


# -- the plan (pure) ----------------------------------------------------------------------


def test_a_record_head_lacks_and_the_work_tree_lacks_is_written_back() -> None:
    assert plan({P: "a"}, {P: None}, {P: None}) == Plan(write=(P,))


def test_a_record_head_holds_older_is_written_back_when_the_work_tree_is_heads() -> None:
    assert plan({P: "new"}, {P: "old"}, {P: "old"}) == Plan(write=(P,))


def test_a_record_the_daemon_deleted_that_the_reset_brought_back_is_deleted_again() -> None:
    assert plan({P: None}, {P: "old"}, {P: "old"}) == Plan(delete=(P,))


def test_a_work_tree_already_as_the_daemon_committed_it_is_only_committed() -> None:
    assert plan({P: "a"}, {P: None}, {P: "a"}) == Plan(commit=(P,))
    assert plan({P: None}, {P: "old"}, {P: None}) == Plan(commit=(P,))


def test_a_file_someone_changed_after_the_reset_is_left() -> None:
    assert plan({P: "a"}, {P: None}, {P: "theirs"}) == Plan(kept=(P,))
    assert plan({P: "a"}, {P: "old"}, {P: CHANGED}) == Plan(kept=(P,))  # a link there now


def test_a_rebase_that_kept_the_content_does_nothing() -> None:
    assert plan({P: "a"}, {P: "a"}, {P: None}) == Plan()


def test_heads_link_at_the_path_is_never_taken_for_the_blob() -> None:
    assert plan({P: "a"}, {P: "120000 a"}, {P: CHANGED}) == Plan(kept=(P,))


# -- the job on a real repository ------------------------------------------------------------


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Git, Records]:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "--quiet")
    git(root, "config", "user.name", "Test User")
    git(root, "config", "user.email", "test@example.com")
    (root / "README.md").write_text("a project\n")
    git(root, "add", "README.md")
    git(root, "commit", "--quiet", "-m", "initial")
    return root, Git(root), Records(root)


def job(repo: Git, records: Records, items: list[CommitItem], notices: list[str],
        tasks: dict[str, object] | None = None) -> DroppedRecords:
    inline: Callable[[Callable[[], None]], None] = lambda work: work()  # noqa: E731
    return DroppedRecords(repo, records, tasks or {}, notices.append,  # type: ignore[arg-type]
                          inline, inline, items.append, clock=lambda: 0.0)


def record_task(root: Path, repo: Git, records: Records, task_id: str) -> tuple[str, list[str]]:
    records.save_task({"task_id": task_id, "status": "COMPLETED"})
    records.save_run({"task_id": task_id, "run": 1, "status": "COMPLETED"})
    (root / "runs" / task_id / "run-1" / "output.log").write_bytes(b"line\n" * 1000)
    paths = [f"runs/{task_id}/status.json", f"runs/{task_id}/run-1/status.json", f"runs/{task_id}/run-1/output.log"]
    sha = repo.commit_paths(paths, f"taskrun: {task_id} COMPLETED\n")
    assert sha is not None
    return sha, paths


def rebuilt_on_side(root: Path, sha: str) -> None:
    """Branch `side` from the commit under `sha`, with a person's commit, then `sha` cherry-picked on top:
    another commit holding the same records; `side` is checked out."""
    git(root, "checkout", "--quiet", "-b", "side", "HEAD~1")
    (root / "notes.txt").write_text("mine\n")
    git(root, "add", "notes.txt")
    git(root, "commit", "--quiet", "-m", "user: notes")
    git(root, "cherry-pick", sha)


def test_a_hard_reset_past_the_daemons_commit_writes_its_records_back(setup: tuple[Path, Git, Records]) -> None:
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []
    dropped = job(repo, records, items, notices)
    dropped.run()
    sha, paths = record_task(root, repo, records, "t")
    before = {path: (root / path).read_bytes() for path in paths}
    dropped.landed(sha)
    dropped.run()  # HEAD is the daemon's own commit: nothing
    assert not items and not notices
    git(root, "reset", "--quiet", "--hard", "HEAD~1")
    assert not (root / "runs" / "t").exists()
    dropped.run()
    assert {path: (root / path).read_bytes() for path in paths} == before
    assert len(items) == 1 and sorted(items[0].paths) == sorted(paths) and TITLE in items[0].title
    assert notices == [("HEAD moved past 1 record commit(s) of the daemon (a reset?): 3 record file(s) written and "
                        "committed again")]


def test_a_rebase_that_kept_the_records_restores_nothing(setup: tuple[Path, Git, Records]) -> None:
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []
    dropped = job(repo, records, items, notices)
    sha, _ = record_task(root, repo, records, "t")
    dropped.landed(sha)
    dropped.run()
    # The person's commit goes under the daemon's: the daemon's commit is rebuilt with the same records.
    rebuilt_on_side(root, sha)
    git(root, "branch", "--quiet", "-f", "main" if "main" in git(root, "branch") else "master", "HEAD")
    dropped.run()
    assert not items and not notices


def test_a_reset_after_a_checkout_of_a_branch_holding_the_same_records_still_writes_them_back(
        setup: tuple[Path, Git, Records]) -> None:
    """A checkout of another branch that holds the daemon's records as it committed them is no drop; the
    commits stay watched, and a later reset past them there writes the records back."""
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []
    dropped = job(repo, records, items, notices)
    sha, paths = record_task(root, repo, records, "t")
    before = {path: (root / path).read_bytes() for path in paths}
    dropped.landed(sha)
    dropped.run()
    # Another branch gets the same records (a cherry-pick over a person's commit: another commit, the same
    # blobs), and is checked out.
    rebuilt_on_side(root, sha)
    assert git(root, "rev-parse", "HEAD").strip() != sha
    dropped.run()
    assert not items and not notices
    git(root, "reset", "--quiet", "--hard", "HEAD~1")
    assert not (root / "runs" / "t").exists()
    dropped.run()
    assert {path: (root / path).read_bytes() for path in paths} == before
    assert len(items) == 1 and sorted(items[0].paths) == sorted(paths)


def test_a_file_changed_after_the_reset_is_left_and_named(setup: tuple[Path, Git, Records]) -> None:
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []
    dropped = job(repo, records, items, notices)
    sha, _ = record_task(root, repo, records, "t")
    dropped.landed(sha)
    git(root, "reset", "--quiet", "--hard", "HEAD~1")
    (root / "runs" / "t" / "run-1").mkdir(parents=True)
    (root / "runs" / "t" / "run-1" / "output.log").write_bytes(b"someone's\n")
    dropped.run()
    assert (root / "runs" / "t" / "run-1" / "output.log").read_bytes() == b"someone's\n"
    assert len(items) == 1 and "runs/t/run-1/output.log" not in items[0].paths
    assert "left as they are: runs/t/run-1/output.log" in notices[0]


def test_a_task_with_a_run_going_keeps_its_record_for_the_engine(setup: tuple[Path, Git, Records]) -> None:
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []

    class Busy:  # a TaskState whose next Run is going
        active_run = object()

    dropped = job(repo, records, items, notices, {"t": Busy()})
    sha, _ = record_task(root, repo, records, "t")
    dropped.landed(sha)
    git(root, "reset", "--quiet", "--hard", "HEAD~1")
    dropped.run()
    assert not (root / "runs" / "t" / "status.json").exists()
    assert (root / "runs" / "t" / "run-1" / "status.json").is_file()
    assert "runs/t/status.json" not in items[0].paths
    assert "1 of Tasks with a Run going are left to the engine" in notices[0]


def test_records_a_prune_deleted_that_a_reset_brought_back_are_deleted_again(setup: tuple[Path, Git, Records]) -> None:
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []
    dropped = job(repo, records, items, notices)
    sha, paths = record_task(root, repo, records, "t")
    dropped.landed(sha)
    dropped.run()
    for path in paths:
        (root / path).unlink()
    pruned = repo.commit_paths(paths, "taskrun: prune 1 Task\n")
    assert pruned is not None
    dropped.landed(pruned)
    git(root, "reset", "--quiet", "--hard", "HEAD~1")
    assert (root / "runs" / "t" / "run-1" / "output.log").is_file()
    dropped.run()
    assert not (root / "runs" / "t").exists()
    assert sorted(items[0].paths) == sorted(paths)


def test_a_status_record_without_this_clones_seal_is_never_written_back(setup: tuple[Path, Git, Records]) -> None:
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []
    dropped = job(repo, records, items, notices)
    forged = root / "runs" / "f" / "status.json"
    forged.parent.mkdir(parents=True)
    forged.write_text('{"task_id": "f", "status": "COMPLETED", "seal": "00"}\n')
    sha = repo.commit_paths(["runs/f/status.json"], "taskrun: f COMPLETED\n")
    assert sha is not None
    dropped.landed(sha)
    git(root, "reset", "--quiet", "--hard", "HEAD~1")
    dropped.run()
    assert not forged.exists() and not items
    assert "left as they are: runs/f/status.json" in notices[0]


def test_a_bisect_checkout_is_left_alone_until_it_ends(setup: tuple[Path, Git, Records]) -> None:
    # A bisect checks out older commits: a restore commit there would move its HEAD and spoil its marks.
    root, repo, records = setup
    items: list[CommitItem] = []
    notices: list[str] = []
    dropped = job(repo, records, items, notices)
    sha, paths = record_task(root, repo, records, "t")
    dropped.landed(sha)
    dropped.run()
    (root / ".git" / "BISECT_LOG").write_text("git bisect start\n")  # as `git bisect start` leaves it
    git(root, "checkout", "--quiet", "--detach", "HEAD~1")
    dropped.run()
    assert not items and not notices
    (root / ".git" / "BISECT_LOG").unlink()  # `git bisect reset` (HEAD left where the bisect put it)
    dropped.run()
    assert len(items) == 1  # once the bisect is over, a HEAD that lost the records gets them back
