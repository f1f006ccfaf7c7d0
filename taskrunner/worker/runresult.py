"""The body of a Run's result, before the Worker signs it (finisher.py `_finish`; the control plane checks it
in taskrunner/results.py).

Shape: `{run_id, status, exit_code, error, started_at, finished_at, output_size, output_sha256, nonce,
change, report, usage_limit, events}` (README, "Workers and the session protocol": `result`).
"""

from __future__ import annotations

import errno
import time
from typing import Any

from taskrunner import crashpoints, diskspace
from taskrunner.errors import TaskrunError
from taskrunner.gitflow import change
from taskrunner.worker import streaming
from taskrunner.worker.activerun import ActiveRun, output_digest


def result_body(run: ActiveRun, status: str, code: int | None, error: str | None, worker: str,
                replace: bool = False, usage_limit: Any = None, room_waited: bool = True) -> dict[str, Any]:
    """What `run` ended with, judged now: its output's size and digest, and its change when it COMPLETED.

    Output the Agent tampered with fails the Run (activerun.output_digest),
    unless it was cancelled. A COMPLETED Run's change is committed and packed
    outside the sandbox, as the Worker (gitflow/change.py); one that cannot be
    fails the Run; one that failed for want of room raises OSError(ENOSPC)
    instead while `room_waited` is False (the Worker waits for room, finisher.py
    FULL_HOME_WAIT_SECONDS), then fails the Run saying the Worker home is
    full. `replace`: the Run had a result whose output no longer
    holds what it covers: its report, usage limit and events stay. A Run read
    through a stream reader (run.pump) adds what its reader reports and the
    digest of the events shipped (streaming.py); other Runs carry null there.
    """
    assignment = run.assignment
    size, digest, problem = output_digest(run)
    if problem is not None and status != "CANCELLED":
        status, error = "FAILED", problem
    found = None
    if status == "COMPLETED" and not replace and run.dir.result() is None:
        try:
            found = change.collect(run.dir.path, run.dir.workspace, assignment, run.secrets,
                                   str(assignment.get("worker") or worker))
            crashpoints.reached("worker.change_collected")
        except (TaskrunError, OSError, ValueError, KeyError, TypeError) as exc:  # GitError, ChangeRefused...
            why = str(exc)
            if diskspace.is_full(exc) or diskspace.full_text(why):
                if not room_waited:
                    raise OSError(diskspace.full_errno(exc) or errno.ENOSPC, why) from exc
                why = diskspace.reason("the Worker home", run.dir.path.parent.parent, exc)
            status, error = "FAILED", f"the Agent's change was not returned: {why}"
    result = {
        "run_id": run.dir.run_id, "status": status, "exit_code": code, "error": error,
        "started_at": assignment.get("assigned_at"), "finished_at": time.time(),
        "output_size": size, "output_sha256": digest, "nonce": assignment.get("nonce"),
        "change": found, "report": None, "usage_limit": streaming.limit_record(usage_limit), "events": None,
    }
    if replace and run.result is not None:
        result.update({k: run.result.get(k) for k in ("report", "usage_limit", "events")})
    elif run.pump is not None:
        result["report"] = run.pump.report()
        if run.pump.keeps_events:
            result["events"] = streaming.shipped(run.dir.path, run.secrets)
        run.pump.close()
    return result
