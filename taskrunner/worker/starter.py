"""Starting one Run's Agent on the Worker: workspace, secrets, the tool's preset, the sandbox, the process.

`start_agent` runs on the session's loop for a Run whose directory is made,
locked (rundir.begin_start) and holds its assignment.json. It checks out the
repository and extracts the bundle into the workspace (gitflow/cache.py,
bundle.py), resolves the Agent's secrets on this Worker (secrets.py), asks
the preset for argv, environment and stdin (agents/), and starts the process
confined (confine.py). An Agent with a stream reader writes its stdout and
stderr to events.jsonl and reads its prompt on stdin (streaming.py renders
output.log); any other writes output.log itself, opened O_APPEND so every
write of the Agent lands at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from taskrunner import agents, bundle, crashpoints, diskspace
from taskrunner.errors import WorkerError
from taskrunner.gitflow.cache import prepare_workspace
from taskrunner.worker import secrets, streaming
from taskrunner.worker.activerun import ActiveRun
from taskrunner.worker.confine import Confinement, agent_environment, missing_program
from taskrunner.worker.rundir import HomeFull


class StartFailed(Exception):
    """The Run's Agent was not started; str() is the reason the Run fails with."""


def start_agent(home: Path, confinement: Confinement, limits: bundle.Limits, run: ActiveRun,
                manifest: dict[str, Any], archive: bytes, pack: bytes = b"") -> None:
    """Start `run`'s Agent: sets run.secrets, run.pump (stream readers) and run.proc.

    Raises StartFailed when something of this one assignment is wrong (a
    prompt template that does not render, a missing CLI, a sandbox that
    cannot be made): that Run fails, not the session. A full Worker home
    (HomeFull, or an OSError diskspace.is_full knows) passes through: the
    caller refuses the Run instead, so it runs elsewhere or later.
    """
    run_dir = run.dir
    names = list(manifest.get("agent", {}).get("env") or [])
    with open(run_dir.output, "ab") as out:
        try:
            checked_out = prepare_workspace(home, run_dir, manifest, pack)
            crashpoints.reached("worker.checkout_done")
            bundle.extract(manifest, archive, run_dir.workspace, limits, overlay=checked_out)
            crashpoints.reached("worker.extracted")
            values = secrets.resolve(names, home)
            run.secrets = secrets.redacted_values(values)
            if run.secrets:
                # A later session masks from this file, whatever its own environment holds.
                secrets.keep(run_dir.path, run.secrets)
            prepared = agents.prepare(manifest["agent"], run_dir.path, run_dir.workspace, manifest)
            env = (agent_environment(run_dir.run_id, manifest["task_id"], run_dir.workspace,
                                     run_dir.agent_home) | dict(prepared.env) | values)
            missing = (missing_program(prepared.argv, env["PATH"], manifest["agent"].get("name"))
                       if prepared.reader is not None else None)
            if missing is not None:
                raise WorkerError(missing)
        except HomeFull:
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and diskspace.is_full(exc):
                raise
            raise StartFailed(str(exc) or type(exc).__name__) from exc
        try:
            # Confined in bwrap, or unconfined where both sides accept it (confine.py); else the Run fails.
            launch = confinement.launch(run_dir, list(prepared.argv), manifest["agent"], manifest["worker"],
                                        inputs=prepared.inputs, home_files=prepared.home_files)
        except (WorkerError, OSError) as exc:
            raise StartFailed(str(exc) or type(exc).__name__) from exc
        env["HOME"] = str(launch.home)
        if agents.TMP_DIR in prepared.home_files:
            env["TMPDIR"] = str(launch.home / agents.TMP_DIR)
        stdout = out.fileno()
        try:
            if prepared.reader is not None:
                stdout = streaming.open_events(run_dir.path)
                run.pump = streaming.Pump(run_dir.path, prepared.reader, run.assignment.get("budget"), run.secrets)
            run.proc = launch.start(run_dir.workspace, env, stdout, prepared.stdin)
            crashpoints.reached("worker.agent_spawned")
        except (OSError, ValueError, TypeError) as exc:
            raise StartFailed(f"cannot start the Agent: {exc}") from exc
        finally:
            launch.close()
            if stdout != out.fileno():
                os.close(stdout)
