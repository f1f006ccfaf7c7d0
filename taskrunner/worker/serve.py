"""`taskrun-worker serve`: one session with the control plane over stdin/stdout.

One thread reads records, screens them (inbound.py: session authentication,
assignments verified before their archive is read) and queues what passes;
the loop thread owns every Run: it starts Agents (detached, each in its own
process group), streams their output, notices when they end, enforces
timeouts and cancels. The session opens with a `hello` that lists no Run and
carries a challenge; once the control plane has answered it with a valid
`auth`, the Worker sends `ready` with the Runs it holds. A session that does
not authenticate within AUTH_TIMEOUT_SECONDS is closed. Agents outlive the
session: when the control plane goes away the loop ends and they keep running;
the next authenticated session learns of them from `ready` and resumes them
where asked.

**Before it is authenticated a session touches nothing.** It reads what its
hello says (its key, its trust store, the sandbox probe) and nothing else: no
Run is adopted, checked, stopped, killed or judged, no result is written, no
trash emptied, no ledger pruned. Only once `auth` verifies does it take up
the Worker home (`_take_up`) and adopt the Runs held there.

**Several sessions on one Worker home.** A reconnect can find the old session
still lingering (its connection half dead), and anyone holding the daemon's
SSH key can open more. Every authenticated session adopts every held Run, and
what they decide they decide through the Run's directory, first writer wins
(rundir.py): a Run being started is locked by its starter (`starting`) and is
never judged ended by another session until the starter has recorded its pid
or its result, or has died; `stop.json` and `result.json` are created once,
and a session that finds one already there takes it as its own, so every
session sends the same signed result; acknowledging renames the directory
away once, and a session whose Run directory is gone forgets the Run. Killing
a Run's group twice, or streaming it on two sessions, does no harm: the
control plane listens to its newest session only.

Output the Agent tampers with fails the Run (activerun.py). Tool presets' event streams are read
into output.log each tick, and stop the Run on a usage limit or a budget passed (streaming.py).
How a Run ends (stopped, its end noticed and judged, its result signed and written) is finisher.py.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from taskrunner import __version__, agents, bundle, crashpoints
from taskrunner.defaults import AUTH_TIMEOUT_SECONDS, HEARTBEAT_SECONDS, OUTPUT_CHUNK_BYTES, WORKER_POLL_SECONDS
from taskrunner.errors import ProtocolError, WorkerError
from taskrunner.protocol import PROTOCOL_VERSION, Message, Reader, Writer
from taskrunner.sessionauth import new_challenge
from taskrunner import diskspace
from taskrunner.worker import agentprobe, audit, rundir, secrets, streaming
from taskrunner.gitflow import change
from taskrunner.gitflow.cache import cached_commits, missing_objects
from taskrunner.worker.activerun import (ActiveRun, prefix_digest, read_masked, run_clock,
                                         run_deadline, truncation)
from taskrunner.worker.inbound import Assignment, Authenticated, Inbound
from taskrunner.worker.ledger import ReplayLedger
from taskrunner.worker.confine import Confinement
from taskrunner.worker.finisher import Finisher
# Defined here before finisher.py took them over: importable from here still.
from taskrunner.worker.finisher import ADOPTED_PROBE_SECONDS, FULL_HOME_WAIT_SECONDS, KILL_GRACE_SECONDS  # noqa: F401
from taskrunner.worker.rundir import RunDir, held_runs, signal_group
from taskrunner.worker.starter import StartFailed, start_agent
from taskrunner.worker.trust import TrustStore, worker_key

_EOF = object()
_EXITED = object()  # an Agent this session started has ended: look now, not at the next poll
#: The keys of a manifest a Run keeps in its assignment.json.
KEPT_KEYS = ("task_id", "revision", "attempt", "agent", "timeout", "task_file", "nonce", "seq", "repo", "git", "files",
             "worker", "budget", "run_number", "title")


@dataclass
class _Probed:
    """The Agents this Worker can run (agentprobe.available), found after authentication: send `ready`."""

    agents: dict[str, dict[str, Any]]


class WorkerServer(Finisher):
    def __init__(self, home: Path, name: str, reader: Reader, writer: Writer, slots: int | None = None,
                 limits: bundle.Limits = bundle.Limits(), confinement: Confinement | None = None,
                 agent_probe: Callable[[], dict[str, dict[str, Any]]] | None = None) -> None:
        self.home = home
        self._confinement = confinement or Confinement(home)
        self.name = name
        self.slots = slots
        self.limits = limits
        self._key = worker_key(home)
        self._trust = TrustStore(home)
        self._ledger = ReplayLedger(home)
        self._reader = reader
        self._writer = writer
        self._inbox: queue.Queue[object] = queue.Queue()
        self._runs: dict[str, ActiveRun] = {}
        self._trash = home / "trash"  # acknowledged Run directories, until the janitor deletes them
        self._removals: queue.Queue[Path] = queue.Queue()
        self._challenge = new_challenge()
        self._authenticated = False  # the loop's view: set when it takes Authenticated from the inbox
        self._probe = agent_probe or (lambda: agentprobe.available(home, agents.PRESETS))

    def serve(self) -> None:
        trust = self._trust.state()
        # Before the session is authenticated: nothing about the Runs held here, and nothing done to them.
        self._send("hello", protocol=PROTOCOL_VERSION, version=__version__, worker=self.name,
                   pid=os.getpid(), agents=agentprobe.available_presets(), slots=self.slots,
                   worker_key=self._key.public_line,
                   trust={"keys": [k["key_id"] for k in trust["keys"]], "issued_at": trust.get("issued_at")},
                   challenge=self._challenge, sandbox=self._confinement.status().hello())
        crashpoints.reached("worker.hello_sent")
        threading.Thread(target=self._read_loop, name="worker-reader", daemon=True).start()
        auth_deadline = time.monotonic() + AUTH_TIMEOUT_SECONDS
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        while True:
            busy = any(r.attached or r.result is None for r in self._runs.values())
            wait = WORKER_POLL_SECONDS if busy else max(0.0, next_beat - time.monotonic())
            try:
                item = self._inbox.get(timeout=wait)
                while True:
                    if item is _EOF:
                        return self._close()
                    if item is not _EXITED:
                        self._handle(item)  # type: ignore[arg-type]
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if busy and not diskspace.has_room(self.home):
                for run in self._runs.values():
                    run.saw_full = run.saw_full or run.result is None  # see _check_exit
            for run in list(self._runs.values()):
                self._guarded(run, self._tick)
            if not self._authenticated:
                if time.monotonic() >= auth_deadline:
                    self._try_send("error", request="auth", message="session closed: not authenticated within "
                                                                     f"{AUTH_TIMEOUT_SECONDS:.0f}s")
                    audit.record(self.home, audit.SESSION_UNAUTHENTICATED, f"no auth in {AUTH_TIMEOUT_SECONDS:.0f}s")
                    return self._close()
                continue  # no heartbeat either: it would tell how many Runs are held
            if time.monotonic() >= next_beat:
                running = sum(1 for r in self._runs.values() if r.result is None)
                # home_full: why this Worker takes no new Run now (its home has no room), or None.
                self._send("heartbeat", time=time.time(), running=running, home_full=rundir.home_refusal(self.home))
                next_beat = time.monotonic() + HEARTBEAT_SECONDS

    # -- records from the control plane ------------------------------------

    def _read_loop(self) -> None:
        inbound = Inbound(self._reader, self._try_send, self.home, self._trust, self._key.key_id, self._challenge,
                          self.limits)
        try:
            inbound.run(self._inbox.put)
        except (ProtocolError, OSError, ValueError) as exc:
            self._try_send("error", message=f"session closed: {exc}")
        except Exception as exc:  # a thread's boundary: the loop must still hear that the session ended
            self._try_send("error", message=f"session closed: {exc!r}")
        self._inbox.put(_EOF)

    def _remove_loop(self) -> None:
        # Deleting a Run directory costs more than a Run on slow disks: not on the loop.
        while True:
            shutil.rmtree(self._removals.get(), ignore_errors=True)

    def _probe_loop(self) -> None:
        # `<cli> --version` takes seconds: off the loop, which keeps its Runs and heartbeats going meanwhile.
        try:
            found = self._probe()
        except Exception:  # a thread's boundary: `ready` must still go out
            found = {preset: {"version": None, "path": ""} for preset in agentprobe.ALWAYS}
        self._inbox.put(_Probed(found))

    def _wait_loop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        self._inbox.put(_EXITED)

    def _take_up(self) -> None:
        """The session is authenticated: tidy the Worker home and adopt every Run held there."""
        (self.home / "runs").mkdir(parents=True, exist_ok=True)
        self._trash.mkdir(exist_ok=True)
        threading.Thread(target=self._remove_loop, name="worker-janitor", daemon=True).start()
        for left in self._trash.iterdir():  # left by a session that ended mid-removal
            self._removals.put(left)
        self._ledger.prune(time.time())
        for run_dir in held_runs(self.home):
            try:
                self._runs[run_dir.run_id] = self._adopt(run_dir)
            except FileNotFoundError:
                pass  # acknowledged by another session meanwhile

    def _handle(self, message: Message | Authenticated | Assignment | _Probed) -> None:
        if isinstance(message, Authenticated):
            self._authenticated = True
            self._take_up()
            threading.Thread(target=self._probe_loop, name="worker-agent-probe", daemon=True).start()
            return
        if isinstance(message, _Probed):
            # repos: {repository id: base commits its cache received lately}, when it has any (gitflow/cache.py).
            # agents: {preset: {version, path}} this Worker can run (agentprobe.py).
            repos = cached_commits(self.home)
            self._send("ready", runs=[{"run_id": r.dir.run_id, "state": "finished" if r.result else "running",
                                       "size": r.dir.output_size()} for r in self._runs.values()],
                       agents=message.agents, **({"repos": repos} if repos else {}))
            return
        if isinstance(message, Assignment):
            self._assign(message)
            return
        run_id = message.get("run_id")
        run = self._runs.get(run_id)
        if run is None:
            if message.type != "ack":
                self._send("error", run_id=run_id, request=message.type, message=f"this Worker holds no Run {run_id}")
            return
        if message.type == "resume":
            run.attached, run.unwanted = True, False
            run.sent = int(message["offset"])
            if run.frozen is None:
                run.digest = prefix_digest(run, run.sent)
        elif message.type == "cancel":
            # Cancelled without being resumed: the control plane settled it and wants no result (its ready).
            run.unwanted = not run.attached
            self._guarded(run, lambda r: self._stop(r, "CANCELLED", message.get("reason") or "cancelled"))
        elif message.type == "ack" and run.result is not None:
            crashpoints.reached("worker.ack_received")
            self._acknowledge(run)
        else:
            self._send("error", run_id=run_id, message=f"a Worker does not accept {message.type} records")

    def _acknowledge(self, run: ActiveRun) -> None:
        """The Run is done with: one rename on the loop (the janitor thread deletes it), and forgotten."""
        run.close()
        gone = self._trash / run.dir.run_id
        try:
            os.rename(run.dir.path, gone)
            crashpoints.reached("worker.acknowledged")
            self._removals.put(gone)
        except FileNotFoundError:
            pass
        del self._runs[run.dir.run_id]

    def _assign(self, verified: Assignment) -> None:
        """Start a verified assignment (inbound.py checked its signature, manifest and archive)."""
        run_dir = RunDir.at(self.home, verified.run_id)
        if run_dir.path.exists() or verified.run_id in self._runs:
            # No `request`: the Run this id names is here and goes on.
            self._send("error", run_id=run_dir.run_id, message="Run was already assigned to this Worker")
            return
        now = time.time()
        manifest, archive = verified.manifest, verified.archive
        full = rundir.home_refusal(self.home)
        if full is not None:
            # Before the ledger or anything else sees it: the control plane runs it later, here or elsewhere.
            self._send("error", run_id=run_dir.run_id, request="assign", disk_full=True, message=full)
            return
        refusal = missing_objects(self.home, manifest)
        if refusal is not None:
            # Before the ledger sees it: the control plane sends the same Run again with a full pack.
            self._send("error", run_id=run_dir.run_id, request="assign", missing_objects=True, message=refusal)
            return
        try:
            self._ledger.admit(manifest["nonce"], manifest["run_id"], manifest["seq"], manifest["expires_at"])
            crashpoints.reached("worker.ledger_admitted")
        except WorkerError as exc:
            # A replay: refused before anything of it is on disk; the control plane fails the Run.
            audit.record(self.home, audit.BUNDLE_REFUSED, str(exc), run_id=run_dir.run_id)
            self._send("error", run_id=run_dir.run_id, request="assign", message=str(exc))
            return
        except OSError as exc:
            if not diskspace.is_full(exc):
                raise
            self._send("error", run_id=run_dir.run_id, request="assign", disk_full=True,
                       message=rundir.home_reason(self.home, exc))
            return
        try:
            run_dir.create(self.home)
            # Until the pid (or the result) is on disk, other sessions see this Run as being started.
            starting = run_dir.begin_start()
            try:
                started = self._start(run_dir, manifest, archive, now, verified.pack)
            finally:
                run_dir.end_start(starting)
        except OSError as exc:  # writing assignment.json, pid, the checkout, the archive...
            if not diskspace.is_full(exc):
                raise
            self._no_room(run_dir, rundir.home_reason(self.home, exc))
            return
        except rundir.HomeFull as exc:
            self._no_room(run_dir, str(exc))
            return
        if started is not None:
            self._send("started", run_id=run_dir.run_id, pid=started, started_at=now)
            crashpoints.reached("worker.started_sent")

    def _no_room(self, run_dir: RunDir, reason: str) -> None:
        """A Run whose start found the Worker home full: nothing of it stays, and the control plane hears why."""
        run = self._runs.pop(run_dir.run_id, None)
        if run is not None:
            if run.proc is not None and run.pid:
                signal_group(run.pid, signal.SIGKILL)
            run.close()
        run_dir.discard()
        self._send("error", run_id=run_dir.run_id, request="assign", disk_full=True, message=reason)

    def _start(self, run_dir: RunDir, manifest: dict[str, Any], archive: bytes, now: float,
               pack: bytes = b"") -> int | None:
        """Start the Agent of a Run whose directory is made and locked (starter.py): its pid, or None when
        the Run failed."""
        kept = {k: manifest.get(k) for k in KEPT_KEYS}
        # Its timeout counts on CLOCK_BOOTTIME from now, in this process and any that adopts it (activerun.py).
        assignment = {"run_id": run_dir.run_id, **kept, "assigned_at": now, **run_clock(now, manifest.get("timeout"))}
        run_dir.write_assignment(assignment)
        crashpoints.reached("worker.assignment_written")
        run = ActiveRun(run_dir, None, None, run_deadline(assignment), attached=True, assignment=assignment,
                        digest=hashlib.sha256())
        self._runs[run_dir.run_id] = run
        try:
            start_agent(self.home, self._confinement, self.limits, run, manifest, archive, pack)
        except StartFailed as exc:
            self._finish(run, "FAILED", None, str(exc))
            return None
        assert run.proc is not None
        run.pid = run.proc.pid
        run_dir.write_pid(run.pid)
        crashpoints.reached("worker.pid_written")
        threading.Thread(target=self._wait_loop, args=(run.proc,), name="agent-wait", daemon=True).start()
        return run.pid

    # -- the loop's work on each Run ---------------------------------------

    def _adopt(self, run_dir: RunDir) -> ActiveRun:
        """A Run held here, taken up by this session; FileNotFoundError when it is not (any more).

        A Run whose starting session died before its Agent's pid (or a result) was recorded never
        really started: whatever it may have started is killed and its directory removed, so `ready`
        does not list it and the control plane runs it again as a lost Run.
        """
        assignment = run_dir.assignment()
        if run_dir.pid() is None and run_dir.result() is None and not run_dir.being_started():
            for pgid in run_dir.stray_groups():
                signal_group(pgid, signal.SIGKILL)
            run_dir.discard()
            raise FileNotFoundError(run_dir.path)
        run = ActiveRun(run_dir, None, run_dir.pid(), run_deadline(assignment), result=run_dir.result(),
                        assignment=assignment)
        run.secrets = secrets.kept(run_dir.path)
        if run.result is None:
            if run.pid is not None:  # its stream is read again from the start (streaming.py, "Replay")
                run.pump = streaming.replay(run_dir.path, assignment, run.secrets)
            self._guarded(run, self._check_exit)  # a full home: judged again on a later tick
        return run

    def _tick(self, run: ActiveRun) -> None:
        if run.result is None:
            if run.timed_out() and run.kill_at is None:
                self._stop(run, "FAILED", f"timed out after {run.assignment.get('timeout')}s")
            if run.kill_at is not None and time.monotonic() >= run.kill_at and run.pid:
                signal_group(run.pid, signal.SIGKILL)
                run.kill_at = float("inf")
            if run.pump is not None:
                self._pump(run)
            self._check_exit(run)
        if run.unwanted and run.result is not None:
            self._acknowledge(run)
        elif run.attached:
            self._stream(run)
            if run.result is not None and run.sent >= run.result["output_size"]:
                # The pack of the Agent's change (its digest is in the signed result) is the payload.
                pack = change.read_pack(run.dir.path) if run.result.get("change") else b""
                # Then the events shipped (their size and digest are in the signed result too).
                pack += streaming.shipped_bytes(run.dir.path, run.result.get("events"), run.secrets)
                self._send("result", pack, run_id=run.dir.run_id, output_size=run.result["output_size"],
                           envelope=run.result["envelope"])
                crashpoints.reached("worker.result_sent")
                run.attached = False  # sent once per attachment; the control plane acks

    def _pump(self, run: ActiveRun) -> None:
        """Read what the Agent streamed since the last tick; stop the Run when its reader says to."""
        assert run.pump is not None
        if run.pid is None:
            return  # still being started by another session
        reason = run.pump.step()
        if reason is not None:
            self._stop(run, "FAILED", reason)

    def _truncated(self, run: ActiveRun, size: int) -> None:
        """output.log holds less than was sent, or than the result covers: the Agent truncated it."""
        if run.truncated:
            return
        if not run.dir.path.is_dir():
            self._forget(run)  # not truncated: acknowledged and removed on another session
            return
        run.truncated = True
        reason = truncation(run.sent, size)
        if run.digest is not None:
            run.frozen = run.sent  # the result covers exactly what the control plane has
        if run.result is None:
            self._stop(run, "FAILED", reason)
        else:
            self._finish(run, "FAILED", run.result.get("exit_code"), reason, replace=True)

    def _stream(self, run: ActiveRun) -> None:
        if run.result is None and run.pid is None:
            return  # still being started by another session: no output yet, nor the secrets to mask it
        size = run.dir.output_size()
        # What there is to send: all the output of a running Run; of a finished one, what its result covers.
        owed = size if run.result is None else run.result["output_size"]
        if run.frozen is not None:
            owed = min(owed, run.frozen)
        if run.sent >= owed:
            if run.result is None and size < run.sent:
                self._truncated(run, size)  # below what was sent already
            return
        if size < owed and run.result is not None:
            self._truncated(run, size)  # the result covers bytes the file no longer holds
            return
        if run.log is None:
            run.log = open(run.dir.output, "rb")
        size = owed if run.result is not None else size  # masked as the result's digest was
        end = min(owed, secrets.safe_end(run.log, size, run.result is not None, run.secrets))
        if run.sent >= end:
            return
        while run.sent < end:
            stop = min(end, run.sent + OUTPUT_CHUNK_BYTES)
            chunk = read_masked(run, run.log, run.sent, stop, size)
            if not chunk:
                break
            crashpoints.reached("worker.output_read")
            self._send("output", payload=chunk, run_id=run.dir.run_id, offset=run.sent)
            crashpoints.reached("worker.output_sent")
            run.sent += len(chunk)
            if run.digest is not None:
                run.digest.update(chunk)

    def _guarded(self, run: ActiveRun, action: Callable[[ActiveRun], None]) -> None:
        """Do `action` on a Run; if its directory is gone (acknowledged on another session), forget the Run."""
        try:
            action(run)
        except FileNotFoundError:
            if run.dir.path.is_dir():
                raise
            self._forget(run)
        except OSError as exc:
            # A full home: the Run and its session go on; what failed is done again on a later tick.
            if not diskspace.is_full(exc):
                raise

    def _forget(self, run: ActiveRun) -> None:
        run.close()
        if self._runs.get(run.dir.run_id) is run:
            del self._runs[run.dir.run_id]

    def _close(self) -> None:
        for run in self._runs.values():
            run.close()

    def _send(self, kind: str, payload: bytes = b"", **fields: Any) -> None:
        self._writer.write(Message(kind, fields, payload))

    def _try_send(self, kind: str, **fields: Any) -> None:
        try:
            self._send(kind, **fields)
        except OSError:
            pass
