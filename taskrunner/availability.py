"""Where each Agent can run, and its pauses: what `taskrun agents` shows. Pure.

An Agent is available on a Worker that offers it (`workers.<name>.agents`)
and has its CLI: the Worker's `ready` lists the preset with the CLI's
version (fleet.WorkerState.offered_presets). shell and command need nothing
from the Worker's PATH. An Agent with a configured `path` runs that program,
not the one on PATH: it is "configured" on every Worker that offers it, with
no version (the path is checked when a Run starts), never the PATH CLI's.

One row per Agent (`--json` shape):

    {"name": str, "preset": str, "path": str|None, "model": str|None,
     "workers": [{"worker": str, "online": bool|None,
                  "status": "available"|"configured"|"missing"|"unknown", "version": str|None}],
     "fix": str|None,
     "pauses": [{"agent", "worker", "until", "until_iso", "since", "message"}]}

`status` "unknown": the Worker has not said (it was never online, or no daemon runs).
`fix`: the change that would let the Agent run when no Worker offers it, or when every
Worker that offers it lacks its CLI (the words `taskrun status` uses for a waiting Task).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from taskrunner.defaults import CONFIG_FILE
from taskrunner.model import AgentSpec
from taskrunner.pauses import Pauses


def agent_rows(agents: Mapping[str, AgentSpec], workers: Iterable[Mapping[str, Any]], pauses: Pauses,
               now: float) -> list[dict[str, Any]]:
    """One row per configured Agent; `workers` are Worker views (fleet.WorkerState.view, or the same keys)."""
    workers = list(workers)
    rows = []
    for name, agent in agents.items():
        places = [_place(agent, w) for w in workers if name in (w.get("agents") or [])]
        rows.append({"name": name, "preset": agent.preset, "path": agent.path, "model": agent.model_name,
                     "workers": places, "fix": _fix(agent, places),
                     "pauses": [p.view() for p in pauses.of(name, now)]})
    return rows


def _place(agent: AgentSpec, worker: Mapping[str, Any]) -> dict[str, Any]:
    presets = worker.get("presets")
    entry = presets.get(agent.preset) if isinstance(presets, dict) else None
    if agent.path is not None:
        return {"worker": worker.get("name"), "online": worker.get("online"), "status": "configured",
                "version": None}
    if agent.always_available:
        status = "available"
    elif not isinstance(presets, dict):
        status = "unknown"
    else:
        status = "available" if entry is not None else "missing"
    version = entry.get("version") if isinstance(entry, dict) else None
    return {"worker": worker.get("name"), "online": worker.get("online"), "status": status,
            "version": version if isinstance(version, str) else None}


def _fix(agent: AgentSpec, places: list[dict[str, Any]]) -> str | None:
    if not places:
        return f"add '{agent.name}' to workers.<name>.agents in {CONFIG_FILE}"
    if all(place["status"] == "missing" for place in places):
        return f"install the {agent.preset} CLI on a Worker's PATH or set agents.{agent.name}.path in {CONFIG_FILE}"
    return None
