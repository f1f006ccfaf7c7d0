"""An OpenAI-compatible Chat Completions API, as Aider (through litellm) uses it.

Aider 0.86.2 with `--model openai/<name>` and `OPENAI_API_BASE=<api.url>/v1` POSTs
`/v1/chat/completions` (source: the OpenAI API reference; litellm's openai provider).
With `--no-stream` the body has `stream: false` and the answer is one JSON
`chat.completion`; with streaming it is SSE `chat.completion.chunk` events ending in
`data: [DONE]`.

Aider has no tool calls: the model edits files by writing edit blocks in its text
reply, in the edit format named in Aider's system prompt. A `Tool("write")` step
becomes such a block: a SEARCH/REPLACE block with an empty SEARCH part (the "diff"
formats; it creates the file) or the whole-file listing ("whole", Aider's default for
a model it does not know). A `Tool("shell")` step becomes a fenced ```bash block,
which Aider offers to run. `Say` is plain text. `Cut` streams part of the text and
drops the connection (or, without streaming, sends a truncated JSON body).
"""

from __future__ import annotations

import itertools
import json
import time

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

#: Appears in Aider's system prompt for its SEARCH/REPLACE ("diff", "diff-fenced") formats.
SEARCH_MARK = "<<<<<<< SEARCH"


def _is_main(request: Recorded) -> bool:
    return request.method == "POST" and request.path.rstrip("/").endswith("/chat/completions")


def _system_text(request: Recorded) -> str:
    body = request.body if isinstance(request.body, dict) else {}
    parts = []
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "system":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
            parts.append(str(content or ""))
    return "\n".join(parts)


def edit_block(path: str, content: str, search_replace: bool) -> str:
    """The reply text that makes Aider write `content` to `path`."""
    if not content.endswith("\n"):
        content += "\n"
    if search_replace:
        return f"{path}\n```\n{SEARCH_MARK}\n=======\n{content}>>>>>>> REPLACE\n```\n"
    return f"{path}\n```\n{content}```\n"


def reply_text(step: Say | Tool | Cut, request: Recorded) -> str:
    """The assistant text for a step, in the edit format the request's system prompt asks for."""
    if isinstance(step, (Say, Cut)):
        return step.text
    lead = f"{step.text}\n\n" if step.text else ""
    if step.intent == "write":
        block = edit_block(str(step.args["path"]), str(step.args["content"]),
                           SEARCH_MARK in _system_text(request))
        return lead + block
    if step.intent == "shell":
        return lead + f"```bash\n{step.args['command']}\n```\n"
    raise ValueError(f"unknown tool intent {step.intent!r}")


def _usage(step: Step) -> dict[str, int]:
    usage = usage_of(step)
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens}


def _model(request: Recorded) -> str:
    body = request.body if isinstance(request.body, dict) else {}
    return str(body.get("model") or "gpt-test")


def _answer(api: ModelAPI, request: Request, step: Step | None) -> None:
    """A main turn: a chat.completion (or its chunks when streaming) for a Say, Tool or Cut."""
    del api
    if not isinstance(step, (Say, Tool, Cut)):
        raise TypeError(f"openai_chat cannot answer {step!r}")
    text = reply_text(step, request)
    ident = f"chatcmpl-{next(_ids)}"
    base = {"id": ident, "created": int(time.time()), "model": _model(request)}
    if not request.wants_stream():
        if isinstance(step, Cut):
            whole = json.dumps(dict(base, object="chat.completion", choices=[
                {"index": 0, "message": {"role": "assistant", "content": text}}])).encode()
            request.start_stream("application/json")
            request.write(whole[: len(whole) // 2])
            request.drop()
            return
        request.json(200, dict(base, object="chat.completion", choices=[
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            usage=_usage(step)))
        return
    chunk = dict(base, object="chat.completion.chunk")
    request.start_stream()
    request.sse(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]))
    half = max(1, len(text) // 2)
    for part in (text[:half], text[half:]):
        if part:
            request.sse(dict(chunk, choices=[{"index": 0, "delta": {"content": part},
                                              "finish_reason": None}]))
        if isinstance(step, Cut):
            request.drop()
            return
    request.sse(dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     usage=_usage(step)))
    request.sse("[DONE]")
    request.end_stream()


register(_is_main, _answer)
