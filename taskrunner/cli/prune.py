"""`taskrun prune [TASK...] --older-than DURATION [--status S] [--dry-run] [--json]`.

Finished Tasks leave the work tree in one commit (taskrunner/prune.py; docs/records.md "Pruning"). With a
daemon running, the daemon does it (the `prune` control request); without one, this command does, holding
the daemon's lock (daemon.lock in the state dir) so that no daemon starts meanwhile. `--json` prints
prune.answer's document (docs/cli.md), and on every failure (a usage mistake, a refusal, git or the
configuration failing) `{"daemon": bool|null, "error": str, "ok": false}` with exit 2: stdout holds one
JSON document and nothing else. `unknown_task` is what the commands taking a Task id say of one that has
no record: pruned (prune.gone) or unknown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console

from taskrunner import control, daemonlock, gitops
from taskrunner.cli.main import EXIT_OK, EXIT_USAGE, UsageError, find_root
from taskrunner.errors import DaemonNotRunning, ForeignRecord, LockError, RecordError, TaskrunError
from taskrunner.textsafe import clean

#: How long the CLI waits for the daemon's answer (it commits first).
REPLY_TIMEOUT = 60.0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    help = ("remove finished Tasks (their Task file, runs/<id>/ and full logs) from the work tree in one commit; "
            "git keeps them")
    p = sub.add_parser("prune", help=help, description=help)
    p.__class__ = _Parser  # argparse makes every subparser of one class: a mistake with --json is JSON too
    p.set_defaults(handler=cmd_prune)
    p.add_argument("task", nargs="*", metavar="TASK", help="only these Task ids or globs ('auth/*', quoted)")
    p.add_argument("--older-than", metavar="DURATION", help="Tasks whose last Run finished longer ago than this "
                   "(30d, 12h; default: records.prune_after)")
    p.add_argument("--status", action="append", metavar="S", help="only Tasks in status S: COMPLETED, CANCELLED, "
                   "FAILED or INVALID (repeat it, or S1,S2)")
    p.add_argument("--dry-run", action="store_true", help="list what would go and the bytes freed; change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")


class _Parser(argparse.ArgumentParser):
    """`taskrun prune`'s parser: with --json among its arguments, a usage mistake is the JSON error document."""

    _json = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        given = list(sys.argv[1:] if args is None else args)
        words = given[:given.index("--")] if "--" in given else given
        self._json = any(len(w) > 2 and "--json".startswith(w) for w in words)  # argparse takes "--j" too
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self._json:  # else `taskrun`'s own parser says so, in text
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> Any:
        if self._json:
            _print_json({"daemon": None, "error": message, "ok": False})
            sys.exit(EXIT_USAGE)
        super().error(message)


def cmd_prune(args: argparse.Namespace, out: Console) -> int:
    if not args.json:
        return _prune(args, out)
    try:
        return _prune(args, out)
    except (TaskrunError, OSError) as exc:
        # Whatever failed (daemon.lock refused, the configuration, git): the document says it, as the
        # daemon's own refusals say theirs; the exit code is that of the same error without --json.
        _print_json({"daemon": getattr(args, "daemon", None), "error": clean(str(exc), multiline=True),
                     "ok": False})
        return EXIT_USAGE


def _prune(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.prune import PruneError, Request

    args.daemon = None
    root = find_root(args)
    statuses = sorted({s.strip().upper() for value in args.status or [] for s in value.split(",") if s.strip()})
    payload: dict[str, Any] = {"command": "prune", "older_than": args.older_than, "statuses": statuses,
                               "patterns": list(args.task), "dry_run": args.dry_run}
    try:  # checked here too, so that a mistake is told the same with or without a daemon
        Request.from_payload(payload, None if args.older_than is not None else _prune_after(root))
    except PruneError as exc:
        raise UsageError(str(exc)) from None
    try:
        # No wait for a starting daemon: without one, prune takes the daemon's lock itself, and says so when it
        # cannot (a daemon starting or running).
        reply = control.request(gitops.state_dir(root), payload, REPLY_TIMEOUT, wait_start=False)
        args.daemon = True
    except DaemonNotRunning:
        args.daemon = False
        reply = _without_daemon(root, payload)
    if not reply.get("ok"):
        raise UsageError(str(reply.get("error") or "the daemon refused the request"))
    reply["daemon"] = args.daemon
    if args.json:
        _print_json(reply)
    else:
        _render(reply, out)
    return EXIT_OK


def _print_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def unknown_task(root: Path, task_id: str, message: str) -> UsageError:
    """The error of a command given a Task id that has no record: that it was pruned (in which commit,
    when, how to see it again: prune.gone) when git says so, else `message`."""
    from taskrunner.prune import gone

    found = gone(root, task_id)
    return UsageError(found.text() if found is not None else message)


def _prune_after(root: Path) -> float | None:
    from taskrunner.config import load_config

    return load_config(root).records.prune_after


def _render(reply: dict[str, Any], out: Console) -> None:
    pruned, dry = reply.get("pruned") or [], reply.get("dry_run")
    verb = "would prune" if dry else "pruned"
    rows: list[list[Any]] = [["TASK", "STATUS", "FINISHED", "SIZE"]]
    for item in pruned:
        when = item.get("finished_at")
        shown = time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if isinstance(when, (int, float)) else "-"
        rows.append([item.get("task"), item.get("status"), shown, _size(int(item.get("bytes") or 0))])
    if pruned:
        _table(rows, out)
    skipped = reply.get("skipped") or []
    if skipped:
        _table([["LEFT", "WHY"], *([item.get("task"), item.get("reason")] for item in skipped)], out)
    for problem in reply.get("problems") or []:
        out.print(clean(f"problem: {problem}"), markup=False)
    count = len(pruned)
    out.print(clean(f"{verb} {count} finished Task{'s' if count != 1 else ''} (older than {reply['older_than']}), "
                    f"{'freeing' if dry else 'freed'} {_size(int(reply.get('bytes') or 0))} in the work tree"
                    + (f"; commit {reply['commit'][:12]}" if reply.get("commit") else "")), markup=False)
    if reply.get("waiting"):
        out.print(clean(f"waiting: {reply['waiting']}"), markup=False)
    if count and not dry:
        commit = (reply.get("commit") or "<commit>")[:12]
        out.print(clean(f"history keeps them: git log -- runs/<id>; git show {commit}^:runs/<id>/status.json"),
                  markup=False)


def _table(rows: list[list[Any]], out: Console) -> None:
    """Rows as aligned columns, two spaces apart, the last one not padded (as render.print_tasks writes
    long tables: a prune may list thousands). Every cell cleaned (textsafe): one line, no control bytes."""
    cells = [[clean("" if cell is None else str(cell)) for cell in row] for row in rows]
    widths = [max(cell_len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    write = out.file.write
    for row in cells:
        write("  ".join([c + " " * (w - cell_len(c)) for c, w in zip(row, widths)] + [row[-1]]).rstrip() + "\n")
    out.file.flush()


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return f"{count} bytes"


def _without_daemon(root: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Prune as the daemon would, under its lock; the same answer."""
    from taskrunner import prune, prune_journal
    from taskrunner.config import load_config
    from taskrunner.records import Records

    config = load_config(root)
    request = prune.Request.from_payload(payload, config.records.prune_after)
    if not config.git.commit and not request.dry_run:
        raise UsageError("git.commit is off: pruning removes files only in a commit, which keeps them")
    state_dir = gitops.state_dir(root)
    with _daemon_lock(state_dir, root):
        def say(message: str) -> None:
            print(f"taskrun: {clean(message)}", file=sys.stderr)

        repo = gitops.Git(root, notice=say)
        for path, begun, removals in [] if request.dry_run else prune_journal.pending(state_dir, say):
            # a prune a kill interrupted: finished first
            prune.remove(root, state_dir, removals)
            prune.prune_commit(repo, removals, begun)
            prune_journal.end(path)
        records = Records(root)
        facts = [f for f in (_facts(records, task_id) for task_id in records.task_ids()) if f is not None]
        chosen, skipped = prune.select(facts, request, time.time())
        removals, more = prune.inspect(repo, chosen, state_dir)
        if request.dry_run or not removals:
            return prune.answer(request, removals, skipped + more)
        busy = repo.in_progress()
        if busy:
            raise UsageError(f"{busy} is in progress in this clone: prune once it ends")
        journal = prune_journal.begin(state_dir, request, removals)
        problems = prune.remove(root, state_dir, removals)
        sha = prune.prune_commit(repo, removals, request)
        prune_journal.end(journal)
        if sha and config.git.push:
            _push(repo, config, state_dir)
        return prune.answer(request, removals, skipped + more, sha, None, problems)


def _facts(records: Any, task_id: str) -> Any:
    from taskrunner.prune import facts_of_record

    try:
        task = records.load_task(task_id)
        entries = task.get("runs") if task else None
        last = records.load_run(task_id, int(entries[-1]["run"])) if entries else None
    except (ForeignRecord, RecordError, KeyError, TypeError, ValueError):
        return None  # a record this clone's daemon did not write, or cannot be read: not known to be over
    return facts_of_record(task, last) if task else None


def _push(repo: gitops.Git, config: Any, state_dir: Path) -> None:
    """One push round, as the daemon's pusher makes after a commit (gitflow/push.py)."""
    from taskrunner.gitflow.gitstate import GitState
    from taskrunner.gitflow.push import Pusher

    Pusher(repo, config.git.remote, config.git.result_branch_prefix, GitState(state_dir),
           notice=lambda message: print(f"taskrun: {clean(message)}", file=sys.stderr)).run()


class _daemon_lock:
    """The lock `taskrun up` takes (daemonlock.py): no daemon starts while this prunes."""

    def __init__(self, state_dir: Path, root: Path) -> None:
        self.state_dir, self.root, self.fd = state_dir, root, -1

    def __enter__(self) -> None:
        try:
            self.fd = daemonlock.take(self.state_dir, self.root, name_holder=False)
        except daemonlock.LockBusy:
            raise UsageError(f"a taskrun daemon is starting or running in {self.root}: try again") from None
        except LockError as exc:
            raise UsageError(str(exc)) from None

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
