"""A soak: mixed Tasks over the local Worker and sshd Workers in network namespaces, with faults at random.

    soak = Soak(SoakOptions(minutes=5, seed=1), base)    # base: an empty directory (its name is the marker)
    try:
        soak.prepare()            # origin, clone on a tmpfs, sshd Workers, `taskrun up`, warm-up
        report = soak.run()       # drop Tasks and inject faults for `minutes`, settle, stop, check
    finally:
        soak.close()              # whatever still runs is stopped; namespaces and the tmpfs removed

Layout under `base` (its name, `soak-…`, is in the command line of every process it starts):
`origin.git` (bare remote), `disk/` a tmpfs of `tmpfs_mb` MB holding `disk/repo` (the daemon's clone,
`git.push: true`) and `disk/state` (XDG_STATE_HOME: the local Worker's home), `host<N>/` each sshd
Worker (tests/netns.py: its own network namespace, reached at 10.200.N.2:22), `daemon.log`.

Tasks (`next_tasks`) are shell Tasks whose output is known byte for byte (tests/reliability/checker.py
`TaskSpec`): short, long (a line every 0.2-0.5 s for 5-30 s), failing (exit 3), failing with
`retries: 1` (two FAILED Runs), a pair where one depends on the other, one that writes a file (a
result branch comes back). Faults (`FAULTS`), one every `fault_every` seconds on average, seeded:
SIGKILL the daemon (started again at once), SIGKILL a Worker session process (`taskrun-worker` on the
local Worker or in an sshd Worker's namespace), cut a link (blackhole or resets for 2 s to past
`worker_offline_after` + `worker_grace`, then heal), disk pressure (a ballast file fills the tmpfs,
held 5-20 s, removed), a person's `git reset --hard HEAD~1` over the daemon's newest record commit. At the end: every fault healed, every Task final, the daemon SIGTERMed, the
invariants checked (`checker.violations`) plus: no Run left in an sshd Worker's home, the daemon
never exited by itself, and a Task with retries has exactly retries + 1 Runs that were not lost,
each failing as its Agent did. The daemon's RSS, open fds, threads and children are sampled from
/proc, idle, after the warm-up and before the SIGTERM (`Sample`).

Needs root (tmpfs, namespaces) and what tests/netns.py needs; `ssh=False` runs the local Worker only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.reliability.checker import FINAL, Expected, TaskSpec, marked_processes, violations
from tests.reliability.procstat import Sample, children, cmdline, sample
from tests.reliability.soaktasks import SoakTask, next_tasks, printing

#: The faults, by name.
FAULTS = ("daemon-kill", "worker-kill", "link-cut", "disk-pressure", "user-reset")
#: `scheduler.worker_offline_after` and `worker_grace` in the soak (seconds): short, so cuts cross them.
OFFLINE_AFTER = 6.0
GRACE = 15.0
#: Lost Runs are run again "up to 3 times per revision" (README, Records): a 4th loss fails the Task.
LOST_LIMIT = 3


def _poll(predicate: Callable[[], object], timeout: float, every: float = 0.2) -> bool:
    """Poll `predicate` until truthy (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@dataclass
class SoakOptions:
    """What a soak does. Times in seconds unless named otherwise."""

    minutes: float = 30.0
    seed: int = 1
    ssh: bool = True
    faults: tuple[str, ...] = FAULTS
    #: The first faults, in this order, before the random ones (the smoke test names one of each).
    first_faults: tuple[str, ...] = ()
    task_every: float = 1.5
    fault_every: float = 20.0
    cut_seconds: tuple[float, float] = (2.0, OFFLINE_AFTER + GRACE + 8.0)
    disk_seconds: tuple[float, float] = (5.0, 20.0)
    tmpfs_mb: int = 256
    settle: float = 600.0
    workers: int = 2


def _git(cwd: Path, *args: str, env: dict[str, str]) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True,
                          env=env, timeout=60).stdout


@dataclass
class Report:
    """What a soak saw. `violations`: broken invariants (target none); `gave_up`: Tasks failed after their
    Runs were lost more than LOST_LIMIT times, or whose Agent's own write found the disk full (documented,
    not a violation; listed); `runs`: Run counts by
    outcome (COMPLETED, FAILED, FAILED-lost, CANCELLED); `faults`: injected by kind; `skipped`: faults that
    had no target then; samples of the daemon at the start and end (idle)."""

    seconds: float = 0.0
    tasks: int = 0
    runs: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    fault_log: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    start: Sample | None = None
    end: Sample | None = None
    peak_rss_kib: int = 0
    daemon_starts: int = 0
    notes: list[str] = field(default_factory=list)


class Soak:
    """One soak in `base` (see the module docstring). Not thread-safe; every wait polls with a deadline."""

    def __init__(self, options: SoakOptions, base: Path) -> None:
        self.options = options
        self.base = base
        self.marker = base.name
        self.rng = random.Random(options.seed)
        self.disk = base / "disk"
        self.root = self.disk / "repo"
        self.origin = base / "origin.git"
        self.log = base / "daemon.log"
        self.ballast = self.disk / "ballast"
        self.env = self._environment()
        self.tasks: dict[str, SoakTask] = {}
        self.waiting: list[SoakTask] = []  # dropped when the disk has room
        self.hosts: list[Any] = []  # (name, Netns, NetnsSshdHost)
        self.proc: subprocess.Popen[bytes] | None = None
        self.report = Report()
        self.mounted = False
        self.heals: list[tuple[float, str, Callable[[], None]]] = []
        self._number = 0
        self._began = time.monotonic()
        self._restart_at = 0.0
        #: Why the daemon exited by itself ("exit N: last error line") -> how often.
        self.exits: dict[str, int] = {}

    def _environment(self) -> dict[str, str]:
        home = self.base / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "TASKRUN_")) and k != "EMAIL"}
        env.update(HOME=str(home), XDG_STATE_HOME=str(self.disk / "state"), XDG_CONFIG_HOME=str(home / ".config"),
                   GIT_CONFIG_NOSYSTEM="1", PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")) if p)
        return env

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """The tmpfs, the remote and clone, the sshd Workers, the daemon, and a warm-up; RuntimeError if not."""
        self.disk.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.options.tmpfs_mb}m", "tmpfs",
                                  str(self.disk)], check=False, capture_output=True, text=True)
        if mounted.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs at {self.disk} (root needed): {mounted.stderr.strip()}")
        self.mounted = True
        env = self.env
        _git(self.base, "init", "--quiet", "--bare", "--initial-branch=main", str(self.origin), env=env)
        _git(self.base, "clone", "--quiet", str(self.origin), str(self.root), env=env)
        _git(self.root, "config", "user.name", "Soak User", env=env)
        _git(self.root, "config", "user.email", "soak@example.com", env=env)
        _git(self.root, "checkout", "--quiet", "-b", "main", env=env)
        init = self.taskrun("init")
        if init.returncode != 0:
            raise RuntimeError(f"taskrun init failed: {init.stderr}")
        state = self.root / ".git" / "taskrun"
        versions = self._agent_versions()
        entries: dict[str, Any] = {}
        if self.options.ssh:
            entries = self._start_hosts(state, versions)
        config = yaml.safe_load((self.root / ".taskrun.yaml").read_text())
        config["workers"]["local"]["slots"] = 2
        config["workers"].update(entries)
        config["scheduler"].update(worker_offline_after=f"{OFFLINE_AFTER:g}s", worker_grace=f"{GRACE:g}s",
                                   backoff={"base": "1s", "max": "5s"})
        config["git"]["push"] = True
        (self.root / ".taskrun.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (self.root / "README.md").write_text("a soaked project\n")
        _git(self.root, "add", "-A", env=env)
        _git(self.root, "commit", "--quiet", "-m", "initial", env=env)
        _git(self.root, "push", "--quiet", "-u", "origin", "main", env=env)
        if versions:
            self._write_versions(self.local_home(), versions)
        self.start_daemon()
        if not _poll(self._ready, 90, 0.5):
            raise RuntimeError(f"the daemon did not have every Worker online in 90 s:\n{self.log_tail()}")
        for n in range(4):  # warm-up: every Worker takes a Run or two before the first sample
            script, out = printing(f"warm-{n}", 3, 0.01, self.marker)
            self.drop(SoakTask(TaskSpec(f"warm-{n}", script, "COMPLETED", out)))
        if not _poll(self.all_final, 120, 0.5):
            raise RuntimeError(f"the warm-up Tasks did not finish in 120 s:\n{self.log_tail()}")
        self.report.start = self._idle_sample()

    def _agent_versions(self) -> bytes:
        from taskrunner import agents
        from taskrunner.worker import agentprobe
        probe = self.base / "probe"
        probe.mkdir()
        agentprobe.available(probe, agents.PRESETS)
        cache = probe / agentprobe.CACHE_FILE
        return cache.read_bytes() if cache.exists() else b""

    @staticmethod
    def _write_versions(home: Path, versions: bytes) -> None:
        from taskrunner.worker import agentprobe
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        cache = home / agentprobe.CACHE_FILE
        cache.write_bytes(versions)
        cache.chmod(0o600)

    def _start_hosts(self, state: Path, versions: bytes) -> dict[str, Any]:
        """sshd Workers w1..wN, each in a network namespace; their configuration entries."""
        from taskrunner import keys
        from tests.netns import Netns, start_netns_sshd
        from tests.sshd import enroll
        _, public = keys.ensure_ssh_key(state)
        entries: dict[str, Any] = {}
        for n in range(1, self.options.workers + 1):
            try:
                ns = Netns.create()
            except BaseException as exc:  # pytest.fail raises an exception outside Exception
                raise RuntimeError(f"cannot make a network namespace: {exc}") from None
            try:
                host = start_netns_sshd(ns, self.base / f"host{n}", public)
            except BaseException as exc:
                ns.close()
                raise RuntimeError(f"cannot start sshd in namespace {ns.name}: {exc}") from None
            self.hosts.append((f"w{n}", ns, host))
            if versions:
                self._write_versions(host.home, versions)
            entries[f"w{n}"] = {"transport": "ssh", "host": ns.addr, "port": host.port, "slots": 2,
                                "host_key": host.host_key_line, "worker_key": enroll(host.home, state)}
        return entries

    def local_home(self) -> Path:
        from taskrunner.gitops import state_dir
        from taskrunner.links.local import default_home
        return default_home(state_dir(self.root), "local", self.env)

    # ------------------------------------------------------------------ the daemon

    def taskrun(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskrunner", "-C", str(self.root), *args], check=False,
                              capture_output=True, text=True, timeout=timeout, env=self.env, stdin=subprocess.DEVNULL)

    def start_daemon(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "taskrunner", "-C", str(self.root), "up"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        self.report.daemon_starts += 1

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            result = self.taskrun("workers", "--json", timeout=30)
            data = json.loads(result.stdout) if result.returncode == 0 else {}
        except (ValueError, subprocess.TimeoutExpired):
            return False
        return bool(data.get("daemon")) and all(w.get("reachable") for w in data.get("workers", []))

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def _idle_sample(self) -> Sample | None:
        """The daemon's figures once no Run is held anywhere (or after 60 s)."""
        _poll(lambda: not self._held_runs(), 60, 0.5)
        if self.proc is None:
            return None
        pid = self.proc.pid  # the last commit's git children gone: the local Worker's session is the one left
        _poll(lambda: (figures := sample(pid)) is None or figures.children <= 1, 10, 0.1)
        return sample(pid)

    def _held_runs(self) -> list[str]:
        homes = [self.local_home()] + [host.home for _, _, host in self.hosts]
        return [f"{home.name}:{p.name}" for home in homes if (home / "runs").is_dir() for p in (home / "runs").iterdir()]

    # ------------------------------------------------------------------ Tasks

    def drop(self, task: SoakTask) -> bool:
        """Write tasks/<id>.md whole (hidden temp name, then rename); False when the disk is full (it waits)."""
        path = self.root / "tasks" / f"{task.spec.task_id}.md"
        tmp = path.parent / f".{path.name}.tmp"
        try:
            tmp.write_text(task.text)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if task not in self.waiting:
                self.waiting.append(task)
            return False
        self.tasks[task.spec.task_id] = task
        return True

    def status(self, task_id: str) -> str | None:
        try:
            return str(json.loads((self.root / "runs" / task_id / "status.json").read_bytes()).get("status"))
        except (OSError, ValueError, AttributeError):
            return None

    def all_final(self) -> bool:
        return not self.waiting and all(self.status(t) in FINAL for t in self.tasks)

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str) -> bool:
        """Inject one fault of `kind` now (held ones are healed later by `heal_due`); False: no target now."""
        now = time.monotonic()
        if kind == "daemon-kill":
            if self.proc is None or self.proc.poll() is not None:
                return False
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.start_daemon()
            detail = "SIGKILL, started again"
        elif kind == "worker-kill":
            targets = self._sessions()
            if not targets:
                return False
            name, pids = self.rng.choice(sorted(targets.items()))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            detail = f"SIGKILL {name}'s session {pids}"
        elif kind == "link-cut":
            free = [(name, ns) for name, ns, _ in self.hosts if not any(h[1] == name for h in self.heals)]
            if not free:
                return False
            name, ns = self.rng.choice(free)
            how = self.rng.choice(("blackhole", "reset"))
            ns.blackhole() if how == "blackhole" else ns.reset()
            hold = self.rng.uniform(*self.options.cut_seconds)
            self.heals.append((now + hold, name, ns.heal))
            detail = f"{how} {name} for {hold:.1f} s"
        elif kind == "disk-pressure":
            if not self.mounted or any(h[1] == "disk" for h in self.heals):
                return False
            filled = self._fill()
            hold = self.rng.uniform(*self.options.disk_seconds)
            self.heals.append((now + hold, "disk", self._release))
            detail = f"ballast {filled / 2**20:.1f} MiB for {hold:.1f} s"
        elif kind == "user-reset":
            # A person's `git reset --hard HEAD~1` that drops the daemon's newest record commit (and its
            # files); the running daemon writes them back and commits them again (gitflow/dropped.py).
            head = subprocess.run(["git", "-C", str(self.root), "log", "-1", "--format=%h %B"], check=False,
                                  capture_output=True, text=True, env=self.env, timeout=60).stdout.strip()
            if not head.partition(" ")[2].startswith("taskrun: ") or "\nTask-Id: " not in head:
                return False  # not a record commit (one Run's or a batch's: they carry Task-Id trailers)
            head = head.splitlines()[0]
            reset = subprocess.run(["git", "-C", str(self.root), "reset", "--quiet", "--hard", "HEAD~1"],
                                   check=False, capture_output=True, text=True, env=self.env, timeout=60)
            if reset.returncode != 0:  # the daemon's index.lock, or its commit moving HEAD meanwhile
                return False
            detail = f"git reset --hard HEAD~1 over {head[:60]}"
        else:
            raise ValueError(f"unknown fault {kind!r}")
        self.report.faults[kind] = self.report.faults.get(kind, 0) + 1
        self.report.fault_log.append(f"{now - self._began:7.1f} s {kind}: {detail}")
        return True

    def _sessions(self) -> dict[str, list[int]]:
        """Worker name -> pids of its `taskrun-worker` session processes now."""
        found: dict[str, list[int]] = {}
        if self.proc is not None and self.proc.poll() is None:
            for pid in children(self.proc.pid):
                if b"taskrunner.worker" in cmdline(pid) and b"serve" in cmdline(pid):
                    found.setdefault("local", []).append(pid)
        for name, ns, _ in self.hosts:
            listed = subprocess.run(["ip", "netns", "pids", ns.name], check=False, capture_output=True,
                                    text=True, timeout=30)
            pids = [int(p) for p in listed.stdout.split() if p.isdigit() and b"taskrun-worker" in cmdline(int(p))]
            if pids:
                found[name] = pids
        return found

    def _fill(self) -> int:
        """Fill the tmpfs with the ballast file until ENOSPC; the bytes written."""
        written = 0
        chunk = b"\0" * 2**20
        try:
            with open(self.ballast, "ab") as handle:
                while True:
                    written += handle.write(chunk)
                    handle.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        return written

    def _release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ballast.unlink()

    def heal_due(self, everything: bool = False) -> None:
        """Heal the held faults whose time came (all of them with `everything`)."""
        now = time.monotonic()
        for entry in [h for h in self.heals if everything or h[0] <= now]:
            self.heals.remove(entry)
            entry[2]()

    # ------------------------------------------------------------------ the soak

    def run(self) -> Report:
        """Drop Tasks and inject faults for `minutes`, then settle, stop the daemon and check."""
        options, report = self.options, self.report
        self._began = began = time.monotonic()
        end = began + options.minutes * 60
        next_task, next_fault = began, began + self.rng.uniform(0.5, 1.5) * options.fault_every / 2
        first = list(options.first_faults)
        peak = 0
        while time.monotonic() < end:
            now = time.monotonic()
            self.heal_due()
            self._watch_daemon()
            for task in list(self.waiting):
                if self.drop(task):
                    self.waiting.remove(task)
            if now >= next_task:
                self._number += 1
                for task in next_tasks(self.rng, self._number, self.marker):
                    self.drop(task)
                next_task = now + self.rng.expovariate(1 / options.task_every)
            if now >= next_fault and (first or options.faults):
                kind = first.pop(0) if first else self.rng.choice(options.faults)
                if not self.inject(kind):
                    report.skipped[kind] = report.skipped.get(kind, 0) + 1
                    if kind in options.first_faults and kind not in report.faults:
                        first.insert(0, kind)
                next_fault = now + self.rng.uniform(0.5, 1.5) * options.fault_every
            if self.proc is not None and (figures := sample(self.proc.pid)):
                peak = max(peak, figures.rss_kib)
            time.sleep(0.2)  # the loop's tick, not synchronisation
        self.settle()
        report.peak_rss_kib = peak
        report.seconds = time.monotonic() - began
        return report

    def _watch_daemon(self) -> None:
        """A daemon that exited by itself is a violation (counted by its last error line, in `exits`); it is
        started again, at most every 2 s, so the soak goes on."""
        if self.proc is None or self.proc.poll() is None or time.monotonic() < self._restart_at:
            return
        errors = [line for line in self.log_tail(3000).splitlines() if "Error" in line or "error" in line]
        reason = f"exit {self.proc.returncode}: {errors[-1].strip() if errors else 'no error in its log'}"
        self.exits[reason] = self.exits.get(reason, 0) + 1
        self.report.fault_log.append(f"{time.monotonic() - self._began:7.1f} s the daemon exited by itself "
                                     f"({reason}); started again")
        self._restart_at = time.monotonic() + 2.0
        self.start_daemon()

    def settle(self) -> None:
        """Heal everything, wait for every Task to be final, sample, SIGTERM the daemon, check."""
        report = self.report
        self.heal_due(everything=True)
        waited = _poll(lambda: (self._watch_daemon(), self._drop_waiting(), self.all_final())[2],
                       self.options.settle, 0.5)
        if not waited:
            late = sorted(f"{t}: {self.status(t)}" for t in self.tasks if self.status(t) not in FINAL)
            report.violations.append(f"{len(late)} Tasks not final {self.options.settle:.0f} s after the faults "
                                     f"stopped: {late[:10]}")
        report.end = self._idle_sample()
        self.stop_daemon()
        for _, _, host in self.hosts:
            host.stop()
        if not _poll(lambda: not marked_processes(self.marker), 30, 0.5):
            pass  # the checker names them
        self.check()

    def _drop_waiting(self) -> None:
        for task in list(self.waiting):
            if self.drop(task):
                self.waiting.remove(task)

    def stop_daemon(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.report.violations.append("the daemon did not stop within 90 s of SIGTERM")
            return
        if code != 0:
            self.report.violations.append(f"the daemon exited with {code} after SIGTERM:\n{self.log_tail(1500)}")

    def check(self) -> None:
        """checker.violations over every Task, with the soak's two documented departures taken out."""
        report = self.report
        report.tasks = len(self.tasks)
        expected = Expected(tasks={t: task.spec for t, task in self.tasks.items()}, marker=self.marker,
                            worker_home=self.local_home())
        found = violations(self.root, expected)
        runs: dict[str, list[dict[str, Any]]] = {}
        for task_id in self.tasks:
            for path in sorted((self.root / "runs" / task_id).glob("run-*/status.json"),
                               key=lambda p: int(p.parent.name[4:]) if p.parent.name[4:].isdigit() else 0):
                with contextlib.suppress(OSError, ValueError):
                    runs.setdefault(task_id, []).append(json.loads(path.read_bytes()))
        for task_id, records in runs.items():
            for run in records:
                key = f"{run.get('status')}{'-lost' if run.get('lost') else ''}"
                report.runs[key] = report.runs.get(key, 0) + 1
            found = self._departures(task_id, records, found)
        for name, _, host in self.hosts:
            left = sorted(p.name for p in (host.home / "runs").iterdir()) if (host.home / "runs").is_dir() else []
            if left:
                found.append(f"Worker {name} still holds Runs in its home: {left}")
        report.violations += [f"the daemon exited by itself {n} times ({reason}); log: {self.log}"
                              for reason, n in self.exits.items()] + found

    def _departures(self, task_id: str, records: list[dict[str, Any]], found: list[str]) -> list[str]:
        """Take out what the checker cannot know: a retried Task's earlier FAILED Runs (checked here
        instead), and a Task failed after more than LOST_LIMIT lost Runs (listed in `gave_up`)."""
        task = self.tasks[task_id]
        if task.retries:
            kept = [r for r in records if not r.get("lost")]
            found = [line for line in found if not line.startswith(f"{task_id} run-")
                     or ": an earlier Run that was not lost (FAILED" not in line]
            if len(kept) != task.retries + 1 or any(r.get("exit_code") != task.spec.exit_code for r in kept):
                found.append(f"{task_id}: {len(kept)} Runs that were not lost, exit codes "
                             f"{[r.get('exit_code') for r in kept]}; expected {task.retries + 1} with "
                             f"{task.spec.exit_code}")
        last = records[-1] if records else {}
        log = self.root / "runs" / task_id / f"run-{last.get('run')}" / "output.log"
        if (last.get("status") == "FAILED" and not last.get("lost") and task.spec.status != "FAILED"
                and last.get("worker") == "local"
                and (_says_no_room(log) or "the disk holding the Worker home is full" in (last.get("error") or ""))):
            # The Agent's own write into its workspace (on the pressured tmpfs) failed: its failure, recorded
            # as it happened; taskrun does not retry an Agent's failure. Listed apart, like a Task given up.
            self.report.gave_up.append(f"{task_id}: the Agent's own write failed for want of room on the Worker "
                                       "home's disk (its output or its record says so)")
            found = [line for line in found if not line.startswith((f"{task_id}: ", f"{task_id} run-"))]
        lost = [r for r in records if r.get("lost")]
        if records and records[-1].get("lost") and len(lost) > LOST_LIMIT and task.spec.status != "FAILED":
            self.report.gave_up.append(f"{task_id}: {len(lost)} Runs lost ({records[-1].get('error')})")
            ends = (f"{task_id}: Task is FAILED", f"{task_id} run-{records[-1].get('run')}: Run is")
            found = [line for line in found if not line.startswith(ends)]
        return found

    def close(self, keep: bool = False) -> None:
        """Stop what still runs (by pid), remove the namespaces, unmount the tmpfs (with `keep`, its
        repository and state copied to `base/kept` first). Safe to call twice."""
        with contextlib.suppress(Exception):
            self.heal_due(everything=True)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for _, ns, host in self.hosts:
            with contextlib.suppress(Exception):
                host.stop()
            with contextlib.suppress(Exception):
                ns.close()
        self.hosts = []
        for pid in marked_processes(self.marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.mounted and keep:
            self._release()
            subprocess.run(["cp", "-a", str(self.disk), str(self.base / "kept")], check=False, capture_output=True)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.disk)], check=False, capture_output=True)
            self.mounted = False


def _says_no_room(log: Path) -> bool:
    """Whether a Run's output.log ends saying a write found no room (the Agent's own ENOSPC)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 4096))
            return b"No space left on device" in handle.read()
    except OSError:
        return False
