"""An Agent on the wire: what an assignment says about it, and what a result reports back.

Out (control plane -> Worker, signed into the bundle's manifest):

    agent   {name, preset, command, env, sandbox, path, model, max_budget_usd, permission_mode,
             allowed_tools, disallowed_tools, append_system_prompt, approval_mode, sandbox_mode,
             extra_args, backend: {provider, model, context_window, base_url} | None,
             prices: {input, output, cache_read, cache_write} | None, prompt_template, pause_scope}
    budget  {max_turns: int|None, max_cost_usd: float|None}   (the Task's front matter over the Agent's)

In (the Worker's signed result; README "Records"): `report`, `usage_limit` and
`events`. A signature says which Worker sent them, not that they are sane: the
Agent's tool wrote them, so every field is type-checked and cut to size here
(`run_report`, `usage_limit`), and anything malformed counts as not reported.
The `result` payload is the change pack followed by the events bytes
(`split_payload`).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Mapping

from taskrunner.agents.stream import Report
from taskrunner.model import AgentSpec, Prices, TaskSpec

#: The Agent's final message is kept up to this many bytes (UTF-8).
MAX_FINAL_MESSAGE_BYTES = 16 * 1024
#: The events.jsonl a Worker ships is at most this large.
MAX_EVENTS_BYTES = 16 * 1024 * 1024
#: Short reported texts (provider, model, CLI version, session id, a limit's message) are cut at this.
MAX_FIELD_CHARS = 200
#: At most this many token counters are kept in `usage`.
MAX_USAGE_KEYS = 32
#: A reported cost is recorded rounded to this many decimals (USD): 0.0012000000000000001 -> 0.0012.
COST_DECIMALS = 6
_SHA256_HEX = frozenset("0123456789abcdef")


def agent_manifest(agent: AgentSpec, sandbox: str, prices: Mapping[str, Prices]) -> dict[str, Any]:
    """`manifest["agent"]` for a Run of `agent` on a Worker whose `sandbox` setting is given.

    `prices` is the configuration's price table: the entry for the Agent's model goes along, so the
    Worker can estimate a cost its tool does not report.
    """
    model = agent.model_name
    price = prices.get(model) if model else None
    return {
        "name": agent.name, "preset": agent.preset, "command": list(agent.command), "env": list(agent.env),
        "sandbox": sandbox, "path": agent.path, "model": model, "max_budget_usd": agent.max_budget_usd,
        "permission_mode": agent.permission_mode, "allowed_tools": list(agent.allowed_tools),
        "disallowed_tools": list(agent.disallowed_tools), "append_system_prompt": agent.append_system_prompt,
        "approval_mode": agent.approval_mode, "sandbox_mode": agent.sandbox_mode,
        "extra_args": list(agent.extra_args),
        "backend": agent.backend.as_manifest() if agent.backend else None,
        "prices": price.as_manifest() if price else None,
        "prompt_template": agent.prompt_template, "pause_scope": agent.pause_scope,
    }


def budget(spec: TaskSpec, agent: AgentSpec) -> dict[str, Any]:
    """`manifest["budget"]`: the Task's front matter over the Agent's configuration."""
    return {
        "max_turns": spec.max_turns if spec.max_turns is not None else agent.max_turns,
        "max_cost_usd": spec.max_cost_usd if spec.max_cost_usd is not None else agent.max_cost_usd,
    }


def run_report(value: Any) -> Report | None:
    """The result's `report` as a Report; None when there is none or it is not a mapping."""
    if not isinstance(value, dict):
        return None
    cost = value.get("cost_usd")
    return Report(
        provider=_text(value.get("provider")), model=_text(value.get("model")),
        cli_version=_text(value.get("cli_version")), session_id=_text(value.get("session_id")),
        turns=_count(value.get("turns")),
        cost_usd=round(float(cost), COST_DECIMALS) if _number(cost) else None,
        cost_estimated=value.get("cost_estimated") is True,
        usage=_usage(value.get("usage")),
        final_message=_final_message(value.get("final_message")),
    )


def usage_limit(value: Any) -> dict[str, Any] | None:
    """The result's `usage_limit` as {resets_at: float|None, message: str}; None when absent or malformed."""
    if not isinstance(value, dict):
        return None
    resets_at = value.get("resets_at")
    message = value.get("message")
    return {"resets_at": float(resets_at) if _number(resets_at) else None,
            "message": _text(message) or ""}


def backend_used(configured: Mapping[str, Any] | None, report: Report | None) -> dict[str, Any] | None:
    """`backend_used` {provider, model, context_window, cli_version}: the configured backend, the provider
    and model the tool reports winning; None when neither says anything."""
    if configured is None and report is None:
        return None
    used: dict[str, Any] = {"provider": None, "model": None, "context_window": None, **(configured or {}),
                            "cli_version": None}
    if report is not None:
        used["provider"] = report.provider or used["provider"]
        used["model"] = report.model or used["model"]
        used["cli_version"] = report.cli_version
    return used


def version_number(line: Any) -> str | None:
    """The version in a `--version` line, as the tools' streams report theirs: "codex-cli 0.171.0" ->
    "0.171.0", "2.1.332 (Claude Code)" -> "2.1.332"; the line itself when it holds none, None for no text."""
    if not isinstance(line, str) or not line.strip():
        return None
    found = re.search(r"\d+(?:\.\d+)+(?:[-+][0-9A-Za-z.]+)?", line)
    return found.group(0) if found else line.strip()


def split_payload(payload: bytes, events: Any) -> tuple[bytes, bytes | None, str | None]:
    """(change pack, events bytes or None, notice or None) from a `result` payload.

    `events` is the signed {size, sha256}. A malformed one or a digest that does not match leaves the
    events out, with a notice saying why; the Run's status stands.
    """
    if events is None:
        return payload, None, None
    size = events.get("size") if isinstance(events, dict) else None
    digest = events.get("sha256") if isinstance(events, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= min(len(payload), MAX_EVENTS_BYTES) \
            or not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
        return payload, None, "its events.jsonl is not recorded: the result describes it wrongly"
    pack, data = payload[:len(payload) - size], payload[len(payload) - size:]
    if hashlib.sha256(data).hexdigest() != digest:
        return pack, None, "its events.jsonl is not recorded: the bytes do not match the digest the Worker signed"
    return pack, data, None


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    clean = "".join(c if c.isprintable() else " " for c in value).strip()
    return clean[:MAX_FIELD_CHARS] or None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 53 else None


def _usage(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    usage: dict[str, int] = {}
    for key, count in value.items():
        if len(usage) >= MAX_USAGE_KEYS:
            break
        if isinstance(key, str) and 0 < len(key) <= 64 and key.isprintable() and _count(count) is not None:
            usage[key] = count
    return usage or None


def _final_message(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    data = value.encode("utf-8", errors="replace")
    if len(data) <= MAX_FINAL_MESSAGE_BYTES:
        return value
    marker = "\n[… cut at 16 KiB]"
    keep = MAX_FINAL_MESSAGE_BYTES - len(marker.encode())
    return data[:keep].decode("utf-8", errors="ignore") + marker
