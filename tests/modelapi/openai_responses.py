"""The OpenAI Responses API, as Codex (`codex exec`) uses it through a `model_providers` entry.

Codex 0.171.0 with `wire_api = "responses"` and `base_url = <api.url>/v1` POSTs
`/v1/responses` with `stream: true` and reads Server-Sent Events (source:
codex-rs/codex-api/src/sse/responses.rs). The events it acts on, in the order
the real API sends them:

    response.created              {response: {id, ...}}
    response.output_item.added    {item}            an item starts
    response.output_text.delta    {delta}           assistant text, streamed
    response.output_item.done     {item}            the finished item: what Codex keeps
    response.completed            {response: {id, usage}}   ends the turn; without it
                                  Codex reports "stream closed before response.completed"

Items: `message` (role assistant, content [{type: output_text, text}]),
`function_call` {name, arguments (a JSON string), call_id} for its `exec_command`
tool (args {cmd}) or the older `shell` tool (args {command: [argv]}), and
`custom_tool_call` {name: "apply_patch", input, call_id} for its freeform patch tool
(offered for models Codex knows, such as gpt-5.5). Codex answers a tool call with
a new request whose `input` ends with the matching `*_call_output`.

Errors Codex maps specially (codex-rs/codex-api/src/api_bridge.rs): HTTP 429 with
`{"error": {"type": "usage_limit_reached", "resets_at": EPOCH, "plan_type": ...}}`
is a usage limit ("... try again at <time>"); 500 is "internal server error"
(retried per `request_max_retries`). `usage_limit_body` builds that 429 body for a
`Fail` step.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from tests.modelapi import (
    Cut,
    ModelAPI,
    Recorded,
    Request,
    Say,
    Step,
    Tool,
    register,
    usage_of,
)

_ids = itertools.count(1)


def usage_limit_body(resets_at: int, plan_type: str = "plus") -> dict[str, Any]:
    """The 429 body Codex reads as a usage limit; `resets_at` in epoch seconds."""
    return {"error": {"type": "usage_limit_reached", "message": "The usage limit has been reached",
                      "plan_type": plan_type, "resets_at": resets_at}}


def _is_main(request: Recorded) -> bool:
    return request.method == "POST" and request.path.rstrip("/").endswith("/responses")


def _tool_kinds(request: Recorded) -> dict[str, str]:
    """The tools the request offers: name -> its type ("function", "custom", ...)."""
    body = request.body if isinstance(request.body, dict) else {}
    tools = body.get("tools") or []
    return {t.get("name", ""): t.get("type", "") for t in tools if isinstance(t, dict)}


def add_file_patch(path: str, content: str) -> str:
    """An apply_patch document that creates `path` holding `content`."""
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    body = "".join(f"+{line}\n" for line in lines)
    return f"*** Begin Patch\n*** Add File: {path}\n{body}*** End Patch\n"


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _call_item(step: Tool, request: Recorded) -> dict[str, Any]:
    """The output item for a Tool step, in the shape of a tool the request offered."""
    tools = _tool_kinds(request)
    call_id = f"call_{next(_ids)}"
    if step.intent == "write":
        path, content = str(step.args["path"]), str(step.args["content"])
        patch = add_file_patch(path, content)
        if tools.get("apply_patch") == "custom":
            return {"type": "custom_tool_call", "id": f"ctc_{call_id}", "status": "completed",
                    "call_id": call_id, "name": "apply_patch", "input": patch}
        if tools.get("apply_patch") == "function":
            return _function_call(call_id, "apply_patch", {"input": patch})
        command = f"printf %s {_shell_quote(content)} > {_shell_quote(path)}"
    elif step.intent == "shell":
        command = str(step.args["command"])
    else:
        raise ValueError(f"unknown tool intent {step.intent!r}")
    if "exec_command" in tools or "shell" not in tools:
        return _function_call(call_id, "exec_command", {"cmd": command})
    return _function_call(call_id, "shell", {"command": ["bash", "-lc", command]})


def _function_call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call_id}", "status": "completed",
            "call_id": call_id, "name": name, "arguments": json.dumps(args)}


def _message(text: str) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{next(_ids)}", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _usage(step: Step) -> dict[str, Any]:
    usage = usage_of(step)
    return {"input_tokens": usage.input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.input_tokens + usage.output_tokens}


def _model(request: Recorded) -> str:
    body = request.body if isinstance(request.body, dict) else {}
    return str(body.get("model") or "gpt-test")


def _send_text(request: Request, index: int, text: str, cut: bool = False) -> dict[str, Any]:
    """Stream one assistant message item (added, deltas, done); `cut` stops after the deltas."""
    item = _message(text)
    started = dict(item, status="in_progress", content=[])
    request.sse({"type": "response.output_item.added", "output_index": index, "item": started},
                "response.output_item.added")
    half = max(1, len(text) // 2)
    for part in (text[:half], text[half:]):
        if part:
            request.sse({"type": "response.output_text.delta", "item_id": item["id"],
                         "output_index": index, "content_index": 0, "delta": part},
                        "response.output_text.delta")
    if not cut:
        request.sse({"type": "response.output_item.done", "output_index": index, "item": item},
                    "response.output_item.done")
    return item


def _answer(api: ModelAPI, request: Request, step: Step | None) -> None:
    """A main turn: one streamed response for a Say, Tool or Cut step."""
    del api
    response_id = f"resp_{next(_ids)}"
    base = {"id": response_id, "object": "response", "model": _model(request)}
    request.start_stream()
    request.sse({"type": "response.created", "response": dict(base, status="in_progress", output=[])},
                "response.created")
    output: list[dict[str, Any]] = []
    if isinstance(step, Cut):
        _send_text(request, 0, step.text, cut=True)
        request.drop()
        return
    if isinstance(step, Say):
        output.append(_send_text(request, 0, step.text))
    elif isinstance(step, Tool):
        if step.text:
            output.append(_send_text(request, 0, step.text))
        item = _call_item(step, request)
        index = len(output)
        request.sse({"type": "response.output_item.added", "output_index": index, "item": item},
                    "response.output_item.added")
        request.sse({"type": "response.output_item.done", "output_index": index, "item": item},
                    "response.output_item.done")
        output.append(item)
    else:
        raise TypeError(f"openai_responses cannot answer {step!r}")
    request.sse({"type": "response.completed",
                 "response": dict(base, status="completed", output=output, usage=_usage(step))},
                "response.completed")
    request.end_stream()


def _models(api: ModelAPI, request: Request, step: Step | None) -> None:
    """GET /v1/models: an empty catalogue (Codex then uses its bundled model metadata)."""
    del api, step
    request.json(200, {"object": "list", "data": [], "models": []})


def _is_models(request: Recorded) -> bool:
    return request.method == "GET" and request.path.rstrip("/") == "/v1/models"


register(_is_main, _answer)
register(_is_models, _models, side=True)
