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
(auth, resume, cancel). Once everything is written, what waited goes first,
then the batch's own.

Nothing here touches git or a socket: `apply` says what to commit and send.
"""

from __future__ import annotations

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

Write = tuple[str, Callable[..., None], tuple[Any, ...]]
Sends = list[tuple[WorkerState, list[Message]]]


class Unwritten:
    """The records not yet written and what waits for them. Used by one thread (the write-behind one)."""

    def __init__(self) -> None:
        self._writes: dict[str, Write] = {}  # by record path, oldest first
        self._commits: list[CommitItem] = []
        self._sends: list[tuple[WorkerState, Message]] = []
        self._told: set[str] = set()  # paths whose failure was said once in this streak

    def __len__(self) -> int:
        """How many status and manifest records wait (summary.md and events.jsonl wait in Records.kept)."""
        return len(self._writes)

    def paths(self) -> list[str]:
        """The work-tree paths of the records kept for writing again."""
        return [path for path, _, _ in self._writes.values()]

    def apply(self, batch: Batch, records: Records,
              notice: Callable[[str], None]) -> tuple[list[CommitItem], Sends]:
        """Write what is kept and the batch's records; the commits and messages (per Worker, in order)
        that may go now. A record that fails is kept (and said once, until it is written)."""
        for path in records.write_kept():  # summary.md and events.jsonl a full disk kept out (records.py)
            notice(f"{path} written, after it could not be")
        for write in _writes(batch, records):
            self._writes.pop(write[0], None)  # re-inserted last: the newest version, in the newest order
            self._writes[write[0]] = write
        for key, (path, write, args) in list(self._writes.items()):
            try:
                write(*args)
            except RecordError as exc:
                if path not in self._told:
                    self._told.add(path)
                    # A full disk's reason already says what happens next (diskspace.reason).
                    notice(str(exc) if isinstance(exc, RecordsFull) else f"{exc}; kept, and written again by itself")
                continue
            del self._writes[key]
            if path in self._told:
                self._told.discard(path)
                notice(f"{path} written, after it could not be")
        if self._writes or records.kept():
            self._commits.extend(batch.commits)
            now: list[tuple[WorkerState, Message]] = []
            for worker, messages in batch.sends:
                for message in messages:
                    (self._sends if message.type in DEPENDENT else now).append((worker, message))
            return [], _grouped(now)
        commits, self._commits = [*self._commits, *batch.commits], []
        held, self._sends = self._sends, []
        flat = held + [(worker, message) for worker, messages in batch.sends for message in messages]
        return commits, _grouped(flat)


def _writes(batch: Batch, records: Records) -> list[Write]:
    """The batch's record writes, keyed by work-tree path: Runs, then manifests, then Tasks (batch.py).

    A Run's status.json comes before its manifest: killed in between, a restarted daemon finds the Run
    (lost, run again), never a run-<n>/ holding only a manifest that no record names.
    """
    found: list[Write] = []
    for record in batch.runs:
        found.append((f"{RUNS_DIR}/{record.get('task_id')}/run-{record.get('run')}/status.json", records.save_run,
                      (record,)))
    for task_id, number, manifest in batch.manifests:
        found.append((f"{RUNS_DIR}/{task_id}/run-{number}/manifest.json", records.save_manifest,
                      (task_id, number, manifest)))
    for record in batch.tasks:
        found.append((f"{RUNS_DIR}/{record.get('task_id')}/status.json", records.save_task, (record,)))
    return found


def _grouped(pairs: Sequence[tuple[WorkerState, Message]]) -> Sends:
    """Messages per Worker, each Worker's in the order given (as batch.py groups them)."""
    sends: dict[str, tuple[WorkerState, list[Message]]] = {}
    for worker, message in pairs:
        sends.setdefault(worker.name, (worker, []))[1].append(message)
    return list(sends.values())
