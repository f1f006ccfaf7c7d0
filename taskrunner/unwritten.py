"""Records a batch could not write, written again by themselves; and what waits for them.

The engine writes each batch's records (batch.py) and then hands over the
commits and sends the messages that depend on them. When a record cannot be
written (a full disk, diskspace.py; any other RecordError alike), its newest
version is kept here, by path, and written again before every later batch
(the daemon flushes at least every MAX_SLEEP seconds, so this is also the
timer), until it is on disk. A newer version of the same record, from a later
batch, replaces the kept one: the record on disk is always the newest the
engine made. summary.md and events.jsonl, written outside batches, are kept
by Records itself (`Records.write_kept`) and written again here too.

While any of them is unwritten, what depends on records waits too, in the
order it came: the commits (a commit would take the older file, or none) and
the `assign` and `ack` messages (a Worker must not start a Run whose manifest
and record are not on disk, nor drop a result the control plane has not
recorded). Every other message goes out at once: a session keeps serving
(auth, resume, cancel). What waits, and for how long:

- a full disk (RecordsFull, or summary.md and events.jsonl kept): every
  dependent commit and message waits, since no record can be written;
- anything else is the failing path's own (a directory pushed where the
  Task's status.json goes, a file where its run-<n>/ goes): only that Task's
  commits, and the `ack`s of Runs whose own records wait, wait; every other
  Task goes on, and the notice says what is in the way. An `assign` whose
  Run's records cannot be written is not held (a Worker takes bundles in
  sequence: one sent later would overtake it): it is refused (`take_refused`),
  and the engine fails that Run, never started, with the reason.

Once what a Task (or the disk) waited for is written, what waited goes
first, in the order it came, then the batch's own.

Nothing here touches git or a socket: `apply` says what to commit and send.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from taskrunner.batch import Batch
from taskrunner.defaults import RUNS_DIR
from taskrunner.diskspace import RecordsFull
from taskrunner.errors import RecordError
from taskrunner.fleet import WorkerState
from taskrunner.protocol import Message
from taskrunner.recorder import CommitItem
from taskrunner.records import Records

#: Messages that must not leave before the records they follow are on disk.
DEPENDENT = frozenset({"assign", "ack"})

Write = tuple[str, str, Callable[..., None], tuple[Any, ...]]  # Task id, path, how, with what
Sends = list[tuple[WorkerState, list[Message]]]


class Unwritten:
    """The records not yet written and what waits for them. Used by one thread (the write-behind one)."""

    def __init__(self) -> None:
        self._writes: dict[str, Write] = {}  # by record path, oldest first
        self._full: set[str] = set()  # paths whose last failure was a full disk
        self._commits: list[CommitItem] = []
        self._sends: list[tuple[WorkerState, Message]] = []
        self._why: dict[str, str] = {}  # path -> why it could not be written
        self._owners: dict[str, tuple[str, str]] = {}  # run id -> (Task id, its run-<n>/ path), while needed
        self._told: set[str] = set()  # paths whose failure was said once in this streak
        self._refused: list[tuple[str, str]] = []  # (run id, why): assigns not sent (take_refused)
        self._refused_lock = threading.Lock()

    def __len__(self) -> int:
        """How many status and manifest records wait (summary.md and events.jsonl wait in Records.kept)."""
        return len(self._writes)

    def paths(self) -> list[str]:
        """The work-tree paths of the records kept for writing again."""
        return [write[1] for write in self._writes.values()]

    def apply(self, batch: Batch, records: Records,
              notice: Callable[[str], None]) -> tuple[list[CommitItem], Sends]:
        """Write what is kept and the batch's records; the commits and messages (per Worker, in order)
        that may go now. A record that fails is kept (and said once, until it is written)."""
        for path in records.write_kept():  # summary.md and events.jsonl a full disk kept out (records.py)
            notice(f"{path} written, after it could not be")
        for write in _writes(batch, records):
            self._writes.pop(write[1], None)  # re-inserted last: the newest version, in the newest order
            self._writes[write[1]] = write
        for key, (_, path, write, args) in list(self._writes.items()):
            try:
                write(*args)
            except RecordError as exc:
                full = isinstance(exc, RecordsFull)
                (self._full.add if full else self._full.discard)(path)
                self._why[path] = str(exc)
                if path not in self._told:
                    self._told.add(path)
                    # A full disk's reason already says what happens next (diskspace.reason).
                    notice(str(exc) if full else f"{exc}; kept, and written again by itself once that is "
                                                 f"moved away (only this Task's Runs wait meanwhile)")
                continue
            del self._writes[key]
            self._full.discard(path)
            self._why.pop(path, None)
            if path in self._told:
                self._told.discard(path)
                notice(f"{path} written, after it could not be")
        for record in batch.runs:
            task_id = str(record.get("task_id"))
            self._owners[str(record.get("run_id"))] = (task_id, f"{RUNS_DIR}/{task_id}/run-{record.get('run')}/")
        self._commits.extend(batch.commits)
        self._sends.extend((worker, message) for worker, messages in batch.sends for message in messages)
        everything = bool(self._full) or bool(records.kept())  # a full disk: no record can be written
        waiting = {task_id for task_id, _, _, _ in self._writes.values()}

        def why(run_id: str) -> str | None:
            """Why the Run's own records are not written yet (None: they are, or its Run is not known)."""
            owner = self._owners.get(run_id)
            return None if owner is None else next(
                (self._why.get(path, path) for path in self._writes if path.startswith(owner[1])), None)

        commits = [item for item in self._commits if not (everything or item.task_id in waiting)]
        self._commits = [item for item in self._commits if everything or item.task_id in waiting]
        now: list[tuple[WorkerState, Message]] = []
        held: list[tuple[WorkerState, Message]] = []
        for worker, message in self._sends:
            if message.type not in DEPENDENT:
                now.append((worker, message))
                continue
            run_id = str(message.get("run_id"))
            reason = why(run_id)
            if everything:
                held.append((worker, message))
            elif reason is None:
                now.append((worker, message))
            elif message.type == "assign":
                with self._refused_lock:
                    self._refused.append((run_id, reason))
            else:
                held.append((worker, message))
        self._sends = held
        kept = {str(m.get("run_id")) for _, m in held}  # the Runs of waiting Tasks stay known
        self._owners = {run: owner for run, owner in self._owners.items() if run in kept or owner[0] in waiting}
        return commits, _grouped(now)

    def take_refused(self) -> list[tuple[str, str]]:
        """The (run id, why) of the `assign`s not sent because the Run's own records could not be written
        (for a reason of their path's, not a full disk), each given once; any thread may ask."""
        with self._refused_lock:
            refused, self._refused = self._refused, []
        return refused


def _writes(batch: Batch, records: Records) -> list[Write]:
    """The batch's record writes (Task id, work-tree path, how, with what): Runs, then manifests, then Tasks
    (batch.py).

    A Run's status.json comes before its manifest: killed in between, a restarted daemon finds the Run
    (lost, run again), never a run-<n>/ holding only a manifest that no record names.
    """
    found: list[Write] = []
    for record in batch.runs:
        task_id = str(record.get("task_id"))
        found.append((task_id, f"{RUNS_DIR}/{task_id}/run-{record.get('run')}/status.json", records.save_run,
                      (record,)))
    for task_id, number, manifest in batch.manifests:
        found.append((task_id, f"{RUNS_DIR}/{task_id}/run-{number}/manifest.json", records.save_manifest,
                      (task_id, number, manifest)))
    for record in batch.tasks:
        task_id = str(record.get("task_id"))
        found.append((task_id, f"{RUNS_DIR}/{task_id}/status.json", records.save_task, (record,)))
    return found


def _grouped(pairs: Sequence[tuple[WorkerState, Message]]) -> Sends:
    """Messages per Worker, each Worker's in the order given (as batch.py groups them)."""
    sends: dict[str, tuple[WorkerState, list[Message]]] = {}
    for worker, message in pairs:
        sends.setdefault(worker.name, (worker, []))[1].append(message)
    return list(sends.values())
