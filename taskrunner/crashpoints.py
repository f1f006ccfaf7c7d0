"""Named crash points: SIGKILL this process between two durable steps, when (and only when) a test asks.

The fault tests (tests/reliability, bench/crash_matrix) kill the daemon or
`taskrun-worker` at each named step and check that nothing is lost or
recorded twice once it restarts. Two environment variables drive it:

    TASKRUN_CRASH_AT    "<point>" or "<point>#<n>": die the n-th time (default
                        the first) this process reaches <point>
    TASKRUN_CRASH_MARK  a file path (required): the point is written there
                        (O_EXCL) just before the kill, so a crash happens once
                        across restarts and the test knows it happened

Without both, `reached()` is a dictionary lookup and returns. The points are
the keys of POINTS (a test checks that each is reached somewhere in the code
and that the code names no other); "daemon." points are in the control
plane, "worker." ones in `taskrun-worker`.
"""

from __future__ import annotations

import os
import signal

#: Every crash point: name -> the durable step just done (the kill comes right after it).
POINTS: dict[str, str] = {
    # The daemon: intake and records.
    "daemon.task_record_written": "a Task's status.json was written",
    "daemon.run_record_written": "a Run's status.json was written",
    "daemon.manifest_written": "a Run's manifest.json was written",
    "daemon.records_batch_written": "every record of a batch was written, before its commits are handed over",
    "daemon.assign_sent": "an assignment (signed bundle) was sent to a Worker",
    "daemon.output_written": "a chunk of output was appended to output.log",
    "daemon.result_verified": "a Worker's signed result was verified, before anything of it is recorded",
    "daemon.events_written": "a Run's events.jsonl was written",
    "daemon.change_imported": "a Run's change was imported as a commit, before its refs move",
    "daemon.run_finished": "a Run's final status was decided in memory, before its records are written",
    "daemon.ack_sent": "a result was acknowledged to the Worker",
    "daemon.summary_written": "a Run's summary.md was written",
    "daemon.full_log_moved": "a final Run's output.log over records.max_log_bytes was moved to the full logs",
    # The daemon: git.
    "daemon.commit_built": "a records commit was built by fast-import, before HEAD moves",
    "daemon.head_moved": "HEAD moved to a records commit, before the index is refreshed",
    "daemon.index_refreshed": "the user's index got the committed records",
    "daemon.commit_done": "a records commit is complete and reported",
    "daemon.result_ref_moved": "a Run's result branch ref moved",
    "daemon.run_ref_moved": "a Run's own result ref (refs/taskrun/runs/...) moved",
    "daemon.push_started": "a push was about to run",
    "daemon.push_done": "a push succeeded, before its state is saved",
    "daemon.sync_fetched": "a sync fetched the remote, before the clone moves",
    "daemon.sync_moved": "a sync fast-forwarded the clone",
    "daemon.pauses_saved": "an Agent's usage-limit pause was saved",
    "daemon.restored": "a restarted daemon read its records, before it schedules",
    "daemon.cancel_sent": "a cancel was sent to a Worker",
    # The Worker.
    "worker.hello_sent": "the session's hello was sent",
    "worker.ledger_admitted": "a bundle's nonce, run id and seq went into the replay ledger",
    "worker.assignment_written": "a Run's assignment.json was written",
    "worker.extracted": "a Run's archive was extracted into its workspace",
    "worker.checkout_done": "a Run's repository checkout was made",
    "worker.agent_spawned": "an Agent's process was started, before its pid is recorded",
    "worker.pid_written": "an Agent's pid was recorded",
    "worker.started_sent": "the `started` message was sent",
    "worker.output_read": "output was read from the Agent's log, before it is sent",
    "worker.output_sent": "a chunk of output was sent",
    "worker.agent_exited": "the Agent's exit was seen, before the result is made",
    "worker.change_collected": "the Agent's change was committed in the workspace and packed",
    "worker.result_signed": "a result was signed, before it is written",
    "worker.result_written": "a result was written to the Run's directory, before it is sent",
    "worker.result_sent": "a result was sent",
    "worker.ack_received": "an ack arrived, before the Run's directory is renamed",
    "worker.acknowledged": "an acked Run's directory was renamed for removal",
    "worker.stop_written": "a stop request was recorded in the Run's directory",
    "worker.group_killed": "an Agent's process group was sent a signal to stop",
}

_AT = os.environ.get("TASKRUN_CRASH_AT", "")
_MARK = os.environ.get("TASKRUN_CRASH_MARK", "")
_POINT, _, _NTH = _AT.partition("#")
_COUNT = [0]


def reached(point: str) -> None:
    """Mark that this process just finished the step named `point` (a key of POINTS).

    When TASKRUN_CRASH_AT names this point (and its n-th hit) and the mark file
    does not exist yet, the mark is written and the process SIGKILLs itself:
    no cleanup, no flush, as a power cut or the OOM killer would end it.
    """
    if point != _POINT or not _MARK:
        return
    _COUNT[0] += 1
    if _COUNT[0] < (int(_NTH) if _NTH.isdigit() else 1):
        return
    try:
        fd = os.open(_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return  # it already crashed here once (an earlier process): run on
    os.write(fd, f"{point} {os.getpid()}\n".encode())
    os.fsync(fd)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
