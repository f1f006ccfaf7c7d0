"""`taskrun demo`: a tour in a temporary repository, on the embedded local Worker."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from taskrunner.cli.render import LiveView
from taskrunner.config import load_config
from taskrunner.daemon import Daemon
from taskrunner.defaults import LOCAL_WORKER, STATE_DIR
from taskrunner.gitops import Git
from taskrunner.project import init_repository
from taskrunner.worker.confine import Confinement
from taskrunner.textsafe import clean

DEMO_TASKS = {
    "hello.md": """---
priority: high
---
# Say hello

```sh
echo "Hello from taskrun, running in $PWD"
uname -sr
```
""",
    "build.md": """---
depends_on: [hello]
---
# Build, after hello

Output streams back live while the Run goes on.

```bash
for step in 1 2 3 4 5; do
  echo "building step $step/5"
  sleep 0.3
done
```
""",
    "report.md": """---
depends_on: [build]
---
# Report, after build

```sh
echo "all built; the records of every Run are in runs/"
```
""",
    "lint.md": """---
group: checks
---
# Lint (group 'checks' runs one at a time)

```sh
echo "lint ok"
```
""",
    "flaky-test.md": """---
group: checks
---
# A test that fails

```sh
echo "running the test suite"
echo "1 failed" >&2
exit 3
```
""",
    "deploy.md": """---
depends_on: [flaky-test]
---
# Deploy, after the failing test: BLOCKED

```sh
echo "never runs"
```
""",
    "broken.md": """---
priority: urgent
---
# Front matter with a mistake: INVALID, and nothing else is disturbed
""",
}

#: A rule's width in a pipe or a log, where the console is as wide as a table needs (render.PIPE_WIDTH).
PLAIN_RULE_WIDTH = 80


def _rule(out: Console, title: str) -> None:
    out.print(Rule(title), width=None if out.is_terminal else PLAIN_RULE_WIDTH)


def run_demo(out: Console) -> int:
    root = Path(tempfile.mkdtemp(prefix="taskrun-demo-")) / "repo"
    _rule(out, "taskrun demo")
    out.print(f"A temporary repository: {root}", markup=False)
    init_repository(root)
    config_file = root / ".taskrun.yaml"
    config = config_file.read_text().replace("groups: {}", "groups: {checks: {parallel: 1}}")
    sandbox = Confinement(root / STATE_DIR / "workers" / LOCAL_WORKER, protect=[root]).status()
    if sandbox.kind is None:
        # The tour must run on a fresh machine: its own throwaway Tasks may run unconfined; yours do not.
        config = config.replace("    sandbox: bwrap\n", "    sandbox: none\n")
        out.print(f"No sandbox on this machine ({sandbox.reason}), so the demo's local Worker runs its "
                  "Tasks unconfined (sandbox: none in its .taskrun.yaml).", markup=False)
    config_file.write_text(config)
    repo = Git(root)
    repo.run("add", "-A")
    repo.run("-c", "user.name=taskrun demo", "-c", "user.email=demo@localhost",
             "commit", "--quiet", "-m", "Set up taskrun")
    for name, text in DEMO_TASKS.items():
        (root / "tasks" / name).write_text(text)
    repo.run("add", "tasks")
    repo.run("-c", "user.name=taskrun demo", "-c", "user.email=demo@localhost",
             "commit", "--quiet", "-m", "Add demo Tasks")
    out.print(f"{len(DEMO_TASKS)} Tasks in tasks/: one depends on another, one fails, one is broken.\n")
    view = LiveView(out, show_output=True)
    with view:
        Daemon(root, load_config(root), view, once=True).run()
    out.print()
    _rule(out, "result commits (git log)")
    for line in repo.log(6):
        out.print(f"  {clean(line)}", markup=False)
    out.print()
    out.print(f"Records: {root / 'runs'}   (runs/<task>/status.json, runs/<task>/run-1/output.log)", markup=False)
    out.print(f"Try:     cd {root} && taskrun status && taskrun logs build", markup=False)
    return 0
