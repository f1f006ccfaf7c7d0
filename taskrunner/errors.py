"""The exception tree of taskrun.

    TaskrunError
    ├── ConfigError          .taskrun.yaml cannot be loaded or validated
    ├── TaskFileError        a tasks/*.md file cannot be parsed or validated
    ├── TransitionError      a status change that the transition table forbids
    ├── ProtocolError        a malformed or unexpected record on a Worker session
    ├── RecordError          a record under runs/ cannot be read or written
    ├── GitError             a git operation failed
    ├── LockError            another daemon holds the repository
    ├── DaemonNotRunning     a command needs the daemon and there is none
    ├── SignatureRejected    (signing) an envelope is malformed or no trusted signature verifies
    ├── ResultRejected       (results) a Worker's result does not verify; recorded as FAILED
    ├── KeyringError         (keys) the control plane's signing keys are missing or unreadable
    └── WorkerError          a Worker cannot be reached or refused a Run
        ├── HostKeyError     (sshkeys) a host key is unknown, changed or unpinnable
        ├── BundleRejected   (bundle) a bundle breaks a rule; nothing of it runs
        ├── Replayed         (worker.ledger) a bundle was taken before
        ├── TrustRefused     (worker.trust) a trust statement is refused
        ├── AgentError       (agents) an Agent cannot be prepared for a Task
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


class GitError(TaskrunError):
    """Raised when a git command fails."""


class LockError(TaskrunError):
    """Raised when another daemon already holds the repository's lock."""


class DaemonNotRunning(TaskrunError):
    """Raised when a command needs a running daemon and there is none."""


class WorkerError(TaskrunError):
    """Raised when a Worker cannot be started, reached or refuses a Run."""
