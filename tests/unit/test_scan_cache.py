"""The scan cache (scancache.py): unchanged Task files are not parsed again, and any doubt reads the file."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from taskrunner import intake, scancache
from taskrunner.config import Config, load_config
from taskrunner.gitops import git_dirs, state_dir
from taskrunner.intake import Intake, RepoFiles, read_task, task_paths
from taskrunner.model import Priority, TaskSpec
from taskrunner.scancache import ScanCache
from taskrunner.taskfile import task_id_for
from tests.conftest import write_task

FRONT = "priority: high\nlabels: {gpu: a100}\ndepends_on: [t-0]\ntimeout: 90s\nretries: 2\n"


@pytest.fixture()
def files(repo: Path) -> RepoFiles:
    for n in range(6):
        write_task(repo, f"t-{n}", f"echo {n}", front=FRONT if n % 2 else "")
    write_task(repo, "bad", "echo", front="priority: [not, one]\n")
    return RepoFiles(repo, git_dirs(repo))


def scan(files: RepoFiles, config: Config) -> tuple[dict[str, Intake], ScanCache]:
    """One scan as engine.scan makes it: every Task file through one ScanCache, saved at the end."""
    cache = ScanCache(state_dir(files.root), config)
    seen = {rel: cache.read(files, task_id_for(rel) or "", rel, config) for rel in task_paths(files)}
    assert cache.save()
    return seen, cache


def direct(files: RepoFiles, config: Config) -> dict[str, Intake]:
    return {rel: read_task(files, task_id_for(rel) or "", rel, config) for rel in task_paths(files)}


def no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> TaskSpec:
        raise AssertionError("a Task file was parsed again")

    monkeypatch.setattr(intake, "parse_task", refuse)


def test_unchanged_files_are_not_parsed_again_and_read_as_before(files: RepoFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    first, cache = scan(files, config)
    assert first == direct(files, config) and cache.hits == 0
    assert first["tasks/t-1.md"].spec is not None and first["tasks/t-1.md"].spec.priority is Priority.HIGH
    assert first["tasks/bad.md"].spec is None
    no_parsing(monkeypatch)
    monkeypatch.setattr(intake, "read_task", lambda *args: pytest.fail("read_task called"))
    again = {rel: i for rel, i in first.items() if rel != "tasks/bad.md"}
    monkeypatch.setattr(files, "open", lambda rel: pytest.fail(f"{rel} was opened"))
    cache = ScanCache(state_dir(files.root), config)
    for rel, expected in again.items():
        assert cache.read(files, task_id_for(rel) or "", rel, config) == expected
    assert cache.hits == len(again)


def test_a_changed_file_is_read_again(files: RepoFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    scan(files, config)
    path = files.root / "tasks" / "t-2.md"
    old = path.stat()
    # Same size, same inode, written in place; its mtime moved on (ctime moves with any write).
    path.write_text(path.read_text().replace("echo 2", "echo 7"))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == old.st_size and path.stat().st_ino == old.st_ino
    second, cache = scan(files, config)
    assert second == direct(files, config)
    assert second["tasks/t-2.md"].spec is not None and "echo 7" in second["tasks/t-2.md"].spec.body
    assert cache.hits == 5  # the other five valid files


def test_a_file_replaced_by_a_link_is_read_as_refused(files: RepoFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    scan(files, config)
    path = files.root / "tasks" / "t-3.md"
    os.replace(path, files.root / "elsewhere.md")
    path.symlink_to(files.root / "elsewhere.md")
    second, _ = scan(files, config)
    assert second["tasks/t-3.md"].spec is None and second == direct(files, config)


def test_a_file_changed_just_before_it_was_parsed_is_not_cached(files: RepoFiles) -> None:
    config = load_config(files.root)
    _, cache = scan(files, config)  # every file was written a moment ago: within RACY_SECONDS
    assert ScanCache(state_dir(files.root), config)._entries == {}


def test_the_configuration_is_checked_again_on_a_cached_spec(files: RepoFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    scan(files, config)
    without = dataclasses.replace(config, agents={})
    second, cache = scan(files, without)
    assert cache.hits == 6
    assert second == direct(files, without)
    assert second["tasks/t-0.md"].spec is None and "unknown Agent" in (second["tasks/t-0.md"].error or "")


@pytest.mark.parametrize("text", [b"", b"\xff\xfe", b"[]", b'{"format": 1}', b"null",
                                  b'{"format": 2, "version": "0.1.0", "entries": {"tasks/t-0.md": '
                                  b'{"stat": [1, 2, 3, 4, 5], "spec": {"id": 5}}}}'])
def test_a_broken_cache_file_is_ignored(files: RepoFiles, monkeypatch: pytest.MonkeyPatch, text: bytes) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    path = state_dir(files.root) / scancache.CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    seen, cache = scan(files, config)
    assert seen == direct(files, config) and cache.hits == 0


def test_an_entry_whose_stat_matches_but_spec_is_of_another_path_is_not_taken(files: RepoFiles,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    scan(files, config)
    cache = ScanCache(state_dir(files.root), config)
    key, spec, script = cache._entries["tasks/t-1.md"]
    cache._entries["tasks/t-1.md"] = (key, dataclasses.replace(spec, path="tasks/t-3.md"), script)
    cache._changed = True
    cache._seen = set(cache._entries)
    assert cache.save()
    assert "tasks/t-1.md" not in ScanCache(state_dir(files.root), config)._entries


def test_off_under_allowed_signers(files: RepoFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    scan(files, config)
    signed = dataclasses.replace(config, security=dataclasses.replace(config.security,
                                                                      allowed_signers=files.root / "signers"))
    cache = ScanCache(state_dir(files.root), signed)
    assert not cache.enabled and cache._entries == {}


def test_every_taskspec_field_is_kept() -> None:
    spec = TaskSpec(id="a/b", path="tasks/a/b.md", revision="r" * 64, title="T", body="body\n", agent="shell",
                    priority=Priority.CRITICAL, depends_on=("x", "y"), labels={"k": "v"}, group="g", timeout=1.5,
                    retries=3, context=("README.md",), authorized_by="alice", max_turns=4, max_cost_usd=0.25)
    # TaskSpec's own order: a cached spec is made from its values in place, without keywords.
    assert list(scancache._KINDS) == [f.name for f in dataclasses.fields(TaskSpec)]
    assert scancache._spec_from_json(scancache._spec_json(spec)) == spec


def test_engine_scan_takes_unchanged_files_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskrunner.config import parse_config
    from taskrunner.engine import Engine
    from taskrunner.fleet import Fleet
    from taskrunner.keys import Keyring
    from tests.conftest import git

    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    git(tmp_path, "init", "-q")
    for n in range(4):
        write_task(tmp_path, f"t-{n}", f"echo {n}")
    config = parse_config("workers: {local: {transport: local, sandbox: none}}\n", ".taskrun.yaml")

    def scanned() -> Engine:
        """A fresh engine (a restart) after one scan of tasks/."""
        keyring, _ = Keyring.ensure(state_dir(tmp_path), 0.0)
        engine = Engine(tmp_path, config, Fleet(config, state_dir(tmp_path), lambda event: None, keyring),
                        commit=lambda item: None)
        engine.scan()
        return engine

    first = scanned()
    specs = {t.id: t.spec for t in first.tasks.values()}
    assert len(specs) == 4 and all(specs.values())
    path = tmp_path / "tasks" / "t-1.md"
    old = path.stat()
    path.write_text(path.read_text().replace("echo 1", "echo 9"))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    parsed: list[str] = []
    real = intake.parse_task
    monkeypatch.setattr(intake, "parse_task", lambda task_id, *args: parsed.append(task_id) or real(task_id, *args))
    second = scanned()
    assert parsed == ["t-1"]  # only the changed file was parsed again
    assert {t.id: t.spec for t in second.tasks.values() if t.id != "t-1"} == {k: v for k, v in specs.items()
                                                                              if k != "t-1"}
    assert second.tasks["t-1"].spec is not None and "echo 9" in second.tasks["t-1"].spec.body


def test_a_cache_edited_or_sealed_with_another_key_is_ignored(files: RepoFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    scan(files, config)
    path = state_dir(files.root) / scancache.CACHE_FILE
    assert len(ScanCache(state_dir(files.root), config)._entries) == 6  # sealed: believed
    sealed = path.read_bytes()
    path.write_bytes(sealed.replace(b"echo 1", b"echo 7"))  # the seal no longer matches
    assert ScanCache(state_dir(files.root), config)._entries == {}
    path.write_bytes(sealed)
    key_file = state_dir(files.root) / "record.key"
    key_file.write_bytes(os.urandom(len(key_file.read_bytes())))  # another clone's key
    assert ScanCache(state_dir(files.root), config)._entries == {}
    seen, cache = scan(files, config)
    assert seen == direct(files, config) and cache.hits == 0


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "link to a good cache", "directory"])
def test_a_cache_file_that_is_not_a_regular_file_is_ignored_at_once(files: RepoFiles, kind: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # No link followed, no FIFO waited on, no endless device read: the Task files are read as without a cache.
    monkeypatch.setattr(scancache, "RACY_SECONDS", 0.0)
    config = load_config(files.root)
    scan(files, config)
    path = state_dir(files.root) / scancache.CACHE_FILE
    good = path.with_name("good-cache")
    os.replace(path, good)
    assert good.stat().st_size > 0
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero" if "zero" in kind else good)
    cache = ScanCache(state_dir(files.root), config)
    seen = {rel: cache.read(files, task_id_for(rel) or "", rel, config) for rel in task_paths(files)}
    assert seen == direct(files, config) and cache.hits == 0


def test_a_rescan_leaves_a_file_still_being_written_to_its_close(tmp_path: Path) -> None:
    """A directory made under tasks/ triggers a rescan: a file in it still open for writing was read half
    written and committed INVALID ("the file is empty"), then run again once whole."""
    from taskrunner.config import parse_config
    from taskrunner.engine import Engine
    from taskrunner.fleet import Fleet
    from taskrunner.keys import Keyring
    from tests.conftest import git

    git(tmp_path, "init", "-q")
    write_task(tmp_path, "whole", "echo whole")
    (tmp_path / "tasks" / "sub").mkdir()
    (tmp_path / "tasks" / "sub" / "half.md").write_bytes(b"")  # being written: empty so far
    config = parse_config("workers: {local: {transport: local, sandbox: none}}\n", ".taskrun.yaml")
    keyring, _ = Keyring.ensure(state_dir(tmp_path), 0.0)
    engine = Engine(tmp_path, config, Fleet(config, state_dir(tmp_path), lambda event: None, keyring),
                    commit=lambda item: None)

    engine.scan(waiting={"tasks/sub/half.md"})

    assert set(engine.tasks) == {"whole"} and not engine.unusable
    (tmp_path / "tasks" / "sub" / "half.md").write_text("# half, now whole\n\n```sh\necho done\n```\n")
    engine.task_file_changed("tasks/sub/half.md")  # its close
    assert engine.tasks["sub/half"].spec is not None


def test_what_a_scan_refuses_is_said_once_not_at_every_scan(tmp_path: Path) -> None:
    from taskrunner.config import parse_config
    from taskrunner.engine import Engine
    from taskrunner.fleet import Fleet
    from taskrunner.hooks import Hooks
    from taskrunner.keys import Keyring
    from tests.conftest import git

    class Heard(Hooks):
        def __init__(self) -> None:
            self.notices: list[str] = []

        def notice(self, message: str) -> None:
            self.notices.append(message)

    git(tmp_path, "init", "-q")
    write_task(tmp_path, "whole", "echo whole")
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    (tmp_path / "tasks" / "elsewhere").symlink_to(tmp_path.parent / "outside")  # refused, with a notice
    config = parse_config("workers: {local: {transport: local, sandbox: none}}\n", ".taskrun.yaml")
    keyring, _ = Keyring.ensure(state_dir(tmp_path), 0.0)
    heard = Heard()
    engine = Engine(tmp_path, config, Fleet(config, state_dir(tmp_path), lambda event: None, keyring),
                    commit=lambda item: None, hooks=heard)
    for _ in range(3):  # a trigger, a new directory, a poll: each a scan
        engine.scan()
    assert [m for m in heard.notices if "elsewhere is a symbolic link" in m] == [heard.notices[0]]
