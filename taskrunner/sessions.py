"""Worker sessions: what the engine does with each record a Worker sends.

The engine owns one `WorkerSessions` and hands it every link event
(`Engine.on_link_event`). It changes the engine's state only through what it
is given: the fleet, the records, the Runs not yet final, and the engine's
own `send`, `finish`, `run_lost` and `save_run`, so a record is still written
before any message that depends on it (engine.py, batch.py).

It also holds the repository transfer (`transfer`, gitflow/transfer.py): what
each Worker's cache has (from `ready`), the assignments to send again with the
whole history when a Worker lacks objects, and, for each verified result that
carries a change, the import and the result branch (gitflow/importer.py). Each
Run's summary.md is written here as it reaches its final status (`summarize`,
called by the engine).
"""

from __future__ import annotations

from typing import Any, Callable

from taskrunner import agentwire, crashpoints, diskspace
from taskrunner.bundle import Bundle
from taskrunner.diskspace import RecordsFull, Stall
from taskrunner.errors import GitError, RecordError
from taskrunner.fleet import Fleet, WorkerState
from taskrunner.gitflow import summary
from taskrunner.gitflow.importer import ChangeRejected, diffstat, import_change
from taskrunner.gitflow.transfer import Transfer, git_fields
from taskrunner.hooks import Hooks, emit
from taskrunner.links import LinkEvent
from taskrunner.model import RunStatus, TaskSpec
from taskrunner.protocol import Message
from taskrunner.records import Records
from taskrunner.results import ResultRejected, more_output_owed, verified_result
from taskrunner.signing import SigningKey, key_id
from taskrunner.state import RunState, TaskState

#: The records a Worker sends (README, the protocol table); any other ends its session.
_FROM_WORKER = frozenset({"hello", "ready", "heartbeat", "error", "trusted", "started", "output", "result"})


class WorkerSessions:
    def __init__(
        self,
        fleet: Fleet,
        records: Records,
        runs: dict[str, RunState],
        hooks: Hooks,
        clock: Callable[[], float],
        send: Callable[[WorkerState, Message], None],
        finish: Callable[..., None],
        run_lost: Callable[[RunState, str, RunStatus], None],
        save_run: Callable[..., None],
    ) -> None:
        self.fleet = fleet
        self.records = records
        self.runs = runs  # the engine's own dict: Runs not yet final, by run id
        self.hooks = hooks
        self._clock = clock
        self._send = send
        self._finish = finish
        self._run_lost = run_lost
        self._save_run = save_run
        #: The repository to the Workers (gitflow/transfer.py); the engine builds assignments with it.
        self.transfer = Transfer(records.root)
        #: The configuration in force (the engine sets it): what `git` says for results.
        self.config: Callable[[], Any] = lambda: None

    def assignment(self, run: RunState, spec: TaskSpec, worker: WorkerState, files: dict[str, bytes],
                   signer: SigningKey, now: float) -> tuple[Bundle, Message]:
        """The signed bundle of a new Run and the `assign` message carrying it (gitflow/transfer.py).

        TaskrunError (a git failure making the repository's pack) when none can be made.
        """
        config = self.config()
        agent = config.agents[run.agent]
        assert worker.result_key is not None  # a Worker is online only once its hello matched the pin
        seq = self.transfer.next_seq(worker.name, now)
        return self.transfer.assign(
            worker.name, files, signer, now=now, run_id=run.run_id, task_id=run.task_id,
            revision=run.revision, attempt=run.attempt, task_file=spec.path,
            timeout=spec.timeout or config.scheduler.timeout, worker=worker.name,
            audience=key_id(worker.result_key), seq=seq, base=run.base_commit,
            git_fields=git_fields(config.git, run.task_id, spec.title),
            # sandbox "none": this Worker may run the Agent unconfined, if it cannot confine it (confine.py).
            agent=agentwire.agent_manifest(agent, worker.spec.sandbox, config.prices),
            budget=agentwire.budget(spec, agent), run_number=run.number, title=spec.title,
        )

    def on_link_event(self, event: LinkEvent) -> None:
        worker = self.fleet.current(event)
        if worker is None:
            return
        if event.message is None:
            # A session we closed ourselves (heartbeat missed) ends here too:
            # count each loss once.
            if worker.online or worker.reconnect_at is None:
                self.fleet.link_down(worker, event.reason, self._clock())
            return
        message = event.message
        worker.last_seen = self._clock()
        if message.type not in _FROM_WORKER:
            self.fleet.link_down(worker, f"protocol error: a Worker does not send {message.type!r} records",
                                 self._clock())
            return
        try:
            self._on_message(worker, message)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # A Worker's records are input like any other: a malformed one ends its session
            # (it reconnects with backoff), never the daemon.
            self.fleet.link_down(worker, f"protocol error: a malformed {message.type} record "
                                 f"({type(exc).__name__}: {exc})", self._clock())

    def _on_message(self, worker: WorkerState, message: Message) -> None:
        """One record from an open session; KeyError, TypeError, ValueError when it is malformed."""
        if message.type == "hello":
            auth = self.fleet.hello(worker, message.fields, self._clock())
            if auth is not None:
                self._send(worker, auth)
        elif message.type == "ready":
            self._ready(worker, message)
        elif message.type == "heartbeat":
            worker.running = int(message.get("running") or 0)
            full = message.get("home_full")
            worker.home_full = str(full)[:500] if full else None
        elif message.type == "error":
            self._worker_error(worker, message)
        elif message.type == "trusted":
            worker.hello["trust"] = {"keys": message["keys"]}
            emit(self.hooks, "notice", f"Worker '{worker.name}' now trusts {', '.join(map(str, message['keys']))}")
            self.check_trust(worker, worker.hello["trust"], self._clock())
        else:
            run = self.runs.get(message.get("run_id"))
            if run is None or run.worker != worker.name:
                if message.type == "result":
                    self._send(worker, Message("ack", {"run_id": message["run_id"]}))
                return
            getattr(self, f"_on_{message.type}")(worker, run, message)

    def _ready(self, worker: WorkerState, message: Message) -> None:
        """The session is authenticated and the Worker lists its Runs: reattach ours, stop the rest."""
        now = self._clock()
        self.fleet.ready(worker, now, message.get("agents"))
        self.check_trust(worker, worker.hello.get("trust"), now)
        self.transfer.worker_ready(worker.name, message.get("repos"))
        runs = message["runs"] if isinstance(message["runs"], list) else []
        held = {entry["run_id"]: entry for entry in runs if isinstance(entry, dict)}
        for run_id in sorted(worker.runs):
            run = self.runs[run_id]
            if run_id in held:
                offset = self.records.output_size(run.task_id, run.number)
                self._send(worker, Message("resume", {"run_id": run_id, "offset": offset}))
            else:
                self._run_lost(run, f"Worker '{worker.name}' no longer holds the Run", RunStatus.FAILED)
        for run_id, entry in held.items():
            if run_id not in worker.runs:
                # A Run this control plane already settled (cancelled while the
                # Worker was away, or retried elsewhere): stop it and forget it.
                kind = "cancel" if entry.get("state") == "running" else "ack"
                self._send(worker, Message(kind, {"run_id": run_id, "reason": "no longer wanted"}))

    def check_trust(self, worker: WorkerState, trust: Any, now: float) -> None:
        """Send a trust statement when the Worker's trusted keys are not the keyring's live ones
        (the Worker gets no Runs until it takes it)."""
        correction = self.fleet.trust_correction(worker, trust.get("keys") if isinstance(trust, dict) else None,
                                                 now)
        if correction is not None:
            self._send(worker, correction)

    def _worker_error(self, worker: WorkerState, message: Message) -> None:
        """A request the Worker refused: a session proof or trust statement (the Worker is untrusted),
        an assignment (its Run fails with the reason; nothing of it is on the Worker), or a notice."""
        request, text = message.get("request"), str(message["message"])
        if request in ("auth", "trust"):
            self.fleet.refused(worker, request, text, self._clock())
            return
        run = self.runs.get(message.get("run_id"))
        if request == "assign" and run is not None and run.worker == worker.name \
                and run.status is RunStatus.ASSIGNED:
            if message.get("missing_objects") is True and self._resend(worker, run):
                return
            refusal = next((k for k in ("disk_full", "untrusted", "missing_objects") if message.get(k) is True),
                           "refused")
            emit(self.hooks, "event", "rejected", {"what": "bundle", "reason": refusal, "worker": worker.name})
            if message.get("disk_full") is True:
                # Nothing of it is on the Worker: it goes elsewhere (or here once its heartbeat says there is room).
                worker.home_full = text[:500]
                run.refused = True
                self._run_lost(run, f"Worker '{worker.name}' refused it: {text}", RunStatus.FAILED)
            elif message.get("untrusted") is True:
                # Its trust store changed under the session (`trust --reset`, say): no more Runs
                # for it, and this one goes elsewhere without spending a retry.
                self.fleet.lost_trust(worker, text, self._clock())
                run.refused = True
                self._run_lost(run, f"Worker '{worker.name}' refused it: {text}", RunStatus.FAILED)
            else:
                self._finish(run, RunStatus.FAILED, None, text)
            return
        emit(self.hooks, "notice", f"Worker '{worker.name}': {text}")

    def _resend(self, worker: WorkerState, run: RunState) -> bool:
        """The Worker's cache lacks what the pack builds on: the same Run again, with the whole history
        (gitflow/transfer.py). False when it cannot be resent (the Run then fails with the Worker's reason)."""
        try:
            again = self.transfer.resend(worker.name, run.run_id, self._clock())
        except GitError as exc:
            emit(self.hooks, "notice", f"cannot send Run {run.run_id} again: {exc}")
            return False
        if again is None:
            return False
        package, assign = again
        try:
            self.records.save_manifest(run.task_id, run.number, {**package.manifest,
                                                                 "signatures": package.envelope["signatures"]})
        except RecordError as exc:
            emit(self.hooks, "notice", str(exc))
        emit(self.hooks, "notice", f"Worker '{worker.name}' lacks objects of the repository: Run {run.run_id} is "
                                   "sent again with the whole history of its base commit")
        self._send(worker, assign)
        return True

    def summarize(self, run: RunState, task: TaskState | None) -> None:
        """Write the Run's summary.md (gitflow/summary.py) as it reaches its final status."""
        self.transfer.done(run.run_id)
        title = task.spec.title if task is not None and task.spec is not None else run.task_id
        size = self.records.output_size(run.task_id, run.number)
        tail = self.records.read_output(run.task_id, run.number, max(0, size - summary.SUMMARY_TAIL_BYTES)) or b""
        stat = None
        if run.result_commit and run.base_commit:
            stat = diffstat(self.transfer.git_dir, run.base_commit, run.result_commit)
        paths = [p for p in self.records.run_paths(run.task_id, run.number) if not p.endswith("summary.md")]
        try:
            run.summary = self.records.save_summary(run.task_id, run.number,
                                                    summary.render(run, title, tail, stat, paths))
        except RecordError as exc:
            emit(self.hooks, "notice", str(exc))

    def _take_change(self, run: RunState, result: dict[str, Any], pack: bytes) -> None:
        """Import the change a verified result carries (gitflow/importer.py); ChangeRejected saying why not."""
        change = result.get("change")
        if change is None:
            if pack:
                raise ChangeRejected("change rejected: the result carries a pack but signs no change")
            return
        if result.get("status") != RunStatus.COMPLETED.value:
            raise ChangeRejected("change rejected: only a COMPLETED Run returns a change")
        git = getattr(self.config(), "git", None)
        prefix = getattr(git, "result_branch_prefix", "taskrun/")
        most = getattr(git, "max_result_bytes", 64 * 1024 * 1024)
        try:
            imported = import_change(self.transfer.git_dir, change, pack, run_id=run.run_id, task_id=run.task_id,
                                     base=run.base_commit, prefix=prefix, max_bytes=most)
        except GitError as exc:
            full = diskspace.git_full(str(exc), self.transfer.git_dir)
            free = diskspace.free_bytes(self.transfer.git_dir)
            if full is not None and free is not None and len(pack) >= free and diskspace.has_room(self.transfer.git_dir):
                # The disk has room, but not for this change: waiting would hold every other Run for good.
                raise ChangeRejected(f"change rejected: its pack of {len(pack)} bytes does not fit on the disk "
                                     f"holding the repository ({free} bytes free): free space there, then "
                                     "`taskrun retry` the Task") from None
            if full is not None:
                # Nothing wrong with the change: the repository's disk is full. Taken again after the resume.
                raise RecordsFull(f"cannot import the change of Run {run.run_id}: {full}",
                                  diskspace.reason("the repository", self.transfer.git_dir)) from None
            raise ChangeRejected(f"change rejected: {exc}") from None
        run.result_commit, run.result_branch, run.result_note = imported.commit, imported.branch, imported.note
        if imported.note:
            emit(self.hooks, "notice", f"Run {run.run_id} of '{run.task_id}': {imported.note}")

    def _take_report(self, run: RunState, result: dict[str, Any], payload: bytes,
                     worker: WorkerState | None = None) -> bytes:
        """Record what a verified result reports of the Agent (agentwire.py) and save its events.jsonl;
        returns the part of the payload that is the change pack."""
        pack, events, notice = agentwire.split_payload(payload, result.get("events"))
        if notice is not None:
            emit(self.hooks, "notice", f"Run {run.run_id} of '{run.task_id}': {notice}")
        if events is not None:
            try:
                run.events = self.records.save_events(run.task_id, run.number, events)
            except RecordError as exc:
                emit(self.hooks, "notice", str(exc))
        report = agentwire.run_report(result.get("report"))
        if report is not None:
            run.session_id, run.turns, run.usage = report.session_id, report.turns, report.usage
            run.cost_usd, run.cost_estimated = report.cost_usd, report.cost_estimated and report.cost_usd is not None
            run.final_message = report.final_message
        if report is not None or run.backend_used is not None:
            run.backend_used = agentwire.backend_used(run.backend_used, report)
            if run.backend_used is not None and run.backend_used.get("cli_version") is None and worker is not None:
                # codex and gemini name no version in their stream: the one the Worker's `ready` found.
                config = self.config()
                agent = config.agents.get(run.agent) if config is not None else None
                found = (worker.offered_presets() or {}).get(agent.preset) if agent is not None else None
                run.backend_used["cli_version"] = agentwire.version_number((found or {}).get("version"))
        limit = agentwire.usage_limit(result.get("usage_limit"))
        # Only a FAILED Run ended on a limit: a COMPLETED one that saw a warning did its work.
        run.usage_limit = limit if result.get("status") == RunStatus.FAILED.value else None
        return pack

    def _on_started(self, worker: WorkerState, run: RunState, message: Message) -> None:
        self.transfer.done(run.run_id)
        if run.status is RunStatus.ASSIGNED:
            run.move(RunStatus.RUNNING)
            run.started_at = message.get("started_at") or self._clock()
            self._save_run(run, late=True)

    def _on_output(self, worker: WorkerState, run: RunState, message: Message) -> None:
        """Record a chunk of a Run's output at its offset (a gap asks the Worker to resume from the end).

        On a full disk the Run goes on and nothing is lost: its output stalls (diskspace.Space): what
        arrives meanwhile is not recorded, its result is neither judged nor acknowledged, and once there is
        room the engine asks the Worker, which keeps the Agent's output, to resume from the recorded offset.
        """
        offset = int(message["offset"])
        if self.records.space.stalled(run.run_id):
            return
        try:
            before, after = self.records.write_output(run.task_id, run.number, offset, message.payload)
            crashpoints.reached("daemon.output_written")
        except RecordsFull as exc:
            if self.records.space.stall(Stall(run.run_id, worker.name, run.task_id, run.number)):
                emit(self.hooks, "notice", f"Run {run.number} of '{run.task_id}' goes on, its output waits: "
                                           f"{exc.reason}")
            return
        except RecordError as exc:
            # Asking for the bytes again would only fail again: the Run ends, saying why.
            self._send(worker, Message("cancel", {"run_id": run.run_id, "reason": "its output cannot be recorded"}))
            self._finish(run, RunStatus.FAILED, None, f"its output cannot be recorded: {exc}")
            return
        if offset > before:
            self._send(worker, Message("resume", {"run_id": run.run_id, "offset": before}))
            return
        run.output_size = after
        if after > before:
            emit(self.hooks, "run_output", run, message.payload[before - offset:])

    def resume_stalled(self) -> None:
        """Runs whose output stalled on a full disk (`_on_output`) resume from the recorded offset once there
        is room (diskspace.Space.due; the engine calls this before each batch); a Worker away gets its
        `resume` from `ready` instead."""
        for stall in self.records.space.due():
            run, worker = self.runs.get(stall.run_id), self.fleet.get(stall.worker)
            if run is not None and worker is not None and worker.online and run.worker == worker.name:
                offset = self.records.output_size(run.task_id, run.number)
                self._send(worker, Message("resume", {"run_id": run.run_id, "offset": offset}))

    def _on_result(self, worker: WorkerState, run: RunState, message: Message) -> None:
        space = self.records.space
        if space.stalled(run.run_id) or (space.still_full() and space.stall(Stall(run.run_id, worker.name, run.task_id,
                                                                          run.number))):
            return  # runs/ is full (_on_output): not judged, not acknowledged; sent again after the resume
        size = self.records.output_size(run.task_id, run.number)
        run.output_size = size
        try:
            # A result covering less output than recorded is final; one covering more, a few resumes at most.
            if more_output_owed(size, message.get("output_size"), run.result_resumes):
                run.result_resumes += 1
                self._send(worker, Message("resume", {"run_id": run.run_id, "offset": size}))
                return
            result = verified_result(message["envelope"], worker.result_key, run.run_id,
                                     self.records.output_digest(run.task_id, run.number))
            crashpoints.reached("daemon.result_verified")
            pack = self._take_report(run, result, message.payload, worker)
            self._take_change(run, result, pack)
        except RecordsFull as exc:
            # Not judged, not acknowledged: the Worker keeps the result and sends it again after the resume.
            space.failed(exc)
            if space.stall(Stall(run.run_id, worker.name, run.task_id, run.number)):
                emit(self.hooks, "notice", f"Run {run.number} of '{run.task_id}' waits for room: {exc.reason}")
            return
        except (ResultRejected, ChangeRejected) as exc:
            emit(self.hooks, "event", "rejected", {"what": "result", "reason": getattr(exc, "reason", "change"),
                                                   "worker": worker.name})
            self._finish(run, RunStatus.FAILED, None, str(exc))
        else:
            run.started_at = run.started_at or result.get("started_at")
            status = RunStatus(result["status"])
            self._finish(run, status, result.get("exit_code"), result.get("error"), result.get("finished_at"))
        self._send(worker, Message("ack", {"run_id": run.run_id}))
