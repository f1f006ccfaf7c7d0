"""`taskrun status` over many Tasks: the query from the arguments, the daemon's answer or the records, the output.

With a daemon running, the Tasks come from its memory (the `status`
request on the control socket, status_query.answer); without one, from the
records under runs/, through the record index (record_index.py), so only
records changed since the index was written are read. Either way the same
selection (status_query.select) decides what is shown.

`--json` is one document, written one Task at a time (write_listing, as render.write_listing):

    {"counts": {"COMPLETED": 9980, "RUNNING": 2, ...},   every matching Task, per status
     "git": {...},                                      pushing and syncing (gitflow/gitstate.py)
     "omitted": 0,                                      matching Tasks not listed (--limit)
     "source": "daemon" | "records",
     "tasks": [Task record, ...],                       as under runs/<id>/status.json, without "seal"
     "total": 9982}                                     matching Tasks

`tasks` and `git` are as before; the other keys were added. Without
`--limit`, `--json` lists every matching Task. Each row is json.dumps(record,
sort_keys=True): from the records, a Task the record index holds unchanged is
written as the index keeps its record's text, never parsed; from a daemon,
each row as the daemon encoded it (`encoded` in the request), never decoded.

Costs at 10,000 Tasks (bench/status_scale): the table into a pipe is written
without rich (cli/plain.py, the same bytes); without a daemon the summary
needs one lstat per record and per directory under runs/, the index's
columns and a walk of tasks/; only the shown records are parsed.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import TYPE_CHECKING, Any

from taskrunner import control, gitops
from taskrunner.cli import plain
from taskrunner.defaults import TASKS_DIR
from taskrunner.errors import DaemonNotRunning, ForeignRecord, RecordError, TaskrunError
from taskrunner.gitflow import gitstate
from taskrunner.model import TaskStatus
from taskrunner.records import Records
from taskrunner.status_query import (DEFAULT_LIMIT, STATUSES, Key, Selection, StatusQuery, record_key,
                                     select_keyed)
from taskrunner.taskfile import task_id_for, task_id_problem
from taskrunner.textsafe import clean

if TYPE_CHECKING:
    from rich.console import Console

#: Rows of `--json` written to the stream at once.
_JSON_BATCH = 500
#: select's seq for a Task without one: after every other (status_query.record_key).
_SEQ_LAST = 1 << 62


def query_of(args: argparse.Namespace) -> StatusQuery:
    """The query the arguments ask for; TaskrunError for an unknown status or a negative limit."""
    statuses: set[str] = set()
    for value in args.status or []:
        for name in value.split(","):
            name = name.strip().upper()
            if name not in STATUSES:
                raise TaskrunError(f"--status {name or '(empty)'}: not a status; one of {', '.join(STATUSES)}")
            statuses.add(name)
    if args.limit is not None and args.limit < 0:
        raise TaskrunError("--limit must be 0 or more")
    if args.all:
        limit = None
    elif args.limit is not None:
        limit = args.limit
    else:
        limit = None if args.json else DEFAULT_LIMIT
    return StatusQuery(tuple(args.task or ()), frozenset(statuses), limit)


def from_daemon(records: Records, query: StatusQuery,
                encoded: bool = False) -> Selection[dict[str, Any] | str] | None:
    """The daemon's answer; None when no daemon runs (or it is too old to answer `status`).

    With `encoded`, the daemon sends each shown Task as its record's JSON text (json.dumps(record,
    sort_keys=True), the form `--json` writes), which is passed on as it is, never decoded; a daemon
    that does not know `encoded` sends records, as without it.
    """
    payload = {"command": "status", **query.as_payload()}
    if encoded:
        payload["encoded"] = True
    try:
        reply = control.request(gitops.state_dir(records.root), payload, wait_start=False)
    except DaemonNotRunning:
        return None
    if reply.get("starting") is True:
        return None  # the daemon is loading the records: they say what it would (daemon.py _ask)
    if not reply.get("ok"):
        if any(why in str(reply.get("error")) for why in ("unknown command", "busy")):
            return None  # a daemon too old to answer, or too busy: the records say the same
        raise TaskrunError(str(reply.get("error") or "the daemon refused the request"))
    tasks: list[dict[str, Any] | str]
    rows = reply.get("rows") if encoded else None
    if isinstance(rows, list):
        # One JSON object a line: what write_listing puts on a line of its own.
        tasks = [t for t in rows if isinstance(t, str) and t[:1] == "{" and t[-1:] == "}" and "\n" not in t]
    else:
        tasks = [t for t in reply.get("tasks") or [] if isinstance(t, dict) and isinstance(t.get("task_id"), str)
                 and isinstance(t.get("status"), str)]
    counts = reply.get("counts")
    counts = {str(k): v for k, v in counts.items() if isinstance(v, int)} if isinstance(counts, dict) else {}
    total, omitted = reply.get("total"), reply.get("omitted")
    return Selection(tasks, counts, total if isinstance(total, int) else len(tasks),
                     omitted if isinstance(omitted, int) else 0)


def _unknown(task_id: str, why: str) -> dict[str, Any]:
    return {"task_id": task_id, "status": "UNKNOWN", "error": why, "runs": []}


def from_records(records: Records, query: StatusQuery, ignored: list[str],
                 raw: bool = False) -> Selection[dict[str, Any] | str]:
    """The selection read from runs/ through the record index (written back when it was stale).

    With `raw`, a shown Task the index holds unchanged is its record's JSON
    text (as json.dumps(record, sort_keys=True)), not parsed. Every Task with a record this
    clone's daemon wrote (others' messages go to `ignored`), an unreadable
    one as UNKNOWN, and every Task file without a record (PENDING, or INVALID
    when its id can have none). A Task the index holds unchanged is selected on
    the index's (status, updated_at, seq): only the shown ones are parsed.
    """
    from taskrunner.record_index import RecordIndex

    index = RecordIndex(records, gitops.state_dir(records.root))
    index.load()
    pairs: list[tuple[Key, Any]] = []
    seen: set[str] = set()
    for task_id, summary in index.summaries():
        if summary is not None:
            status, updated, seq = summary
            key = (task_id, status, updated, seq if seq > 0 else _SEQ_LAST)
            pairs.append((key, key))  # a key as the item: its record is looked up if it is shown
            seen.add(task_id)
            continue
        try:
            record = index.load_task(task_id)
        except ForeignRecord as exc:
            ignored.append(str(exc))
            continue
        except RecordError as exc:
            record = _unknown(task_id, str(exc))
        if record:
            pairs.append((record_key(record), record))
            seen.add(task_id)
    pairs.extend((record_key(r), r) for r in unrecorded_files(records, seen))
    chosen = select_keyed(pairs, query)
    shown: list[dict[str, Any] | str] = []
    for item in chosen.shown:
        if type(item) is tuple:
            task_id = item[0]
            text = index.task_text(task_id) if raw else None
            if text is not None:
                shown.append(text)
                continue
            try:
                record = index.load_task(task_id)
            except (ForeignRecord, RecordError) as exc:  # changed since it was looked at
                record = _unknown(task_id, str(exc))
            item = record or _unknown(task_id, "its record is gone")
        shown.append(item)
    if index.misses or not index.loaded:
        index.save()  # best effort: a reader that cannot write it reads the records again next time
    return Selection(shown, chosen.counts, chosen.total, chosen.omitted)


def unrecorded_files(records: Records, seen: set[str]) -> list[dict[str, Any]]:
    """Task files with no record in `seen`: PENDING "not yet seen by the daemon", or INVALID with the
    reason their id can have no record (taskfile.task_id_problem), as the daemon says."""
    if _all_recorded(str(records.root), seen):
        return []
    from taskrunner.intake import RepoFiles, task_paths

    found = []
    cut = len(TASKS_DIR) + 1
    for rel in task_paths(RepoFiles(records.root)):
        if rel[cut:-3] in seen:  # tasks/<id>.md: the id, when it is one (task_paths gives only such names)
            continue
        task_id = task_id_for(rel)
        if not task_id or task_id in seen:
            continue
        problem = task_id_problem(task_id)
        if problem:
            found.append({"task_id": task_id, "status": TaskStatus.INVALID.value, "runs": [],
                          "error": f"{rel}: {problem}", "file": rel})
        else:
            found.append({"task_id": task_id, "status": TaskStatus.PENDING.value, "runs": [],
                          "waiting": "not yet seen by the daemon", "file": rel})
    return found


def _all_recorded(root: str, seen: set[str]) -> bool:
    """True when every name under tasks/ that task_paths could list (`*.md`, files and directories) is
    tasks/<id>.md of an id in `seen`: then no Task file lacks a record, known with one walk and a set
    lookup per file instead of task_paths' checks of each name. False (look closer) for anything else,
    tasks/ a link or missing included."""
    top = f"{root}/{TASKS_DIR}"
    try:
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            return False
    except OSError:
        return False
    cut = len(top) + 1
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        prefix = f"{dirpath[cut:]}/" if len(dirpath) > len(top) else ""
        for names in (filenames, dirnames):
            for name in names:
                if name.endswith(".md") and prefix + name[:-3] not in seen:
                    return False
    return True


def list_tasks(args: argparse.Namespace, out: Console, records: Records) -> int:
    """`taskrun status [GLOB...] [--all] [--status S] [--limit N] [--json]`; the exit code.

    Into a pipe or a file (plain.is_plain) the table is written as plain lines, as rich would write it
    there, without importing rich; on a terminal it is rich's.
    """
    from taskrunner.cli.main import EXIT_OK, report_ignored

    query = query_of(args)
    ignored: list[str] = []
    chosen = from_daemon(records, query, encoded=bool(args.json))
    source = "daemon"
    if chosen is None:
        chosen, source = from_records(records, query, ignored, raw=bool(args.json)), "records"
    report_ignored(ignored)
    git_state = gitstate.read(gitops.state_dir(records.root))  # pushing and syncing (gitflow/gitstate.py)
    try:
        if args.json:
            write_listing(sys.stdout, {"counts": chosen.counts, "git": git_state, "omitted": chosen.omitted,
                                       "source": source, "total": chosen.total}, chosen.shown)
            sys.stdout.flush()
            return EXIT_OK
        filtered = bool(query.patterns or query.statuses)
        empty = "" if chosen.total else ("No Task matches." if filtered else "No Tasks yet: add a file to tasks/"
                                         + ("." if source == "daemon" else " and start `taskrun up`."))
        shown = [t if isinstance(t, dict) else json.loads(t) for t in chosen.shown]
        lines = [plain.summary_line(len(shown), chosen.total, chosen.counts, query.limit)] if chosen.omitted else []
        lines.extend(clean(line) for line in gitstate.problems(git_state))
        if plain.is_plain(sys.stdout):
            if empty:
                sys.stdout.write(empty + "\n")
            else:
                plain.write_tasks(sys.stdout.write, shown)
            sys.stdout.write("".join(f"{line}\n" for line in lines))
            sys.stdout.flush()
            return EXIT_OK
        from taskrunner.cli import render

        if empty:
            out.print(empty, markup=False)
        else:
            render.print_tasks(out, shown)
        for line in lines:
            out.print(line, markup=False, soft_wrap=True)
    except BrokenPipeError:
        # `taskrun status --json | head`: the reader has what it wanted.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK


def write_listing(stream: Any, fields: dict[str, Any], tasks: list[dict[str, Any] | str]) -> None:
    """`{**fields, "tasks": [...]}` as render.write_listing writes it (keys sorted, each Task on a line of its
    own as json.dumps(task, sort_keys=True)), where a Task given as a str is that text already; written in
    batches of _JSON_BATCH rows with one encoder (json.dumps builds an encoder per call)."""
    encode = json.JSONEncoder(sort_keys=True).encode
    stream.write("{")
    for n, key in enumerate(sorted([*fields, "tasks"])):
        stream.write(f"{',' if n else ''}\n  {json.dumps(key)}: ")
        if key != "tasks":
            stream.write(json.dumps(fields[key], indent=2, sort_keys=True).replace("\n", "\n  "))
            continue
        if not tasks:
            stream.write("[]")
            continue
        for at in range(0, len(tasks), _JSON_BATCH):
            rows = [t if isinstance(t, str) else encode(t) for t in tasks[at:at + _JSON_BATCH]]
            stream.write(("[\n    " if at == 0 else ",\n    ") + ",\n    ".join(rows))
        stream.write("\n  ]")
    stream.write("\n}\n")
