"""A WorkerLink: one session with one Worker, whatever carries the bytes.

Subclasses only open the byte streams (`_connect`) and tear them down
(`_disconnect`); reading records and reporting them is shared, so the local
Worker and SSH Workers are one code path above the transport.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import BinaryIO, Callable

from taskrunner.errors import ProtocolError, WorkerError
from taskrunner.model import WorkerSpec
from taskrunner.protocol import Message, Reader, Writer


@dataclass(frozen=True)
class LinkEvent:
    """What a session reports: a record, or (message None) that it ended and why."""

    worker: str
    generation: int
    message: Message | None
    reason: str = ""


class WorkerLink(ABC):
    def __init__(self, spec: WorkerSpec, post: Callable[[LinkEvent], None]) -> None:
        self.spec = spec
        self._post = post
        self._writer: Writer | None = None
        self._lock = threading.Lock()
        self.generation = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def open(self) -> int:
        """Start a new session; its records arrive through `post`. Returns its generation."""
        with self._lock:
            self._close_locked()
            self.generation += 1
            reader_stream, writer_stream = self._connect()
            self._writer = Writer(writer_stream)
            generation = self.generation
        threading.Thread(target=self._read, args=(reader_stream, generation),
                         name=f"link-{self.name}", daemon=True).start()
        return generation

    def send(self, message: Message) -> None:
        writer = self._writer
        if writer is None:
            raise WorkerError(f"Worker '{self.name}' has no open session")
        try:
            writer.write(message)
        except (OSError, ValueError) as exc:
            raise WorkerError(f"Worker '{self.name}': session lost while sending ({exc})") from exc

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._writer is not None:
            self._writer = None
            self._disconnect()

    def _read(self, stream: BinaryIO, generation: int) -> None:
        reader = Reader(stream)
        reason = "the Worker closed the session"
        try:
            while (message := reader.read()) is not None:
                self._post(LinkEvent(self.name, generation, message))
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
