"""The exception tree of taskrun.

    TaskrunError
    ├── ConfigError          .taskrun.yaml cannot be loaded or validated
    ├── TaskFileError        a tasks/*.md file cannot be parsed or validated
    ├── TransitionError      a status change that the transition table forbids
    ├── ProtocolError        a malformed or unexpected record on a Worker session
    ├── RecordError          a record under runs/ cannot be read or written
    │   └── ForeignRecord    a record this daemon did not write (no valid seal), or not a regular file
    ├── UnsafePath           (safefs) a path beneath a root is a link or special file, or leaves the root
    ├── GitError             a git operation failed
    ├── LockError            another daemon holds the repository
    ├── DaemonNotRunning     a command needs the daemon and there is none
    ├── SignatureRejected    (signing) an envelope is malformed or no trusted signature verifies
    ├── ResultRejected       (results) a Worker's result does not verify; recorded as FAILED
    ├── KeyringError         (keys) the control plane's signing keys are missing or unreadable
    │   └── KeyFileError     (recordkey) one key file holds something else: what, and what to do
    └── WorkerError          a Worker cannot be reached or refused a Run
        ├── HostKeyError     (sshkeys) a host key is unknown, changed or unpinnable
        ├── BundleRejected   (bundle) a bundle breaks a rule; nothing of it runs
        ├── Replayed         (worker.ledger) a bundle was taken before
        ├── TrustRefused     (worker.trust) a trust statement or enrollment is refused
        ├── AuthRefused      (sessionauth) a session's proof of a trusted key is refused
        ├── EnrollmentRefused (worker.enrollment) a first enrollment is not by whom the admin named
        ├── AgentError       (agents) an Agent cannot be prepared for a Task
        ├── PromptError      (agents.prompt) a prompt template does not render
        ├── TaskDirError     (agents.workspace) the Task's directory cannot be written in the checkout
        ├── SandboxRefused   (worker.confine) an Agent may not run unconfined and no sandbox can be made
        └── GateRefused      (worker.gate) the gate refuses an SSH command

Third-party exceptions (GitPython, paramiko, yaml) are translated into these at
the module that uses the library; nothing above the edges sees them.
"""

from __future__ import annotations


class TaskrunError(Exception):
    """Raised for every error taskrun reports; the root of the tree."""


class _Located(TaskrunError):
    """An error in a file, optionally at one key: `file: key 'k': reason`."""

    def __init__(self, file: str, reason: str, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: key '{key}'" if key else file
        super().__init__(f"{where}: {reason}")


class ConfigError(_Located):
    """Raised when the configuration file is malformed or invalid."""


class TaskFileError(_Located):
    """Raised when a Task file is malformed or invalid."""


class TransitionError(TaskrunError):
    """Raised when a status change is not in the transition table."""


class ProtocolError(TaskrunError):
    """Raised when a Worker session carries a malformed or unexpected record."""


class RecordError(TaskrunError):
    """Raised when a record under runs/ cannot be read or written."""


class ForeignRecord(RecordError):
    """Raised when a record under runs/ was not written by this daemon; it is treated as absent.

    No valid seal (records.py), or a link or special file where the record
    should be: either way nothing of it is believed.
    """


class UnsafePath(TaskrunError, OSError):
    """Raised when a path beneath a root is a link, a special file or not plain; nothing went through it.

    Also an OSError, so that code which handles a file it cannot open (a
    missing or unreadable one) handles this one the same way, without
    following it. `path` is the part of the path that is refused (a parent
    directory when that is the link), `what` what was found there, `reason`
    what the caller should know.
    """

    def __init__(self, path: str, what: str, reason: str = "") -> None:
        self.path = path
        self.what = what
        self.reason = reason
        super().__init__(f"{path} is {what}" + (f"; {reason}" if reason else ""))

    def __str__(self) -> str:
        return str(self.args[0])


class GitError(TaskrunError):
    """Raised when a git command fails."""


class KeyringError(TaskrunError):
    """Raised when the control plane's keys (keys.py, recordkey.py) are missing or unreadable."""


class LockError(TaskrunError):
    """Raised when another daemon already holds the repository's lock."""


class DaemonNotRunning(TaskrunError):
    """Raised when a command needs a running daemon and there is none."""


class WorkerError(TaskrunError):
    """Raised when a Worker cannot be started, reached or refuses a Run."""
