"""`taskrun-worker serve`: one session with the control plane over stdin/stdout.

One thread reads records into a queue; the loop thread owns every Run: it
starts Agents (detached, each in its own process group), streams their output,
notices when they end, enforces timeouts and cancels. Agents outlive the
session: when the control plane goes away the loop ends and they keep running;
the next session reports them in `hello` and resumes them where asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from taskrunner import __version__, agents, bundle
from taskrunner.defaults import HEARTBEAT_SECONDS, OUTPUT_CHUNK_BYTES, WORKER_POLL_SECONDS
from taskrunner.errors import ProtocolError, WorkerError
from taskrunner.protocol import PROTOCOL_VERSION, Message, Reader, Writer
from taskrunner.signing import RESULT_TYPE, sign
from taskrunner.worker import secrets
from taskrunner.worker.ledger import ReplayLedger
from taskrunner.worker.rundir import RunDir, group_alive, held_runs, wrapped
from taskrunner.worker.trust import TrustStore, worker_key

#: Seconds between SIGTERM and SIGKILL when a Run is stopped.
KILL_GRACE_SECONDS = 3.0
#: How often a Run started by an earlier session is checked for having ended.
ADOPTED_PROBE_SECONDS = 0.2
#: The output digest of a finished Run is computed this many bytes at a time.
DIGEST_CHUNK_BYTES = 1024 * 1024
_EOF = object()
_EXITED = object()  # an Agent this session started has ended: look now, not at the next poll


@dataclass
class ActiveRun:
    dir: RunDir
    proc: subprocess.Popen[bytes] | None  # None for Runs started by an earlier session
    pid: int | None
    deadline: float | None
    attached: bool = False
    sent: int = 0
    kill_at: float | None = None
    result: dict[str, Any] | None = None
    log: IO[bytes] | None = None
    next_probe: float = 0.0  # adopted Runs: when to look at their process group again
    assignment: dict[str, Any] = field(default_factory=dict)  # as in assignment.json
    secrets: list[bytes] = field(default_factory=list)  # values masked in the output sent


class WorkerServer:
    def __init__(self, home: Path, name: str, reader: Reader, writer: Writer, slots: int | None = None,
                 limits: bundle.Limits = bundle.Limits()) -> None:
        self.home = home
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

    def serve(self) -> None:
        (self.home / "runs").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._trash, ignore_errors=True)  # left by a session that ended mid-removal
        self._trash.mkdir()
        threading.Thread(target=self._remove_loop, name="worker-janitor", daemon=True).start()
        self._ledger.prune(time.time())
        for run_dir in held_runs(self.home):
            self._runs[run_dir.run_id] = self._adopt(run_dir)
        trust = self._trust.state()
        self._send("hello", protocol=PROTOCOL_VERSION, version=__version__, worker=self.name,
                   pid=os.getpid(), agents=available_presets(), slots=self.slots,
                   worker_key=self._key.public_line,
                   trust={"keys": [k["key_id"] for k in trust["keys"]], "issued_at": trust.get("issued_at")},
                   runs=[{"run_id": r.dir.run_id, "state": "finished" if r.result else "running",
                          "size": r.dir.output_size()} for r in self._runs.values()])
        threading.Thread(target=self._read_loop, name="worker-reader", daemon=True).start()
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
            for run in list(self._runs.values()):
                self._tick(run)
            if time.monotonic() >= next_beat:
                running = sum(1 for r in self._runs.values() if r.result is None)
                self._send("heartbeat", time=time.time(), running=running)
                next_beat = time.monotonic() + HEARTBEAT_SECONDS

    # -- records from the control plane ------------------------------------

    def _read_loop(self) -> None:
        try:
            while (message := self._reader.read()) is not None:
                self._inbox.put(message)
        except (ProtocolError, OSError, ValueError) as exc:
            self._try_send("error", message=f"session closed: {exc}")
        self._inbox.put(_EOF)

    def _remove_loop(self) -> None:
        # Deleting a Run directory costs more than a Run on slow disks: not on the loop.
        while True:
            shutil.rmtree(self._removals.get(), ignore_errors=True)

    def _wait_loop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        self._inbox.put(_EXITED)

    def _handle(self, message: Message) -> None:
        run_id = message.get("run_id")
        if message.type == "assign":
            self._assign(message)
            return
        if message.type == "trust":
            try:
                keys = self._trust.apply(message.get("request"), self._key.key_id, time.time())
            except WorkerError as exc:
                self._send("error", message=str(exc))
            else:
                self._send("trusted", keys=[k["key_id"] for k in keys])
            return
        run = self._runs.get(run_id)
        if run is None:
            if message.type != "ack":
                self._send("error", run_id=run_id, message=f"this Worker holds no Run {run_id}")
            return
        if message.type == "resume":
            run.attached = True
            run.sent = int(message["offset"])
        elif message.type == "cancel":
            self._stop(run, "CANCELLED", message.get("reason") or "cancelled")
        elif message.type == "ack":
            if run.result is not None:
                if run.log:
                    run.log.close()
                # One rename on the loop; the janitor thread deletes it.
                gone = self._trash / run.dir.run_id
                try:
                    os.rename(run.dir.path, gone)
                    self._removals.put(gone)
                except FileNotFoundError:
                    pass
                del self._runs[run_id]
        else:
            self._send("error", run_id=run_id, message=f"a Worker does not accept {message.type} records")

    def _assign(self, message: Message) -> None:
        try:
            run_dir = RunDir.at(self.home, message["run_id"])
        except WorkerError as exc:
            self._send("error", run_id=message.get("run_id"), message=str(exc))
            return
        if run_dir.path.exists() or message["run_id"] in self._runs:
            self._send("error", run_id=run_dir.run_id, message="Run was already assigned to this Worker")
            return
        now = time.time()
        try:
            manifest = self._admit(message, now)
            failure = None
        except WorkerError as exc:
            manifest, failure = {"run_id": run_dir.run_id}, str(exc)
        run_dir.path.mkdir(parents=True)
        timeout = manifest.get("timeout")
        deadline = now + float(timeout) if timeout else None
        names = list(manifest.get("agent", {}).get("env") or [])
        kept = {k: manifest.get(k) for k in ("task_id", "revision", "attempt", "agent", "timeout", "task_file",
                                               "nonce", "seq")}
        assignment = {"run_id": run_dir.run_id, **kept, "assigned_at": now, "deadline": deadline}
        run_dir.write_assignment(assignment)
        run = ActiveRun(run_dir, None, None, deadline, attached=True, assignment=assignment)
        self._runs[run_dir.run_id] = run
        if failure is not None:
            self._finish(run, "FAILED", None, failure)
            return
        with open(run_dir.output, "ab") as out:
            try:
                bundle.extract(manifest, message.payload, run_dir.workspace, self.limits)
                values = secrets.resolve(names, self.home)
                run.secrets = secrets.redacted_values(values)
                if run.secrets:
                    # A later session masks from this file, whatever its own environment holds.
                    secrets.keep(run_dir.path, run.secrets)
                argv = agents.prepare(manifest["agent"], run_dir.path, run_dir.workspace,
                                      manifest["task_id"], manifest["task_file"])
            except (WorkerError, OSError, ValueError, TypeError, KeyError) as exc:
                # Whatever is wrong with one assignment fails that Run, not the session.
                self._finish(run, "FAILED", None, str(exc) or type(exc).__name__)
                return
            env = agent_environment(run_dir.run_id, manifest["task_id"], run_dir.workspace) | values
            try:
                run.proc = subprocess.Popen(
                    wrapped(run_dir.path, argv),
                    cwd=run_dir.workspace, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,
                )
            except OSError as exc:
                self._finish(run, "FAILED", None, f"cannot start the Agent: {exc}")
                return
        threading.Thread(target=self._wait_loop, args=(run.proc,), name="agent-wait", daemon=True).start()
        run.pid = run.proc.pid
        run_dir.write_pid(run.pid)
        self._send("started", run_id=run_dir.run_id, pid=run.pid, started_at=now)

    def _admit(self, message: Message, now: float) -> dict[str, Any]:
        """The verified manifest of an assignment, recorded in the replay ledger; else BundleRejected."""
        trusted, refused = self._trust.trusted(now)
        if not trusted and not refused:
            raise bundle.BundleRejected("bundle rejected: this Worker trusts no control plane key yet; enroll "
                                        "it with `taskrun worker add`")
        manifest = bundle.verified_manifest(message.get("envelope"), message.payload, trusted=trusted,
                                            refused=refused, audience=self._key.key_id, now=now)
        if manifest["run_id"] != message["run_id"]:
            raise bundle.BundleRejected(f"bundle rejected: signed for Run {manifest['run_id']}, "
                                        f"assigned as Run {message['run_id']}")
        self._ledger.admit(manifest["nonce"], manifest["run_id"], manifest["seq"], manifest["expires_at"])
        return manifest

    # -- the loop's work on each Run ---------------------------------------

    def _adopt(self, run_dir: RunDir) -> ActiveRun:
        assignment = run_dir.assignment()
        run = ActiveRun(run_dir, None, run_dir.pid(), assignment.get("deadline"), result=run_dir.result(),
                        assignment=assignment)
        run.secrets = secrets.kept(run_dir.path)
        if run.result is None:
            self._check_exit(run)
        return run

    def _tick(self, run: ActiveRun) -> None:
        if run.result is None:
            now = time.time()
            if run.deadline is not None and now >= run.deadline and run.kill_at is None:
                self._stop(run, "FAILED", f"timed out after {_seconds(run)}")
            if run.kill_at is not None and time.monotonic() >= run.kill_at and run.pid:
                _signal_group(run.pid, signal.SIGKILL)
                run.kill_at = float("inf")
            self._check_exit(run)
        if run.attached:
            self._stream(run)
            if run.result is not None and run.sent >= run.result["output_size"]:
                self._send("result", run_id=run.dir.run_id, output_size=run.result["output_size"],
                           envelope=run.result["envelope"])
                run.attached = False  # sent once per attachment; the control plane acks

    def _check_exit(self, run: ActiveRun) -> None:
        # The wrapper's exit_code is complete once it has exited: read it only then.
        if run.proc is not None:
            returncode = run.proc.poll()
            if returncode is None:
                return
            code = run.dir.exit_code()
            if code is None and returncode >= 0:
                code = returncode
        else:
            if run.pid is not None:
                # Not our child: no waitpid. Probing the group scans /proc, so not every tick.
                now = time.monotonic()
                if now < run.next_probe:
                    return
                run.next_probe = now + ADOPTED_PROBE_SECONDS
                if group_alive(run.pid):
                    return
            code = run.dir.exit_code()
        stop = run.dir.stop()
        if stop is not None:
            status, error = stop["status"], stop["reason"]
        elif code == 0:
            status, error = "COMPLETED", None
        elif code is None:
            status, error = "FAILED", "the Agent ended without an exit status (killed by a signal?)"
        else:
            status, error = "FAILED", f"the Agent exited with code {code}"
        # A Run's processes do not outlive it: stragglers in its group are ended.
        if run.pid:
            _signal_group(run.pid, signal.SIGKILL)
        self._finish(run, status, code, error)

    def _finish(self, run: ActiveRun, status: str, code: int | None, error: str | None) -> None:
        assignment = run.assignment
        size, digest = self._output_digest(run)
        result = {
            "run_id": run.dir.run_id, "status": status, "exit_code": code, "error": error,
            "started_at": assignment.get("assigned_at"), "finished_at": time.time(),
            "output_size": size, "output_sha256": digest, "nonce": assignment.get("nonce"),
        }
        body = json.dumps(result, sort_keys=True, separators=(",", ":")).encode()
        run.result = {**result, "envelope": sign(RESULT_TYPE, body, [self._key])}
        run.dir.write_result(run.result)

    def _output_digest(self, run: ActiveRun) -> tuple[int, str]:
        """Size and sha256 of the output as the control plane records it (secrets masked)."""
        digest = hashlib.sha256()
        size = run.dir.output_size()
        try:
            with open(run.dir.output, "rb") as log:
                for start in range(0, size, DIGEST_CHUNK_BYTES):
                    end = min(size, start + DIGEST_CHUNK_BYTES)
                    digest.update(secrets.masked_range(log, start, end, size, run.secrets) if run.secrets
                                  else log.read(end - start))
        except FileNotFoundError:
            size = 0
        return size, digest.hexdigest()

    def _stop(self, run: ActiveRun, status: str, reason: str) -> None:
        if run.result is not None or run.dir.stop() is not None:
            return
        run.dir.write_stop(status, reason)
        if run.pid:
            _signal_group(run.pid, signal.SIGTERM)
            run.kill_at = time.monotonic() + KILL_GRACE_SECONDS
        else:
            self._check_exit(run)

    def _stream(self, run: ActiveRun) -> None:
        size = run.dir.output_size()
        if run.sent >= size:
            return
        if run.log is None:
            run.log = open(run.dir.output, "rb")
        end = secrets.safe_end(run.log, size, run.result is not None, run.secrets)
        if run.sent >= end:
            return
        if not run.secrets:
            run.log.seek(run.sent)
        while run.sent < end:
            stop = min(end, run.sent + OUTPUT_CHUNK_BYTES)
            if run.secrets:
                chunk = secrets.masked_range(run.log, run.sent, stop, size, run.secrets)
            else:
                chunk = run.log.read(stop - run.sent)
            if not chunk:
                break
            self._send("output", payload=chunk, run_id=run.dir.run_id, offset=run.sent)
            run.sent += len(chunk)

    def _close(self) -> None:
        for run in self._runs.values():
            if run.log:
                run.log.close()

    def _send(self, kind: str, payload: bytes = b"", **fields: Any) -> None:
        self._writer.write(Message(kind, fields, payload))

    def _try_send(self, kind: str, **fields: Any) -> None:
        try:
            self._send(kind, **fields)
        except OSError:
            pass


#: Set by sshd for the session that runs serve; not the Agent's. Debian's bash
#: sources ~/.bashrc for any `bash -c` that sees SSH_CLIENT with a low SHLVL,
#: which would run the login's .bashrc (and any output of it) in every Run.
_SESSION_VARIABLES = ("SSH_CLIENT", "SSH2_CLIENT", "SSH_CONNECTION", "SSH_ORIGINAL_COMMAND", "SSH_TTY")


def agent_environment(run_id: str, task_id: str, workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_VARIABLES}
    env.update(TASKRUN_RUN_ID=run_id, TASKRUN_TASK_ID=task_id, TASKRUN_WORKSPACE=str(workspace))
    return env


def available_presets() -> list[str]:
    found = [preset for preset in agents.PRESETS if preset in ("shell", "command") or shutil.which(preset)]
    return found


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _seconds(run: ActiveRun) -> str:
    assignment = run.dir.assignment()
    return f"{assignment.get('timeout')}s"
