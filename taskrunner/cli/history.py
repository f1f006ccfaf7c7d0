"""`taskrun history TASK [--json]`: a Task's revisions and every Run of each, from its records under runs/.

`task_history` is pure: the Task record and its Run records in, the
document `--json` prints out (schema in docs/cli.md, "taskrun history"):

    {"task_id": str, "title": str|null, "file": str|null, "status": str, "error": str|null,
     "revision": str|null (the sha256 of the Task file's bytes now),
     "revisions": [{"revision": str|null, "current": bool, "runs": [Run, ...]}, ...]   (oldest first)}
    Run: {"number": int, "run_id": str|null, "status": str|null, "attempt": int|null, "worker": str|null,
          "agent": str|null, "started_at": float|null, "finished_at": float|null (Unix times),
          "duration": float|null (seconds), "cost_usd": float|null, "cost_estimated": bool,
          "exit_code": int|null, "error": str|null, "result_branch": str|null, "result_commit": str|null}

Only records this clone's daemon sealed are believed (records.py); a Run
whose own record is missing or not believed keeps what the Task record says
of it (number, run id, status, Worker).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from taskrunner.cli import render
from taskrunner.cli.main import EXIT_OK, UsageError, believed, find_root, report_ignored
from taskrunner.records import Records
from taskrunner.textsafe import clean

#: Revisions are shown by this many hex digits of their sha256 in the table (the JSON has them whole).
SHORT_REVISION = 12


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_entry(entry: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """One Run of the history: its own record's fields, else what the Task record's `runs` entry says."""
    found = record or {}
    started, finished = _number(found.get("started_at")), _number(found.get("finished_at"))
    duration = round(finished - started, 3) if started is not None and finished is not None else None
    return {"number": entry["run"], "run_id": found.get("run_id", entry.get("run_id")),
            "status": found.get("status", entry.get("status")), "attempt": found.get("attempt"),
            "worker": found.get("worker", entry.get("worker")), "agent": found.get("agent"),
            "started_at": started, "finished_at": finished, "duration": duration,
            "cost_usd": _number(found.get("cost_usd")), "cost_estimated": found.get("cost_estimated") is True,
            "exit_code": found.get("exit_code"), "error": found.get("error"),
            "result_branch": found.get("result_branch"), "result_commit": found.get("result_commit")}


def task_history(task: dict[str, Any], runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The history document of `task` (its record) given its Run records by number (schema above)."""
    current = task.get("revision")
    revisions: dict[Any, list[dict[str, Any]]] = {}
    for entry in task.get("runs") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("run"), int) or isinstance(entry["run"], bool):
            continue
        record = runs.get(entry["run"])
        revision = (record or {}).get("revision", entry.get("revision"))
        revisions.setdefault(revision, []).append(run_entry(entry, record))
    if current not in revisions:
        revisions[current] = []  # the file as it is now, not run yet (or never: BLOCKED, INVALID)
    return {"task_id": task.get("task_id"), "title": task.get("title"), "file": task.get("file"),
            "status": task.get("status"), "error": task.get("error"), "revision": current,
            "revisions": [{"revision": revision, "current": revision == current,
                           "runs": sorted(found, key=lambda r: r["number"])}
                          for revision, found in revisions.items()]}


def load_history(records: Records, task_id: str) -> dict[str, Any]:
    """The history of `task_id` from runs/; UsageError when it has no record this clone's daemon wrote."""
    ignored: list[str] = []
    task = believed(lambda: records.load_task(task_id), ignored)
    report_ignored(ignored)
    if task is None:
        from taskrunner.cli.prune import unknown_task  # pruned: which commit, how to see it (git, only here)

        raise unknown_task(records.root, task_id, f"no Task '{task_id}' has a record; see `taskrun status`")
    runs: dict[int, dict[str, Any]] = {}
    for entry in task.get("runs") or []:
        number = entry.get("run") if isinstance(entry, dict) else None
        if isinstance(number, int) and not isinstance(number, bool):
            found = believed(lambda: records.load_run(task_id, number), ignored)
            if found is not None:
                runs[number] = found
    report_ignored(ignored)
    return task_history(task, runs)


def cost_text(run: dict[str, Any]) -> str:
    """"$0.0123", "~$0.0123" when estimated from tokens, "-" when none was reported."""
    if run.get("cost_usd") is None:
        return "-"
    return f"{'~' if run.get('cost_estimated') else ''}${run['cost_usd']:.4f}"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{rest:02d}s"


def started_text(timestamp: float | None) -> str:
    """A Run's start in local time to the minute ("2026-05-01 14:03"): a history spans days."""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M") if timestamp else "-"


def history_table(revision: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("RUN", "STATUS", "WORKER", "AGENT", "STARTED", "DURATION", "COST", "RESULT BRANCH", "ERROR"):
        table.add_column(column)
    for run in revision["runs"]:
        table.add_row(render.literal(run["number"]), render.status_text(str(run.get("status") or "-")),
                      render.literal(run.get("worker") or "-"), render.literal(run.get("agent") or "-"),
                      started_text(run.get("started_at")), duration_text(run.get("duration")), cost_text(run),
                      render.literal(run.get("result_branch") or "-"), render.literal(run.get("error") or ""))
    return table


def cmd_history(args: argparse.Namespace, out: Console) -> int:
    history = load_history(Records(find_root(args)), args.task)
    if args.json:
        print(json.dumps(history, indent=2, sort_keys=True))
        return EXIT_OK
    title = f": {history['title']}" if history.get("title") else ""
    out.print(render.literal(f"{history['task_id']}{title} "), render.status_text(str(history["status"])), sep="")
    if history.get("error"):
        out.print(clean(f"error: {history['error']}", multiline=True), markup=False)
    for revision in history["revisions"]:
        sha = str(revision["revision"] or "unknown")[:SHORT_REVISION]
        runs = len(revision["runs"])
        note = " (the file now)" if revision["current"] else ""
        out.print()
        out.print(clean(f"revision {sha}{note}: {runs} Run{'' if runs == 1 else 's'}"), markup=False)
        if runs:
            out.print(history_table(revision))
    return EXIT_OK
