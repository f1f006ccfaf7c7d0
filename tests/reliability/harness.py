"""One crash scenario: a real repository and daemon, killed at a named crash point, restarted, checked.

`Scenario(base, seed)` makes, under `base/crashmx-<seed>-<hex>/` (the directory name is the
scenario's marker, in the command line of every process it starts):

- `origin.git`, a bare remote, and `repo`, its clone, set up by `taskrun init` with `git.push:
  true`, the local Worker at 2 slots, and one initial commit pushed;
- `user`, a second clone, whose commit adding `tasks/synced.md` is pushed once the daemon is up,
  followed by `taskrun trigger` (a sync that fetches and fast-forwards the daemon's clone);
- the user's uncommitted work in `repo`: README.md edited, `staged.txt` staged, `scratch.txt`
  untracked;
- Tasks for the built-in shell Agent (`tasks_for(seed)`): two that print a few KB of known lines
  over about a second, one that changes a file in its checkout (a result branch comes back), one
  that fails with exit code 3, one that depends on another, one cancelled by deleting its file
  while it runs, and the synced one. The seed varies their sizes, pacing and arrival (before the
  daemon starts or while it runs).

`run(point)` starts `taskrun up` with TASKRUN_CRASH_AT=<point> and TASKRUN_CRASH_MARK (the local
Worker inherits them), waits for the daemon (or its Worker) to kill itself there, then: a dead
daemon is started again without the crash variables; either daemon runs until every Task is
final (the Worker the daemon restarts finds the mark and runs on), then gets SIGTERM and must exit
0. `checker.violations` then judges the repository.
Every wait polls with a deadline; nothing started is left running.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from taskrunner.gitops import state_dir
from taskrunner.links.local import default_home
from taskrunner.worker.agentprobe import CACHE_FILE
from tests.reliability.checker import FINAL, Expected, TaskSpec, marked_processes, violations

#: Points a scenario cannot reach, with the reason (a test of such a point expects no crash).
UNREACHABLE: dict[str, str] = {
    "daemon.pauses_saved": "only an AI Agent's usage limit pauses it; the shell Agent has none",
    "daemon.events_written": "events.jsonl is written only for an Agent read through a stream reader "
                             "(claude, codex, gemini, aider); the shell Agent has none",
    "daemon.full_log_moved": "only an output over records.max_log_bytes (4 MiB) is moved out; this scenario's "
                             "are small (tests/integration/test_big_output.py kills the daemon there)",
}

#: How long a (re)started daemon may take to answer with its Worker reachable, in seconds.
READY_TIMEOUT = 180.0
#: How often the scenario asks for a sync until the Task pushed from the user's clone arrived, in seconds.
TRIGGER_EVERY = 5.0


def _poll(predicate: Callable[[], object], timeout: float) -> bool:
    """Poll `predicate` every 50 ms until truthy (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _lines_script(name: str, lines: int, every: int, pause: float, marker: str) -> tuple[str, bytes]:
    """(a bash script printing `lines` known lines with a `pause` s sleep every `every` lines, its output)."""
    pad = (name * 8)[:48]
    script = (f"for i in $(seq 1 {lines}); do printf '{name} %04d {pad}\\n' \"$i\"; "
              f"if [ $((i % {every})) -eq 0 ]; then (exec -a {marker} sleep {pause}); fi; done")
    output = "".join(f"{name} {i:04d} {pad}\n" for i in range(1, lines + 1)).encode()
    return script, output


def tasks_for(seed: int, marker: str) -> list[TaskSpec]:
    """The scenario's Tasks for `seed`: sizes, pacing and arrival vary, the kinds do not."""
    rng = random.Random(seed)
    specs: list[TaskSpec] = []
    for name in ("out-a", "out-b"):
        lines = rng.randrange(40, 80)
        script, output = _lines_script(name, lines, every=rng.choice((4, 5, 6)),
                                       pause=rng.choice((0.04, 0.06)), marker=marker)
        specs.append(TaskSpec(name, script, "COMPLETED", output, early=rng.random() < 0.7))
    change_text = f"changed by seed {seed}\n"
    script, output = _lines_script("change", rng.randrange(10, 30), 5, 0.05, marker)
    specs.append(TaskSpec("change", f"{script}\nprintf '%s' '{change_text}' > changed.txt", "COMPLETED",
                          output, change=("changed.txt", change_text.encode()), early=rng.random() < 0.5))
    script, output = _lines_script("fails", rng.randrange(5, 20), 5, 0.05, marker)
    specs.append(TaskSpec("fails", f"{script}\nexit 3", "FAILED", output, exit_code=3,
                          early=rng.random() < 0.5))
    script, output = _lines_script("child", rng.randrange(5, 20), 5, 0.05, marker)
    specs.append(TaskSpec("child", script, "COMPLETED", output, depends_on=("out-a",),
                          early=rng.random() < 0.5))
    script = f"echo started\n(exec -a {marker} sleep 60)\necho never"
    specs.append(TaskSpec("cancel-me", script, "CANCELLED", b"started\n", early=rng.random() < 0.5))
    return specs


def synced_task(marker: str) -> TaskSpec:
    """The Task that arrives by a sync from the remote (committed by the user's clone)."""
    script, output = _lines_script("synced", 12, 4, 0.05, marker)
    return TaskSpec("synced", script, "COMPLETED", output, committed=True)


def task_text(spec: TaskSpec) -> str:
    """The Task file for `spec` (front matter, a heading, one sh block)."""
    front = f"depends_on: [{', '.join(spec.depends_on)}]\n" if spec.depends_on else ""
    return f"---\n{front}---\n# {spec.task_id}\n\n```sh\n{spec.script}\n```\n"


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True,
                          env=env, timeout=60).stdout


@dataclass
class Outcome:
    """What one `Scenario.run` saw: the crash (mark text or None), the violations, the wall time."""

    point: str
    seed: int
    crashed: str | None
    side: str  # "daemon", "worker" or "" (no crash)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Scenario:
    """A throw-away repository, remote and user clone for one crash run (see the module docstring)."""

    def __init__(self, base: Path, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.marker = f"crashmx-{seed}-{uuid.uuid4().hex[:10]}"
        self.dir = base / self.marker
        self.dir.mkdir(parents=True)
        self.root = self.dir / "repo"
        self.origin = self.dir / "origin.git"
        self.user = self.dir / "user"
        self.mark = self.dir / "crash.mark"
        self.log = self.dir / "daemon.log"
        self.env = self._environment()
        self.specs = tasks_for(seed, self.marker)
        self.synced = synced_task(self.marker)
        self._proc: subprocess.Popen[bytes] | None = None
        self._asked = 0.0

    def _environment(self) -> dict[str, str]:
        home = self.dir / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GIT_", "TASKRUN_CRASH_")) and k not in ("EMAIL",)}
        env.update(HOME=str(home), XDG_STATE_HOME=str(self.dir / "state"), XDG_CONFIG_HOME=str(home / ".config"),
                   GIT_CONFIG_NOSYSTEM="1", PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")) if p)
        return env

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """The remote, the daemon's clone (`taskrun init`, push on), the user's clone and uncommitted work."""
        _git(self.dir, "init", "--quiet", "--bare", "--initial-branch=main", str(self.origin), env=self.env)
        _git(self.dir, "clone", "--quiet", str(self.origin), str(self.root), env=self.env)
        for clone in (self.root,):
            _git(clone, "config", "user.name", "Crash User", env=self.env)
            _git(clone, "config", "user.email", "crash@example.com", env=self.env)
        _git(self.root, "checkout", "--quiet", "-b", "main", env=self.env)
        init = self.taskrun("init")
        if init.returncode != 0:
            raise RuntimeError(f"taskrun init failed: {init.stderr}")
        config = self.root / ".taskrun.yaml"
        text = config.read_text().replace("  push: false", "  push: true", 1)
        config.write_text(text.replace("slots: 4", "slots: 2", 1))
        (self.root / "README.md").write_text("a project\n")
        _git(self.root, "add", "-A", env=self.env)
        _git(self.root, "commit", "--quiet", "-m", "initial", env=self.env)
        _git(self.root, "push", "--quiet", "-u", "origin", "main", env=self.env)
        _git(self.dir, "clone", "--quiet", str(self.origin), str(self.user), env=self.env)
        _git(self.user, "config", "user.name", "Other User", env=self.env)
        _git(self.user, "config", "user.email", "other@example.com", env=self.env)
        for path, content in self.user_edits().items():
            (self.root / path).write_bytes(content)
        _git(self.root, "add", "--", "staged.txt", env=self.env)
        self._share_versions(into_home=True)

    def _share_versions(self, into_home: bool) -> None:
        """Scenarios under one base share the local Worker's cache of Agent CLI versions (agentprobe.py):
        asking every CLI on PATH takes seconds, the same answers each time."""
        shared, home = self.base / CACHE_FILE, self.expected().worker_home
        assert home is not None
        try:
            if into_home and shared.exists():
                home.mkdir(mode=0o700, parents=True, exist_ok=True)
                shutil.copyfile(shared, home / CACHE_FILE)
            elif not into_home and (home / CACHE_FILE).exists() and not shared.exists():
                shutil.copyfile(home / CACHE_FILE, shared)
        except OSError:
            pass  # only slower

    def user_edits(self) -> dict[str, bytes]:
        """The user's uncommitted work in the daemon's clone: path -> bytes."""
        return {"README.md": b"a project\nedited, not committed\n", "staged.txt": b"staged, not committed\n",
                "scratch.txt": b"untracked\n"}

    def expected(self) -> Expected:
        """What the checker compares the repository with."""
        return Expected(tasks={s.task_id: s for s in (*self.specs, self.synced)}, marker=self.marker,
                        user_edits=self.user_edits(), staged=("staged.txt",),
                        worker_home=default_home(state_dir(self.root), "local", self.env))

    def write_task(self, spec: TaskSpec) -> None:
        """tasks/<id>.md whole (temp name, then rename)."""
        path = self.root / "tasks" / f"{spec.task_id}.md"
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_text(task_text(spec))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ processes

    def taskrun(self, *args: str, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskrunner", "-C", str(self.root), *args], capture_output=True,
                              text=True, timeout=timeout, env=env or self.env, stdin=subprocess.DEVNULL)

    def _start(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(self.root), "up", *args],
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return self._proc

    def _ready(self) -> bool:
        try:
            result = self.taskrun("workers", "--json", timeout=30)
        except subprocess.TimeoutExpired:
            return False  # a loaded machine: asked again
        if result.returncode != 0:
            return False
        try:
            data = json.loads(result.stdout)
        except ValueError:
            return False
        return bool(data.get("daemon")) and all(w.get("reachable") for w in data.get("workers", []))

    def record(self, task_id: str) -> dict[str, object] | None:
        try:
            return json.loads((self.root / "runs" / task_id / "status.json").read_bytes())
        except (OSError, ValueError):
            return None

    def _status(self, task_id: str) -> str | None:
        record = self.record(task_id)
        return str(record.get("status")) if record else None

    def _all_final(self) -> bool:
        return all(self._status(t) in FINAL for t in self.expected().tasks)

    def _cancel_when_started(self) -> None:
        """Delete cancel-me's file once its output shows it started (or once it is known and not yet started)."""
        path = self.root / "tasks" / "cancel-me.md"
        if not path.exists():
            return
        output = self.root / "runs" / "cancel-me"
        if any((p / "output.log").exists() and (p / "output.log").read_bytes() for p in output.glob("run-*")):
            path.unlink()

    def _sync_from_user(self) -> None:
        """The user's clone adds tasks/synced.md, pushes it (rebasing over the daemon's pushes), triggers."""
        (self.user / "tasks").mkdir(exist_ok=True)
        (self.user / "tasks" / "synced.md").write_text(task_text(self.synced))
        _git(self.user, "add", "--", "tasks/synced.md", env=self.env)
        _git(self.user, "commit", "--quiet", "-m", "add synced", env=self.env)
        for _ in range(10):
            pushed = subprocess.run(["git", "-C", str(self.user), "push", "--quiet", "origin", "HEAD:main"],
                                    capture_output=True, env=self.env, timeout=60)
            if pushed.returncode == 0:
                break
            _git(self.user, "pull", "--quiet", "--rebase", "origin", "main", env=self.env)
        self._asked = 0.0
        self._trigger_until_synced()

    def _trigger_until_synced(self) -> None:
        """`taskrun trigger` (a sync) at most every TRIGGER_EVERY s until the pushed Task has a record: a
        trigger that reached a daemon killed before it synced is asked again of the next."""
        if self.record(self.synced.task_id) is not None or time.monotonic() - self._asked < TRIGGER_EVERY:
            return
        self._asked = time.monotonic()
        try:
            self.taskrun("trigger", "--quiet", timeout=60)
        except subprocess.TimeoutExpired:
            pass  # asked again

    # ------------------------------------------------------------------ the run

    def run(self, point: str, deadline: float = 300.0) -> Outcome:
        """Crash at `point`, restart, settle, check; always stops what it started."""
        began = time.monotonic()
        try:
            self.prepare()
            crashed, side = self._crash_and_recover(point, deadline)
            self._share_versions(into_home=False)
            _poll(lambda: not marked_processes(self.marker), 15)
            found = violations(self.root, self.expected())
        except Exception as exc:  # a scenario that could not finish is a violation, not a crash of the bench
            crashed, side = self._mark_text(), ""
            found = [f"the scenario failed: {type(exc).__name__}: {exc}"]
        finally:
            self.stop()
        return Outcome(point, self.seed, crashed, side, found, time.monotonic() - began)

    def _mark_text(self) -> str | None:
        try:
            return self.mark.read_text().strip() or None
        except OSError:
            return None

    def _crash_and_recover(self, point: str, deadline: float) -> tuple[str | None, str]:
        end = time.monotonic() + deadline
        early = [s for s in self.specs if s.early]
        late = [s for s in self.specs if not s.early]
        for spec in early:
            self.write_task(spec)
        env = dict(self.env, TASKRUN_CRASH_AT=point, TASKRUN_CRASH_MARK=str(self.mark))
        proc = self._start(env)
        if not _poll(lambda: proc.poll() is not None or self._ready(), READY_TIMEOUT):
            raise RuntimeError(f"the daemon did not become ready in {READY_TIMEOUT:.0f} s")
        synced = False
        if proc.poll() is None:
            for spec in late:
                self.write_task(spec)
            late = []
            self._sync_from_user()
            synced = True

        def settled() -> bool:
            self._cancel_when_started()
            if synced:
                self._trigger_until_synced()
            return proc.poll() is not None or self._all_final()

        if not _poll(settled, max(1.0, end - time.monotonic())):
            raise RuntimeError("the Tasks did not settle before the deadline")
        crashed = self._mark_text()
        if proc.poll() is None:
            side = "worker" if crashed else ""
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"the daemon exited with {proc.returncode} after SIGTERM")
            return crashed, side
        proc.wait()
        if not crashed:
            raise RuntimeError(f"the daemon exited with {proc.returncode} and no crash mark")
        # Restarted without the crash variables; what the crash kept from being written comes now.
        for spec in late:
            self.write_task(spec)
        if not synced:
            self._sync_from_user()  # the daemon is down: the next one syncs at start or on trigger
        self._restart_until_final(end)
        return crashed, "daemon"

    def _restart_until_final(self, end: float) -> None:
        """`taskrun up` without the crash variables until every Task is final, then SIGTERM."""
        proc = self._start(self.env)
        if not _poll(lambda: proc.poll() is not None or self._ready(), READY_TIMEOUT):
            raise RuntimeError(f"the restarted daemon did not become ready in {READY_TIMEOUT:.0f} s")
        self._asked = 0.0

        def settled() -> bool:
            self._cancel_when_started()
            self._trigger_until_synced()
            return proc.poll() is not None or self._all_final()

        _poll(settled, max(1.0, end - time.monotonic()))
        if proc.poll() is not None:
            raise RuntimeError(f"the restarted daemon exited with {proc.returncode}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"the restarted daemon exited with {proc.returncode} after SIGTERM")

    def stop(self) -> None:
        """Kill (by pid) whatever of this scenario still runs: the daemon, its Worker, Agents."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for pid in marked_processes(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self) -> None:
        """Delete the scenario's directory (after `stop`)."""
        shutil.rmtree(self.dir, ignore_errors=True)
