"""A WorkerLink: one session with one Worker, whatever carries the bytes.

Subclasses only open the byte streams (`_connect`) and tear them down
(`_disconnect`); reading records and reporting them is shared, so the local
Worker and SSH Workers are one code path above the transport.

A session is opened on its own thread, never on the caller's: an SSH handshake
with a host that accepts TCP but says nothing (frozen, overloaded, behind a
half-open firewall) takes up to CONNECT_TIMEOUT, and the caller is the engine
thread, which every other Worker, Run and CLI request waits on.

A session's reader hands the daemon's loop at most MAX_QUEUED_OUTPUT_BYTES of
output it has not handled yet (OutputBudget): past that it stops reading, the
Worker's writes back up in the pipe or the SSH window, and the daemon's memory
stays the same whatever an Agent prints and however far the loop is behind.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from taskrunner.defaults import OFFLINE_AFTER_SECONDS, READ_MARGIN_SECONDS
from taskrunner.errors import ProtocolError, WorkerError
from taskrunner.model import WorkerSpec
from taskrunner.protocol import FROM_WORKER_LIMITS, Message, Reader, Writer


#: The most output (bytes of `output` payloads) one session queues for the daemon's loop before it waits.
MAX_QUEUED_OUTPUT_BYTES = 8 * 1024 * 1024
#: How often a reader waiting for the loop looks whether its session was closed meanwhile (seconds).
BUDGET_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class LinkEvent:
    """What a session reports: a record, or (message None) that it ended and why.

    `release`, when set, must be called once the event was handled (it returns the
    event's output bytes to the session's OutputBudget).
    """

    worker: str
    generation: int
    message: Message | None
    reason: str = ""
    release: Callable[[], None] | None = field(default=None, compare=False, repr=False)


class OutputBudget:
    """Bytes of output handed to the daemon's loop and not handled yet, at most `limit` (one chunk
    always passes, however large)."""

    def __init__(self, limit: int = MAX_QUEUED_OUTPUT_BYTES) -> None:
        self._limit = limit
        self._queued = 0
        self._changed = threading.Condition()

    def take(self, size: int, wanted: Callable[[], bool]) -> None:
        """Wait until `size` more bytes fit (or nothing is queued, or `wanted()` turns false), then count them."""
        with self._changed:
            while self._queued and self._queued + size > self._limit and wanted():
                self._changed.wait(BUDGET_POLL_SECONDS)
            self._queued += size

    def give(self, size: int) -> None:
        with self._changed:
            self._queued = max(0, self._queued - size)
            self._changed.notify_all()


class WorkerLink(ABC):
    def __init__(self, spec: WorkerSpec, post: Callable[[LinkEvent], None]) -> None:
        self.spec = spec
        self._post = post
        self._writer: Writer | None = None
        self._lock = threading.Lock()
        # Held while a session is being opened: one at a time, so a slow open
        # and the next one never share the subclass's connection state.
        self._opening = threading.Lock()
        self.generation = 0
        #: Why the latest session could not be opened (None: it opened, or is opening).
        self.failure: Exception | None = None
        self.budget = OutputBudget()
        #: Longest wait for the Worker's next bytes before the session counts as
        #: dead, for transports whose reads can be bounded (ssh); set before `open`.
        self.read_timeout = OFFLINE_AFTER_SECONDS + READ_MARGIN_SECONDS

    @property
    def name(self) -> str:
        return self.spec.name

    def open(self) -> int:
        """Start opening a new session and return its generation at once.

        Its records arrive through `post`, then its end; a session that cannot
        be opened only ends, with the reason (and `failure` says why).
        """
        with self._lock:
            self._close_locked()
            self.generation += 1
            self.failure = None
            generation = self.generation
        threading.Thread(target=self._session, args=(generation,), name=f"link-{self.name}", daemon=True).start()
        return generation

    def send(self, *messages: Message) -> None:
        writer = self._writer
        if writer is None:
            raise WorkerError(f"Worker '{self.name}' has no open session")
        try:
            writer.write(*messages)
        except (OSError, ValueError) as exc:
            raise WorkerError(f"Worker '{self.name}': session lost while sending ({exc})") from exc

    def close(self) -> None:
        with self._lock:
            self._close_locked()
            self.generation += 1  # a session still being opened is closed as soon as it is

    def _close_locked(self) -> None:
        if self._writer is not None:
            self._writer = None
            self._disconnect()

    def _session(self, generation: int) -> None:
        with self._opening:
            try:
                reader_stream, writer_stream = self._connect()
            except Exception as exc:  # a thread's boundary: whatever it is, the session ended and why
                self.failure = exc
                reason = str(exc) if isinstance(exc, WorkerError) else f"cannot open the session: {exc!r}"
                self._post(LinkEvent(self.name, generation, None, reason))
                return
            with self._lock:
                if generation != self.generation:  # closed or reopened meanwhile
                    self._disconnect()
                    return
                self._writer = Writer(writer_stream)
        self._read(reader_stream, generation)

    def _read(self, stream: BinaryIO, generation: int) -> None:
        reader = Reader(stream, FROM_WORKER_LIMITS)  # a Worker sends no payload but output chunks
        reason = "the Worker closed the session"
        try:
            while (message := reader.read()) is not None:
                size = len(message.payload) if message.type == "output" else 0
                if not size:
                    self._post(LinkEvent(self.name, generation, message))
                    continue
                self.budget.take(size, lambda: generation == self.generation)
                self._post(LinkEvent(self.name, generation, message, release=functools.partial(self.budget.give, size)))
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except (OSError, ValueError) as exc:
            reason = f"session lost: {exc}"
        self._post(LinkEvent(self.name, generation, None, reason))

    @abstractmethod
    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        """Open the session's streams: (from the Worker, to the Worker)."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Tear the current session down; the reader then sees its end."""
