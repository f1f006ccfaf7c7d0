"""The embedded local Worker: `taskrun-worker serve` as a subprocess of the daemon."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

from taskrunner.errors import WorkerError
from taskrunner.links.base import LinkEvent, WorkerLink
from taskrunner.model import WorkerSpec


def default_home(state_dir: Path, name: str, environ: Mapping[str, str] = os.environ) -> Path:
    """A local Worker's home when `workers.<name>.home` is not set:
    `${XDG_STATE_HOME:-~/.local/state}/taskrun/<repository>-<key>/workers/<name>`.

    `<key>` is 12 hex digits of the sha256 of the daemon's state directory
    (`<git dir>/taskrun`), so each clone and worktree has its own. Not inside
    the git directory: Agents see their workspace's path, and Claude Code
    refuses to edit any file whose path has a `.git` component.
    """
    base = Path(environ.get("XDG_STATE_HOME") or Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    state = os.path.abspath(state_dir)
    repository = Path(state).parent.parent.name or "repository"
    key = hashlib.sha256(state.encode()).hexdigest()[:12]
    return base / "taskrun" / f"{repository}-{key}" / "workers" / name


class LocalLink(WorkerLink):
    def __init__(self, spec: WorkerSpec, state_dir: Path, post: Callable[[LinkEvent], None]) -> None:
        super().__init__(spec, post)
        self.home = Path(spec.home).expanduser() if spec.home else default_home(state_dir, spec.name)
        # The daemon's repository (its .git/taskrun/ holds the control plane's keys): no Agent sees it.
        self.repository = state_dir.parent.parent
        self._proc: subprocess.Popen[bytes] | None = None

    def _connect(self) -> tuple[BinaryIO, BinaryIO]:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "taskrunner.worker", "serve",
                "--home", str(self.home), "--name", self.name, "--slots", str(self.spec.slots),
                "--protect", str(self.repository)]
        try:
            with open(self.home / "serve.log", "ab") as log:
                # Its own session: a Ctrl-C meant for the daemon must not reach
                # the Worker, which the daemon ends by closing its stdin.
                self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=log, start_new_session=True)
        except OSError as exc:
            raise WorkerError(f"Worker '{self.name}': cannot start taskrun-worker ({exc})") from exc
        assert self._proc.stdout is not None and self._proc.stdin is not None
        return self._proc.stdout, self._proc.stdin

    def _disconnect(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()  # the reader has seen its end: the Worker exited
