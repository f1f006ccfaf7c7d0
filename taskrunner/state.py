"""The control plane's view of each Task and Run, and their record form.

These are the daemon's working state (owned by one thread, the engine's);
`record()` gives the JSON written under runs/ and `from_record` rebuilds the
state after a restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from taskrunner.model import Priority, RunStatus, TaskSpec, TaskStatus

RECORD_VERSION = 1
_ENCODE = json.JSONEncoder(sort_keys=True).encode  # as json.dumps(record, sort_keys=True)


@dataclass
class RunState:
    run_id: str
    task_id: str
    number: int
    revision: str
    attempt: int
    worker: str
    agent: str
    status: RunStatus = RunStatus.PENDING
    backend_used: dict[str, Any] | None = None
    created_at: float = 0.0
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    output_size: int = 0
    lost: bool = False  # failed because its Worker was lost, not because of its Agent
    refused: bool = False  # lost as its Worker refused it before anything of it ran (home full, trust gone)
    authorized_by: str | None = None  # the allowed signer who introduced its revision (security.allowed_signers)
    pull_request: str | None = None  # the web URL of the pull / merge request for its result branch
    base_commit: str | None = None  # the commit the Run's workspace was checked out at (gitflow/transfer.py)
    result_commit: str | None = None  # the Agent's change, imported (gitflow/importer.py); None: no change
    result_branch: str | None = None  # the branch moved to result_commit; None: not moved (result_note says why)
    result_note: str | None = None
    summary: str | None = None  # the work-tree path of the Run's summary.md (gitflow/summary.py)
    # What the Agent's tool reported (agentwire.Report), None when it reported nothing.
    session_id: str | None = None
    turns: int | None = None
    cost_usd: float | None = None
    cost_estimated: bool = False
    usage: dict[str, int] | None = None
    final_message: str | None = None
    usage_limit: dict[str, Any] | None = None  # {resets_at, message}: the Run ended on a usage limit
    events: str | None = None  # the work-tree path of the Run's events.jsonl, once recorded
    result_resumes: int = 0  # results answered with `resume` (results.more_output_owed); not recorded

    def move(self, status: RunStatus) -> None:
        self.status = self.status.to(status)

    def record(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "run": self.number,
            "revision": self.revision,
            "attempt": self.attempt,
            "status": self.status.value,
            "worker": self.worker,
            "agent": self.agent,
            "backend_used": self.backend_used,
            "created_at": self.created_at,
            "assigned_at": self.assigned_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "error": self.error,
            "output_bytes": self.output_size,
            "lost": self.lost,
            **({"refused": True} if self.refused else {}),
            "base_commit": self.base_commit,
            "result_commit": self.result_commit,
            "result_branch": self.result_branch,
            "result_note": self.result_note,
            "summary": self.summary,
            "authorized_by": self.authorized_by,
            "pull_request": self.pull_request,
            "session_id": self.session_id,
            "turns": self.turns,
            "cost_usd": self.cost_usd,
            "cost_estimated": self.cost_estimated,
            "usage": self.usage,
            "final_message": self.final_message,
            "usage_limit": self.usage_limit,
            "events": self.events,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> RunState:
        return cls(
            run_id=data["run_id"], task_id=data["task_id"], number=int(data["run"]),
            revision=data["revision"], attempt=int(data.get("attempt", 1)), worker=data["worker"],
            agent=data["agent"], status=RunStatus(data["status"]), backend_used=data.get("backend_used"),
            created_at=data.get("created_at") or 0.0, assigned_at=data.get("assigned_at"),
            started_at=data.get("started_at"), finished_at=data.get("finished_at"),
            exit_code=data.get("exit_code"), error=data.get("error"),
            output_size=int(data.get("output_bytes") or 0), lost=bool(data.get("lost")),
            refused=bool(data.get("refused")),
            base_commit=data.get("base_commit"), result_commit=data.get("result_commit"),
            result_branch=data.get("result_branch"), result_note=data.get("result_note"),
            summary=data.get("summary"),
            authorized_by=data.get("authorized_by"), pull_request=data.get("pull_request"),
            session_id=data.get("session_id"), turns=data.get("turns"), cost_usd=data.get("cost_usd"),
            cost_estimated=bool(data.get("cost_estimated")), usage=data.get("usage"),
            final_message=data.get("final_message"), usage_limit=data.get("usage_limit"),
            events=data.get("events"),
        )


@dataclass
class TaskState:
    id: str
    file: str
    seq: int
    status: TaskStatus = TaskStatus.PENDING
    spec: TaskSpec | None = None
    revision: str | None = None
    error: str | None = None
    waiting: str | None = None
    attempts: int = 0  # Runs of the current revision so far
    not_before: float = 0.0
    removed: bool = False  # the file was deleted; a file that reappears runs again
    cycle: bool = False  # INVALID only because of a dependency cycle
    cancel_requested: bool = False
    runs: list[RunState] = field(default_factory=list)
    updated_at: float = 0.0
    #: `row()`'s last text and what it was made from (see there); never compared, never a record field.
    _row: tuple[tuple[Any, ...], str] | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name != "_row":  # any field set: the next row() is made afresh
            object.__setattr__(self, "_row", None)

    def move(self, status: TaskStatus) -> None:
        self.status = self.status.to(status)

    @property
    def active_run(self) -> RunState | None:
        if self.runs and not self.runs[-1].status.final:
            return self.runs[-1]
        return None

    @property
    def priority(self) -> Priority:
        return self.spec.priority if self.spec else Priority.NORMAL

    def record(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "version": RECORD_VERSION,
            "task_id": self.id,
            "file": self.file,
            "title": spec.title if spec else self.id,
            "status": self.status.value,
            "revision": self.revision,
            "error": self.error,
            "waiting": self.waiting,
            "priority": self.priority.label,
            "agent": spec.agent if spec else None,
            "depends_on": list(spec.depends_on) if spec else [],
            "group": spec.group if spec else None,
            "labels": dict(spec.labels) if spec else {},
            "seq": self.seq,
            "attempts": self.attempts,
            "not_before": self.not_before or None,
            "removed": self.removed,
            "updated_at": self.updated_at,
            "runs": [
                {"run": r.number, "run_id": r.run_id, "status": r.status.value, "worker": r.worker,
                 "revision": r.revision}
                for r in self.runs
            ],
        }

    def row(self) -> str:
        """`record()` as its JSON text, json.dumps(record, sort_keys=True): a line of `status --json`.

        Kept from one call to the next until a field of this Task is set, or a Run is added to or
        taken from `runs`, or one of them changes what the record shows of it (number, id, status,
        Worker, revision): `status --json` over 10,000 Tasks encodes only the Tasks that changed.
        Call it on the thread that owns the state (the engine's), as `record()`.
        """
        key = tuple((r.number, r.run_id, r.status, r.worker, r.revision) for r in self.runs)
        kept = self._row
        if kept is None or kept[0] != key:
            kept = (key, _ENCODE(self.record()))
            object.__setattr__(self, "_row", kept)
        return kept[1]

    @classmethod
    def from_record(cls, data: dict[str, Any], runs: list[RunState]) -> TaskState:
        return cls(
            id=data["task_id"], file=data.get("file") or f"tasks/{data['task_id']}.md",
            seq=int(data.get("seq") or 0), status=TaskStatus(data["status"]), revision=data.get("revision"),
            error=data.get("error"), attempts=int(data.get("attempts") or 0),
            not_before=float(data.get("not_before") or 0.0), removed=bool(data.get("removed")),
            runs=runs, updated_at=float(data.get("updated_at") or 0.0),
        )
