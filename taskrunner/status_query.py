"""Which Tasks `taskrun status` shows: filters on the id and the status, and a summary of large sets.

The same selection runs in the daemon (over its memory, answering the
`status` request on the control socket) and in the CLI without a daemon
(over the records). A query:

- `patterns`: Task ids or shell-style globs (`auth/*`, `t-00[0-4]?`;
  fnmatch, case-sensitive, `*` also matches `/`); a Task matches any one.
  None given: every Task.
- `statuses`: status names (upper case); a Task matches any one. None: all.
- `limit`: of the matching Tasks in a finished status (COMPLETED, FAILED,
  CANCELLED) only the `limit` latest (by `updated_at`) are shown; every
  other matching Task (PENDING, RUNNING, BLOCKED, INVALID: the ones that
  need someone or something) is always shown. None: every matching Task.

`counts` are over every matching Task, shown or not; `omitted` is how many
matching Tasks are not shown. Shown Tasks are in the order Tasks arrived
(`seq`), then by id, as `taskrun status` always listed them.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import re
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Generic, Iterable, TypeVar

from taskrunner.state import TaskState
from taskrunner.taskfile import task_id_for

#: Statuses a Task stays in until someone acts: summarised beyond `limit`.
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
#: Status names a query may ask for (UNKNOWN: a record that cannot be read).
STATUSES = ("PENDING", "RUNNING", "BLOCKED", "INVALID", "COMPLETED", "FAILED", "CANCELLED", "UNKNOWN")
_ENCODE = json.JSONEncoder(sort_keys=True).encode  # as json.dumps(record, sort_keys=True)
#: Finished Tasks the human table shows unless told otherwise.
DEFAULT_LIMIT = 20
#: Characters that make an argument of `taskrun status` a glob rather than one Task id.
GLOB_CHARS = frozenset("*?[")
#: Bounds of a query that comes over the control socket.
MAX_PATTERNS = 100
MAX_PATTERN_CHARS = 1000
_SEQ_LAST = 1 << 62

T = TypeVar("T")
#: What `select` orders and filters a Task on: (task id, status, updated_at, seq).
Key = tuple[str, str, float, int]


def is_glob(argument: str) -> bool:
    """True when `argument` is a pattern (holds * ? or [), not a Task id."""
    return any(c in GLOB_CHARS for c in argument)


@dataclass(frozen=True)
class StatusQuery:
    patterns: tuple[str, ...] = ()
    statuses: frozenset[str] = frozenset()
    limit: int | None = DEFAULT_LIMIT
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.patterns:
            # One compiled alternation: cheap per Task whatever the number of patterns.
            object.__setattr__(self, "_regex", re.compile("|".join(f"(?:{fnmatch.translate(p)})"
                                                                 for p in self.patterns)))

    def matches(self, task_id: str, status: str) -> bool:
        if self.statuses and status not in self.statuses:
            return False
        return self._regex is None or self._regex.match(task_id) is not None

    def as_payload(self) -> dict[str, Any]:
        """The query as the `status` request carries it (see `from_payload`)."""
        return {"patterns": list(self.patterns), "statuses": sorted(self.statuses), "limit": self.limit}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> StatusQuery:
        """The query of a `status` request; ValueError for anything malformed (never trusted further)."""
        patterns = payload.get("patterns") or []
        statuses = payload.get("statuses") or []
        limit = payload.get("limit")
        if not (isinstance(patterns, list) and len(patterns) <= MAX_PATTERNS
                and all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_CHARS for p in patterns)):
            raise ValueError("patterns must be a list of up to 100 non-empty strings")
        if not (isinstance(statuses, list) and all(isinstance(s, str) and s in STATUSES for s in statuses)):
            raise ValueError(f"statuses must be a list of {', '.join(STATUSES)}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError("limit must be a whole number >= 0, or null")
        return cls(tuple(patterns), frozenset(statuses), limit)


@dataclass
class Selection(Generic[T]):
    shown: list[T]
    counts: dict[str, int]
    total: int
    omitted: int


def select(items: Iterable[T], key: Callable[[T], Key], query: StatusQuery) -> Selection[T]:
    """The Tasks `query` shows out of `items`; `key` gives (task id, status, updated_at, seq) of one."""
    return select_keyed(((key(item), item) for item in items), query)


def select_keyed(pairs: Iterable[tuple[Key, T]], query: StatusQuery) -> Selection[T]:
    """As `select`, over (key, item) pairs: the key (task id, status, updated_at, seq) given with each item."""
    counts: dict[str, int] = {}
    shown: list[tuple[int, str, T]] = []
    finished: list[tuple[float, int, str, T]] = []
    limit = query.limit
    filtering = bool(query.statuses) or query._regex is not None
    for (task_id, status, updated, seq), item in pairs:
        if filtering and not query.matches(task_id, status):
            continue
        counts[status] = counts.get(status, 0) + 1
        if limit is not None and status in FINISHED:
            finished.append((updated, seq, task_id, item))
        else:
            shown.append((seq, task_id, item))
    if finished:
        latest = heapq.nlargest(limit or 0, finished, key=itemgetter(0, 1, 2))
        shown.extend((seq, task_id, item) for _, seq, task_id, item in latest)
    shown.sort(key=itemgetter(0, 1))
    total = sum(counts.values())
    return Selection([item for _, _, item in shown], dict(sorted(counts.items())), total, total - len(shown))


def record_key(record: dict[str, Any]) -> Key:
    """`select`'s key for a Task record (as written under runs/, or as `from_records` lists one)."""
    updated = record.get("updated_at")
    seq = record.get("seq")
    return (str(record.get("task_id")), str(record.get("status")),
            float(updated) if isinstance(updated, (int, float)) and not isinstance(updated, bool) else 0.0,
            seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else _SEQ_LAST)


def state_key(task: TaskState) -> Key:
    """`select`'s key for the daemon's TaskState."""
    return task.id, task.status.value, task.updated_at, task.seq or _SEQ_LAST


def answer(tasks: Iterable[TaskState], unusable: dict[str, str], payload: dict[str, Any]) -> dict[str, Any]:
    """The daemon's reply to {"command": "status", "patterns", "statuses", "limit", "encoded"}, from its memory.

    {"ok": true, "tasks": [Task records], "counts": {status: n}, "total": n, "omitted": n}; Task files
    whose id can have no record are INVALID entries with their reason, as `taskrun status` lists them
    without a daemon. With "encoded": true, "rows" instead of "tasks": each record as its JSON text
    (json.dumps(record, sort_keys=True): what `status --json` writes on a line), so the CLI passes it
    on without decoding and encoding it again; a Task's text is kept between answers until it changes
    (TaskState.row). {"ok": false, "error"} for a malformed query. Call it on the thread that owns
    the Tasks' state.
    """
    try:
        query = StatusQuery.from_payload(payload)
    except ValueError as exc:
        return {"ok": False, "error": f"bad status request: {exc}"}
    pairs: list[tuple[Key, TaskState | dict[str, Any]]] = [(state_key(task), task) for task in tasks]
    for rel, reason in unusable.items():
        item = {"task_id": task_id_for(rel) or rel, "status": "INVALID", "runs": [], "error": reason, "file": rel}
        pairs.append((record_key(item), item))
    chosen = select_keyed(pairs, query)
    reply: dict[str, Any] = {"ok": True, "counts": chosen.counts, "total": chosen.total, "omitted": chosen.omitted}
    if payload.get("encoded") is True:
        reply["rows"] = [i.row() if isinstance(i, TaskState) else _ENCODE(i) for i in chosen.shown]
    else:
        reply["tasks"] = [i.record() if isinstance(i, TaskState) else i for i in chosen.shown]
    return reply
