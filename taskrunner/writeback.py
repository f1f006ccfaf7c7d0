"""The write-behind thread: the engine's records are written off the engine thread.

Creating and replacing small files is the slowest thing a Run costs the
control plane (ext4 serialises them on its journal; with several Workers
writing on the same disk one record can take a millisecond). The engine thread
hands each batch over as one job and goes on with the next events; this thread
runs the jobs one at a time in the order given, so a record is still on disk
before the message or commit that depends on it, and a newer version of a
record always lands after an older one.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

_STOP = object()


class WriteBehind:
    def __init__(self, on_error: Callable[[str], None]) -> None:
        self._jobs: queue.Queue[object] = queue.Queue()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._loop, name="records", daemon=True)
        self._thread.start()

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` after every job handed over before it."""
        self._jobs.put(job)

    def wait(self) -> None:
        """Return once every job handed over so far has run."""
        done = threading.Event()
        self._jobs.put(done.set)
        done.wait()

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        self._jobs.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            try:
                job()  # type: ignore[operator]
            except Exception as exc:  # a thread's boundary: report, keep serving
                self._on_error(f"writing records failed: {exc!r}")
