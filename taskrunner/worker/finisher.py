"""How a Run ends on the Worker: stopped, its end noticed and judged, its result signed and written.

`_stop` asks a Run to end (a cancel, its timeout, its stream reader, its output
truncated): it writes stop.json, first writer wins (rundir.py), and sends the
Run's process group SIGTERM; the loop's tick sends SIGKILL KILL_GRACE_SECONDS
later. `_check_exit` notices that the Agent ended (this session's child
polled; a Run adopted from an earlier session, its group probed) and judges
its status from stop.json, the stream reader's outcome (streaming.py) or the
exit code; `_finish` signs the result (runresult.py) and writes it, unless
another session did first, waiting a while for room when the Worker home is
full.

`Finisher` is a part of `WorkerServer` (serve.py), on the session's loop
thread: it works on the Worker's state listed below.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any, Callable

from taskrunner import crashpoints, diskspace
from taskrunner.signing import RESULT_TYPE, SigningKey, sign
from taskrunner.worker import secrets, streaming
from taskrunner.worker.activerun import ActiveRun
from taskrunner.worker.rundir import group_alive, signal_group
from taskrunner.worker.runresult import result_body

#: Seconds between SIGTERM and SIGKILL when a Run is stopped.
KILL_GRACE_SECONDS = 3.0
#: A Run that ended while the Worker home had no room for its change or result.json waits this long for
#: room (a spell of disk pressure passes); then it ends FAILED saying so, its result sent from memory.
FULL_HOME_WAIT_SECONDS = 30.0
#: How often a Run started by an earlier session is checked for having ended.
ADOPTED_PROBE_SECONDS = 0.2


class Finisher:
    """The end of each Run, mixed into `WorkerServer`, which provides everything annotated here."""

    home: Path
    name: str
    _key: SigningKey
    _trash: Path
    _removals: queue.Queue[Path]
    _forget: Callable[[ActiveRun], None]
    _pump: Callable[[ActiveRun], None]

    def _start_recorded(self, run: ActiveRun) -> bool:
        """For a Run adopted without a pid: True once its Agent's pid is known (run.pid set).

        While the session starting it holds its lock, the Run is being started,
        not ended. Once the lock is free, the pid or the result is on disk, or
        the starter died first: then whatever it may have started is killed and
        the Run fails.
        """
        now = time.monotonic()
        if now < run.next_probe:
            return False
        run.next_probe = now + ADOPTED_PROBE_SECONDS
        if run.dir.being_started():
            return False
        run.secrets = secrets.kept(run.dir.path)  # written during the start, before the Agent ran
        found = run.dir.result()
        if found is not None:
            run.result = found  # it failed before its Agent started
            return False
        run.pid = run.dir.pid()
        if run.pid is not None:
            run.pump = streaming.replay(run.dir.path, run.assignment, run.secrets)
        else:
            for pgid in run.dir.stray_groups():
                signal_group(pgid, signal.SIGKILL)
            self._finish(run, "FAILED", None, "the Worker session starting the Agent ended before the start was "
                                              "recorded")
            return False
        run.next_probe = 0.0
        return True

    def _carry_out_stop(self, run: ActiveRun) -> None:
        """A running Run adopted (or whose start was recorded) after a session was asked to stop it
        (its stop.json, or this session's, while it was being started) is stopped now."""
        run.stop_checked = True
        if run.pid and (run.kill_at is None or run.kill_at == float("inf")) and run.dir.stop() is not None:
            signal_group(run.pid, signal.SIGTERM)
            run.kill_at = time.monotonic() + KILL_GRACE_SECONDS

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
            if run.pid is None and not self._start_recorded(run):
                return
            assert run.pid is not None
            # Not our child: no waitpid. Probing the group reads /proc, so not every tick.
            now = time.monotonic()
            if now < run.next_probe:
                return
            run.next_probe = now + ADOPTED_PROBE_SECONDS
            if group_alive(run.pid):
                if not run.stop_checked:
                    self._carry_out_stop(run)
                return
            code = run.dir.exit_code()
        if not run.dir.path.is_dir():
            self._forget(run)  # another session acknowledged it: its pid may name another group by now
            return
        if run.pid and (run.pump is None or run.pump.end is None):
            # A Run's processes do not outlive it: stragglers in its group are ended (before the rest of its
            # stream is read: nothing writes to it after).
            signal_group(run.pid, signal.SIGKILL)
        if run.pump is not None:
            run.pump.ending()
            if not run.pump.caught_up():
                self._pump(run)
                if not run.pump.caught_up():
                    return  # more on the next tick: a long stream never holds up the loop
        crashpoints.reached("worker.agent_exited")
        stop = run.dir.stop()
        outcome = run.pump.outcome(code) if run.pump is not None else None
        if stop is not None:
            status, error = stop["status"], stop["reason"]
        elif outcome is not None:
            status, error = outcome.status, outcome.error
        elif code == 0:
            status, error = "COMPLETED", None
        elif code is None:
            status, error = "FAILED", "the Agent ended without an exit status (killed by a signal?)"
        else:
            status, error = "FAILED", f"the Agent exited with code {code}"
            if run.saw_full or not diskspace.has_room(self.home):
                # Its own writes (output, workspace) may have failed on the full disk, saying so nowhere:
                # even its error message had no room. The record says what happened.
                error += f" while {diskspace.reason('the Worker home', self.home)}; its writes may have failed"
        self._finish(run, status, code, error, usage_limit=outcome.usage_limit if outcome else None)

    def _finish(self, run: ActiveRun, status: str, code: int | None, error: str | None,
                replace: bool = False, usage_limit: Any = None) -> None:
        """Sign the Run's result (runresult.py) and write it, unless another session did first (then that one
        stands). `replace`: the Run had a result, but its output no longer holds what it covers (`_truncated`)."""
        now = time.monotonic()
        if run.full_since is not None and now < run.full_since + FULL_HOME_WAIT_SECONDS \
                and not diskspace.has_room(self.home):
            return  # still no room: tried again once there is, or once the wait is over
        waited = run.full_since is not None and now >= run.full_since + FULL_HOME_WAIT_SECONDS
        made: dict[str, Any] | None = None
        try:
            result = result_body(run, status, code, error, self.name, replace, usage_limit, room_waited=waited)
            body = json.dumps(result, sort_keys=True, separators=(",", ":")).encode()
            made = {**result, "envelope": sign(RESULT_TYPE, body, [self._key])}
            crashpoints.reached("worker.result_signed")
            if replace:
                run.dir.write_result(made)
            elif not run.dir.create_result(made):
                made = run.dir.result() or made  # another session judged the Run first: one outcome, the same
        except OSError as exc:
            if not diskspace.is_full(exc) or not waited or made is None:
                run.full_since = now if run.full_since is None and diskspace.is_full(exc) else run.full_since
                raise  # _guarded: tried again on a later tick
            # The Worker home stayed full (the Agent's own files, often): the Run ends all the same, its
            # result held in memory and sent from there, and the Agent's files go now (its change is given
            # up): the control plane may share the disk, and could not record the result without that room.
            self._drop_files(run)
        crashpoints.reached("worker.result_written")
        run.result = made

    def _drop_files(self, run: ActiveRun) -> None:
        """Hand a finished Run's workspace and change objects to the janitor (a rename each, then deleted off
        the loop); what the result needs (output.log, its directory) stays until it is acknowledged."""
        for path in (run.dir.workspace, run.dir.path / "objects", run.dir.path / "change.pack"):
            gone = self._trash / f"{run.dir.run_id}.{path.name}"
            try:
                os.rename(path, gone)
            except OSError:
                continue  # not there (no checkout, nothing packed)
            self._removals.put(gone)

    def _stop(self, run: ActiveRun, status: str, reason: str) -> None:
        if run.result is not None or run.kill_at is not None:
            return
        run.dir.create_stop(status, reason)  # unless a session gave a reason first: that one stands
        crashpoints.reached("worker.stop_written")
        if run.pid:
            signal_group(run.pid, signal.SIGTERM)
            crashpoints.reached("worker.group_killed")
            run.kill_at = time.monotonic() + KILL_GRACE_SECONDS
        else:
            run.kill_at = float("inf")  # being started by another session: stopped once its pid is known
            self._check_exit(run)
