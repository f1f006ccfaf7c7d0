"""`taskrun demo`: a tour in a temporary repository, on the embedded local Worker."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.rule import Rule

from taskrunner import control, gitops
from taskrunner.cli.render import LiveView
from taskrunner.config import load_config
from taskrunner.links.local import default_home
from taskrunner.daemon import Daemon
from taskrunner.defaults import LOCAL_WORKER
from taskrunner.errors import GitError, TaskrunError
from taskrunner.gitflow import hooks
from taskrunner.gitops import state_dir
from taskrunner.model import TaskStatus
from taskrunner.project import init_repository
from taskrunner.records import Records
from taskrunner.textsafe import clean
from taskrunner.worker.confine import Confinement

#: The demo Task whose Agent changes a file; its change comes back on this branch.
RESULT_BRANCH = "taskrun/greeting"
#: The most the demo waits for any one step (it takes under 30 s in all).
DEMO_DEADLINE_SECONDS = 60
FINAL = {s.value for s in TaskStatus if s.final}
README = "# A project\n\nThe taskrun demo's repository.\n"

DEMO_TASKS = {
    "greeting.md": """# Add a greeting to the README

An Agent's change comes back as a commit on taskrun/greeting, ready for a pull request.

```sh
printf '\\nHello from an Agent, in a checkout of %s.\\n' "$(git rev-parse --short HEAD)" >> README.md
git diff --stat
```
""",
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
    """The whole loop (README "The git workflow"): a Task pushed to an origin starts a Run, the
    Agent's change comes back as a branch, the records land on the origin's main branch.

    Three repositories in a temporary directory: `origin.git` (bare, with the post-receive hook
    `taskrun hooks install` writes), `clone` (the daemon's, `git.push: true`) and `you` (a user's).
    """
    base = Path(tempfile.mkdtemp(prefix="taskrun-demo-"))
    # The local Worker's home (links/local.py default_home) stays inside the demo's directory too.
    os.environ["XDG_STATE_HOME"] = str(base / "state")
    origin, clone, you = base / "origin.git", base / "clone", base / "you"
    _rule(out, "taskrun demo")
    out.print(f"In {base}: origin.git (a bare origin), clone (the daemon's), you (your clone), state (its local "
              "Worker's home)", markup=False)
    _git(base, "init", "--quiet", "--bare", "--initial-branch=main", str(origin))
    _git(base, "clone", "--quiet", str(origin), str(clone))
    init_repository(clone)
    _configure(clone, out)
    (clone / "README.md").write_text(README)
    _git(clone, "add", "-A")
    _git(clone, "commit", "--quiet", "-m", "Set up taskrun")
    _git(clone, "push", "--quiet", "origin", "HEAD:refs/heads/main")
    hooks.install(hooks.bare_git_dir(origin), "post-receive",
                  hooks.post_receive_script(clone, hooks.taskrun_command()))
    out.print("taskrun hooks install origin.git: a push to the origin makes the clone's daemon sync.\n", markup=False)
    daemon = Daemon(clone, load_config(clone), view := LiveView(out, show_output=True))
    pushed: list[str] = []
    failed: list[BaseException] = []
    user = threading.Thread(target=_as_a_user, args=(daemon, origin, clone, you, pushed, failed),
                            name="demo-user", daemon=True)
    with view:
        user.start()
        daemon.run()
    user.join(timeout=5)
    out.print()
    for line in pushed:
        out.print(clean(line), markup=False)
    if failed:
        out.print(f"The demo did not finish: {clean(str(failed[0]))}", markup=False)
        return 1
    _git(you, "fetch", "--quiet", "origin")
    _rule(out, f"the Agent's change: origin's {RESULT_BRANCH} (git log -p)")
    for line in _git(you, "log", "-p", "--format=%h %s%n%n%b", f"origin/main..origin/{RESULT_BRANCH}").splitlines():
        out.print(f"  {clean(line)}", markup=False)
    summary = clone / "runs" / "greeting" / "run-1" / "summary.md"
    _rule(out, "its pull request body: runs/greeting/run-1/summary.md")
    for line in summary.read_text(errors="replace").splitlines()[:14]:
        out.print(f"  {clean(line)}", markup=False)
    _rule(out, "the records on origin's main (git log)")
    for line in _git(you, "log", "--format=%h %s", "-6", "origin/main").splitlines():
        out.print(f"  {clean(line)}", markup=False)
    out.print()
    out.print(f"Try:     cd {you} && git pull && git log origin/{RESULT_BRANCH}", markup=False)
    out.print(f"         cd {clone} && taskrun status && taskrun logs build", markup=False)
    return 0


def _configure(clone: Path, out: Console) -> None:
    config_file = clone / ".taskrun.yaml"
    config = (config_file.read_text().replace("groups: {}", "groups: {checks: {parallel: 1}}")
              .replace("  push: false\n", "  push: true\n"))
    sandbox = Confinement(default_home(state_dir(clone), LOCAL_WORKER), protect=[clone]).status()
    if sandbox.kind is None:
        # The tour must run on a fresh machine: its own throwaway Tasks may run unconfined; yours do not.
        config = config.replace("    sandbox: bwrap\n", "    sandbox: none\n")
        out.print(f"No sandbox on this machine ({sandbox.reason}), so the demo's local Worker runs its "
                  "Tasks unconfined (sandbox: none in its .taskrun.yaml).", markup=False)
    config_file.write_text(config)


def _as_a_user(daemon: Daemon, origin: Path, clone: Path, you: Path, said: list[str],
               failed: list[BaseException]) -> None:
    """Push the demo's Tasks from a clone of the user's, then stop the daemon once all is on the origin."""
    try:
        _until(lambda: _answers(daemon), "the daemon to start")
        _git(you.parent, "clone", "--quiet", str(origin), str(you))
        for name, text in DEMO_TASKS.items():
            (you / "tasks" / name).write_text(text)
        _git(you, "add", "tasks")
        _git(you, "commit", "--quiet", "-m", "Add the demo's Tasks")
        pushed = subprocess.run(gitops.command("-C", str(you), "push", "origin", "main"), capture_output=True,
                                text=True, env=_demo_env())
        if pushed.returncode != 0:
            raise RuntimeError(f"git push failed: {pushed.stderr.strip()}")
        said.append(f"You pushed {len(DEMO_TASKS)} Tasks to origin.git; its post-receive hook told the daemon.")
        records = Records(clone)
        ids = [name.removesuffix(".md") for name in DEMO_TASKS]

        def settled() -> bool:
            done = [records.load_task(i) for i in ids]
            return all(t is not None and t["status"] in FINAL for t in done)

        _until(settled, "every Task to reach a final status")
        # The records of every Task, and the result branch, pushed to the origin.
        _until(lambda: _on_origin(origin, ids), "the records and the result branch on the origin")
    except BaseException as exc:  # reported by run_demo after the daemon stopped
        failed.append(exc)
    finally:
        daemon.request_stop()


def _answers(daemon: Daemon) -> bool:
    try:
        return bool(control.request(daemon.state_dir, {"command": "ping"}).get("ok"))
    except TaskrunError:
        return False


def _on_origin(origin: Path, ids: list[str]) -> bool:
    try:
        names = _git(origin, "ls-tree", "-r", "--name-only", "main", "runs").splitlines()
        _git(origin, "rev-parse", "--verify", "--quiet", f"refs/heads/{RESULT_BRANCH}")
    except GitError:
        return False
    return all(f"runs/{i}/status.json" in names for i in ids)


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEMO_DEADLINE_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {DEMO_DEADLINE_SECONDS}s for {what}")
        time.sleep(0.1)


def _git(where: Path, *args: str) -> str:
    done = subprocess.run(gitops.command(*args), cwd=where, capture_output=True, text=True, env=_demo_env())
    if done.returncode != 0:
        raise GitError(f"git {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _demo_env() -> dict[str, str]:
    """The user's environment without git's own variables, with an identity for the demo's commits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**env, "GIT_AUTHOR_NAME": "taskrun demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
            "GIT_COMMITTER_NAME": "taskrun demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}
