"""The Gemini API (generateContent / streamGenerateContent), as Gemini CLI calls it via GOOGLE_GEMINI_BASE_URL.

Wire format: https://ai.google.dev/api/generate-content - POST
`/v1beta/models/{model}:streamGenerateContent?alt=sse` answers Server-Sent
Events whose `data:` is a `GenerateContentResponse` ({candidates: [{content:
{role: "model", parts: [{text} | {functionCall: {name, args}}]}, finishReason}],
usageMetadata: {promptTokenCount, candidatesTokenCount, totalTokenCount},
modelVersion}); `:generateContent` answers one such object.

Intents map to Gemini CLI's own tools: "write" -> write_file{file_path, content}
(file_path made absolute against the workspace announced in the first user
message when relative), "shell" -> run_shell_command{command}.

Main turn: a (stream)generateContent request whose body carries `tools`.
Side requests (no step consumed): generateContent without `tools` (Gemini
CLI's small-model helpers: model routing, next-speaker check, loop detection,
session summary - answered with JSON filling the request's response schema,
or "ok"), `:countTokens`, `:embedContent`, model listing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.modelapi import Cut, ModelAPI, Recorded, Request, Say, Step, Tool, register, usage_of

_GENERATE = re.compile(r"^/v1(?:beta|alpha)?\d*/models/([^/:]+):(stream)?[gG]enerateContent$")

#: Enum values preferred when filling a side request's response schema.
_PREFERRED = ("user", "flash", "false", "no")


def resource_exhausted_body(message: str = "Resource has been exhausted (e.g. check quota).",
                            retry_delay_s: int | None = None) -> dict[str, Any]:
    """The body of a 429 from the Gemini API (status RESOURCE_EXHAUSTED; optional RetryInfo)."""
    error: dict[str, Any] = {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}
    if retry_delay_s is not None:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaMetric":
                             "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                             "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_delay_s}s"}]
    return {"error": error}


def internal_body() -> dict[str, Any]:
    """The body of a 500 from the Gemini API."""
    return {"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}


def _model(request: Recorded) -> str:
    found = _GENERATE.match(request.path)
    return found.group(1) if found else "gemini-2.5-pro"


def _workspace(request: Recorded) -> str | None:
    body = request.body if isinstance(request.body, dict) else {}
    texts: list[str] = []
    system = body.get("systemInstruction")
    if isinstance(system, dict):
        texts.extend(str(p.get("text", "")) for p in system.get("parts") or [] if isinstance(p, dict))
    for content in body.get("contents") or []:
        if isinstance(content, dict):
            texts.extend(str(p.get("text", "")) for p in content.get("parts") or []
                         if isinstance(p, dict))
    for text in texts:
        found = re.search(r"(?:I'm currently working in the directory|working directory is|"
                          r"Current working directory|Workspace directories?)[:\s]*\n?\s*[-*]?\s*"
                          r"(/[^\s`'\"]+)", text)
        if found:
            return found.group(1).rstrip(".:")
    return None


def _call(request: Recorded, step: Tool) -> dict[str, Any]:
    if step.intent == "write":
        path = str(step.args["path"])
        if not path.startswith("/"):
            root = _workspace(request)
            if root:
                path = f"{root.rstrip('/')}/{path}"
        return {"name": "write_file", "args": {"file_path": path, "content": step.args["content"]}}
    if step.intent == "shell":
        return {"name": "run_shell_command",
                "args": {"command": step.args["command"], "description": "run a command"}}
    raise ValueError(f"unknown tool intent {step.intent!r}")


def _response(request: Recorded, parts: list[dict[str, Any]], finish: str | None,
              input_tokens: int, output_tokens: int) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate],
            "usageMetadata": {"promptTokenCount": input_tokens,
                              "candidatesTokenCount": output_tokens,
                              "totalTokenCount": input_tokens + output_tokens},
            "modelVersion": _model(request), "responseId": "resp-modelapi"}


def _parts(request: Recorded, step: Step) -> list[dict[str, Any]]:
    if isinstance(step, Say):
        return [{"text": step.text}]
    if isinstance(step, Tool):
        parts: list[dict[str, Any]] = [{"text": step.text}] if step.text else []
        parts.append({"functionCall": _call(request, step)})
        return parts
    raise TypeError(f"no Gemini answer for {step!r}")


def _answer(request: Request, parts: list[dict[str, Any]], input_tokens: int,
            output_tokens: int) -> None:
    if request.wants_stream():
        request.start_stream()
        request.sse(_response(request, parts, "STOP", input_tokens, output_tokens))
        request.end_stream()
    else:
        request.json(200, _response(request, parts, "STOP", input_tokens, output_tokens))


def _main(api: ModelAPI, request: Request, step: Step | None) -> None:
    assert step is not None
    if isinstance(step, Cut):
        if not request.wants_stream():
            request.cut_body(json.dumps(_response(request, [{"text": step.text}], None, 10, 1)).encode())
            return
        request.start_stream()
        request.sse(_response(request, [{"text": step.text}], None, 10, 1))
        request.drop()
        return
    usage = usage_of(step)
    _answer(request, _parts(request, step), usage.input_tokens, usage.output_tokens)


def _fill(schema: Any) -> Any:
    """A value that satisfies a (JSON or OpenAPI-style) schema, preferring harmless choices."""
    if not isinstance(schema, dict):
        return "ok"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        for preferred in _PREFERRED:
            if preferred in enum:
                return preferred
        return enum[0]
    kind = str(schema.get("type", "object")).lower()
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: _fill(sub) for name, sub in props.items()}
    if kind == "array":
        return []
    if kind in ("number", "integer"):
        low = schema.get("minimum", 0)
        return low if isinstance(low, (int, float)) else 0
    if kind == "boolean":
        return False
    return "ok"


def _is_main(request: Recorded) -> bool:
    body = request.body
    return (request.method == "POST" and bool(_GENERATE.match(request.path))
            and isinstance(body, dict) and bool(body.get("tools")))


def _is_side(request: Recorded) -> bool:
    path = request.path
    return (bool(_GENERATE.match(path)) and not _is_main(request)) or bool(
        re.match(r"^/v1(?:beta|alpha)\d*/models(?:/[^/:]+)?$", path))


def _side(api: ModelAPI, request: Request, step: Step | None) -> None:
    path = request.path
    if path.endswith(":countTokens"):
        request.json(200, {"totalTokens": 100})
        return
    if path.endswith(":embedContent") or path.endswith(":batchEmbedContents"):
        request.json(200, {"embedding": {"values": [0.0] * 8}})
        return
    if not _GENERATE.match(path):
        request.json(200, {"models": []})
        return
    body = request.body if isinstance(request.body, dict) else {}
    config = body.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    text = json.dumps(_fill(schema)) if schema else "ok"
    _answer(request, [{"text": text}], 10, 1)


register(_is_side, _side, side=True)
register(_is_main, _main)
