"""A Worker's signed result, checked before anything of it is recorded.

The Worker signs (signing.RESULT_TYPE) {run_id, status, exit_code, error,
started_at, finished_at, output_size, output_sha256, nonce, change} with its
result key (`change`: {commit, base, sha256, size} of the pack of the Agent's
change that follows as the payload, or null; gitflow/importer.py takes it); the control plane verifies the signature with the key pinned at
enrollment, that the result is for this Run, and that size and sha256 match
the output.log it recorded. A result that fails any of this is recorded as
FAILED with the reason, never as COMPLETED.

Before that, `more_output_owed` compares the output the result covers with
the output recorded: a result covering less is final (the Agent truncated
its output; asking again would only get the same answer), one covering more
is answered with `resume` at most RESULT_RESUMES times. So no Worker, however
its Agent tampers with its output, keeps a Run going with results.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from taskrunner.errors import TaskrunError
from taskrunner.signing import RESULT_TYPE, SignatureRejected, key_id, verify_json

STATUSES = ("COMPLETED", "FAILED", "CANCELLED")
#: How often one Run's result announcing output the control plane lacks is answered with `resume`
#: before the Run fails. A Worker sends all output before its result: once is already unusual.
RESULT_RESUMES = 3


class ResultRejected(TaskrunError):
    """Raised when a Worker's result does not verify; the message says why, `reason` in one fixed word."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason  # for the "rejected" event (hooks.py): a metric's label, never free text


def verified_result(envelope: Any, result_key: bytes | None, run_id: str,
                    output: Path | tuple[int, str]) -> dict[str, Any]:
    """The verified result; ResultRejected saying why not.

    `output` is the recorded output: its (size, sha256 hex), as the daemon
    reads it from runs/ without following links (records.output_digest), or
    a path to hash.
    """
    if result_key is None:
        raise ResultRejected("result rejected: no result key is pinned for this Worker", "no_key")
    try:
        result, _ = verify_json(envelope, RESULT_TYPE, {key_id(result_key): result_key}, what="result")
    except SignatureRejected as exc:
        raise ResultRejected(f"result rejected: {exc}", "signature") from None
    if result.get("run_id") != run_id:
        raise ResultRejected(f"result rejected: signed for another Run than {run_id}", "wrong_run")
    if result.get("status") not in STATUSES:
        raise ResultRejected(f"result rejected: unknown status {result.get('status')!r}", "bad_status")
    size, digest = output if isinstance(output, tuple) else _digest(output)
    if result.get("output_size") != size or result.get("output_sha256") != digest:
        raise ResultRejected("result rejected: the output recorded does not match the output the Worker signed",
                             "output_mismatch")
    return result


def more_output_owed(recorded: int, signed: Any, resumes: int) -> bool:
    """True: ask the Worker for the output its result covers and the control plane lacks (`resume`);
    False: verify the result now. ResultRejected when it can only fail.

    `recorded` is the size of the output recorded, `signed` the result's
    `output_size`, `resumes` how often this Run's results were answered with
    `resume` already.
    """
    if not isinstance(signed, int) or isinstance(signed, bool) or signed < 0:
        raise ResultRejected(f"result rejected: output_size {signed!r} is not a byte count", "output_size")
    if signed < recorded:
        raise ResultRejected(f"result rejected: it covers {signed} bytes of output, {recorded} were recorded "
                             "(the Agent truncated its output)", "output_size")
    if signed > recorded:
        if resumes < RESULT_RESUMES:
            return True
        raise ResultRejected(f"result rejected: it covers {signed} bytes of output, {recorded} were recorded "
                             f"after asking {resumes} times for the rest", "output_missing")
    return False


def _digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        pass
    return size, digest.hexdigest()
