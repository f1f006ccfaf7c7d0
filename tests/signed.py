"""A control plane for Worker tests: an enrolled Worker home and the signed assignments sent to it.

`enroll(home, state_dir)` makes a keyring under `state_dir` (as the daemon
keeps one under .git/taskrun/), pins its key in the Worker at `home` as the
Worker's admin does (`taskrun-worker init --trust-key`), and has the Worker
take its trust statement, exactly as `taskrun worker add` does through the gate.
`ControlPlane(...)` without enrolling gives a keyring the Worker does not
trust. Either way `assignment()` builds what the engine sends: an `assign`
record of `{run_id, envelope}` with the bundle's archive as payload.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from taskrunner import bundle
from taskrunner.enroll import trust_request
from taskrunner.keys import Keyring
from taskrunner.protocol import Message
from taskrunner.sessionauth import auth_envelope
from taskrunner.signing import BUNDLE_TYPE, RESULT_TYPE, SigningKey, sign, verify
from taskrunner.worker.enrollment import Enrollment
from taskrunner.worker.trust import TrustStore, worker_key

#: Seconds before "now" at which a test keyring is made and its Worker enrolled, so
#: that a trust statement made during the test is newer than the enrollment.
ENROLLED_AGO = 60.0
#: A Run's timeout when a test does not care about one (the manifest always carries one).
NO_HURRY = 600.0
TASK_FILE = "tasks/t.md"


def task_md(script: str | None) -> bytes:
    """A Task file for the shell Agent: `script` as its ```sh block, or prose only."""
    body = f"```sh\n{script}\n```\n" if script is not None else "Just prose, no code block.\n"
    return f"---\n---\n# T\n\n{body}".encode()


def shell_agent(env: Sequence[str] = ()) -> dict[str, Any]:
    return {"name": "shell", "preset": "shell", "command": [], "env": list(env)}


@dataclass
class ControlPlane:
    """A keyring and the Worker it addresses (by the Worker's result key id)."""

    keyring: Keyring
    audience: str
    worker: str = "w1"
    _seq: int = field(default=0, repr=False)

    @classmethod
    def make(cls, home: Path, state_dir: Path, now: float | None = None) -> ControlPlane:
        made_at = time.time() - ENROLLED_AGO if now is None else now
        keyring, _ = Keyring.ensure(state_dir, made_at)
        return cls(keyring, worker_key(home).key_id)

    @property
    def key(self) -> SigningKey:
        return self.keyring.current

    def next_seq(self) -> int:
        # As the engine does: microseconds since the epoch, above the last one sent.
        self._seq = max(self._seq + 1, int(time.time() * 1e6))
        return self._seq

    def bundle(self, run_id: str, script: str | None = "true", *, files: Mapping[str, bytes] | None = None,
               timeout: float = NO_HURRY, env: Sequence[str] = (), signer: SigningKey | None = None,
               now: float | None = None, **over: Any) -> bundle.Bundle:
        """A signed bundle running `script` with the shell Agent; `over` replaces manifest fields."""
        fields: dict[str, Any] = {
            "run_id": run_id, "task_id": "t", "revision": "r", "attempt": 1, "task_file": TASK_FILE,
            "timeout": timeout, "worker": self.worker, "audience": self.audience, "agent": shell_agent(env),
            "seq": self.next_seq(), "base_commit": None,
        }
        fields.update(over)
        return bundle.build(files if files is not None else {TASK_FILE: task_md(script)}, signer or self.key,
                            now=time.time() if now is None else now, **fields)

    def assignment(self, run_id: str, script: str | None = "true", **kwargs: Any) -> Message:
        built = self.bundle(run_id, script, **kwargs)
        return Message("assign", {"run_id": run_id, "envelope": built.envelope}, built.archive)

    def resigned(self, manifest: Mapping[str, Any], signer: SigningKey | None = None) -> dict[str, Any]:
        """An envelope over `manifest` as given (say, altered after build), signed by a trusted key."""
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        return sign(BUNDLE_TYPE, body, [signer or self.key])

    def trust_request(self, now: float | None = None) -> dict[str, Any]:
        return trust_request(self.keyring, self.audience, time.time() if now is None else now)

    def auth(self, hello: Message, now: float | None = None) -> Message:
        """The `auth` record answering `hello`'s challenge, as the daemon sends it."""
        when = time.time() if now is None else now
        return Message("auth", {"envelope": auth_envelope(self.keyring.signers(when), hello["challenge"],
                                                          self.audience, when)})


def enroll(home: Path, state_dir: Path) -> ControlPlane:
    """A control plane whose keys the Worker at `home` trusts, enrolled ENROLLED_AGO seconds ago."""
    plane = ControlPlane.make(home, state_dir)
    made_at = plane.keyring.entries[0].created_at
    Enrollment(home).pin([plane.key.key_id], made_at)
    TrustStore(home).apply(trust_request(plane.keyring, plane.audience, made_at), plane.audience, made_at)
    return plane


def signed_result(envelope: Any, home: Path) -> dict[str, Any]:
    """The body of a result envelope, once it verifies with the result key of the Worker at `home`."""
    key = worker_key(home)
    body, _ = verify(envelope, RESULT_TYPE, {key.key_id: key.public})
    result: dict[str, Any] = json.loads(body)
    return result
