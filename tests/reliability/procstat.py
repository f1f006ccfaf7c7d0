"""A process's figures from /proc, for watching a long-running daemon: RSS, open fds, threads, children.

`sample(pid)` reads /proc/<pid>/status (VmRSS, Threads), lists /proc/<pid>/fd, and walks every
/proc/<n>/stat for the parent pid field (the 4th, after the parenthesised command name) to count
the process's children and its whole tree. `children(pid)` and `cmdline(pid)` are the pieces.
Linux only; a process that is gone gives None, an empty list or b"".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """The daemon process at one moment, from /proc: RSS (KiB), open fds, threads, live children
    (direct; `descendants`: the whole tree, the local Worker's Agents included), zombie children."""

    pid: int
    rss_kib: int
    fds: int
    threads: int
    children: int
    descendants: int
    zombies: int

    def line(self) -> str:
        return (f"pid {self.pid}: RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} fds, {self.threads} threads, "
                f"{self.children} children ({self.descendants} descendants, {self.zombies} zombies)")


def sample(pid: int) -> Sample | None:
    """The figures of process `pid` (None: it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    parents: dict[int, list[tuple[int, bool]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(stat[1]), []).append((int(entry), stat[0] == b"Z"))
    direct = parents.get(pid, [])
    tree, todo = 0, [child for child, zombie in direct if not zombie]
    while todo:
        tree += 1
        todo += [child for child, zombie in parents.get(todo.pop(), []) if not zombie]
    return Sample(pid, int(fields.get("VmRSS", "0 kB").split()[0]), fds, int(fields.get("Threads", "0")),
                  sum(not z for _, z in direct), tree, sum(z for _, z in direct))



def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found
