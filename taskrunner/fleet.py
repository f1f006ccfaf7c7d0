"""The fleet: every configured Worker, its session, its health and its load.

Sessions are opened and re-opened here (with backoff), heartbeats are watched
here, and `views()` gives the scheduler what it needs to place Runs. How long
a silent Worker stays online (`scheduler.worker_offline_after`) and how long
an offline Worker's Runs wait for it (`scheduler.worker_grace`) come from the
configuration, and a reload applies them. Like the engine, a Fleet is used
from one thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from taskrunner import scheduler
from taskrunner.config import Config
from taskrunner.defaults import READ_MARGIN_SECONDS
from taskrunner.enroll import enroll_local
from taskrunner.errors import WorkerError
from taskrunner.hooks import Hooks, emit
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent, WorkerLink, make_link
from taskrunner.links.local import LocalLink
from taskrunner.model import WorkerSpec
from taskrunner.protocol import Message
from taskrunner.signing import SignatureRejected, key_id, parse_public_line
from taskrunner.sshkeys import HostKeyError

#: Reconnect delays grow from this, doubling, up to RECONNECT_MAX.
RECONNECT_BASE = 0.5
RECONNECT_MAX = 30.0


@dataclass
class WorkerState:
    spec: WorkerSpec
    link: WorkerLink | None = None
    generation: int = 0
    online: bool = False
    tried: bool = False  # a session has said hello or failed at least once
    trusted: bool | None = None  # host and result keys matched their pins (None: not checked yet)
    result_key: bytes | None = None  # the Worker's result key, once its hello matched the pin
    hello: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    last_seen: float | None = None
    offline_since: float | None = None
    reconnect_at: float | None = 0.0
    failures: int = 0
    running: int = 0
    runs: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.spec.name

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name, "transport": self.spec.transport, "host": self.spec.host,
            "online": self.online, "reachable": self.online,
            "trusted": True if self.spec.transport == "local" else self.trusted,
            "slots": self.spec.slots, "used": len(self.runs), "agents": list(self.spec.agents),
            "labels": dict(self.spec.labels), "last_seen": self.last_seen, "error": self.error,
            "version": self.hello.get("version"),
        }


class Fleet:
    def __init__(self, config: Config, state_dir: Path, post: Callable[[LinkEvent], None],
                 keyring: Keyring, hooks: Hooks | None = None) -> None:
        self._state_dir = state_dir
        self.keyring = keyring
        self._post = post
        self.hooks = hooks or Hooks()
        self.workers: dict[str, WorkerState] = {}
        self.configure(config)

    def configure(self, config: Config) -> list[WorkerState]:
        """Apply a (re)loaded configuration; returns Workers that were removed."""
        self.grace = config.scheduler.worker_grace
        self.offline_after = config.scheduler.worker_offline_after
        removed = [w for name, w in self.workers.items() if name not in config.workers]
        for worker in removed:
            if worker.link:
                worker.link.close()
            del self.workers[worker.name]
        for name, spec in config.workers.items():
            current = self.workers.get(name)
            if current is None:
                self.workers[name] = WorkerState(spec)
            elif current.spec != spec:
                if (current.spec.transport, current.spec.host, current.spec.port) != (spec.transport, spec.host, spec.port):
                    if current.link:
                        current.link.close()
                    current.link = None
                    current.online = False
                    current.reconnect_at = 0.0
                current.spec = spec
        return removed

    def __getitem__(self, name: str) -> WorkerState:
        return self.workers[name]

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(self.workers.values())

    def get(self, name: str) -> WorkerState | None:
        return self.workers.get(name)

    def current(self, event: LinkEvent) -> WorkerState | None:
        """The Worker an event belongs to, or None if it is from an older session."""
        worker = self.workers.get(event.worker)
        if worker is None or event.generation != worker.generation:
            return None
        return worker

    def views(self) -> list[scheduler.WorkerView]:
        views = []
        for w in self.workers.values():
            presets = w.hello.get("agents")
            agents = frozenset(w.spec.agents)
            views.append(scheduler.WorkerView(
                name=w.name, slots=w.spec.slots, used=len(w.runs), agents=agents,
                labels=w.spec.labels, online=w.online and presets is not None,
            ))
        return views

    def all_tried(self) -> bool:
        return all(w.tried for w in self.workers.values())

    def next_wakeup(self) -> float | None:
        times = [w.reconnect_at for w in self.workers.values() if w.reconnect_at is not None]
        return min(times) if times else None

    # -- sessions --------------------------------------------------------------

    def tick(self, now: float) -> list[WorkerState]:
        """Reconnect what is due, notice silent Workers; returns Workers whose grace ran out."""
        expired = []
        for worker in self.workers.values():
            if worker.online and worker.last_seen is not None and now - worker.last_seen > self.offline_after:
                self.link_down(worker, f"no heartbeat for {now - worker.last_seen:.0f}s", now)
            if not worker.online and worker.reconnect_at is not None and now >= worker.reconnect_at:
                self._connect(worker, now)
            if not worker.online and worker.runs and worker.offline_since is not None and \
                    now - worker.offline_since > self.grace:
                expired.append(worker)
        return expired

    def _connect(self, worker: WorkerState, now: float) -> None:
        worker.reconnect_at = None
        try:
            if worker.link is None:
                worker.link = make_link(worker.spec, self._state_dir, self._post)
            # Set at every connect, so a reloaded offline_after holds from the next session on.
            worker.link.read_timeout = self.offline_after + READ_MARGIN_SECONDS
            if isinstance(worker.link, LocalLink):
                # The daemon's own Worker home: enrolled directly, its key known from the file.
                worker.result_key = enroll_local(worker.link.home, self.keyring, now)
            # Returns at once: the session says hello, or ends with why it could not open.
            worker.generation = worker.link.open()
        except (WorkerError, OSError) as exc:
            self.link_down(worker, str(exc), now)

    def hello(self, worker: WorkerState, fields: dict[str, Any], now: float) -> bool:
        """Take a session's hello; False (and the session closed) if its result key is not the pinned one."""
        try:
            worker.result_key = self._result_key(worker, fields.get("worker_key"))
        except WorkerError as exc:
            worker.trusted = False
            self.link_down(worker, str(exc), now)
            return False
        if worker.offline_since is not None:
            emit(self.hooks, "notice", f"Worker '{worker.name}' back online after {now - worker.offline_since:.1f}s")
        worker.hello = fields
        worker.trusted = True
        worker.online = True
        worker.tried = True
        worker.error = None
        worker.failures = 0
        worker.offline_since = None
        worker.last_seen = now
        emit(self.hooks, "worker_changed", worker.view())
        return True

    def _result_key(self, worker: WorkerState, seen: Any) -> bytes:
        try:
            presented = parse_public_line(seen)
        except SignatureRejected as exc:
            raise WorkerError(f"Worker '{worker.name}' presents no valid result key ({exc}): upgrade its "
                              "taskrun-worker") from None
        if worker.spec.transport == "local":
            pinned = worker.result_key or b""
            hint = ""
        elif worker.spec.worker_key is None:
            raise WorkerError(f"Worker '{worker.name}' has no pinned result key (worker_key): enroll it with "
                              f"`taskrun worker add {worker.name} --host {worker.spec.host}`")
        else:
            pinned = parse_public_line(worker.spec.worker_key)
            hint = (f"; if the Worker was reinstalled, enroll it again with "
                    f"`taskrun worker add {worker.name} --host {worker.spec.host}`")
        if presented != pinned:
            raise WorkerError(f"Worker '{worker.name}' result key changed: pinned {key_id(pinned)}, "
                              f"seen {key_id(presented)}; refusing it{hint}")
        return presented

    def link_down(self, worker: WorkerState, reason: str, now: float) -> None:
        was_online = worker.online
        if worker.link is not None and isinstance(worker.link.failure, HostKeyError):
            worker.trusted = False
        worker.online = False
        worker.tried = True
        worker.error = reason
        if worker.offline_since is None:
            worker.offline_since = now
        if worker.link is not None:
            worker.link.close()
        delay = min(RECONNECT_MAX, RECONNECT_BASE * 2 ** worker.failures)
        worker.failures += 1
        worker.reconnect_at = now + delay
        if was_online or worker.failures == 1:
            emit(self.hooks, "notice", f"Worker '{worker.name}' offline: {reason} (retrying in {delay:.1f}s)")
            emit(self.hooks, "worker_changed", worker.view())

    def send(self, worker: WorkerState, *messages: Message) -> None:
        if worker.link is None:
            return
        try:
            worker.link.send(*messages)
        except WorkerError as exc:
            # The reader sees the same end and reports it; marking offline now
            # keeps further Runs off this Worker in the meantime.
            worker.online = False
            worker.error = str(exc)

    def close(self) -> None:
        for worker in self.workers.values():
            if worker.link is not None:
                worker.link.close()
