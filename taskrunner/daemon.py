"""The daemon: threads, one queue, the lock.

Threads and their one role each:
    main      the engine: every event, every decision, every record
    watcher   watchdog + debounce -> FileEvents on the queue
    link-*    one reader per Worker session -> LinkEvents on the queue
    control   the CLI's socket -> requests on the queue, replies back
    recorder  git: batches final records into commits

Signals are the entry point's business: it calls `request_stop()` (drain:
take no new work, record what arrives, commit, exit) and exits at once on a
second signal. Runs still going on Workers keep going; the next daemon
reattaches to them.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskrunner import doctor
from taskrunner.config import Config, load_config
from taskrunner.control import ControlServer
from taskrunner.defaults import STATE_DIR
from taskrunner.engine import Engine
from taskrunner.errors import ConfigError, LockError
from taskrunner.fleet import Fleet
from taskrunner.gitops import Git
from taskrunner.hooks import Hooks, emit
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent
from taskrunner.model import TaskStatus
from taskrunner.recorder import CommitItem, Recorder
from taskrunner.watcher import FileEvent, Watcher
from taskrunner.writeback import WriteBehind

#: Longest the main loop sleeps without an event: heartbeats and grace
#: periods are checked at least this often.
MAX_SLEEP = 0.5
#: How many queued events are handled before the scheduler runs again.
BATCH = 500
_NO_REPLAN = frozenset({"output", "started", "heartbeat"})


@dataclass
class _Request:
    payload: dict[str, Any]
    reply: queue.Queue[dict[str, Any]] = field(default_factory=lambda: queue.Queue(maxsize=1))


@dataclass(frozen=True)
class _Committed:
    sha: str


class Daemon:
    def __init__(self, root: Path, config: Config, hooks: Hooks | None = None, once: bool = False) -> None:
        self.root = root
        self.config = config
        self.hooks = hooks or Hooks()
        self.once = once
        self.state_dir = root / STATE_DIR
        self.events: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self.repo = Git(root, notice=lambda message: emit(self.hooks, "notice", message))
        self.recorder = Recorder(self.repo, enabled=config.git.commit, on_commit=self._committed,
                                 on_error=lambda message: emit(self.hooks, "notice", message))
        keyring, _ = Keyring.ensure(self.state_dir, time.time())
        self.fleet = Fleet(config, self.state_dir, self.events.put, keyring, self.hooks)
        self.writer = WriteBehind(on_error=lambda message: emit(self.hooks, "notice", message))
        self.engine = Engine(root, config, self.fleet, self.recorder.submit, self.hooks, deliver=self.writer.run)
        self.watcher = Watcher(root, self.events.put)
        self.control = ControlServer(self.state_dir, self._ask)
        self._lock_file: int | None = None

    def request_stop(self) -> None:
        self._stop.set()
        self.events.put(None)  # wake the loop

    def run(self) -> int:
        """Serve until stopped (or, with once, until nothing is left to do); the exit code."""
        self._acquire_lock()
        try:
            if self.config.git.push:
                emit(self.hooks, "notice", "git.push is not implemented yet: result commits stay local")
            for finding in (doctor.key_findings(self.root, self.config) + doctor.pin_findings(self.config)
                            + doctor.sandbox_findings(self.root, self.config)):
                emit(self.hooks, "notice", f"{finding.level}: {finding.what} (fix: {finding.fix})")
            self.recorder.start()
            self.engine.base_commit = self.repo.head()
            self.engine.restore()
            self.watcher.start()
            self.control.start()
            self.engine.scan()
            self._loop()
        finally:
            self._shutdown()
        if not self.once:
            return 0
        done = [self.engine.tasks[t] for t in self.engine.touched if t in self.engine.tasks]
        # A Task file whose id cannot have a record is INVALID all the same.
        return 0 if all(t.status is TaskStatus.COMPLETED for t in done) and not self.engine.unusable else 1

    def _loop(self) -> None:
        replan = True
        while not self._stop.is_set():
            now = time.time()
            for worker in self.fleet.tick(now):
                self.engine.grace_expired(worker)
                replan = True
            retirement = self.fleet.keyring.next_retirement()
            if retirement is not None and now >= retirement:
                self.engine.refresh_keys()
            wakeup = self.engine.next_wakeup
            if replan or (wakeup is not None and now >= wakeup):
                self.engine.schedule()
                replan = False
            self._flush()
            if self.once and self.engine.idle():
                self.engine.give_up_waiting()
                self._flush(force=True, wait=True)
                return
            wakeups = [t for t in (self.engine.next_wakeup, self.fleet.next_wakeup(), self.engine.pending.due,
                                   self.fleet.keyring.next_retirement()) if t is not None]
            sleep = min([now + MAX_SLEEP, *wakeups]) - now
            try:
                event = self.events.get(timeout=max(0.0, sleep))
            except queue.Empty:
                replan = True  # a quiet moment: look again (heartbeats, reconnects)
                continue
            for _ in range(BATCH):
                replan = self._handle(event) or replan
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    break

    def _handle(self, event: object) -> bool:
        """Apply one event; True if it may change what the scheduler would decide."""
        if isinstance(event, LinkEvent):
            self.engine.on_link_event(event)
            # Output, starts and heartbeats change no placement; planning over
            # every Task after each of them was most of the daemon's CPU.
            return event.message is None or event.message.type not in _NO_REPLAN
        if isinstance(event, _Committed):
            self.engine.base_commit = event.sha
            return False
        if isinstance(event, FileEvent):
            if event.kind == "changed":
                self.engine.task_file_changed(event.path)
            elif event.kind == "removed":
                self.engine.task_file_removed(event.path)
            elif event.kind == "rescan":
                self.engine.scan()
            elif event.kind == "config":
                self._reload()
        elif isinstance(event, _Request):
            answer = self._answer(event.payload)
            self._flush(force=True, wait=True)  # the caller may read the records as soon as it has the answer
            event.reply.put(answer)
        return True

    def _flush(self, force: bool = False, wait: bool = False) -> None:
        if self.engine.flush(force) and not self.engine.runs:
            # Nothing else is about to finish: commit now rather than wait out the window
            # (once the writer has handed the commits over).
            self.writer.run(self.recorder.kick)
        if wait:
            self.writer.wait()

    def _answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        command = payload.get("command")
        task = str(payload.get("task", ""))
        if command == "ping":
            return {"ok": True, "pid": os.getpid()}
        if command == "cancel":
            return self.engine.cancel(task)
        if command == "retry":
            return self.engine.retry(task)
        if command == "trigger":
            self.engine.scan()
            return {"ok": True, "message": "tasks/ rescanned"}
        if command == "keys":
            self.engine.refresh_keys()
            return {"ok": True, "message": "signing keys reloaded; online Workers are told"}
        if command == "workers":
            return {"ok": True, "workers": [w.view() for w in self.fleet]}
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Called on the control thread: hand the request to the main loop and wait."""
        request = _Request(payload)
        self.events.put(request)
        try:
            return request.reply.get(timeout=10)
        except queue.Empty:
            return {"ok": False, "error": "the daemon is busy; try again"}

    def _reload(self) -> None:
        try:
            config = load_config(self.root)
        except ConfigError as exc:
            emit(self.hooks, "notice", f"configuration not reloaded, the previous one stays in force: {exc}")
            return
        self.config = config
        self.engine.reconfigure(config)
        emit(self.hooks, "notice", f"configuration reloaded from {config.source}")

    def _committed(self, sha: str, items: list[CommitItem]) -> None:
        self.events.put(_Committed(sha))
        emit(self.hooks, "committed", sha, f"{len(items)} record(s)")

    def _acquire_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(
                f"a taskrun daemon is already running in {self.root} (pid {holder}); "
                "use `taskrun status`, or stop it before starting another"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_file = fd

    def _shutdown(self) -> None:
        for stop in (lambda: self.engine.flush(force=True), self.writer.stop, self.watcher.stop, self.control.stop,
                     self.fleet.close, self.recorder.stop):
            try:
                stop()
            except Exception as exc:  # shutting down: report, keep going
                emit(self.hooks, "notice", f"during shutdown: {exc}")
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
