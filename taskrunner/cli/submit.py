"""`taskrun submit FILE... [--wait]` and `taskrun wait TASK...`: add Tasks and wait for them, for CI.

Both wait the same way (`wait_for`): they poll the records this clone's
daemon writes until every Task is final at the revision asked for, the
timeout passes, or the daemon is gone. The answer is the same for both: a
line per Task, or `--json` (the keys are listed in README "CI: submit and
wait"), and optionally a JUnit XML report (taskrunner/junit.py). Exit codes
are DESIGN.md §3's: 0 all COMPLETED, 1 some not, 3 timed out, 2 usage,
configuration, or no daemon to wait on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from taskrunner import control, gitops, junit
from taskrunner.atomic import write_bytes
from taskrunner.cli import render
from taskrunner.cli.main import (EXIT_NOT_COMPLETED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, POLL_SECONDS, UsageError,
                                 believed, find_root, report_ignored)
from taskrunner.defaults import TASKS_DIR
from taskrunner.duration import parse_duration
from taskrunner.errors import DaemonNotRunning, GitError, UnsafePath
from taskrunner.intake import RepoFiles, read_submitted
from taskrunner.model import TaskStatus
from taskrunner.records import Records
from taskrunner.taskfile import task_id_for, task_id_problem
from taskrunner.textsafe import clean

#: How often a wait asks whether the daemon is still there.
DAEMON_CHECK_SECONDS = 2.0
#: A daemon gone this long ends the wait (exit 2): long enough for a restart.
DAEMON_GONE_SECONDS = 10.0
#: The JUnit report's <system-out> holds at most this many of the last lines of a Run's output...
TAIL_LINES = 50
#: ...read from at most this many of its last bytes.
TAIL_BYTES = 64 * 1024
#: A commit of submitted Task files that fails (HEAD moving, a busy ref) is tried this often.
COMMIT_ATTEMPTS = 3
#: How long a submit waits for the user's git to release the index after committing (seconds).
INDEX_WAIT_SECONDS = 10.0
#: Task ids named in a submit commit's subject; the trailers name them all.
SUBJECT_IDS = 5

_TASK_FINAL = frozenset(s.value for s in TaskStatus if s.final)
_RUN_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    submit = sub.add_parser("submit", help="add Task files to tasks/ (for CI)",
                            description="Copy Task files into tasks/ (and commit them under git.commit); "
                            "with --wait, wait until they end.")
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.add_argument("--wait", action="store_true",
                        help="wait until they end: exit 0 all COMPLETED, 1 some not, 3 timeout")
    _wait_options(submit)
    submit.set_defaults(handler=cmd_submit)
    wait = sub.add_parser("wait", help="wait for Tasks to end, like `submit --wait`",
                          description="Wait until the Tasks are final at the revision of their file in tasks/: "
                          "exit 0 all COMPLETED, 1 some not, 3 timeout.")
    wait.add_argument("tasks", nargs="+", metavar="TASK", help="a Task id")
    _wait_options(wait)
    wait.set_defaults(handler=cmd_wait)


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="DURATION",
                        help="give up waiting after DURATION (90, 45s, 30m, 1h)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--junit", metavar="FILE", help="write a JUnit XML report of the Tasks to FILE")


def _seconds(text: str) -> float:
    """A --timeout as taskfile durations are written (duration.parse_duration); argparse says what is wrong."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- commands ---------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.config import load_config

    if not args.wait and (args.timeout is not None or args.junit):
        raise UsageError("--timeout and --junit go with --wait")
    _check_wait_options(args)
    root = find_root(args)
    config = load_config(root)
    if args.wait:
        _need_daemon(root)  # fail now, not after the timeout
    # Every file is read and checked before any is written: a refused one leaves tasks/ as it was.
    files: dict[str, tuple[str, bytes]] = {}
    for name in args.files:
        rel = f"{TASKS_DIR}/{Path(name).name}"
        task_id = task_id_for(rel)
        if task_id is None:
            raise UsageError(f"{name}: a Task file is named <id>.md with id [a-z0-9][a-z0-9._/-]*")
        problem = task_id_problem(task_id)
        if problem:
            raise UsageError(f"{name}: {problem}")
        if task_id in files:
            raise UsageError(f"{name}: the Task '{task_id}' is already given as {files[task_id][0]}")
        # No link is followed at the file itself or inside the work tree, no FIFO waited on (intake.read_submitted).
        files[task_id] = (name, read_submitted(name, root))
    submitted: dict[str, str | None] = {}
    records = Records(root)
    for task_id, (_, data) in files.items():
        rel = f"{TASKS_DIR}/{task_id}.md"
        # Written under an ignored temp name, then renamed: the daemon reads it whole.
        # Beneath the work tree: a tasks/ that is a link is refused, not written through.
        try:
            write_bytes(root / rel, data, beneath=root)
        except OSError as exc:
            raise UsageError(f"cannot write {rel}: {exc}") from exc
        submitted[task_id] = hashlib.sha256(data).hexdigest()
        if not args.json:
            out.print(f"submitted {rel}", markup=False)
            earlier = _final_record(records, task_id, submitted[task_id], [])
            if earlier is not None:  # the same bytes already ran: the daemon does not run them again
                out.print(f"  unchanged since its last Run ({earlier.get('status')}): not run again; "
                          f"`taskrun retry {task_id}` runs it again", markup=False)
    commit = _commit(root, list(submitted)) if config.git.commit else None
    if commit and not args.json:
        out.print(f"committed {commit[:10]} ({len(submitted)} Task file(s))", markup=False)
    if not args.wait:
        if args.json:
            tasks = [{"task_id": t, "file": f"{TASKS_DIR}/{t}.md", "revision": r} for t, r in submitted.items()]
            print(json.dumps({"tasks": tasks, "commit": commit}, indent=2, sort_keys=True))
        return EXIT_OK
    waited = wait_for(records, submitted, args.timeout, gitops.state_dir(root), out, quiet=args.json)
    return _answer(waited, args, out, {"commit": commit})


def cmd_wait(args: argparse.Namespace, out: Console) -> int:
    _check_wait_options(args)
    root = find_root(args)
    records = Records(root)
    files = RepoFiles(root, gitops.git_dirs(root))
    wanted: dict[str, str | None] = {}
    ignored: list[str] = []
    for task_id in dict.fromkeys(args.tasks):
        problem = task_id_problem(task_id)
        if problem:
            raise UsageError(f"'{task_id}': {problem}")
        revision = _file_revision(files, task_id)
        if revision is None and believed(lambda: records.load_task(task_id), ignored) is None:
            report_ignored(ignored)
            from taskrunner.cli.prune import unknown_task  # pruned: which commit, how to see it (git, only here)

            raise unknown_task(root, task_id,
                               f"no Task '{task_id}': neither {TASKS_DIR}/{task_id}.md nor a record of it")
        wanted[task_id] = revision
    report_ignored(ignored)
    waited = wait_for(records, wanted, args.timeout, gitops.state_dir(root), out, quiet=args.json)
    return _answer(waited, args, out, {})


def _check_wait_options(args: argparse.Namespace) -> None:
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g}: give a number of seconds above 0")
    if args.junit:
        # Before anything is submitted: a report that cannot be written is found out now.
        report = Path(args.junit)
        if report.is_dir():
            raise UsageError(f"--junit {args.junit}: that is a directory; name the report file")
        if not report.absolute().parent.is_dir():
            raise UsageError(f"--junit {args.junit}: the directory {report.absolute().parent} does not exist")


def _need_daemon(root: Path) -> None:
    try:
        control.request(gitops.state_dir(root), {"command": "ping"})
    except DaemonNotRunning as exc:
        raise DaemonNotRunning(f"{exc}. Without a daemon: `taskrun submit FILE...`, then `taskrun up --once`, "
                               "then `taskrun wait TASK... [--json] [--junit FILE]`") from exc


def _file_revision(files: RepoFiles, task_id: str) -> str | None:
    """The sha256 of tasks/<id>.md as it is now; None when it is missing or refused (then any final record counts)."""
    try:
        return hashlib.sha256(files.read(f"{TASKS_DIR}/{task_id}.md")).hexdigest()
    except (OSError, UnsafePath):
        return None


def _commit(root: Path, task_ids: list[str]) -> str | None:
    """Commit exactly the submitted Task files (git.commit); the commit's sha, or None when nothing changed.

    gitops.Git.commit_paths leaves the user's staged and unstaged work as it
    was. A commit that fails is said on stderr and the Tasks run anyway: their
    files are in tasks/, where the daemon takes them up.
    """
    paths = [f"{TASKS_DIR}/{t}.md" for t in task_ids]
    shown = ", ".join(task_ids[:SUBJECT_IDS]) + (f" and {len(task_ids) - SUBJECT_IDS} more"
                                                  if len(task_ids) > SUBJECT_IDS else "")
    message = f"taskrun: submit {shown}\n\n" + "".join(f"Task-Id: {t}\n" for t in task_ids)
    problem: GitError | None = None
    repo = gitops.Git(root)
    for _ in range(COMMIT_ATTEMPTS):
        try:
            commit = repo.commit_paths(paths, message)
            break
        except GitError as exc:
            problem = exc  # HEAD kept moving, or the daemon held a ref: try again
    else:
        print(f"taskrun: the Task files are in {TASKS_DIR}/ but were not committed: {clean(str(problem))}",
              file=sys.stderr)
        return None
    try:
        # This process ends now: an index entry left pending would show the files as staged deletions.
        refreshed = repo.refresh_index(wait=INDEX_WAIT_SECONDS)
    except GitError:
        refreshed = False
    if not refreshed:
        print(f"taskrun: committed {commit}, but git's index was busy and does not list the Task files yet; "
              f"`git reset -q -- {' '.join(paths)}` makes it agree with the commit", file=sys.stderr)
    return commit


# -- waiting ----------------------------------------------------------------------


@dataclass(frozen=True)
class Waited:
    """How a wait ended: one result per Task (the `--json` "tasks" entries), in the order asked."""

    results: list[dict[str, Any]]
    tails: dict[str, str]  # task id -> the last lines of its final Run's output (for the JUnit report)
    timed_out: bool
    daemon_stopped: bool

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return EXIT_TIMEOUT
        if self.daemon_stopped:
            return EXIT_USAGE
        return EXIT_OK if all(r["status"] == "COMPLETED" for r in self.results) else EXIT_NOT_COMPLETED


def wait_for(records: Records, wanted: dict[str, str | None], timeout: float | None, state_dir: Path,
             out: Console, quiet: bool = False) -> Waited:
    """Poll the records until every Task in `wanted` (task id -> revision, None: any) is final there.

    A Task is final when its record (one this clone's daemon wrote: a forged
    COMPLETED is no answer) is COMPLETED, FAILED, CANCELLED, BLOCKED or
    INVALID at the revision asked for, and its last Run for that revision
    has its final record too. Ends early after `timeout` seconds, or when no
    daemon has answered for DAEMON_GONE_SECONDS; DaemonNotRunning at once if
    some Task is not final and no daemon runs at the start.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    final: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    shown: set[str] = set()
    checked = gone = None
    timed_out = stopped = False
    spinner = out.status("waiting for the Tasks to finish...") if out.is_terminal and not quiet \
        else contextlib.nullcontext()
    with spinner:
        while True:
            for task_id, revision in wanted.items():
                if task_id not in final:
                    record = _final_record(records, task_id, revision, ignored)
                    if record is not None:
                        final[task_id] = record
            report_ignored(ignored, shown)
            if len(final) == len(wanted):
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                break
            if checked is None or now - checked >= DAEMON_CHECK_SECONDS:
                try:
                    control.request(state_dir, {"command": "ping"})
                    if checked is None:
                        print(f"taskrun: waiting for {len(wanted) - len(final)} of {len(wanted)} Task(s)"
                              + (f" (at most {timeout:g}s)" if timeout is not None else ""),
                              file=sys.stderr, flush=True)
                    gone = None
                except DaemonNotRunning as exc:
                    if checked is None:
                        raise DaemonNotRunning(
                            f"{exc}; {len(wanted) - len(final)} of the Tasks are not final (without a daemon, "
                            "`taskrun up --once` brings every pending Task to a final state)"
                        ) from None
                    gone = gone or now
                checked = now
                if gone is not None and now - gone >= DAEMON_GONE_SECONDS:
                    stopped = True
                    break
            time.sleep(POLL_SECONDS)
    results = []
    tails = {}
    for task_id in wanted:
        record = final.get(task_id) or believed(lambda: records.load_task(task_id), ignored) or {}
        result, tail = _result(records, task_id, record, wanted[task_id], task_id not in final and timed_out)
        results.append(result)
        tails[task_id] = tail
    report_ignored(ignored, shown)
    return Waited(results, tails, timed_out, stopped)


def _same_revision(recorded: Any, revision: str) -> bool:
    """Whether a Task record is about the file bytes whose sha256 is `revision`.

    A Task refused under security.allowed_signers records the revision
    `refused:<sha256>:<reason digest>` (intake.refused_revision).
    """
    return isinstance(recorded, str) and (recorded == revision or recorded.startswith(f"refused:{revision}:"))


def _final_record(records: Records, task_id: str, revision: str | None,
                  ignored: list[str]) -> dict[str, Any] | None:
    record = believed(lambda: records.load_task(task_id), ignored)
    if not record or record.get("status") not in _TASK_FINAL:
        return None
    if revision is not None and not _same_revision(record.get("revision"), revision):
        return None  # an earlier revision's answer: the daemon has not taken this file up yet
    entry = _last_run(record)
    if entry is not None:
        # The Task record can turn final a moment before its Run's own record is written.
        run = believed(lambda: records.load_run(task_id, int(entry["run"])), ignored)
        if not run or run.get("status") not in _RUN_FINAL:
            return None
    return record


def _last_run(record: dict[str, Any]) -> dict[str, Any] | None:
    """The entry of the Task's last Run of its current revision; None when that revision has no Run."""
    runs = [e for e in record.get("runs") or [] if isinstance(e, dict) and isinstance(e.get("run"), int)]
    mine = [e for e in runs if e.get("revision") == record.get("revision")]
    return mine[-1] if mine else None


def _result(records: Records, task_id: str, record: dict[str, Any], revision: str | None,
            timed_out: bool) -> tuple[dict[str, Any], str]:
    """One Task's `--json` entry (README "CI: submit and wait"), and the tail of its final Run's output."""
    if revision is not None and not _same_revision(record.get("revision"), revision):
        record = {}  # only an earlier revision's record: this one is not taken up yet
    entry = _last_run(record)
    run: dict[str, Any] | None = None
    tail = ""
    if entry is not None:
        number = int(entry["run"])
        ignored: list[str] = []
        found = believed(lambda: records.load_run(task_id, number), ignored) or {}
        started, finished = found.get("started_at"), found.get("finished_at")
        duration = finished - started if isinstance(started, (int, float)) and isinstance(finished, (int, float)) \
            else None
        run = {"number": number, "run_id": found.get("run_id", entry.get("run_id")),
               "status": found.get("status", entry.get("status")), "exit_code": found.get("exit_code"),
               "error": found.get("error"), "worker": found.get("worker", entry.get("worker")),
               "agent": found.get("agent"), "started_at": started, "finished_at": finished,
               "duration": None if duration is None else round(duration, 3),
               "result_branch": found.get("result_branch"), "result_commit": found.get("result_commit"),
               "result_note": found.get("result_note"), "summary": found.get("summary"),
               "output": records.relative(records.output(task_id, number)) if _has_output(records, task_id, number)
               else None}  # a Run that failed before any output has no output.log
        tail = output_tail(records, task_id, number)
    result = {"task_id": task_id, "status": record.get("status", TaskStatus.PENDING.value),
              "error": record.get("error"), "revision": revision or record.get("revision"),
              "title": record.get("title"), "file": record.get("file", f"{TASKS_DIR}/{task_id}.md"),
              "runs": len(record.get("runs") or []), "run": run, "timed_out": timed_out}
    return result, tail


def _has_output(records: Records, task_id: str, number: int) -> bool:
    """Whether the Run has an output.log (empty or not); reads nothing of it."""
    return records.read_output(task_id, number, records.output_size(task_id, number)) is not None


def output_tail(records: Records, task_id: str, number: int) -> str:
    """The last TAIL_LINES lines of a Run's output.log (of its last TAIL_BYTES bytes), as text; "" when none.

    Decoded as UTF-8 with invalid bytes replaced; not yet made safe to show
    (junit.xml_text does that).
    """
    size = records.output_size(task_id, number)
    start = max(0, size - TAIL_BYTES)
    data = records.read_output(task_id, number, start) or b""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start and lines:
        lines = lines[1:]  # the first line read is cut: leave it out
    return "\n".join(lines[-TAIL_LINES:])


# -- answering --------------------------------------------------------------------


def _answer(waited: Waited, args: argparse.Namespace, out: Console, extra: dict[str, Any]) -> int:
    """Print the results (a line per Task, or --json), write the --junit report, and give the exit code."""
    problem = None
    if args.junit:
        cases = [junit.case_for(r, waited.tails.get(r["task_id"], "")) for r in waited.results]
        try:
            # Atomic: a CI step reading the report finds the old one or the whole new one.
            write_bytes(Path(args.junit).absolute(), junit.render(cases, time.time()))
        except OSError as exc:
            problem = f"cannot write the JUnit report {args.junit}: {exc}"
    if args.json:
        print(json.dumps({"tasks": waited.results, "timed_out": waited.timed_out,
                          "daemon_stopped": waited.daemon_stopped, "exit_code": waited.exit_code, **extra},
                         indent=2, sort_keys=True))
    else:
        for result in waited.results:
            out.print(render.literal(f"{result['task_id']} "), render.status_text(result["status"]),
                      render.literal(_note(result)), sep="")
        if args.junit and not problem:
            out.print(f"JUnit report: {args.junit}", markup=False)
    if waited.timed_out:
        print(f"taskrun: timed out after {args.timeout:g}s waiting for "
              f"{sum(r['timed_out'] for r in waited.results)} Task(s)", file=sys.stderr)
    if waited.daemon_stopped:
        print(f"taskrun: the taskrun daemon stopped (no answer for {DAEMON_GONE_SECONDS:g}s) before every Task "
              "was final; start it again with `taskrun up`", file=sys.stderr)
    if problem:
        raise UsageError(problem)
    return waited.exit_code


def _note(result: dict[str, Any]) -> str:
    """What follows a Task's status on its line: its Run, result branch and error, made safe to show."""
    parts = []
    run = result.get("run")
    if run:
        took = f", {run['duration']:.1f}s" if run.get("duration") is not None else ""
        parts.append(f" (run {run['number']} on {run['worker']}{took})")
        if run.get("result_branch"):
            parts.append(f" result branch {run['result_branch']}")
    if result["timed_out"]:
        parts.append(" not final when the wait ended")
    if result.get("error"):
        parts.append(f": {result['error']}")
    return clean("".join(parts))
