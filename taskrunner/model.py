"""The vocabulary as plain data: Task, Run, Worker, Agent, ModelBackend and statuses.

Nothing here does I/O. Status changes go through `TaskStatus.to` /
`RunStatus.to`, which raise `TransitionError` for a change the tables below do
not allow, so a bug shows up as an error instead of a silently wrong record.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Mapping

from taskrunner.errors import TransitionError

#: A Task id is its path under tasks/ without `.md`.
TASK_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]*$")
#: The longest Task id, and the longest part of one between '/'. Well under
#: NAME_MAX (255; the file is `<part>.md`, its editors' temp files longer
#: still) and PATH_MAX (4096; records live at runs/<id>/run-<n>/manifest.json
#: inside a work tree that has a path of its own).
MAX_TASK_ID_CHARS = 200
MAX_TASK_ID_PART_CHARS = 100
#: The names the records layout uses inside a Task's directory runs/<id>/ and
#: a Run's runs/<id>/run-<n>/ (records.py). A Task id part with one of these
#: names (or a run-<n> name, or a leading '.', which temp files use) would make
#: one Task's record path another Task's file.
RECORD_NAMES = ("status.json", "output.log", "manifest.json", "summary.md", "events.jsonl")
RUN_DIR_RE = re.compile(r"^run-(\d+)$")
#: Agent, Worker, group and label names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TaskStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    BLOCKED = "BLOCKED"
    INVALID = "INVALID"

    @property
    def final(self) -> bool:
        """True when nothing will happen to the Task until someone acts."""
        return self in _TASK_SETTLED

    def to(self, new: TaskStatus) -> TaskStatus:
        if new is not self and new not in _TASK_TRANSITIONS[self]:
            raise TransitionError(f"Task status cannot go from {self.value} to {new.value}")
        return new


class RunStatus(str, enum.Enum):
    PENDING = "PENDING"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)

    def to(self, new: RunStatus) -> RunStatus:
        if new is not self and new not in _RUN_TRANSITIONS[self]:
            raise TransitionError(f"Run status cannot go from {self.value} to {new.value}")
        return new


_T = TaskStatus
_TASK_SETTLED = frozenset({_T.COMPLETED, _T.FAILED, _T.CANCELLED, _T.BLOCKED, _T.INVALID})
_TASK_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    # A file can turn INVALID (edited) or be cancelled (deleted) in any state
    # but RUNNING, where the Run must end first.
    _T.PENDING: frozenset({_T.RUNNING, _T.BLOCKED, _T.CANCELLED, _T.INVALID}),
    # RUNNING -> PENDING: a failed Run that will be retried after its backoff,
    # or a new revision that arrived while the old one ran.
    _T.RUNNING: frozenset({_T.PENDING, _T.COMPLETED, _T.FAILED, _T.CANCELLED, _T.INVALID}),
    # Settled Tasks come back to PENDING on a new revision or a manual retry.
    _T.COMPLETED: frozenset({_T.PENDING, _T.INVALID, _T.BLOCKED}),
    _T.FAILED: frozenset({_T.PENDING, _T.INVALID, _T.BLOCKED}),
    _T.CANCELLED: frozenset({_T.PENDING, _T.INVALID, _T.BLOCKED}),
    # A BLOCKED Task is unblocked when its failed dependency is retried.
    _T.BLOCKED: frozenset({_T.PENDING, _T.CANCELLED, _T.INVALID}),
    _T.INVALID: frozenset({_T.PENDING, _T.CANCELLED}),
}

_R = RunStatus
_RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    _R.PENDING: frozenset({_R.ASSIGNED, _R.CANCELLED, _R.FAILED}),
    # ASSIGNED -> COMPLETED: a Run so short that its result is the first news.
    _R.ASSIGNED: frozenset({_R.RUNNING, _R.COMPLETED, _R.FAILED, _R.CANCELLED}),
    _R.RUNNING: frozenset({_R.COMPLETED, _R.FAILED, _R.CANCELLED}),
    _R.COMPLETED: frozenset(),
    _R.FAILED: frozenset(),
    _R.CANCELLED: frozenset(),
}


class Priority(enum.IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A parsed, valid Task file: what the user asked for."""

    id: str
    path: str  # relative to the repository root, e.g. tasks/db-schema.md
    revision: str  # sha256 of the file's bytes
    title: str
    body: str
    agent: str | None = None
    priority: Priority = Priority.NORMAL
    depends_on: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    group: str | None = None
    timeout: float | None = None  # seconds
    retries: int | None = None
    context: tuple[str, ...] = ()
    # The principal whose signed commit introduced this revision (security.allowed_signers), else None.
    authorized_by: str | None = None
    max_turns: int | None = None  # budget: the Run is stopped past this many reported turns
    max_cost_usd: float | None = None  # budget: the Run is stopped past this reported (or estimated) cost, USD


@dataclass(frozen=True, slots=True)
class ModelBackend:
    """The model behind an Agent, recorded on each Run as `backend_used`."""

    provider: str | None  # None: the preset's default provider, if it has one
    model: str | None  # None: the Agent's `model`, else the tool's default
    context_window: int | None = None
    base_url: str | None = None  # the provider's API endpoint, for the tool (http(s) URL); None: the tool's own

    def as_record(self) -> dict[str, object]:
        """The Run record's `backend_used` before the tool reports: {provider, model, context_window}."""
        return {"provider": self.provider, "model": self.model, "context_window": self.context_window}

    def as_manifest(self) -> dict[str, object]:
        """`manifest.agent.backend`: {provider, model, context_window, base_url}."""
        return {**self.as_record(), "base_url": self.base_url}


@dataclass(frozen=True, slots=True)
class Prices:
    """What a model costs, USD per million tokens; used to estimate a Run's cost when the tool reports none."""

    input: float
    output: float
    cache_read: float = 0.0
    cache_write: float = 0.0

    def as_manifest(self) -> dict[str, float]:
        return {"input": self.input, "output": self.output, "cache_read": self.cache_read,
                "cache_write": self.cache_write}


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """A named way of carrying out a Task: a preset, or a command of its own."""

    name: str
    preset: str
    command: tuple[str, ...] = ()
    backend: ModelBackend | None = None
    env: tuple[str, ...] = ()  # names of credentials, resolved on the Worker
    path: str | None = None  # argv[0] instead of the preset's program name; such an Agent counts as available
    model: str | None = None  # the tool's --model; None: the backend's model, else the tool's default
    max_turns: int | None = None  # budget, unless the Task's front matter sets one
    max_cost_usd: float | None = None  # budget, unless the Task's front matter sets one
    max_budget_usd: float | None = None  # claude's own --max-budget-usd
    permission_mode: str | None = None  # claude
    allowed_tools: tuple[str, ...] = ()  # claude
    disallowed_tools: tuple[str, ...] = ()  # claude
    append_system_prompt: str | None = None  # claude
    approval_mode: str | None = None  # gemini: default, auto_edit, yolo
    sandbox_mode: str | None = None  # codex --sandbox (the preset's default: workspace-write)
    extra_args: tuple[str, ...] = ()  # appended to the argv
    prompt_template: str | None = None  # jinja2 source; None: the default template
    pause_scope: str = "everywhere"  # where a usage limit pauses this Agent: "everywhere" | "worker"

    @property
    def always_available(self) -> bool:
        """True when no Worker's PATH decides where it runs: shell, command, or an Agent with `path`."""
        return self.preset in ("shell", "command") or self.path is not None

    @property
    def model_name(self) -> str | None:
        """The model the Agent asks for: `model`, else the backend's."""
        return self.model or (self.backend.model if self.backend else None)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """A configured Worker: where it is and what it offers."""

    name: str
    transport: str  # "local" | "ssh"
    slots: int
    agents: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    host: str | None = None
    port: int = 22
    user: str | None = None
    identity: str | None = None
    host_key: str | None = None
    known_hosts: str | None = None
    home: str | None = None  # the Worker's state directory
    worker_key: str | None = None  # the Worker's result key, `ed25519 BASE64`, pinned at enrollment
    # "bwrap": Agents run confined, and a Worker that cannot confine them gets no Runs;
    # "none": accept unconfined Agents on it (signed into each bundle's agent settings).
    sandbox: str = "bwrap"
