"""The invariants every fault must leave true: a pure function of a stopped daemon's repository and the
outputs its Agents were expected to write.

`violations(root, expected)` returns one line per broken invariant (empty: all hold). It reads the
work tree, git (HEAD, refs, history, `git fsck`), the local Worker's home and /proc; it changes
nothing. Used by tests/reliability (the crash matrix) and bench/crash_matrix; written for any
scenario that can say what each Task's Agent prints (`TaskSpec`).

What is checked (README "Records", "The git workflow", DESIGN.md's "exactly one final status"):

- every Task has one record, in its expected final status; its `runs` list names exactly the
  `run-<n>` directories on disk; run ids are unique;
- every Run record is final; only the last Run of a Task may be other than `lost`; the last Run
  has the expected status and exit code; every `output.log` is byte-identical to what the Agent
  wrote (a prefix of it for a lost or cancelled Run) and `output_bytes` is its size;
- every version of a Run record in HEAD's history is final and they all say the same;
- HEAD's `runs/` tree is the work tree's `runs/`, byte for byte, and `git status` shows nothing
  there;
- a changing Task's result branch and `refs/taskrun/runs/<run id>` point at the commit its Run
  record names, whose parent is the Run's base commit and whose tree holds the change; no other
  Run has a result ref, and every `refs/taskrun/runs/*` is named by a Run record;
- `git fsck` is clean; no `*.lock` and no `fast_import_crash_*` in the git directory; no hidden
  or `*.tmp` file under `runs/` or in `.git/taskrun/`; no Run left in the Worker's home;
- the user's uncommitted edits, staged files and untracked files are as they were;
- no live process holds the scenario's marker in its command line.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "BLOCKED", "INVALID"})
RUN_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


@dataclass(frozen=True)
class TaskSpec:
    """One Task of a scenario: its shell script and what its Agent writes.

    `output` is the exact bytes of output.log of a Run that ran to its end; `change` (path, bytes)
    is a file the Agent writes in its checkout, so a result branch comes back.
    """

    task_id: str
    script: str
    status: str
    output: bytes
    exit_code: int = 0
    change: tuple[str, bytes] | None = None
    depends_on: tuple[str, ...] = ()
    early: bool = True
    committed: bool = False


@dataclass
class Expected:
    """What a scenario's repository must hold once its daemon stopped.

    `user_edits` maps a path of the work tree to its bytes (edited, staged or untracked); `staged`
    names those that must also be in the index with those bytes; `worker_home` is the local
    Worker's home (None: not checked); `marker` is in the command line of every process the
    scenario started.
    """

    tasks: dict[str, TaskSpec]
    marker: str
    user_edits: dict[str, bytes] = field(default_factory=dict)
    staged: tuple[str, ...] = ()
    worker_home: Path | None = None
    result_prefix: str = "taskrun/"


def _git(root: Path, *args: str, binary: bool = False) -> subprocess.CompletedProcess[Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    return subprocess.run(["git", "-C", str(root), "-c", "core.hooksPath=/dev/null", *args], capture_output=True,
                          text=not binary, env=env, timeout=120)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marked_processes(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds `marker`, this process excluded."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() not in handle.read():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except (OSError, IndexError):
            continue
        found.append(int(entry))
    return found


def violations(root: Path, expected: Expected) -> list[str]:
    """Every broken invariant of the stopped daemon's repository `root`, one line each (see the module)."""
    found: list[str] = []
    runs_by_id: dict[str, tuple[str, dict[str, Any]]] = {}
    for task_id, spec in sorted(expected.tasks.items()):
        found += _task(root, spec, runs_by_id)
    found += _history(root, runs_by_id)
    found += _tree_matches(root)
    found += _refs(root, expected, runs_by_id)
    found += _leftovers(root, expected)
    found += _user_work(root, expected)
    pids = marked_processes(expected.marker)
    if pids:
        found.append(f"processes of the scenario still run: {pids}")
    return found


def _task(root: Path, spec: TaskSpec, runs_by_id: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
    found: list[str] = []
    tid = spec.task_id
    record = _json(root / "runs" / tid / "status.json")
    if record is None:
        return [f"{tid}: no Task record"]
    if record.get("status") != spec.status:
        found.append(f"{tid}: Task is {record.get('status')}, expected {spec.status} ({record.get('error')})")
    listed = [entry.get("run") for entry in record.get("runs", []) if isinstance(entry, dict)]
    on_disk = sorted(int(p.name[4:]) for p in (root / "runs" / tid).glob("run-*") if p.name[4:].isdigit())
    if sorted(n for n in listed if isinstance(n, int)) != on_disk or len(set(listed)) != len(listed):
        found.append(f"{tid}: the Task record lists Runs {listed}, the directories are {on_disk}")
    if spec.status != "CANCELLED" and not on_disk:
        found.append(f"{tid}: no Run")
    for number in on_disk:
        last = number == on_disk[-1]
        found += _run(root, spec, number, last, runs_by_id)
    return found


def _run(root: Path, spec: TaskSpec, number: int, last: bool,
         runs_by_id: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
    where = f"{spec.task_id} run-{number}"
    directory = root / "runs" / spec.task_id / f"run-{number}"
    run = _json(directory / "status.json")
    if run is None:
        return [f"{where}: no Run record"]
    found: list[str] = []
    run_id = str(run.get("run_id"))
    if run_id in runs_by_id:
        found.append(f"{where}: run id {run_id} is also {runs_by_id[run_id][0]}")
    runs_by_id[run_id] = (where, run)
    status = run.get("status")
    if status not in RUN_FINAL:
        return found + [f"{where}: Run record is {status}, not final"]
    try:
        output = (directory / "output.log").read_bytes()
    except FileNotFoundError:
        output = b""
    if run.get("output_bytes", 0) != len(output):
        found.append(f"{where}: output_bytes {run.get('output_bytes')} but output.log holds {len(output)}")
    partial = bool(run.get("lost")) or status == "CANCELLED"
    if not last and not run.get("lost"):
        found.append(f"{where}: an earlier Run that was not lost ({status}: {run.get('error')})")
    if last and status != spec.status and spec.status != "CANCELLED":
        found.append(f"{where}: Run is {status}, expected {spec.status} ({run.get('error')})")
    if last and status == spec.status and status != "CANCELLED" and run.get("exit_code") != spec.exit_code:
        found.append(f"{where}: exit code {run.get('exit_code')}, expected {spec.exit_code}")
    if output != spec.output and not (partial and spec.output.startswith(output)):
        found.append(f"{where}: output.log ({len(output)} bytes) differs from what the Agent wrote "
                     f"({len(spec.output)} bytes){_first_difference(output, spec.output)}")
    return found


def _first_difference(got: bytes, want: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f", first difference at byte {at}: {got[at:at + 24]!r} vs {want[at:at + 24]!r}"


def _history(root: Path, runs_by_id: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
    """Every committed version of each Run record is final, and they agree."""
    found: list[str] = []
    for where, run in runs_by_id.values():
        task_id, number = where.rsplit(" run-", 1)
        path = f"runs/{task_id}/run-{number}/status.json"
        log = _git(root, "log", "--format=%H", "HEAD", "--", path)
        versions: set[tuple[Any, ...]] = set()
        for sha in log.stdout.split():
            shown = _git(root, "show", f"{sha}:{path}")
            if shown.returncode != 0:
                continue  # the commit deleted it
            try:
                data = json.loads(shown.stdout)
            except ValueError:
                found.append(f"{where}: commit {sha[:10]} holds a record that is not JSON")
                continue
            if data.get("status") not in RUN_FINAL:
                found.append(f"{where}: commit {sha[:10]} holds the record {data.get('status')}, not final")
                continue
            versions.add((data.get("status"), data.get("exit_code"), data.get("result_commit"), data.get("lost")))
        if len(versions) > 1:
            found.append(f"{where}: the history records it differently: {sorted(map(str, versions))}")
        if not versions:
            found.append(f"{where}: its final record was never committed")
    return found


def _tree_matches(root: Path) -> list[str]:
    """HEAD's runs/ is the work tree's runs/ (blob ids of every file), and git status shows nothing there."""
    found: list[str] = []
    listed = _git(root, "ls-tree", "-r", "-z", "HEAD", "--", "runs")
    head = {}
    for entry in listed.stdout.split("\0"):
        if entry:
            meta, path = entry.split("\t", 1)
            head[path] = meta.split()[2]
    disk = sorted(str(p.relative_to(root)) for p in (root / "runs").rglob("*") if p.is_file() or p.is_symlink())
    if disk:
        hashed = _git(root, "hash-object", "--no-filters", "--", *disk).stdout.split()
        work = dict(zip(disk, hashed))
    else:
        work = {}
    for path in sorted(set(head) | set(work)):
        if head.get(path) != work.get(path):
            state = "missing in HEAD" if path not in head else "missing on disk" if path not in work else "differs"
            found.append(f"{path}: HEAD and the work tree disagree ({state})")
    porcelain = _git(root, "status", "--porcelain", "--", "runs").stdout
    if porcelain.strip():
        found.append(f"git status shows records left over: {porcelain.strip()[:200]}")
    return found


def _refs(root: Path, expected: Expected, runs_by_id: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
    found: list[str] = []
    refs = dict(line.split(" ", 1)[::-1] for line in
                _git(root, "for-each-ref", "--format=%(objectname) %(refname)").stdout.splitlines() if line)
    named = {str(run.get("result_commit")) for _, run in runs_by_id.values() if run.get("result_commit")}
    for ref, sha in refs.items():
        if ref.startswith("refs/taskrun/runs/") and sha not in named:
            found.append(f"{ref} -> {sha[:10]}: no Run record names that commit")
    for where, run in runs_by_id.values():
        task_id = where.rsplit(" run-", 1)[0]
        spec = expected.tasks[task_id]
        commit = run.get("result_commit")
        run_ref = refs.get(f"refs/taskrun/runs/{run.get('run_id')}")
        if commit is None:
            if run_ref:
                found.append(f"{where}: refs/taskrun/runs/{run.get('run_id')} exists, the record names no commit")
            continue
        if run_ref != commit:
            found.append(f"{where}: result commit {str(commit)[:10]} but its run ref is {run_ref}")
        parent = _git(root, "rev-parse", f"{commit}^").stdout.strip()
        if parent != run.get("base_commit"):
            found.append(f"{where}: result commit's parent {parent[:10]} is not the base {run.get('base_commit')}")
        if spec.change:
            shown = _git(root, "show", f"{commit}:{spec.change[0]}", binary=True)
            if shown.returncode != 0 or shown.stdout != spec.change[1]:
                found.append(f"{where}: the result commit does not hold the change to {spec.change[0]}")
    for task_id, spec in expected.tasks.items():
        branch = refs.get(f"refs/heads/{expected.result_prefix}{task_id}")
        if not spec.change:
            if branch:
                found.append(f"{task_id}: a result branch exists for a Task that changes nothing")
            continue
        last = max((run for where, run in runs_by_id.values() if where.startswith(f"{task_id} run-")),
                   key=lambda run: int(run.get("run", 0)), default=None)
        if last is None or last.get("status") != "COMPLETED":
            continue
        if branch is None or branch != last.get("result_commit") or last.get("result_branch") is None:
            found.append(f"{task_id}: result branch {branch} but the last Run names {last.get('result_commit')} "
                         f"on {last.get('result_branch')}")
    return found


def _leftovers(root: Path, expected: Expected) -> list[str]:
    found: list[str] = []
    fsck = _git(root, "fsck", "--no-progress", "--no-dangling")
    if fsck.returncode != 0 or any(line.split(" ", 1)[0].rstrip(":") in ("error", "missing", "broken", "fatal")
                                   for line in (fsck.stdout + fsck.stderr).splitlines()):
        found.append(f"git fsck: {(fsck.stdout + fsck.stderr).strip()[:300]}")
    git_dir = Path(_git(root, "rev-parse", "--absolute-git-dir").stdout.strip())
    for path in git_dir.rglob("*"):
        name = path.name
        if name.endswith(".lock") and git_dir / "taskrun" not in path.parents:
            found.append(f"a git lock was left behind: {path.relative_to(git_dir)}")
        if name.startswith("fast_import_crash_"):
            found.append(f"a fast-import crash report was left behind: {path.relative_to(git_dir)}")
        if git_dir / "taskrun" in path.parents and name.endswith(".tmp"):
            found.append(f"a temp file was left behind: {path.relative_to(git_dir)}")
    for path in (root / "runs").rglob("*"):
        if (path.name.startswith(".") and path.name != ".gitkeep") or path.name.endswith(".tmp"):
            found.append(f"a temp file was left behind: {path.relative_to(root)}")
    if expected.worker_home is not None and (expected.worker_home / "runs").is_dir():
        left = sorted(p.name for p in (expected.worker_home / "runs").iterdir())
        if left:
            found.append(f"the Worker still holds Runs in its home: {left}")
    return found


def _user_work(root: Path, expected: Expected) -> list[str]:
    found: list[str] = []
    for path, content in expected.user_edits.items():
        try:
            if (root / path).read_bytes() != content:
                found.append(f"the user's {path} was changed")
        except OSError:
            found.append(f"the user's {path} is gone")
    for path in expected.staged:
        shown = _git(root, "show", f":{path}", binary=True)
        if shown.returncode != 0 or shown.stdout != expected.user_edits.get(path):
            found.append(f"the user's staged {path} is no longer staged as it was")
    return found
