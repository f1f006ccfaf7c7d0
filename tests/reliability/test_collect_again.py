"""A Worker killed after it collected an Agent's change but before it wrote the Run's result (crash points
worker.change_collected, worker.result_signed) collects it again on restart: the same change comes back,
not "nothing changed" (gitflow/change.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from taskrunner.gitflow import change
from taskrunner.gitflow.cache import ObjectCache
from tests.conftest import git


def _checkout(home: Path, repo: Path) -> tuple[Path, dict[str, Any]]:
    """A Run's directory in a Worker home with a checkout of `repo`'s HEAD, and its manifest."""
    base = git(repo, "rev-parse", "HEAD").strip()
    cache = ObjectCache(home, "a" * 32)
    cache.receive(subprocess.run(["git", "-C", str(repo), "pack-objects", "--stdout", "--revs", "-q"],
                                 input=f"{base}\n".encode(), capture_output=True, check=True).stdout, base)
    run_dir = home / "runs" / "run-abc"
    run_dir.mkdir(parents=True)
    cache.checkout(run_dir / "index", run_dir / "workspace", base, "taskrun/t")
    manifest = {"run_id": "run-abc", "task_id": "t", "agent": {"name": "shell"}, "files": [],
                "repo": {"id": cache.repo_id, "base": base},
                "git": {"author_name": "Bot", "author_email": "bot@x", "max_result_bytes": 1 << 20, "title": "T"}}
    return run_dir, manifest


def test_a_change_collected_again_after_a_crash_is_the_same_change(repo: Path, tmp_path: Path) -> None:
    run_dir, manifest = _checkout(tmp_path / "worker", repo)
    (run_dir / "workspace" / "README.md").write_text("changed\n")
    (run_dir / "workspace" / "new.txt").write_text("new\n")
    first = change.collect(run_dir, run_dir / "workspace", manifest, [], "w1")
    assert first is not None

    again = change.collect(run_dir, run_dir / "workspace", manifest, [], "w1")

    assert again is not None
    pack = change.read_pack(run_dir)
    assert again["size"] == len(pack)
    assert _tree(run_dir, tmp_path / "worker", again["commit"]) == _tree(run_dir, tmp_path / "worker", first["commit"])
    assert _files(run_dir, tmp_path / "worker", again["commit"]) == {"README.md": "changed\n", "new.txt": "new\n"}

def _tree(run_dir: Path, home: Path, commit: str) -> str:
    """`commit`'s tree id, read with the Run's objects and the cache's."""
    cache = next((home / "repos").glob("*.git"))
    env = {"GIT_OBJECT_DIRECTORY": str(run_dir / "objects"), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(cache / "objects"),
           "PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "--git-dir", str(cache), "rev-parse", f"{commit}^{{tree}}"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def _files(run_dir: Path, home: Path, commit: str) -> dict[str, str]:
    """The files `commit` changed against its parent, with their content."""
    cache = next((home / "repos").glob("*.git"))
    env = {"GIT_OBJECT_DIRECTORY": str(run_dir / "objects"), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(cache / "objects"),
           "PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1"}

    def show(*args: str) -> str:
        return subprocess.run(["git", "--git-dir", str(cache), *args], env=env, capture_output=True, text=True,
                              check=True).stdout

    names = show("diff-tree", "--no-commit-id", "-r", "--name-only", f"{commit}^", commit).split()
    return {name: show("show", f"{commit}:{name}") for name in names}
