"""The daemon: threads, one queue, the lock.

Threads and their one role each:
    main      the engine: every event, every decision, every record
    watcher   watchdog + debounce -> FileEvents on the queue
    link-*    one reader per Worker session -> LinkEvents on the queue
    control   the CLI's socket -> requests on the queue, replies back
    recorder  git: batches final records into commits
    http      the webhook receiver (taskrunner/http.py), when configured:
              queues syncs, never runs git; and /metrics (metrics.py): reads a snapshot

Signals are the entry point's business: it calls `request_stop()` (drain:
take no new work, record what arrives, commit, exit) and exits at once on a
second signal. Runs still going on Workers keep going; the next daemon
reattaches to them.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskrunner import (
    clock,
    daemonlock,
    doctor,
    fulllogs,
    gitops,
    pruner,
    safefs,
    status_query,
)
from taskrunner.config import Config, load_config
from taskrunner.control import ControlServer
from taskrunner.engine import Engine
from taskrunner.errors import ConfigError, GitError
from taskrunner.fleet import Fleet
from taskrunner.gitflow import landing, pullrequests, signers
from taskrunner.gitflow.dropped import DroppedRecords
from taskrunner.gitflow.gitstate import GitState
from taskrunner.gitflow.pullrequests import (
    BranchPushed,
    PullRequestOpened,
    PullRequests,
)
from taskrunner.gitflow.push import Pusher
from taskrunner.gitflow.sync import Syncer
from taskrunner.gitops import Git, state_dir
from taskrunner.hooks import Hooks, HookSet, emit
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent
from taskrunner.model import TaskStatus
from taskrunner.notify import Notifier
from taskrunner.recorder import CommitItem, Recorder
from taskrunner.watcher import FileEvent, Watcher
from taskrunner.writeback import WriteBehind

if TYPE_CHECKING:  # http.server and prometheus_client load only when `webhook` or `metrics` is configured
    from taskrunner.http import HttpServer, WebhookRoute
    from taskrunner.metrics import Metrics

#: Longest the main loop sleeps without an event: heartbeats and grace
#: periods are checked at least this often.
MAX_SLEEP = 0.5
#: How many queued events are handled before the scheduler runs again.
BATCH = 500
#: Seconds after the main loop starts that doctor's start-up checks begin (`git grep` over every tracked file,
#: bwrap probes): the daemon's first answers do not share the CPU with them.
DOCTOR_DELAY = 2.0
_NO_REPLAN = frozenset({"output", "started", "heartbeat"})


@dataclass
class _Request:
    payload: dict[str, Any]
    reply: queue.Queue[dict[str, Any]] = field(default_factory=lambda: queue.Queue(maxsize=1))


@dataclass(frozen=True)
class _Committed:
    """The recorder made a record commit `sha` on top of `parent` (None when unknown)."""

    sha: str
    parent: str | None


@dataclass(frozen=True)
class _Synced:
    """A sync ended (gitflow.sync.Syncer, on the recorder thread); `head` is HEAD afterwards."""

    head: str | None


@dataclass(frozen=True)
class _SyncRequest:
    """A sync asked for off the main thread (the webhook receiver); `reason` is for the log."""

    reason: str


class Daemon:
    def __init__(self, root: Path, config: Config, hooks: Hooks | None = None, once: bool = False,
                 lock_fd: int | None = None) -> None:
        self.root = root
        self.config = config
        #: What hears the engine's events: the CLI's view first; the metrics, notifier and log `add` theirs.
        self.hooks = HookSet(hooks or Hooks())
        self.once = once
        self.state_dir = state_dir(root)
        self.events: queue.Queue[object] = queue.Queue()
        self._stop = threading.Event()
        self._serving = threading.Event()  # the main loop runs: every request is answered by it (_ask)
        self.repo = Git(root, notice=lambda message: emit(self.hooks, "notice", message))
        self.recorder = Recorder(self.repo, enabled=config.git.commit, on_commit=self._committed,
                                 on_error=lambda message: emit(self.hooks, "notice", message),
                                 recover=lambda: landing.unrecorded(self.repo, self.engine.records))
        self.git_state = GitState(self.state_dir)
        notice = lambda message: emit(self.hooks, "notice", message)  # noqa: E731
        self.syncer = Syncer(self.repo, config.git.remote, self.git_state, notice,
                             on_done=lambda head: self.events.put(_Synced(head)))
        self.recorder.set_sync(self.syncer.sync)
        self.notifier = Notifier(config, notice)  # `notify`: events to commands and URLs (notify.py)
        self.hooks.add(self.notifier)
        self.pusher: Pusher | None = None
        if config.git.push:
            self.pusher = Pusher(self.repo, config.git.remote, config.git.result_branch_prefix, self.git_state, notice,
                                 on_moved=lambda head: self.events.put(_Synced(head)),
                                 on_branch_pushed=lambda branch: self.result_branch_pushed("", branch),
                                 on_event=lambda kind, fields: emit(self.hooks, "event", kind, fields))
            self.recorder.add_job(self.pusher)
            self.recorder.after_commit.append(self.pusher.wanted)
        keyring, _ = Keyring.ensure(self.state_dir, clock.wall())
        self.fleet = Fleet(config, self.state_dir, self.events.put, keyring, self.hooks)
        self.writer = WriteBehind(on_error=lambda message: emit(self.hooks, "notice", message))
        self.engine = Engine(root, config, self.fleet, self.recorder.submit, self.hooks, deliver=self.writer.run)
        self.recorder.add_job(fulllogs.Pruner(self.engine.full_logs, lambda: self.engine.config.records, notice))
        # `taskrun prune` and records.prune_after: the engine forgets the Tasks, the recorder commits (prune.py).
        self.pruner = pruner.DaemonPruner(
            self.engine, self.repo, self.events.put, lambda: self._flush(force=True, wait=True), self.recorder.kick,
            self._pruned, notice)
        self.recorder.add_job(self.pruner)
        # Records a person's `git reset` dropped: written back and committed again (gitflow/dropped.py).
        self.dropped = DroppedRecords(self.repo, self.engine.records, self.engine.tasks, notice, self.events.put,
                                      self.writer.run, self.recorder.submit)
        self.recorder.add_job(self.dropped)
        self.recorder.after_commit.append(self.dropped.landed)
        self.watcher = Watcher(root, self.events.put)
        self.control = ControlServer(self.state_dir, self._ask, lambda message: emit(self.hooks, "notice", message))
        self._lock_file: int | None = lock_fd  # daemon.lock, held from _acquire_lock to the end (or given)
        #: HEAD as this daemon last made or saw it (record commits, syncs): see _Committed.
        self._head: str | None = None
        self._tasks_touched = False  # a Task file changed since HEAD was last looked at (_follow_head)
        self._http: HttpServer | None = None
        self._metrics_http: HttpServer | None = None  # `metrics.listen` when not the webhook's address
        self.metrics: Metrics | None = None  # made when `metrics` is first configured (metrics.py)
        self._next_poll: float | None = None
        self._doctor_due: float | None = None  # when doctor's checks start (monotonic; DOCTOR_DELAY), None: started
        self.pull_requests = PullRequests(self.events.put, lambda message: emit(self.hooks, "notice", message))

    def result_branch_pushed(self, run_id: str, branch: str) -> None:
        """A Run's result branch is on the forge (any thread may call this): open or update its pull request.

        With `git.pull_requests` (gitflow/pullrequests.py); `run_id` may be
        empty, meaning the latest Run whose result branch is `branch`.
        """
        self.events.put(BranchPushed(run_id, branch))

    def request_stop(self) -> None:
        self._stop.set()
        self.events.put(None)  # wake the loop

    def run(self) -> int:
        """Serve until stopped (or, with once, until nothing is left to do); the exit code."""
        try:
            webhook = None if self.once else self._webhook_route(self.config)  # no secret: ConfigError, nothing started
            # Without the record key nothing can be recorded: a damaged one stops the start, saying so.
            self.engine.records.check_key()
            self._acquire_lock()
        except BaseException:
            self._release_lock()  # one `taskrun up` took for this daemon
            raise
        try:
            for problem in pullrequests.problems(self.config):
                emit(self.hooks, "notice", f"warning: {problem}")
            self.engine.base_commit = self._head = self.repo.head()
            # Before the recorder commits what it finds on disk: a log to cap is capped first (fulllogs.py).
            self.pruner.resume()  # a prune a kill interrupted: its files go before the restore reads runs/
            # Requests are taken from now on: a ping is answered at once, the rest once the loop runs (_ask).
            self.control.start()
            self.engine.restore()
            self.notifier.seed(self.engine.tasks.values())  # a restored status is no change to tell
            self.notifier.start()
            self.recorder.start()
            self.pull_requests.start()
            self.watcher.start()
            # doctor's checks run git grep and bwrap probes: in their own thread, DOCTOR_DELAY after the loop
            # starts, so the socket answers meanwhile (with --once before any Run: a short run still prints
            # every finding).
            if self.once:
                self._doctor()
            self.pruner.start()  # records.prune_after: once now, then daily
            self._start_http(webhook, self.config)
            self._schedule_poll(self.config)
            self.engine.scan()
            # What the start built (every Task's state: tens of MB of objects at 10,000 Tasks) lives as long
            # as the daemon: left out of the cyclic collector's full passes, which walked all of it every
            # few hundred thousand allocations (a third of a `status --json` answer's CPU at that size).
            # Reference counting still frees whatever of it is dropped later.
            gc.freeze()
            self._loop()
        finally:
            self._shutdown()
        if not self.once:
            return 0
        done = [self.engine.tasks[t] for t in self.engine.touched if t in self.engine.tasks]
        # A Task file whose id cannot have a record is INVALID all the same.
        return 0 if all(t.status is TaskStatus.COMPLETED for t in done) and not self.engine.unusable else 1

    def _doctor(self) -> None:
        """doctor's start-up findings (keys, pins, sandbox, git) as notices; a check that fails is one too."""
        try:
            for finding in (doctor.key_findings(self.root, self.config) + doctor.pin_findings(self.config)
                            + doctor.sandbox_findings(self.root, self.config)
                            + doctor.git_findings(self.root, self.config)):
                emit(self.hooks, "notice", f"{finding.level}: {finding.what} (fix: {finding.fix})")
        except Exception as exc:  # noqa: BLE001 - a check is advice: it never stops the daemon
            emit(self.hooks, "notice", f"warning: the start-up checks (taskrun doctor) failed: {exc}")

    def _loop(self) -> None:
        """Handle events and wake for timers until stopped; every wait is on the monotonic clock (clock.py).

        Wall times (a key's retirement, a usage limit's end in the engine's
        next wakeup, the next git poll) are placed on the monotonic clock
        afresh at each turn, and one already past never makes the loop spin.
        A wall-clock jump (wall minus monotonic moves by more than
        clock.JUMP_SECONDS) makes the engine plan again (its backoffs stay
        true to the monotonic clock; pauses end by the wall clock) and moves
        the next poll with it: a poll interval is a duration.
        """

        def monotonic_at(when: float | None, now: float, mono: float) -> float | None:
            return None if when is None else mono + (when - now)

        replan = True
        skew: float | None = None  # wall minus monotonic clock at the last turn
        if not self.once:
            self._doctor_due = clock.monotonic() + DOCTOR_DELAY
        self._serving.set()
        while not self._stop.is_set():
            now, mono = clock.wall(), clock.monotonic()
            if self._doctor_due is not None and mono >= self._doctor_due:
                self._doctor_due = None
                threading.Thread(target=self._doctor, name="doctor", daemon=True).start()
            jumped, skew = (0.0 if skew is None else now - mono - skew), now - mono
            if abs(jumped) > clock.JUMP_SECONDS:
                replan = True
                if self._next_poll is not None:
                    self._next_poll += jumped
            for worker in self.fleet.tick(now):
                self.engine.grace_expired(worker)
                replan = True
            retirement = self.fleet.keyring.next_retirement()
            if retirement is not None and now >= retirement:
                self.engine.refresh_keys()
            if self._next_poll is not None and now >= self._next_poll:
                self._sync("poll")
                self._schedule_poll(self.config)
            wakeup = self.engine.next_wakeup
            # Not while the clone diverged from its remote (nothing stale runs), nor while a sync moves it.
            if (replan or (wakeup is not None and now >= wakeup)) and not self.syncer.stale and not self.repo.moving:
                if self._tasks_touched:
                    self._follow_head()
                self.engine.schedule()
                replan = False
            self._flush()
            if self.once and self._once_done():
                self.engine.give_up_waiting()
                self._flush(force=True, wait=True)
                return
            retirement = self.fleet.keyring.next_retirement()  # one refresh_keys could not take waits a turn
            wakeups = [t for t in (monotonic_at(self.engine.next_wakeup, now, mono), self.fleet.next_wakeup(),
                                   self.engine.pending.due, monotonic_at(self._next_poll, now, mono),
                                   monotonic_at(retirement, now, mono) if retirement and retirement > now else None,
                                   self._doctor_due)
                       if t is not None]
            sleep = min([mono + MAX_SLEEP, *wakeups]) - mono
            try:
                event = self.events.get(timeout=max(0.0, sleep))
            except queue.Empty:
                replan = True  # a quiet moment: look again (heartbeats, reconnects)
                continue
            replan = self._handle(event) or replan
            for _ in range(BATCH - 1):  # the rest of a burst, up to BATCH events in all, then plan
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    break
                replan = self._handle(event) or replan

    def _once_done(self) -> bool:
        """`up --once` is done: the engine is idle, or nothing runs and no Task waits to start.

        The engine's idleness also waits until every Worker's first session has said hello or
        failed, since a PENDING Task may be waiting for that very Worker. With no Task PENDING
        there is nothing left for it to take, and waiting held the exit after the last record
        commit for as long as a slow session took to open or fail: up to CONNECT_TIMEOUT per
        SSH step for a host that accepts TCP and says nothing, worker_offline_after plus
        READ_MARGIN_SECONDS for a Worker whose session opens but sends no hello. What such a
        Worker holds for this control plane (a result of a Run already final, not acknowledged)
        is taken by its next session's `ready` (sessions.py).
        """
        engine = self.engine
        if engine.idle():
            return True
        # Every Run the scheduler started is in engine.runs, and a Task it unblocked is PENDING.
        return (not engine.runs and engine.next_wakeup is None
                and not any(task.status is TaskStatus.PENDING for task in engine.tasks.values()))

    def _handle(self, event: object) -> bool:
        """Apply one event; True if it may change what the scheduler would decide."""
        if isinstance(event, LinkEvent):
            try:
                self.engine.on_link_event(event)
            finally:
                if event.release is not None:
                    event.release()  # its output is handled: the session may read more (links/base.py)
            # Output, starts and heartbeats change no placement; planning over
            # every Task after each of them was most of the daemon's CPU.
            return event.message is None or event.message.type not in _NO_REPLAN
        if isinstance(event, _Committed):
            # A commit of records alone on the HEAD Runs start from changes nothing a workspace holds
            # (runs/ is not checked out): Runs keep that base, and Workers need no new objects. Anything
            # else that came in between (a user's commit, a submit) makes the new commit the base.
            if event.parent is None or event.parent != self._head:
                self.engine.base_commit = event.sha
            self._head = event.sha
            return False
        if isinstance(event, _Synced):
            self.engine.base_commit = self._head = event.head or self.engine.base_commit
            self.repo.moving = False
            # Tasks a sync brought run as dropped files do; deleted ones are cancelled.
            self.engine.scan(waiting=self.watcher.waiting())
            return True
        if isinstance(event, _SyncRequest):
            self._sync(event.reason)
            return True
        if isinstance(event, (BranchPushed, PullRequestOpened)):
            self.pull_requests.handle(event, self.engine, self.config, self.repo.branch)
            return False
        if isinstance(event, FileEvent):
            self._tasks_touched = True
            if event.kind == "changed":
                self.engine.task_file_changed(event.path)
            elif event.kind == "removed":
                self.engine.task_file_removed(event.path)
            elif event.kind == "rescan":
                self.engine.scan(waiting=self.watcher.waiting())  # files still being written: at their close
            elif event.kind == "config":
                self._reload()
        elif isinstance(event, _Request):
            if event.payload.get("command") == "prune":  # answered by the recorder thread once committed
                self.pruner.handle(event.payload, event.reply.put)
                return True
            answer = self._answer(event.payload)
            self._flush(force=True, wait=True)  # the caller may read the records as soon as it has the answer
            event.reply.put(answer)
        elif callable(event):  # work for this thread from another (pruner.DaemonPruner)
            event()
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
            self._sync("trigger")
            return {"ok": True, "message": "sync queued"}
        if command == "keys":
            self.engine.refresh_keys()
            return {"ok": True, "message": "signing keys reloaded; online Workers are told"}
        if command == "workers":
            return {"ok": True, "workers": [w.view() for w in self.fleet]}
        if command == "status":  # from memory, not runs/ (status_query.py)
            return status_query.answer(self.engine.tasks.values(), self.engine.unusable, payload)
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Called on the control thread: hand the request to the main loop and wait.

        While the daemon starts (restore, first scan) a few requests are answered here, each with
        `"starting": true`, so a client has an answer at once: `ping` (it needs no state), `workers`
        (the configured Workers, none connected yet: sessions open once the loop runs) and `status`
        (refused, `"ok": false`: the records on disk are what the daemon is loading, and the CLI reads
        them itself, cli/status.py). Every other request waits for the loop.
        """
        if not self._serving.is_set():
            command = payload.get("command")
            if command == "ping":
                return {"ok": True, "pid": os.getpid(), "starting": True}
            if command == "workers":
                return {"ok": True, "starting": True, "workers": [w.view() for w in list(self.fleet)]}
            if command == "status":
                return {"ok": False, "starting": True, "error": "the daemon is starting: its records are read"}
        request = _Request(payload)
        self.events.put(request)
        while True:
            starting = not self._serving.is_set() and not self._stop.is_set()  # however long a start takes
            try:
                return request.reply.get(timeout=MAX_SLEEP if starting else 10)
            except queue.Empty:
                if starting:
                    continue
                return {"ok": False, "error": "the daemon is busy; try again"}

    def _reload(self) -> None:
        refusal = signers.config_refusal(self.root, self.config.security, self.engine.files.git_dirs)
        if refusal:  # under security.allowed_signers only a signed configuration is taken
            emit(self.hooks, "notice", f"configuration not reloaded, the previous one stays in force: {refusal}")
            return
        try:
            config = load_config(self.root)
        except ConfigError as exc:
            emit(self.hooks, "notice", f"configuration not reloaded, the previous one stays in force: {exc}")
            return
        previous, self.config = self.config, config
        self.engine.reconfigure(config)
        if self.metrics is not None:  # a Worker taken out of the configuration leaves the metrics
            self.metrics.reseed_workers([w.view() for w in self.fleet])
        self.notifier.configure(config)
        if config.git.poll != previous.git.poll:
            self._schedule_poll(config)
        if (config.webhook != previous.webhook or config.metrics != previous.metrics) and not self.once:
            self._restart_http(config)
        self.syncer.remote = config.git.remote  # read on the recorder thread at its next sync
        if self.pusher is not None:
            self.pusher.remote, self.pusher.result_prefix = config.git.remote, config.git.result_branch_prefix
        if config.git.push != previous.git.push or config.git.commit != previous.git.commit:
            emit(self.hooks, "notice", "git.push and git.commit take effect when the daemon restarts")
        emit(self.hooks, "notice", f"configuration reloaded from {config.source}")

    # -- triggers: hooks (`taskrun trigger`), git.poll, the webhook receiver --------------

    def _sync(self, reason: str) -> None:
        """Bring in what the remote has: the git thread's sync (fetch, fast-forward; coalesced), on the main thread."""
        if reason != "poll":  # a poll every few seconds would fill the log
            emit(self.hooks, "notice", f"sync requested ({reason})")
        self.recorder.sync(reason)

    def _schedule_poll(self, config: Config) -> None:
        self._next_poll = None if config.git.poll is None else clock.wall() + config.git.poll

    def _webhook_route(self, config: Config) -> WebhookRoute | None:
        """The receiver's route when `webhook` is configured; ConfigError without its secret (fail closed)."""
        if config.webhook is None:
            return None
        from taskrunner.http import WebhookRoute

        return WebhookRoute(config.webhook.secret_env, config.webhook.max_body_bytes, self.state_dir,
                            sync=lambda reason: self.events.put(_SyncRequest(reason)),
                            notice=lambda message: emit(self.hooks, "notice", message))

    def _start_http(self, route: WebhookRoute | None, config: Config) -> None:
        """The webhook receiver and the metrics route: one listener when they share an address (metrics.py)."""
        wanted = None if self.once else config.metrics
        if route is None and wanted is None:
            return  # no listener configured
        from taskrunner.http import HttpServer
        from taskrunner.metrics import PATH as METRICS_PATH
        from taskrunner.metrics import Metrics, MetricsRoute, listeners

        if wanted is not None and self.metrics is None:
            self.metrics = Metrics()
            self.metrics.seed(self.engine.tasks.values(), [w.view() for w in self.fleet])
            self.hooks.add(self.metrics)
        webhook = (config.webhook.host, config.webhook.port) if route is not None and config.webhook else None
        plan = listeners(webhook, {"/webhook": route, "/": route} if route is not None else {}, wanted,
                         MetricsRoute(self.metrics) if wanted is not None and self.metrics is not None else None)
        for host, port, routes, where in plan:
            server = HttpServer(host, port, routes, notice=lambda message: emit(self.hooks, "notice", message),
                                where=where)
            server.start()
            if where == "webhook.listen":
                self._http = server
            else:
                self._metrics_http = server
            host, port = server.address
            if "/webhook" in routes:
                emit(self.hooks, "notice", f"webhook receiver listening on http://{host}:{port}/webhook")
            if METRICS_PATH in routes:
                emit(self.hooks, "notice", f"metrics listening on http://{host}:{port}{METRICS_PATH}")

    def _restart_http(self, config: Config) -> None:
        """After a reload: the old receiver stops; a new one starts if configured and possible (else a notice)."""
        self._stop_http()
        try:
            self._start_http(self._webhook_route(config), config)
        except ConfigError as exc:
            emit(self.hooks, "notice", f"HTTP listener not started (webhook, metrics): {exc}")

    def _stop_http(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None

    def _follow_head(self) -> None:
        """New Runs start from HEAD as it is now when someone else moved it (a user's commit in this
        clone that brought a Task with the files it needs). One `rev-parse`, only after Task files changed."""
        self._tasks_touched = False
        head = gitops.head_of(self.root)
        # A record commit the recorder just made is ours: its _Committed event is on its way.
        if head is not None and head != self._head and head not in self.repo.made:
            self.engine.base_commit = self._head = head

    def _committed(self, sha: str, items: list[CommitItem], what: str | None = None) -> None:
        """On the recorder thread, which owns git. `what` the commit held, when not records (a prune)."""
        try:
            parent: str | None = self.repo.run("rev-parse", "--verify", "--quiet", f"{sha}^")
        except GitError:
            parent = None
        self.events.put(_Committed(sha, parent))
        emit(self.hooks, "committed", sha, what or f"{len(items)} record(s)")

    def _pruned(self, sha: str) -> None:
        """A prune's commit is made (recorder thread): what follows a record commit (push, hooks) follows it."""
        self._committed(sha, [], "a prune")
        for hook in self.recorder.after_commit:
            hook(sha)

    def _acquire_lock(self) -> None:
        """Take daemon.lock (daemonlock.py), unless `taskrun up` took it for this daemon already (`lock_fd`)."""
        fd = self._lock_file if self._lock_file is not None else daemonlock.take(self.state_dir, self.root)
        self._lock_file = fd
        # Ours alone now: temp files a killed daemon left mid-write (the record key's, say) go.
        state = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            safefs.drop_stale_temps(state)
        finally:
            os.close(state)

    def _shutdown(self) -> None:
        self._stop.set()  # requests still waiting for the loop (a start that failed) are let go (_ask)
        for stop in (self._stop_http, lambda: self.engine.flush(force=True), self.writer.stop, self.watcher.stop, self.control.stop,
                     self.fleet.close, self.recorder.stop, self.pull_requests.stop, self.notifier.stop):
            try:
                stop()
            except Exception as exc:  # shutting down: report, keep going
                emit(self.hooks, "notice", f"during shutdown: {exc}")
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
