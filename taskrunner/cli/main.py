"""`taskrun`: parse, call the library, render. Exit codes as in docs/cli.md ("Exit codes")."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from taskrunner import __version__
from taskrunner.errors import DaemonNotRunning, ForeignRecord, TaskrunError
from taskrunner.lazymodule import lazy
from taskrunner.textsafe import clean

if TYPE_CHECKING:
    from rich.console import Console

# Start-up: `taskrun --version`, `trigger` and the like load neither rich nor the records nor git;
# each is imported when a command first uses it (lazymodule.py).
control = lazy("taskrunner.control")
gitops = lazy("taskrunner.gitops")
render = lazy("taskrunner.cli.render")

EXIT_OK = 0
EXIT_NOT_COMPLETED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
#: How often `logs -f` and `submit --wait` look at the records.
POLL_SECONDS = 0.1


class UsageError(TaskrunError):
    """Raised when a command is called wrongly or in the wrong place."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(complete=False)
    args = parser.parse_args(argv)
    out: Console = _Deferred(stdout_console)  # type: ignore[assignment]  # made at its first use
    try:
        return int(args.handler(args, out))
    except DaemonNotRunning as exc:
        stderr_console().print(f"taskrun: {clean(str(exc), multiline=True)}", markup=False)
        return EXIT_USAGE
    except TaskrunError as exc:
        # Messages quote file names, Worker stderr and the like: shown, never acted on.
        stderr_console().print(f"taskrun: {clean(str(exc), multiline=True)}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def stdout_console() -> Console:
    """The Console commands print to.

    Plain lines for pipes and logs: no hard wrapping at an imagined 80
    columns, and tables as wide as their content. No emoji codes: a title
    ":x:" is shown as written (see textsafe).
    """
    from rich.console import Console

    terminal = sys.stdout.isatty()
    return Console(highlight=False, emoji=False, soft_wrap=not terminal,
                   width=None if terminal else render.PIPE_WIDTH)


def stderr_console() -> Console:
    """The Console error messages go to."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)


class _Deferred:
    """Stands in for the object `make()` returns, made at the first attribute read (rich is imported
    only by commands that print through it: not by `trigger --quiet`, which git hooks run)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._made: Any = None

    def _get(self) -> Any:
        if self._made is None:
            self._made = self._make()
        return self._made

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    # Special methods are looked up on the type, not through __getattr__: rich's Live does `with console:`.
    def __enter__(self) -> Any:
        return self._get().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._get().__exit__(*exc)


#: Commands that other modules define (their `add_parsers(sub)`): module -> its command names, in the
#: order of `taskrun --help`. Each module is imported only when one of its commands is run, or for the
#: whole tree (`taskrun --help`, completion, the docs); until then a command has a stand-in parser.
LAZY_COMMANDS: dict[str, tuple[str, ...]] = {
    "taskrunner.cli.submit": ("submit", "wait"),
    "taskrunner.cli.worker": ("worker",),
    "taskrunner.cli.keys": ("keys", "doctor"),
    "taskrunner.cli.agents": ("agents",),
    "taskrunner.cli.service": ("service",),  # systemd units
    "taskrunner.cli.top": ("top",),  # the dashboard (taskrunner/tui/)
    "taskrunner.cli.prune": ("prune",),  # finished Tasks leave the work tree (taskrunner/prune.py)
}


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """`taskrun`'s subcommands, those of LAZY_COMMANDS with stand-in parsers until used.

    A stand-in (a parser with no arguments, its help line empty) is replaced
    by the module's own parsers, with their examples, when argparse picks
    that command (`__call__`) or by `load_all`. The module's help lines take
    the stand-ins' places, so the order of `taskrun --help` is kept.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stand_ins: dict[str, str] = {}  # command name -> module

    def add_lazy(self, module: str) -> None:
        for name in LAZY_COMMANDS[module]:
            self.add_parser(name, help="")
            self.stand_ins[name] = module

    def load(self, name: str) -> None:
        """Replace `name`'s stand-in (and its module's other commands') by the module's parsers."""
        from taskrunner.cli.examples import add_examples

        module = self.stand_ins.get(name)
        if module is None:
            return
        names = [n for n, m in self.stand_ins.items() if m == module]
        order = list(self._name_parser_map)  # `choices` too: the order completion and the docs walk
        for each in names:
            del self.stand_ins[each], self._name_parser_map[each]
        slots = {a.dest: i for i, a in enumerate(self._choices_actions) if a.dest in names}
        before = len(self._choices_actions)
        importlib.import_module(module).add_parsers(self)
        added = self._choices_actions[before:]
        del self._choices_actions[before:]
        for action in added:
            if action.dest in slots:
                self._choices_actions[slots.pop(action.dest)] = action
            else:
                self._choices_actions.append(action)
        parsers = dict(self._name_parser_map)
        self._name_parser_map.clear()
        self._name_parser_map.update({n: parsers.pop(n) for n in order if n in parsers})
        self._name_parser_map.update(parsers)  # commands the module added that had no stand-in
        for each in names:
            if each in self._name_parser_map:
                add_examples(self._name_parser_map[each], (each,))

    def load_all(self) -> None:
        for name in list(self.stand_ins):
            self.load(name)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        self.load(values[0])
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """`taskrun`'s own parser: its help lists every command, so it loads every stand-in first."""

    def format_help(self) -> str:
        for action in self._actions:
            if isinstance(action, _Commands):
                action.load_all()
        return super().format_help()


def build_parser(complete: bool = True) -> argparse.ArgumentParser:
    """`taskrun`'s parser: complete, or (`complete=False`, what `main` uses) with the commands of
    LAZY_COMMANDS as stand-ins that load their module when used: a command imports only what it needs."""
    parser = _Parser(prog="taskrun", description="A git-native, file-driven orchestrator.")
    parser.add_argument("--version", action="version", version=f"taskrun {__version__}")
    parser.add_argument("-C", "--repo", default=".", help="the managed repository (default: the current directory)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Commands,
                                parser_class=argparse.ArgumentParser)

    def command(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    command("init", cmd_init, "create .taskrun.yaml, tasks/, runs/, hooks/ and the signing key (idempotent)")
    p = command("up", cmd_up, "run the daemon in the foreground")
    p.add_argument("--once", action="store_true", help="bring every pending Task to a final state, then exit "
                   "(0 if all COMPLETED, 1 otherwise)")
    p.add_argument("--output", action="store_true", help="also print the Runs' output (plain mode)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="text: the live table at a "
                   "terminal, plain lines otherwise (default); json: one JSON object per line (docs/logging.md)")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO",
                   help="the least severe events shown (default INFO)")
    p = command("demo", cmd_demo, "a self-contained tour on the embedded local Worker")
    p.add_argument("--keep", action="store_true", help="(always kept) print where the demo repository is")
    p = command("status", cmd_status, "Tasks (counts per status, the Tasks not finished, the latest finished), "
                "or one Task with its Runs")
    p.add_argument("task", nargs="*", metavar="TASK", help="a Task id: that Task with its Runs; or globs on the id "
                   "('auth/*', quoted): the Tasks that match any of them")
    p.add_argument("--json", action="store_true", help="machine-readable output (every matching Task unless --limit)")
    p.add_argument("--all", action="store_true", help="every matching Task, not only the latest finished ones")
    p.add_argument("--status", action="append", metavar="S", help="only Tasks in status S (repeat it, or S1,S2)")
    p.add_argument("--limit", type=int, metavar="N", help="the latest N finished Tasks (default 20; with --json: all)")
    p = command("logs", cmd_logs, "a Run's output")
    p.add_argument("task", help="a Task id")
    p.add_argument("--run", type=int, help="the Run number (default: the latest)")
    p.add_argument("-f", "--follow", action="store_true", help="follow the output live: without --run, the Task "
                   "across its Runs (a header line before each later Run) until it is finished; with --run, "
                   "that Run until it ends")
    p.add_argument("--raw", action="store_true", help="at a terminal too, write the output byte for byte "
                   "(by default a terminal gets control characters other than newline and tab escaped)")
    p.add_argument("--json", action="store_true", help="JSON Lines: a run, output and end event per Run "
                   "(docs/cli.md)")
    p = command("history", cmd_history, "a Task's revisions and every Run of each: status, Worker, Agent, "
                "started, duration, cost, result branch")
    p.add_argument("task", help="a Task id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("completion", cmd_completion, "print the shell completion script for bash or zsh")
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    sub.add_lazy("taskrunner.cli.submit")
    for name, help in (("cancel", "stop a Task's Run on its Worker"), ("retry", "run a Task again")):
        p = command(name, cmd_request, help)
        p.add_argument("task", help="a Task id")
    p = command("workers", cmd_workers, "Workers: reachable, trusted, sandbox, slots used, Agents, last seen")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    for module in ("taskrunner.cli.worker", "taskrunner.cli.keys", "taskrunner.cli.agents", "taskrunner.cli.service",
                   "taskrunner.cli.top", "taskrunner.cli.prune"):
        sub.add_lazy(module)
    p = command("trigger", cmd_request, "what git hooks call: the running daemon syncs now")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    hooks = sub.add_parser("hooks", help="git hooks that make the daemon sync").add_subparsers(
        dest="hooks_command", required=True, metavar="ACTION")
    p = hooks.add_parser("install", help="write a post-receive hook into BARE_REPO, or without it a post-merge hook "
                         "into this clone's git directory; the hook asks this clone's daemon to sync")
    p.set_defaults(handler=cmd_hooks_install)
    p.add_argument("bare", nargs="?", metavar="BARE_REPO", help="the bare repository people push to")
    p.add_argument("--force", action="store_true", help="replace a hook taskrun did not write (it is moved aside)")
    p.add_argument("--print", action="store_true", help="print the hook instead of installing it")
    from taskrunner.cli.examples import add_examples

    add_examples(parser)  # every --help ends with an example (cli/examples.py)
    if complete:
        sub.load_all()
    return parser


def find_root(args: argparse.Namespace) -> Path:
    start = Path(args.repo).resolve()
    root = gitops.toplevel(start)
    if root is None:
        raise UsageError(f"{start} is not inside a git repository; run `taskrun init` there first")
    return root


# -- commands ---------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.project import init_repository

    root = Path(args.repo).resolve()
    done = init_repository(root)
    for line in done:
        out.print(f"  {line}", markup=False)
    out.print("taskrun is set up." if done else "Already set up; nothing to do.")
    out.print("Next: add a Task as tasks/<id>.md, then run `taskrun up` (or `taskrun up --once`).")
    return EXIT_OK


def cmd_up(args: argparse.Namespace, out: Console) -> int:
    import contextlib

    from taskrunner import daemonlock
    from taskrunner.gitbase import state_dir

    root = find_root(args)
    # First: from here on a command sent to this daemon waits for its socket rather than finding none.
    lock = daemonlock.take(state_dir(root), root)
    try:
        from taskrunner import logs
        from taskrunner.config import load_config
        from taskrunner.daemon import Daemon
        from taskrunner.hooks import Hooks

        config = load_config(root)
        hooks: Hooks
        drawn: contextlib.AbstractContextManager[Any]
        if args.log_format == "json":  # every line on stdout a JSON object (logs.py)
            hooks, drawn = logs.LogHooks(output=args.output), contextlib.nullcontext()
        else:
            view = render.LiveView(out, show_output=args.output)
            hooks, drawn = logs.FilteredView(view, args.log_level), view
        daemon = Daemon(root, config, hooks, once=args.once, lock_fd=lock)  # the daemon's to let go from here
    except BaseException:
        os.close(lock)
        raise
    signals = {"count": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(EXIT_NOT_COMPLETED)  # second signal: stop now
        daemon.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    handler = logs.configure(args.log_format, args.log_level)  # the package's `logging` calls, same stream
    try:
        if args.log_format == "json":
            logs.started(root)
        elif not args.once:
            out.print(f"taskrun daemon in {root} (pid {os.getpid()}); Ctrl-C to stop", markup=False)
        with drawn:
            code = daemon.run()
        if args.log_format == "json":
            logs.stopped(code)
        elif not args.once:
            out.print(f"taskrun daemon in {root} stopped (exit {code})", markup=False)
        return code
    finally:
        logs.unconfigure(handler)


def cmd_demo(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.cli.demo import run_demo

    return run_demo(out)


def cmd_status(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.cli import status
    from taskrunner.records import Records
    from taskrunner.status_query import is_glob

    records = Records(find_root(args))
    ignored: list[str] = []
    if (len(args.task) != 1 or not args.task[0] or is_glob(args.task[0]) or args.all or args.status
            or args.limit is not None):
        return status.list_tasks(args, out, records)  # many Tasks (cli/status.py)
    args.task = args.task[0]
    if args.task:
        task = believed(lambda: records.load_task(args.task), ignored)
        report_ignored(ignored)
        if task is None:
            from taskrunner.cli.prune import unknown_task  # pruned: which commit, how to see it (git, only here)

            raise unknown_task(records.root, args.task, f"no Task '{args.task}' has a record; see `taskrun status`")
        runs = [r for r in (believed(lambda: records.load_run(args.task, e["run"]), ignored)
                            for e in task.get("runs", [])) if r]
        report_ignored(ignored)
        if args.json:
            print(json.dumps({"task": task, "runs": runs}, indent=2, sort_keys=True))
            return EXIT_OK
        out.print(render.tasks_table([task]))
        if task.get("error"):
            out.print("\n", render.literal("error:", "bold"), " ", clean(task["error"], multiline=True),
                      sep="", markup=False, highlight=False)
        if runs:
            out.print()
            out.print(render.runs_table(runs))
            last = runs[-1]
            if last.get("status") in ("FAILED", "CANCELLED"):
                if records.output_size(args.task, int(last.get("run") or 0)):
                    out.print(f"\nits output: taskrun logs {args.task} --run {last.get('run')}", markup=False)
                else:  # it failed before any output (a prompt template error, a Worker that refused it)
                    out.print("\n" + render.no_output(args.task, last), markup=False)
            if last.get("result_branch"):
                out.print("\n" + clean(f"its change: the branch {last['result_branch']} (git log -p "
                                        f"{last.get('base_commit') or ''}..{last['result_branch']}); "
                                        f"the pull request body: {last.get('summary')}"), markup=False)
    return EXIT_OK


def believed(load: Callable[[], dict[str, Any] | None], ignored: list[str]) -> dict[str, Any] | None:
    """What `load` gives, or None for a record this clone's daemon did not write (its message to `ignored`)."""
    try:
        return load()
    except ForeignRecord as exc:
        ignored.append(str(exc))
        return None


#: Records not believed that are named one by one on stderr; the rest are counted.
IGNORED_NAMED = 5


def report_ignored(ignored: list[str], shown: set[str] | None = None) -> None:
    """Say on stderr which records were not believed, then forget them (README "Records").

    Messages in `shown` are not said again (a loop that polls passes one set).
    """
    fresh = [m for m in dict.fromkeys(ignored) if shown is None or m not in shown]
    ignored.clear()
    for message in fresh[:IGNORED_NAMED]:
        print(f"taskrun: {clean(message)}", file=sys.stderr)
    if len(fresh) > IGNORED_NAMED:
        print(f"taskrun: {len(fresh) - IGNORED_NAMED} more records under runs/ were not written by this "
              "clone's daemon (no valid seal); ignored", file=sys.stderr)
    if shown is not None:
        shown.update(fresh)


def cmd_logs(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.cli import logs  # following a Task across its Runs, and --json (cli/logs.py)

    return logs.cmd_logs(args, out)


def cmd_history(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.cli import history  # a Task's revisions and Runs from the records (cli/history.py)

    return history.cmd_history(args, out)


def cmd_completion(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.cli.completion import script  # shtab, loaded for this command only

    sys.stdout.write(script(build_parser(), args.shell))
    return EXIT_OK


def cmd_request(args: argparse.Namespace, out: Console) -> int:
    root = find_root(args)
    payload = {"command": args.command, "task": getattr(args, "task", "")}
    try:
        reply = control.request(gitops.state_dir(root), payload, wait_start=not getattr(args, "quiet", False))
    except DaemonNotRunning:
        if getattr(args, "quiet", False):
            return EXIT_OK  # a git hook with no daemon: the next `taskrun up` scans anyway
        raise
    if not reply.get("ok"):
        if reply.get("error") == f"no Task '{payload['task']}'":  # engine.cancel/retry: pruned, or unknown
            from taskrunner.cli.prune import unknown_task

            raise unknown_task(root, payload["task"], reply["error"])
        raise UsageError(reply.get("error") or "the daemon refused the request")
    if not getattr(args, "quiet", False):
        out.print(clean(str(reply.get("message", "ok")), multiline=True), markup=False)
    return EXIT_OK


def cmd_hooks_install(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.gitflow import hooks

    root = find_root(args)
    if args.bare is not None:
        git_dir = hooks.bare_git_dir(Path(args.bare))
        name, script = "post-receive", hooks.post_receive_script(root, hooks.taskrun_command())
    else:
        git_dir = hooks.common_git_dir(root)
        name, script = "post-merge", hooks.post_merge_script(root, hooks.taskrun_command())
    if args.print:
        sys.stdout.write(script)
        return EXIT_OK
    done = hooks.install(git_dir, name, script, force=args.force)
    if done.kept is not None:
        out.print(f"moved the hook that was there to {done.kept}", markup=False)
    out.print(f"wrote {done.path}: it asks the daemon of {root} to sync", markup=False)
    return EXIT_OK


def cmd_workers(args: argparse.Namespace, out: Console) -> int:
    from taskrunner.config import load_config

    root = find_root(args)
    try:
        reply = control.request(gitops.state_dir(root), {"command": "workers"}, wait_start=False)
        workers, daemon, starting = reply["workers"], True, reply.get("starting") is True
    except DaemonNotRunning:
        starting = False
        config = load_config(root)
        daemon = False
        # The same keys as the daemon's answer (fleet.WorkerState.view), unknown ones null.
        workers = [{"name": w.name, "transport": w.transport, "host": w.host, "online": None, "reachable": None,
                    "trusted": None, "slots": w.slots, "used": 0, "agents": list(w.agents),
                    "labels": dict(w.labels), "last_seen": None, "error": None, "version": None,
                    "sandbox": None, "sandbox_accepted": w.sandbox}
                   for w in config.workers.values()]
    _add_homes(root, workers)
    if args.json:
        print(json.dumps({"daemon": daemon, "starting": starting, "workers": workers}, indent=2, sort_keys=True))
    else:
        out.print(render.workers_table(workers, daemon))
        if starting:
            out.print("the daemon is starting (loading its Tasks): its Workers connect once it has", markup=False)
        for w in workers:
            if w.get("trusted") is False and w.get("error"):
                # The table cuts long notes: why a Worker is untrusted, and the fix, are shown whole.
                out.print(clean(f"{w['name']} is untrusted: {w['error']}"), markup=False, soft_wrap=True)
    return EXIT_OK


def _add_homes(root: Path, workers: list[dict[str, Any]]) -> None:
    """Give each Worker view `home`: a local Worker's home directory (`workers.<name>.home`, else the
    default under XDG_STATE_HOME, whose name holds a hash of the clone's path); None for ssh Workers."""
    from taskrunner.config import load_config
    from taskrunner.links.local import default_home

    try:
        specs = load_config(root).workers
    except TaskrunError:
        specs = {}
    for view in workers:
        spec = specs.get(view.get("name")) if isinstance(view.get("name"), str) else None
        if view.get("home") is None:
            view["home"] = None if spec is None or spec.transport != "local" else str(
                Path(spec.home).expanduser() if spec.home else default_home(gitops.state_dir(root), spec.name))
