"""How the control plane reaches a Worker: one session per Worker, one interface."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from taskrunner.errors import WorkerError
from taskrunner.links.base import LinkEvent, WorkerLink
from taskrunner.links.local import LocalLink
from taskrunner.model import WorkerSpec

__all__ = ["LinkEvent", "WorkerLink", "make_link"]


def make_link(spec: WorkerSpec, state_dir: Path, post: Callable[[LinkEvent], None]) -> WorkerLink:
    if spec.transport == "local":
        return LocalLink(spec, state_dir, post)
    if spec.transport == "ssh":
        from taskrunner.links.ssh import SshLink  # paramiko, only for a fleet with an ssh Worker

        return SshLink(spec, state_dir, post)
    raise WorkerError(f"Worker '{spec.name}': transport '{spec.transport}' is not available in this version")
