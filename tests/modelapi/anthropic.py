"""The Anthropic Messages API (POST /v1/messages), as Claude Code calls it through ANTHROPIC_BASE_URL.

Wire format: https://docs.anthropic.com/en/api/messages-streaming - a stream is
`message_start`, per content block `content_block_start` / `content_block_delta`
(`text_delta`, `input_json_delta`) / `content_block_stop`, then `message_delta`
(stop_reason, output usage) and `message_stop`.

Intents map to Claude Code's own tools: "write" -> Write{file_path, content}
(file_path made absolute against the CLI's cwd when relative: Write requires
an absolute path, and the cwd is read from the `<env>` block of the system
prompt), "shell" -> Bash{command}.

Side requests (no step consumed):
- POST /v1/messages/count_tokens -> {"input_tokens": N}
- POST /v1/messages without `tools` (Claude Code's small-model calls: session
  title / topic detection, the quota probe with max_tokens 1) -> a short text
  answer in the shape asked for (stream or not)
- GET /v1/models..., anything under /api/ (telemetry, client data, settings)
  -> an empty JSON answer
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from tests.modelapi import Cut, ModelAPI, Recorded, Request, Say, Step, Tool, register, usage_of

#: Header names the real API sends on a rate-limited request (used by tests to build a Fail).
RATE_LIMIT_HEADERS = ("retry-after", "anthropic-ratelimit-unified-status",
                      "anthropic-ratelimit-unified-reset")


def rate_limit_body(message: str = "This request would exceed your account's rate limit. "
                    "Please try again later.") -> dict[str, Any]:
    """The body of a 429 from the Messages API (type rate_limit_error)."""
    return {"type": "error", "error": {"type": "rate_limit_error", "message": message}}


def unified_limit_headers(resets_at: int, window: str = "5h") -> dict[str, str]:
    """The headers of a subscription usage-limit 429: unified status rejected, reset at `resets_at` (epoch s).

    Claude Code reads these (and only on a subscription login: CLAUDE_CODE_OAUTH_TOKEN)
    into a `rate_limit_event` {status: rejected, resetsAt, rateLimitType} and the text
    "You've hit your 5-hour limit · resets <time>".
    """
    return {"retry-after": str(max(0, resets_at - int(time.time()))),
            "anthropic-ratelimit-unified-status": "rejected",
            "anthropic-ratelimit-unified-reset": str(resets_at),
            f"anthropic-ratelimit-unified-{window}-status": "rejected",
            f"anthropic-ratelimit-unified-{window}-reset": str(resets_at),
            "anthropic-ratelimit-unified-representative-claim":
                {"5h": "five_hour", "7d": "seven_day"}.get(window, window)}


def overloaded_body() -> dict[str, Any]:
    """The body of a 529/500 from the Messages API."""
    return {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}


def _model(request: Recorded) -> str:
    body = request.body if isinstance(request.body, dict) else {}
    return str(body.get("model") or "claude-sonnet-4-5")


def _cwd(request: Recorded) -> str | None:
    """The working directory Claude Code announces in its system prompt (`Working directory: ...`)."""
    body = request.body if isinstance(request.body, dict) else {}
    system = body.get("system")
    texts: list[str] = []
    if isinstance(system, str):
        texts.append(system)
    elif isinstance(system, list):
        texts.extend(str(block.get("text", "")) for block in system if isinstance(block, dict))
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(b.get("text", "")) for b in content if isinstance(b, dict))
    for text in texts:
        found = re.search(r"(?:Primary working directory|Working directory): *(\S+)", text)
        if found:
            return found.group(1)
    return None


def _tool_call(request: Recorded, step: Tool) -> tuple[str, dict[str, Any]]:
    if step.intent == "write":
        path = str(step.args["path"])
        if not path.startswith("/"):
            cwd = _cwd(request)
            if cwd:
                path = f"{cwd.rstrip('/')}/{path}"
        return "Write", {"file_path": path, "content": step.args["content"]}
    if step.intent == "shell":
        return "Bash", {"command": step.args["command"], "description": "run a command"}
    raise ValueError(f"unknown tool intent {step.intent!r}")


def _blocks(request: Recorded, step: Step) -> tuple[list[dict[str, Any]], str]:
    """The content blocks of the answer and its stop_reason."""
    if isinstance(step, Say):
        return [{"type": "text", "text": step.text}], "end_turn"
    if isinstance(step, Tool):
        blocks: list[dict[str, Any]] = []
        if step.text:
            blocks.append({"type": "text", "text": step.text})
        name, args = _tool_call(request, step)
        blocks.append({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                       "name": name, "input": args})
        return blocks, "tool_use"
    raise TypeError(f"no Messages answer for {step!r}")


def _message(request: Recorded, blocks: list[dict[str, Any]], stop: str | None,
             input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": _model(request), "content": blocks, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def _stream(request: Request, blocks: list[dict[str, Any]], stop: str, input_tokens: int,
            output_tokens: int) -> None:
    request.start_stream(headers={"request-id": f"req_{uuid.uuid4().hex[:24]}"})
    start = _message(request, [], None, input_tokens, 1)
    request.sse({"type": "message_start", "message": start}, "message_start")
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            request.sse({"type": "content_block_start", "index": index,
                         "content_block": {"type": "text", "text": ""}}, "content_block_start")
            request.sse({"type": "content_block_delta", "index": index,
                         "delta": {"type": "text_delta", "text": block["text"]}},
                        "content_block_delta")
        else:
            request.sse({"type": "content_block_start", "index": index,
                         "content_block": {"type": "tool_use", "id": block["id"],
                                           "name": block["name"], "input": {}}},
                        "content_block_start")
            request.sse({"type": "content_block_delta", "index": index,
                         "delta": {"type": "input_json_delta",
                                   "partial_json": json.dumps(block["input"])}},
                        "content_block_delta")
        request.sse({"type": "content_block_stop", "index": index}, "content_block_stop")
    request.sse({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                 "usage": {"output_tokens": output_tokens}}, "message_delta")
    request.sse({"type": "message_stop"}, "message_stop")
    request.end_stream()


def _answer(request: Request, step: Step) -> None:
    if isinstance(step, Cut) and not request.wants_stream():
        request.cut_body(json.dumps(_message(request, [{"type": "text", "text": step.text}],
                                              "end_turn", 10, 1)).encode())
        return
    if isinstance(step, Cut):
        request.start_stream()
        start = _message(request, [], None, 10, 1)
        request.sse({"type": "message_start", "message": start}, "message_start")
        request.sse({"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}}, "content_block_start")
        request.sse({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": step.text}}, "content_block_delta")
        request.drop()
        return
    blocks, stop = _blocks(request, step)
    usage = usage_of(step)
    if request.wants_stream():
        _stream(request, blocks, stop, usage.input_tokens, usage.output_tokens)
    else:
        request.json(200, _message(request, blocks, stop, usage.input_tokens, usage.output_tokens))


def _is_main_turn(request: Recorded) -> bool:
    body = request.body
    return (request.method == "POST" and request.path == "/v1/messages"
            and isinstance(body, dict) and bool(body.get("tools")))


def _is_side_messages(request: Recorded) -> bool:
    return request.path.startswith("/v1/messages") and not _is_main_turn(request)


def _is_side_other(request: Recorded) -> bool:
    if request.path.startswith("/v1/models"):
        return "anthropic-version" in request.headers
    return request.path.startswith("/api/")


def _side_messages(api: ModelAPI, request: Request, step: Step | None) -> None:
    if request.path.endswith("/count_tokens"):
        request.json(200, {"input_tokens": 100})
        return
    body = request.body if isinstance(request.body, dict) else {}
    text = '{"isNewTopic": false, "title": null}' if "isNewTopic" in json.dumps(body) else "ok"
    blocks = [{"type": "text", "text": text}]
    if request.wants_stream():
        _stream(request, blocks, "end_turn", 10, 1)
    else:
        request.json(200, _message(request, blocks, "end_turn", 10, 1))


def _side_other(api: ModelAPI, request: Request, step: Step | None) -> None:
    if request.path.startswith("/v1/models"):
        request.json(200, {"data": [], "has_more": False, "first_id": None, "last_id": None})
        return
    request.json(200, {})


def _main(api: ModelAPI, request: Request, step: Step | None) -> None:
    assert step is not None
    _answer(request, step)


register(_is_side_messages, _side_messages, side=True)
register(_is_side_other, _side_other, side=True)
register(_is_main_turn, _main)
