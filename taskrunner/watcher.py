"""watchdog -> events about Task files and the configuration.

A file written and closed (inotify's close-after-write) or renamed into place
is read at once: that is how editors and `taskrun submit` finish a file.
A file created or written and not closed yet is still being written (`cp` of
a big file makes it empty first, then writes it in pieces): it waits for its
close, or for UNCLOSED_QUIET_SECONDS without another event (a writer that
keeps it open, a touch), so a half-written file is not read. A removal is
debounced until the file has been quiet for DEBOUNCE_SECONDS. A file written
in two separate writes (each closed) further apart than that is read after
each: write a Task file under another name and rename it into tasks/.
Editor swap and temp files are ignored.

A directory moved or removed under tasks/ carries no per-file events, so it
triggers a rescan once the debounce is over; one made there (`mkdir -p`,
`cp -r`) after the unclosed wait, when what is written into it is most
likely complete. Many such events make one rescan. A rescan skips the files
still waiting here for their writer (`waiting`): they are read at their
close. watchdog walks a new directory with os.walk, one frame per level: the
recursion limit is raised so that no tree a path can name ends its thread.

An overflow of the kernel's inotify queue (fs.inotify.max_queued_events,
16384 by default: 10,000 Task files renamed into tasks/ at once overflow it)
triggers a rescan too, since the events lost are not known: watchdog rebuilds its watches and says so
only in a log record (`watchdog.observers.inotify_c`, "Inotify queue
overflowed"), which `_Overflow` turns into one rescan once the files are quiet.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from taskrunner.defaults import CONFIG_FILE, DEBOUNCE_SECONDS, TASKS_DIR
from taskrunner.taskfile import is_ignored_name


@dataclass(frozen=True)
class FileEvent:
    """kind: "changed" or "removed" for a Task file, "config", or "rescan"."""

    kind: str
    path: str = ""  # relative to the repository root


#: Quiet seconds after which a file written and not closed (see the module doc) is read all the same.
UNCLOSED_QUIET_SECONDS = 2.0
#: Levels a path of PATH_MAX bytes can have ('a/a/…'), with room for the frames below a walk.
WALK_DEPTH_LIMIT = 4096 // 2 + 1000
#: The logger watchdog reports an inotify queue overflow on (watchdog/observers/inotify_c.py).
OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


class _Overflow(logging.Handler):
    """watchdog's log record of a queue overflow -> a rescan (the module doc)."""

    def __init__(self, rescan: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._rescan = rescan

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower():
            self._rescan()


class Watcher(FileSystemEventHandler):
    def __init__(self, root: Path, post: Callable[[FileEvent], None], debounce: float = DEBOUNCE_SECONDS,
                 unclosed: float = UNCLOSED_QUIET_SECONDS) -> None:
        self.root = root
        self._post = post
        self._debounce = debounce
        self._unclosed = max(debounce, unclosed)
        self._due: dict[str, tuple[float, FileEvent]] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._observer = Observer()
        self._timer = threading.Thread(target=self._flush_loop, name="watcher-debounce", daemon=True)
        self._overflow = _Overflow(lambda: self._later(FileEvent("rescan")))

    def start(self) -> None:
        # watchdog walks a directory that appears (and tasks/ at the start) with os.walk, one frame per level:
        # a pushed tree 1,000 directories deep would end its thread (RecursionError) and with it every event.
        # Paths are at most PATH_MAX (4096) bytes, so no walk goes deeper than WALK_DEPTH_LIMIT.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), WALK_DEPTH_LIMIT))
        # When a `mkdir -p` races its recursive watch, watchdog warns once per directory it watches again, each
        # warning naming every watched path: a tree 1,500 deep made 1 GB of stderr in 40 s. It keeps one watch.
        warnings.filterwarnings("ignore", message="Callback with id .* already exists for watch",
                                category=RuntimeWarning, module="watchdog")
        overflow = logging.getLogger(OVERFLOW_LOGGER)
        overflow.setLevel(logging.WARNING)  # heard whatever level the root logger is given
        overflow.addHandler(self._overflow)
        tasks = self.root / TASKS_DIR
        if not os.path.lexists(tasks):
            tasks.mkdir(exist_ok=True)
        # A tasks/ that is a link (or a file) is not watched through: the engine
        # reads no Task through it and says so; the root's watch sees it replaced.
        if tasks.is_dir() and not tasks.is_symlink():
            self._observer.schedule(self, str(tasks), recursive=True)
        self._observer.schedule(self, str(self.root), recursive=False)
        self._observer.start()
        self._timer.start()

    def stop(self) -> None:
        logging.getLogger(OVERFLOW_LOGGER).removeHandler(self._overflow)
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._observer.stop()
        for thread in (self._observer, self._timer):
            if thread.ident is not None:  # a daemon whose start failed never started them
                thread.join()

    def waiting(self) -> frozenset[str]:
        """The Task files (paths relative to the root) whose change waits for its writer's close or the quiet
        (the module doc): a rescan leaves them to that event."""
        with self._cond:
            return frozenset(path for path, (_, event) in self._due.items() if event.kind == "changed")

    # -- watchdog's thread -----------------------------------------------------

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        if event.is_directory:
            # One rescan for many (`mkdir -p` makes one event per level): a directory moved or removed once
            # the debounce is over; one made (its files may still be being written) after the unclosed wait.
            if kind in ("moved", "deleted"):
                self._later(FileEvent("rescan"))
            elif kind == "created" and self._under_tasks(str(event.src_path)):
                self._later(FileEvent("rescan"), self._unclosed)
            return
        if kind == "moved":
            # Renamed in whole, it is read at once; renamed while its writer still has it open, at the close.
            with self._cond:
                pending = self._due.get(self._rel(str(event.src_path)))
            self._file(str(event.src_path), "removed")
            self._file(str(event.dest_path), "changed", at_once=pending is None or pending[1].kind != "changed")
        elif kind == "deleted":
            self._file(str(event.src_path), "removed")
        else:
            # "closed": written and closed; "created", "modified": a writer may still be at it.
            self._file(str(event.src_path), "changed", at_once=kind == "closed")

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def _file(self, path: str, kind: str, at_once: bool = False) -> None:
        rel = self._rel(path)
        if rel == CONFIG_FILE:
            self._later(FileEvent("config", rel))
            return
        if not rel.startswith(TASKS_DIR + "/") or not rel.endswith(".md"):
            return
        if any(is_ignored_name(part) for part in rel.split("/")[1:]):
            return
        event = FileEvent(kind, rel)
        # A removal waits out the debounce too: git replaces a file it updates (a sync, a checkout) by
        # unlinking and writing it, and a Task whose file is back is changed, not deleted (_flush_loop).
        if at_once:
            self._now(event)
        else:
            self._later(event, self._unclosed if kind == "changed" else self._debounce)

    def _under_tasks(self, path: str) -> bool:
        return os.path.relpath(path, self.root).startswith(TASKS_DIR + "/")

    def _now(self, event: FileEvent) -> None:
        with self._cond:
            self._due.pop(event.path, None)
        self._post(event)

    def _later(self, event: FileEvent, quiet: float | None = None) -> None:
        with self._cond:
            self._due[event.path] = (time.monotonic() + (self._debounce if quiet is None else quiet), event)
            self._cond.notify()

    # -- the debounce thread ---------------------------------------------------

    def _flush_loop(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                ready = [path for path, (due, _) in self._due.items() if due <= now]
                for path in ready:
                    event = self._due.pop(path)[1]
                    if event.kind == "removed" and os.path.lexists(os.path.join(self.root, path)):
                        event = FileEvent("changed", path)
                    self._post(event)
                wait = min((due for due, _ in self._due.values()), default=now + 3600) - now
                self._cond.wait(timeout=max(wait, 0.001))
