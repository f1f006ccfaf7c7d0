"""A Run a Worker session holds, and what the session has sent of its output.

**Output the Agent tampers with.** The Agent's stdout is an O_APPEND fd to
`output.log`, and nothing stops it from truncating that file (ftruncate) or
clearing O_APPEND and writing over bytes already sent: no fd to a regular
file can forbid that without privileges (chattr +a), and a pipe would need a
reader per Run that outlives the session. So the Worker checks instead. It
keeps the sha256 of what it has sent (`ActiveRun.digest`; on `resume` it
hashes the recorded prefix once). A file found shorter than what was sent
fails the Run ("the Agent truncated its output") with a result that covers
exactly the bytes sent, so it verifies against what the control plane
recorded; nothing after them is sent. Bytes written over after they were
sent change nothing: the result counts them as they were sent (what the
control plane holds), and they are not read again when the Run ends. Once a result is made, nothing past
its `output_size` is streamed, and a file that can no longer deliver the
bytes a result covers turns that result into the same failure. Whatever the
Agent does, one result per attachment is sent, and the control plane
(sessions.py) fails a result that covers less output than it recorded rather
than ask again.

**A Run's timeout** counts from its assignment on CLOCK_BOOTTIME (clock.py),
not the wall clock: a wall-clock jump neither ends nor extends it, and a
restarted `taskrun-worker` that adopts the Run keeps it. assignment.json
keeps the timeout (`timeout`, seconds), the boot it was assigned in and
that clock's reading then (`boot`: {"id", "at"}), and the wall time it
ends (`deadline`), which is what people read and what a Run found after a
reboot (or assigned by an older taskrun-worker) is timed by instead.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from dataclasses import dataclass, field
from typing import IO, Any, Mapping

from taskrunner import clock
from taskrunner.worker import secrets
from taskrunner.worker.rundir import RunDir
from taskrunner.worker.streaming import Pump

#: The output digest of a finished Run is computed this many bytes at a time.
DIGEST_CHUNK_BYTES = 1024 * 1024


@dataclass
class ActiveRun:
    """A Run this session holds: its directory, its Agent, and how much of its output was sent."""

    dir: RunDir
    proc: subprocess.Popen[bytes] | None  # None for Runs started by an earlier session
    pid: int | None
    deadline: float | None  # when it times out, on clock.boottime() (run_deadline); None: never
    attached: bool = False
    sent: int = 0
    kill_at: float | None = None
    result: dict[str, Any] | None = None
    log: IO[bytes] | None = None
    next_probe: float = 0.0  # adopted Runs: when to look at their process group again
    assignment: dict[str, Any] = field(default_factory=dict)  # as in assignment.json
    secrets: list[bytes] = field(default_factory=list)  # values masked in the output sent
    digest: Any = None  # sha256 of output bytes [0, sent) as sent (masked), when this session knows it
    frozen: int | None = None  # the Agent tampered with output already sent: the result covers [0, frozen)
    truncated: bool = False  # the Agent's truncation is noticed (once per session)
    stop_checked: bool = False  # adopted Runs: a stop.json asked for by an earlier session is carried out
    unwanted: bool = False  # cancelled by a control plane that settled it: removed once stopped, no result sent
    pump: Pump | None = None  # an Agent read through its event stream (streaming.py)
    saw_full: bool = False  # the Worker home had no room at some tick while the Agent ran (diskspace.py)
    full_since: float | None = None  # time.monotonic() when its end first found no room for its result

    def timed_out(self) -> bool:
        """Whether the Run's timeout has passed (clock.boottime: a wall-clock jump changes nothing)."""
        return self.deadline is not None and clock.boottime() >= self.deadline

    def close(self) -> None:
        """Close the files this session holds open for the Run."""
        if self.log:
            self.log.close()
        if self.pump is not None:
            self.pump.close()


def _finite(value: Any) -> float | None:
    """A finite number, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _seconds(value: Any) -> float | None:
    """A finite, positive number of seconds, or None."""
    seconds = _finite(value)
    return seconds if seconds is not None and seconds > 0 else None


def run_clock(now: float, timeout: Any) -> dict[str, Any]:
    """assignment.json's clock fields for a Run assigned at `now` (wall clock) with `timeout` seconds.

    {"deadline": the wall time it times out, or None without a timeout;
    "boot": {"id": clock.boot_id(), "at": clock.boottime()}, or None where
    the system names no boot}. Read back by `run_deadline`.
    """
    seconds = _seconds(timeout)
    boot = clock.boot_id()
    return {"deadline": None if seconds is None else now + seconds,
            "boot": None if boot is None else {"id": boot, "at": clock.boottime()}}


def run_deadline(assignment: Mapping[str, Any]) -> float | None:
    """When (clock.boottime) the Run of an assignment.json times out; None: it has no timeout.

    Counted from `boot.at` when it was assigned in this boot, so a restarted
    Worker keeps the timeout; else from the wall clock's `deadline` as it
    stands now. The file is the Worker's own, yet a value of the wrong type
    or not finite is taken as absent, never raised.
    """
    if not isinstance(assignment, Mapping):
        return None
    timeout, boot, here = _seconds(assignment.get("timeout")), assignment.get("boot"), clock.boot_id()
    at = _finite(boot.get("at")) if isinstance(boot, dict) and here is not None and boot.get("id") == here else None
    if timeout is not None and at is not None:
        return at + timeout
    wall_deadline = _finite(assignment.get("deadline"))
    return None if wall_deadline is None else clock.boottime() + (wall_deadline - clock.wall())


def output_digest(run: ActiveRun) -> tuple[int, str, str | None]:
    """Size and sha256 of the output the result covers (secrets masked), and what the Agent did to it.

    Normally the whole output.log: the bytes this session sent are counted
    as they were sent (its running digest, what the control plane recorded,
    so they are not read again), and only the rest is read. A file now
    shorter than what was sent makes the result cover what was sent, and the
    third value says why the Run fails.
    """
    if run.frozen is not None:
        return run.frozen, run.digest.hexdigest(), None
    size = run.dir.output_size()
    sent = run.sent if run.digest is not None else 0
    if sent > size:
        run.frozen = sent
        return sent, run.digest.hexdigest(), truncation(sent, size)
    digest = run.digest.copy() if run.digest is not None else hashlib.sha256()
    try:
        with open(run.dir.output, "rb") as log:
            for start in range(sent, size, DIGEST_CHUNK_BYTES):
                digest.update(read_masked(run, log, start, min(size, start + DIGEST_CHUNK_BYTES), size))
    except FileNotFoundError:
        size = 0
    return size, digest.hexdigest(), None


def prefix_digest(run: ActiveRun, offset: int) -> Any:
    """sha256 of output bytes [0, offset) as they were sent (masked); None if the file no longer has them.

    Read once per `resume`, so that tampering with output sent before it
    is noticed too.
    """
    size = run.dir.output_size()
    if offset > size:
        return None
    digest = hashlib.sha256()
    try:
        with open(run.dir.output, "rb") as log:
            for start in range(0, offset, DIGEST_CHUNK_BYTES):
                digest.update(read_masked(run, log, start, min(offset, start + DIGEST_CHUNK_BYTES), size))
    except FileNotFoundError:
        return None if offset else digest
    return digest


def read_masked(run: ActiveRun, log: IO[bytes], start: int, end: int, size: int) -> bytes:
    if run.secrets:
        return secrets.masked_range(log, start, end, size, run.secrets)
    log.seek(start)
    return log.read(end - start)


def truncation(sent: int, size: int) -> str:
    return f"the Agent truncated its output: {sent} bytes were sent, output.log now holds {size}"
