"""The soak's Tasks: shell Tasks whose output is known byte for byte, in a seeded mix.

`next_tasks(rng, number, marker)` gives the Tasks of one drop, ids `k<number>-<kind>`: short (1-19
lines at once), long (a line every 0.2-0.5 s for 5-30 s), fails (exit 3), retry (exit 3 with
`retries: 1`: two FAILED Runs, the same output each), depends (a pair, the second `depends_on` the
first, dropped in either order), change (writes `<id>.txt` in its checkout: a result branch comes
back). Every sleep runs as `exec -a <marker> sleep`, so a leftover Agent shows in `marked_processes`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tests.reliability.checker import TaskSpec


@dataclass(frozen=True)
class SoakTask:
    """A Task of the soak: what the checker expects, its front matter's retries and its file text."""

    spec: TaskSpec
    retries: int = 0

    @property
    def text(self) -> str:
        front = f"depends_on: [{', '.join(self.spec.depends_on)}]\n" if self.spec.depends_on else ""
        front += f"retries: {self.retries}\n" if self.retries else ""
        return f"---\n{front}---\n# {self.spec.task_id}\n\n```sh\n{self.spec.script}\n```\n"


def printing(name: str, lines: int, pause: float, marker: str) -> tuple[str, bytes]:
    """(a script printing `lines` known lines, sleeping `pause` s after each; its exact output)."""
    script = (f"for i in $(seq 1 {lines}); do printf '{name} %04d\\n' \"$i\"; "
              f"(exec -a {marker} sleep {pause}); done")
    return script, "".join(f"{name} {i:04d}\n" for i in range(1, lines + 1)).encode()


def next_tasks(rng: random.Random, number: int, marker: str) -> list[SoakTask]:
    """The Tasks of drop `number` (one, or two for a dependency), ids `k<number>-<kind>`."""
    kind = rng.choices(("short", "long", "fails", "retry", "depends", "change"), (30, 25, 10, 10, 10, 15))[0]
    tid = f"k{number:05d}-{kind}"
    if kind == "short":
        script, out = printing(tid, rng.randrange(1, 20), 0.01, marker)
        return [SoakTask(TaskSpec(tid, script, "COMPLETED", out))]
    if kind == "long":
        pause = rng.choice((0.2, 0.3, 0.5))
        script, out = printing(tid, int(rng.uniform(5, 30) / pause), pause, marker)
        return [SoakTask(TaskSpec(tid, script, "COMPLETED", out))]
    if kind in ("fails", "retry"):
        script, out = printing(tid, rng.randrange(1, 10), 0.05, marker)
        return [SoakTask(TaskSpec(tid, script + "\nexit 3", "FAILED", out, exit_code=3),
                         retries=1 if kind == "retry" else 0)]
    if kind == "depends":
        first, out = printing(f"{tid}-a", rng.randrange(3, 20), 0.2, marker)
        second, out2 = printing(f"{tid}-b", rng.randrange(1, 10), 0.05, marker)
        parent = SoakTask(TaskSpec(f"{tid}-a", first, "COMPLETED", out))
        child = SoakTask(TaskSpec(f"{tid}-b", second, "COMPLETED", out2, depends_on=(f"{tid}-a",)))
        return [child, parent] if rng.random() < 0.5 else [parent, child]
    script, out = printing(tid, rng.randrange(2, 15), 0.2, marker)
    text = f"{tid} was here\n"
    return [SoakTask(TaskSpec(tid, f"{script}\nprintf '%s' '{text}' > {tid}.txt", "COMPLETED", out,
                              change=(f"{tid}.txt", text.encode())))]


