"""Worker sessions: what the engine does with each record a Worker sends.

The engine owns one `WorkerSessions` and hands it every link event
(`Engine.on_link_event`). It changes the engine's state only through what it
is given: the fleet, the records, the Runs not yet final, and the engine's
own `send`, `finish`, `run_lost` and `save_run`, so a record is still written
before any message that depends on it (engine.py, batch.py).
"""

from __future__ import annotations

from typing import Any, Callable

from taskrunner.fleet import Fleet, WorkerState
from taskrunner.hooks import Hooks, emit
from taskrunner.links import LinkEvent
from taskrunner.model import RunStatus
from taskrunner.protocol import Message
from taskrunner.records import Records
from taskrunner.results import ResultRejected, more_output_owed, verified_result
from taskrunner.state import RunState


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
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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
        self.fleet.ready(worker, now)
        self.check_trust(worker, worker.hello.get("trust"), now)
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
            if message.get("untrusted") is True:
                # Its trust store changed under the session (`trust --reset`, say): no more Runs
                # for it, and this one goes elsewhere without spending a retry.
                self.fleet.lost_trust(worker, text, self._clock())
                self._run_lost(run, f"Worker '{worker.name}' refused it: {text}", RunStatus.FAILED)
            else:
                self._finish(run, RunStatus.FAILED, None, text)
            return
        emit(self.hooks, "notice", f"Worker '{worker.name}': {text}")

    def _on_started(self, worker: WorkerState, run: RunState, message: Message) -> None:
        if run.status is RunStatus.ASSIGNED:
            run.move(RunStatus.RUNNING)
            run.started_at = message.get("started_at") or self._clock()
            self._save_run(run, late=True)

    def _on_output(self, worker: WorkerState, run: RunState, message: Message) -> None:
        offset = int(message["offset"])
        try:
            before, after = self.records.write_output(run.task_id, run.number, offset, message.payload)
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

    def _on_result(self, worker: WorkerState, run: RunState, message: Message) -> None:
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
        except ResultRejected as exc:
            self._finish(run, RunStatus.FAILED, None, str(exc))
        else:
            run.started_at = run.started_at or result.get("started_at")
            status = RunStatus(result["status"])
            self._finish(run, status, result.get("exit_code"), result.get("error"), result.get("finished_at"))
        self._send(worker, Message("ack", {"run_id": run.run_id}))
