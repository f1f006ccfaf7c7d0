"""How pushing and syncing are going, for `taskrun status`: `<state dir>/git-status.json`.

Written (atomically, whole) by the recorder thread after every push and
sync; read by the CLI, with or without a running daemon. Shape:

    {"push": {"ok": bool, "error": str | null, "failures": int,
              "last_ok_at": float | null, "last_try_at": float | null,
              "refused": {"<result branch>": "<reason>"}},
     "sync": {"state": "ok" | "diverged" | "refused" | "failed" | "no-remote",
              "message": str, "at": float | null, "head": str | null,
              "remote_tip": str | null}}

Times are Unix seconds. Keys absent until the first push / sync.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from taskrunner.atomic import write_bytes

FILE = "git-status.json"
#: Sync states in which the engine starts no new Run: the clone is not what the remote says it should be.
STALE_STATES = frozenset({"diverged"})


class GitState:
    """The file above, kept in memory and rewritten on each change."""

    def __init__(self, state_dir: Path) -> None:
        """Starts from what the last daemon wrote (a diverged clone stays diverged across a restart)."""
        self.path = state_dir / FILE
        self._data: dict[str, Any] = read(state_dir)
        self._lock = threading.Lock()

    def update(self, section: str, **values: Any) -> None:
        with self._lock:
            self._data.setdefault(section, {}).update(values)
            text = json.dumps(self._data, indent=2, sort_keys=True) + "\n"
        try:
            write_bytes(self.path, text.encode(), mode=0o600, durable=False)
        except OSError:
            pass  # a status display, not a record: the next change writes it again

    def get(self, section: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._data.get(section, {}))


def read(state_dir: Path) -> dict[str, Any]:
    """The last state written, {} when there is none or it cannot be read."""
    try:
        data = json.loads((state_dir / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, dict)} if isinstance(data, dict) else {}


def problems(data: dict[str, Any]) -> list[str]:
    """One line per thing a user should know: a push that keeps failing, a refused result branch, a diverged clone."""
    lines: list[str] = []
    push = data.get("push") or {}
    if push.get("ok") is False:
        lines.append(f"push failing ({push.get('failures', 0)} attempt(s), retried later): {push.get('error')}")
    for branch, reason in sorted((push.get("refused") or {}).items()):
        lines.append(f"result branch {branch} not pushed: {reason}")
    sync = data.get("sync") or {}
    if sync.get("state") in ("diverged", "refused", "failed"):
        stale = " (no new Run starts until a sync finds the clone in step)" if sync["state"] in STALE_STATES else ""
        lines.append(f"sync {sync['state']}: {sync.get('message')}{stale}")
    return lines
