"""The watcher: file events under tasks/, debounced, judged by what the path holds."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from taskrunner.watcher import FileEvent, Watcher
from tests.conftest import wait_until


def _events(posted: queue.Queue[FileEvent], until: str, path: str) -> list[str]:
    seen: list[str] = []
    while True:
        event = posted.get(timeout=10)
        if event.path == path:
            seen.append(event.kind)
            if event.kind == until:
                return seen


@contextlib.contextmanager
def _watching(root: Path, **options: float) -> Iterator[tuple[Watcher, queue.Queue[FileEvent]]]:
    """A started Watcher of `root` (tasks/ made) and the queue it posts to; stopped at the end."""
    (root / "tasks").mkdir()
    posted: queue.Queue[FileEvent] = queue.Queue()
    watcher = Watcher(root, posted.put, **options)
    watcher.start()
    try:
        yield watcher, posted
    finally:
        watcher.stop()


def test_a_task_file_git_replaces_is_changed_not_removed_and_a_deleted_one_is_removed(tmp_path: Path) -> None:
    with _watching(tmp_path) as (watcher, posted):
        task = tmp_path / "tasks" / "a.md"
        task.write_text("# one\n")
        assert _events(posted, "changed", "tasks/a.md")[-1] == "changed"
        # As git updates a file in a sync or checkout: unlink, then write it anew.
        os.unlink(task)
        task.write_text("# two\n")
        assert "removed" not in _events(posted, "changed", "tasks/a.md")
        os.unlink(task)
        assert _events(posted, "removed", "tasks/a.md")[-1] == "removed"


def test_an_inotify_queue_overflow_becomes_one_rescan(tmp_path: Path) -> None:
    """The kernel's queue overflowed (10,000 files renamed in at once do it): the events lost are not
    known, so tasks/ is read again, once. watchdog reports an overflow only by this log record."""
    import inspect
    import logging

    from watchdog.observers import inotify_c

    assert "Inotify queue overflowed" in inspect.getsource(inotify_c)  # what watchdog logs, on this logger
    (tmp_path / "tasks").mkdir()
    posted: queue.Queue[FileEvent] = queue.Queue()
    watcher = Watcher(tmp_path, posted.put, debounce=0.2)
    watcher.start()
    logging.getLogger().setLevel(logging.CRITICAL)  # as `taskrun up --log-level ERROR` may leave it
    try:
        for _ in range(3):
            logging.getLogger(inotify_c.__name__).warning("Inotify queue overflowed; filesystem events were lost")
        assert posted.get(timeout=10) == FileEvent("rescan")
        (tmp_path / "tasks" / "after.md").write_text("# after\n")
        assert posted.get(timeout=10) == FileEvent("changed", "tasks/after.md")  # one rescan for the three
    finally:
        logging.getLogger().setLevel(logging.WARNING)
        watcher.stop()
    logging.getLogger(inotify_c.__name__).warning("Inotify queue overflowed; filesystem events were lost")
    assert posted.empty()  # a stopped watcher hears nothing


def test_a_file_still_open_for_writing_is_read_at_its_close_not_half_written(tmp_path: Path) -> None:
    """`cp` of a big Task file makes it empty, then writes it in pieces: neither the empty file nor a
    piece is read while the writer has it open; its close is."""
    with _watching(tmp_path, debounce=0.05, unclosed=30.0) as (watcher, posted):
        with open(tmp_path / "tasks" / "big.md", "wb") as handle:
            handle.flush()
            os.fsync(handle.fileno())
            handle.write(b"---\npriority: 1\n")
            handle.flush()
            # Far longer than the debounce: the half-written file would have been posted by now.
            with pytest.raises(queue.Empty):
                posted.get(timeout=0.5)
            handle.write(b"---\n# the whole requirement\n")
        assert posted.get(timeout=10) == FileEvent("changed", "tasks/big.md")
        assert posted.empty()


def test_a_file_left_open_is_read_once_it_has_been_quiet_for_the_unclosed_wait(tmp_path: Path) -> None:
    with _watching(tmp_path, debounce=0.05, unclosed=0.3) as (watcher, posted):
        with open(tmp_path / "tasks" / "held.md", "wb") as handle:
            handle.write(b"# held open\n")
            handle.flush()
            assert posted.get(timeout=10) == FileEvent("changed", "tasks/held.md")  # before the close


def _deep(top: Path, levels: int) -> None:
    top.mkdir()
    for _ in range(levels):
        top = top / "a"
        os.mkdir(top)


def _remove(top: Path) -> None:
    """rm -r of a tree too deep for shutil.rmtree (one Python frame per level): pytest's own clean-up of old
    temp directories would fail on it in a later run."""
    subprocess.run(["rm", "-rf", "--", str(top)], check=True)


def test_a_tree_a_thousand_directories_deep_does_not_end_the_watch(tmp_path: Path) -> None:
    """watchdog walks tasks/ and every new directory with a recursive os.walk: a pushed tree 990 deep ended its
    thread (RecursionError), and no Task file was seen after it."""
    (tmp_path / "tasks").mkdir()
    _deep(tmp_path / "tasks" / "before", 990)
    posted: queue.Queue[FileEvent] = queue.Queue()
    watcher = Watcher(tmp_path, posted.put, debounce=0.05, unclosed=0.1)
    watcher.start()
    try:
        _deep(tmp_path / "during", 990)
        os.rename(tmp_path / "during", tmp_path / "tasks" / "during")  # moved in: watched with one walk
        (tmp_path / "tasks" / "after.md").write_text("# after\n")
        assert "changed" in _events(posted, "changed", "tasks/after.md")
    finally:
        watcher.stop()
        _remove(tmp_path / "tasks")


def test_a_deep_mkdir_racing_the_watch_neither_floods_warnings_nor_ends_the_watch(tmp_path: Path) -> None:
    """watchdog warned once per directory it watched again, each warning naming every watched path (a tree
    1,500 deep: 1 GB of stderr in 40 s); under warnings-as-errors that warning would end its thread."""
    with _watching(tmp_path, debounce=0.05, unclosed=0.1) as (watcher, posted):
        (tmp_path / "tasks" / "/".join(["d"] * 120)).mkdir(parents=True)
        (tmp_path / "tasks" / "after.md").write_text("# after\n")
        assert "changed" in _events(posted, "changed", "tasks/after.md")


def test_directories_made_under_tasks_make_one_rescan(tmp_path: Path) -> None:
    with _watching(tmp_path, debounce=0.05, unclosed=0.3) as (watcher, posted):
        (tmp_path / "tasks" / "x" / "y" / "z").mkdir(parents=True)
        assert posted.get(timeout=10) == FileEvent("rescan")
        with pytest.raises(queue.Empty):
            posted.get(timeout=0.7)  # one rescan for the three directories


def test_a_file_still_being_written_is_waiting_so_a_rescan_leaves_it_to_its_close(tmp_path: Path) -> None:
    with _watching(tmp_path, debounce=0.05, unclosed=30.0) as (watcher, posted):
        with open(tmp_path / "tasks" / "job.md", "wb") as handle:
            handle.write(b"---\n")
            handle.flush()
            wait_until(lambda: watcher.waiting() == frozenset({"tasks/job.md"}), what="the open file to be waiting")
            handle.write(b"---\n# job\n")
        assert posted.get(timeout=10) == FileEvent("changed", "tasks/job.md")
        assert watcher.waiting() == frozenset()


def test_a_file_renamed_while_its_writer_still_has_it_open_is_read_at_the_close(tmp_path: Path) -> None:
    with _watching(tmp_path, debounce=0.05, unclosed=30.0) as (watcher, posted):
        with open(tmp_path / "tasks" / "draft.md", "wb") as handle:
            handle.write(b"# part\n")
            handle.flush()
            wait_until(lambda: watcher.waiting() == frozenset({"tasks/draft.md"}), what="the open file to wait")
            os.rename(tmp_path / "tasks" / "draft.md", tmp_path / "tasks" / "moved.md")
            wait_until(lambda: watcher.waiting() == frozenset({"tasks/moved.md"}), what="the new name to wait")
            handle.write(b"the rest\n")
        seen = [posted.get(timeout=10) for _ in range(2)]
        assert FileEvent("changed", "tasks/moved.md") in seen and FileEvent("removed", "tasks/draft.md") in seen
