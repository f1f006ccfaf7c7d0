"""The real Codex and Aider CLIs against the scripted OpenAI-style model API (no taskrun yet).

Codex (`codex exec --json`) talks the Responses API through a `model_providers` entry
given with `-c` overrides; Aider talks Chat Completions through litellm
(`--model openai/<name>`, OPENAI_API_BASE). Only the model is stood in: the CLIs
really write files, run commands and report errors the way they do for users. The
streams captured from the same recipes are in tests/fixtures/streams/codex-*.jsonl
and aider-*.txt.

The CLIs missing is a failure that says how to install them, never a skip.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.modelapi import Cut, Fail, ModelAPI, Say, Tool, Usage, iter_sse
from tests.modelapi.openai_responses import usage_limit_body

#: The tests that run a real CLI.
cli = pytest.mark.agentcli

#: A model slug Codex 0.171.0 knows (bundled metadata): it then offers apply_patch.
CODEX_MODEL = "gpt-5.5"
#: The model name Aider is given; litellm's "openai/" prefix routes it to OPENAI_API_BASE.
AIDER_MODEL = "openai/gpt-test"
#: USD per token for AIDER_MODEL, so Aider prints its "Cost:" figures (litellm model info).
AIDER_PRICES = {"input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06}
API_KEY = "sk-test-openai-0123456789"
CLI_TIMEOUT = 60.0

INSTALL_CODEX = "install it with: npm install -g @openai/codex@0.171.0"
INSTALL_AIDER = ("install it with: python3 -m venv /opt/aider && "
                 "/opt/aider/bin/pip install aider-chat==0.86.2")


def codex_program() -> str:
    """The codex executable on PATH; fails the test (never skips) when it is missing."""
    found = shutil.which("codex")
    if found is None:
        pytest.fail(f"codex is not on PATH; {INSTALL_CODEX}")
    return found


def aider_program() -> str:
    """The aider executable ($AIDER, /opt/aider/bin/aider or PATH); fails when missing."""
    for candidate in (os.environ.get("AIDER"), "/opt/aider/bin/aider", shutil.which("aider")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"aider is not installed; {INSTALL_AIDER}")


def codex_argv(api: ModelAPI, model: str = CODEX_MODEL, extra: tuple[str, ...] = ()) -> list[str]:
    """`codex exec` headless against `api`: JSON lines on stdout, the prompt on stdin ("-")."""
    provider = "model_providers.scripted"
    return [codex_program(), "exec", "--json", "--skip-git-repo-check", "--strict-config",
            "--sandbox", "workspace-write", "-m", model,
            "-c", 'model_provider="scripted"',
            "-c", f'{provider}.name="scripted"',
            "-c", f'{provider}.base_url="{api.url}/v1"',
            "-c", f'{provider}.wire_api="responses"',
            "-c", f'{provider}.env_key="SCRIPTED_API_KEY"',
            "-c", f"{provider}.request_max_retries=0",
            "-c", f"{provider}.stream_max_retries=0",
            "-c", "analytics.enabled=false", "-c", "feedback.enabled=false",
            "-c", 'history.persistence="none"', *extra,
            "-"]


def codex_env(root: Path) -> dict[str, str]:
    """A fresh HOME under `root`, and TMPDIR beside it.

    Codex refuses to lay its sandbox helpers into a CODEX_HOME under the temp dir
    (and then every tool call fails), so TMPDIR must not contain HOME.
    """
    home, tmp = root / "home", root / "tmpdir"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    tmp.mkdir(exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(tmp),
            "LANG": "C.UTF-8", "SCRIPTED_API_KEY": API_KEY}


def aider_argv(message_file: Path, state: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Aider headless: one message from a file, no commits, plain output, no network but the API."""
    metadata = state / "model-metadata.json"
    metadata.write_text(json.dumps({AIDER_MODEL: {
        **AIDER_PRICES, "max_input_tokens": 128000, "max_output_tokens": 16384, "max_tokens": 16384,
        "litellm_provider": "openai", "mode": "chat"}}))
    return [aider_program(), "--message-file", str(message_file), "--yes-always",
            "--no-auto-commits", "--no-pretty", "--no-stream", "--model", AIDER_MODEL,
            "--no-check-update", "--no-show-release-notes", "--no-analytics", "--no-gitignore",
            "--no-show-model-warnings", "--no-fancy-input", "--no-detect-urls",
            "--model-metadata-file", str(metadata),
            "--chat-history-file", str(state / "chat.md"),
            "--input-history-file", str(state / "input.txt"),
            "--map-tokens", "0", *extra]


def aider_env(api: ModelAPI, root: Path) -> dict[str, str]:
    """A fresh HOME; litellm kept from fetching its price table from the network."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "OPENAI_API_BASE": f"{api.url}/v1", "OPENAI_API_KEY": API_KEY,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "4000"}


def workspace(root: Path) -> Path:
    """A git checkout with one commit, as the Worker gives an Agent."""
    path = root / "ws"
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.org",
                    "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    return path


class Running:
    """A CLI in its own process group; stdout read line by line on a thread.

    stderr goes to `stderr_path` when given, else it is merged into stdout.
    """

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], stdin: Path | None,
                 stderr_path: Path | None = None) -> None:
        with open(stdin or os.devnull, "rb") as stdin_file, \
                open(stderr_path or os.devnull, "wb") as stderr_file:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=stdin_file, stdout=subprocess.PIPE,
                stderr=stderr_file if stderr_path else subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def until(self, predicate: Callable[[list[str]], bool], timeout: float = CLI_TIMEOUT) -> bool:
        """Collect lines until `predicate(lines)` holds (True) or the output ends (False)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise AssertionError(f"timed out after {timeout}s; output so far:\n"
                                     + "\n".join(self.lines[-40:]))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                return predicate(self.lines)
            self.lines.append(line)
        return True

    def finish(self, timeout: float = CLI_TIMEOUT) -> int:
        """All the output, then the exit code."""
        self.until(lambda _: False, timeout)
        code = self.proc.wait(timeout=timeout)
        self._thread.join(timeout=timeout)
        return code

    def stop(self) -> None:
        """Kill the CLI's process group (as the Worker stops a Run)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._thread.join(timeout=10)


def run_codex(api: ModelAPI, root: Path, prompt: str = "Create hello.txt holding hi.",
              model: str = CODEX_MODEL, extra: tuple[str, ...] = ()) -> Running:
    """codex exec in `root`/ws (made when missing); stderr to `root`/codex.stderr."""
    prompt_file = root / "prompt.md"
    prompt_file.write_text(prompt)
    env = codex_env(root)
    ws = root / "ws" if (root / "ws").exists() else workspace(root)
    return Running(codex_argv(api, model, extra), ws, env, prompt_file, root / "codex.stderr")


def run_aider(api: ModelAPI, root: Path, prompt: str = "Create hello.txt holding hi.",
              extra: tuple[str, ...] = ()) -> Running:
    """aider in `root`/ws (made when missing); stdout and stderr merged, as the Worker records it."""
    state = root / "aider-state"
    state.mkdir(parents=True, exist_ok=True)
    message = root / "prompt.md"
    message.write_text(prompt)
    ws = root / "ws" if (root / "ws").exists() else workspace(root)
    return Running(aider_argv(message, state, extra), ws, aider_env(api, root), None)


def events(lines: list[str]) -> list[dict]:
    """The JSON events of a codex stdout (every line must be one)."""
    return [json.loads(line) for line in lines if line.strip()]


def kinds(stream: list[dict]) -> list[str]:
    """Event types, with the item type for item events: "item.completed:file_change"."""
    return [f"{e['type']}:{e['item']['type']}" if "item" in e else e["type"] for e in stream]


@pytest.fixture
def api() -> Iterator[ModelAPI]:
    with ModelAPI() as server:
        yield server
        assert server.errors == []


# -- codex --------------------------------------------------------------------------------------

@cli
def test_codex_writes_a_file_with_apply_patch_and_reports_usage(api: ModelAPI, tmp_path: Path) -> None:
    api.script(Tool("write", {"path": "hello.txt", "content": "hi\n"}, usage=Usage(1200, 30)),
               Say("Created hello.txt.", usage=Usage(1300, 10)))
    running = run_codex(api, tmp_path)
    assert running.finish() == 0
    assert (tmp_path / "ws" / "hello.txt").read_text() == "hi\n"
    assert (tmp_path / "codex.stderr").read_text() == ""   # no "Refusing to create helper binaries"
    stream = events(running.lines)
    assert kinds(stream) == ["thread.started", "turn.started", "item.started:file_change",
                             "item.completed:file_change", "item.completed:agent_message",
                             "turn.completed"]
    change = stream[3]["item"]
    assert change["status"] == "completed"
    assert change["changes"] == [{"path": str(tmp_path / "ws" / "hello.txt"), "kind": "add"}]
    assert stream[4]["item"]["text"] == "Created hello.txt."
    usage = stream[-1]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (2500, 40)  # summed over the turn
    main = api.main_requests
    assert [r.path for r in main] == ["/v1/responses", "/v1/responses"]
    assert main[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert main[0].body["stream"] is True and main[0].body["model"] == CODEX_MODEL
    assert main[1].body["input"][-1]["type"] == "custom_tool_call_output"


@cli
def test_codex_keeps_calling_its_shell_until_stopped(api: ModelAPI, tmp_path: Path) -> None:
    api.script(Tool("shell", {"command": "echo again >> runs.txt"}, text="Once more."))
    running = run_codex(api, tmp_path)
    try:
        def three_commands(lines: list[str]) -> bool:
            return kinds(events(lines)).count("item.completed:command_execution") >= 3
        assert running.until(three_commands), "codex stopped calling the shell on its own"
    finally:
        running.stop()
    stream = events(running.lines)
    done = [e["item"] for e in stream if e["type"] == "item.completed"
            and e["item"]["type"] == "command_execution"]
    assert done[0]["command"] == "/bin/bash -lc 'echo again >> runs.txt'"
    assert done[0]["exit_code"] == 0 and done[0]["status"] == "completed"
    assert "turn.completed" not in kinds(stream)            # one turn, never ended by codex
    assert (tmp_path / "ws" / "runs.txt").read_text().count("again") >= 3


@cli
def test_codex_usage_limit_says_when_to_try_again(api: ModelAPI, tmp_path: Path) -> None:
    resets_at = int(time.time()) + 3 * 86400
    api.script(Fail(429, usage_limit_body(resets_at)))
    running = run_codex(api, tmp_path)
    assert running.finish() == 1
    stream = events(running.lines)
    assert kinds(stream) == ["thread.started", "turn.started", "error", "turn.failed"]
    message = stream[-1]["error"]["message"]
    assert stream[2]["message"] == message
    assert message.startswith("You\u2019ve hit your usage limit.")
    day = datetime.fromtimestamp(resets_at, timezone.utc).day        # TZ unset: UTC
    reset = datetime.fromtimestamp(resets_at, timezone.utc).strftime(f"%b {day}")
    assert f"try again at {reset}" in message, message
    assert len(api.main_requests) == 1                                # not retried


@cli
def test_codex_usage_limit_without_a_reset_time(api: ModelAPI, tmp_path: Path) -> None:
    api.script(Fail(429, {"error": {"type": "usage_limit_reached", "plan_type": "plus"}}))
    running = run_codex(api, tmp_path)
    assert running.finish() == 1
    message = events(running.lines)[-1]["error"]["message"]
    assert "usage limit" in message and message.endswith("try again later.")


@cli
@pytest.mark.parametrize("step, message", [
    (Fail(500, {"error": {"type": "server_error", "message": "boom"}}),
     "We\u2019re currently experiencing high demand, which may cause temporary errors."),
    (Cut("I will write the fi"),
     ("stream disconnected before completion: Transport error: network error: "
      "error decoding response body")),
    (Fail(429, {"error": {"type": "rate_limit_exceeded", "code": "rate_limit_exceeded",
                          "message": "Rate limit reached."}}),
     "exceeded retry limit, last status: 429 Too Many Requests"),
], ids=["server-error", "cut", "rate-limit"])
def test_codex_api_errors_fail_the_turn(api: ModelAPI, tmp_path: Path, step: Fail | Cut,
                                        message: str) -> None:
    api.script(step)
    running = run_codex(api, tmp_path)
    assert running.finish() == 1
    stream = events(running.lines)
    assert kinds(stream) == ["thread.started", "turn.started", "error", "turn.failed"]
    assert stream[-1]["error"]["message"] == message


# -- aider --------------------------------------------------------------------------------------

@cli
@pytest.mark.slow
@pytest.mark.parametrize("edit_format", ["whole", "diff"])
def test_aider_writes_a_file_and_reports_tokens_and_cost(api: ModelAPI, tmp_path: Path,
                                                          edit_format: str) -> None:
    api.script(Tool("write", {"path": "hello.txt", "content": "hi\n"}, text="Creating it.",
                    usage=Usage(1000, 50)))
    running = run_aider(api, tmp_path, extra=("--edit-format", edit_format))
    assert running.finish() == 0
    assert (tmp_path / "ws" / "hello.txt").read_text() == "hi\n"
    out = running.lines
    assert f"Model: {AIDER_MODEL} with {edit_format} edit format" in out
    # 1000 * 2e-6 + 50 * 8e-6 = $0.0024
    assert "Tokens: 1.0k sent, 50 received. Cost: $0.0024 message, $0.0024 session." in out, out
    assert "Applied edit to hello.txt" in out
    assert sorted(p.name for p in (tmp_path / "ws").iterdir()) == [".git", "hello.txt"]
    main = api.main_requests
    assert len(main) == 1 and main[0].path == "/v1/chat/completions"
    assert main[0].body["model"] == "gpt-test" and "stream" not in main[0].body
    assert main[0].headers["authorization"] == f"Bearer {API_KEY}"


#: (HTTP error body, what aider prints for it); 429 and 500 are retried, 401 is final.
RATE_LIMIT = ({"error": {"message": "Rate limit reached", "type": "requests",
                         "code": "rate_limit_exceeded"}},
              "litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached")
SERVER_ERROR = ({"error": {"message": "The server had an error", "type": "server_error"}},
                ("litellm.InternalServerError: InternalServerError: OpenAIException - "
                 "The server had an error"))
BAD_KEY = ({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                      "code": "invalid_api_key"}},
           ("litellm.AuthenticationError: AuthenticationError: OpenAIException - "
            "Incorrect API key provided"))


@cli
@pytest.mark.slow
def test_aider_retries_api_errors_then_gives_up_with_exit_code_0(api: ModelAPI,
                                                                 tmp_path: Path) -> None:
    # the openai client under litellm tries each request 3 times (retry-after-ms honoured),
    # then aider prints the error and tries again itself after 0.25 s, 0.5 s, ... up to 60 s
    quick = {"retry-after-ms": "10"}
    api.script(*[Fail(429, RATE_LIMIT[0], quick)] * 3, *[Fail(500, SERVER_ERROR[0], quick)] * 3,
               Fail(401, BAD_KEY[0]))
    running = run_aider(api, tmp_path)
    assert running.finish() == 0                      # aider's exit code hides the failure
    out = running.lines
    expected = [RATE_LIMIT[1],
                "The API provider has rate limited you. Try again later or check your quotas.",
                "Retrying in 0.2 seconds...",
                SERVER_ERROR[1],
                "The API provider's servers are down or overloaded.",
                "Retrying in 0.5 seconds...",
                BAD_KEY[1],
                "The API provider is not able to authenticate you. Check your API key."]
    at = [out.index(line) for line in expected]     # each on one line (COLUMNS is wide)
    assert at == sorted(at), out
    assert len(api.main_requests) == 7
    assert not (tmp_path / "ws" / "hello.txt").exists()


# -- the protocol modules alone (no CLI) --------------------------------------------------------

def post(api: ModelAPI, path: str, body: dict) -> tuple[int, bytes]:
    """POST JSON to the scripted API; (status, the raw body read to the end or the drop)."""
    conn = http.client.HTTPConnection(api.url.removeprefix("http://"), timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        try:
            return response.status, response.read()
        except http.client.IncompleteRead as cut:
            return response.status, cut.partial
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[dict]:
    return [json.loads(data) for _, data in iter_sse(raw) if data != "[DONE]"]


def test_responses_write_is_an_apply_patch_call_when_the_tool_is_offered(api: ModelAPI) -> None:
    api.script(Tool("write", {"path": "a/b.txt", "content": "one\ntwo\n"}, usage=Usage(7, 3)))
    tools = [{"type": "custom", "name": "apply_patch"}, {"type": "function", "name": "exec_command"}]
    status, raw = post(api, "/v1/responses", {"model": "m", "stream": True, "tools": tools})
    assert status == 200
    stream = sse_events(raw)
    assert [e["type"] for e in stream] == ["response.created", "response.output_item.added",
                                           "response.output_item.done", "response.completed"]
    item = stream[2]["item"]
    assert item["type"] == "custom_tool_call" and item["name"] == "apply_patch"
    assert item["input"] == "*** Begin Patch\n*** Add File: a/b.txt\n+one\n+two\n*** End Patch\n"
    assert stream[-1]["response"]["usage"]["input_tokens"] == 7
    assert stream[-1]["response"]["usage"]["total_tokens"] == 10


def test_responses_write_falls_back_to_exec_command(api: ModelAPI) -> None:
    api.script(Tool("write", {"path": "x.txt", "content": "it's\n"}))
    tools = [{"type": "function", "name": "exec_command"}]
    _, raw = post(api, "/v1/responses", {"model": "m", "stream": True, "tools": tools})
    item = sse_events(raw)[2]["item"]
    assert item["type"] == "function_call" and item["name"] == "exec_command"
    command = json.loads(item["arguments"])["cmd"]
    assert subprocess.run(["bash", "-c", command.replace("> 'x.txt'", "")], capture_output=True,
                          text=True, check=True).stdout == "it's\n"


def test_responses_cut_ends_before_response_completed(api: ModelAPI) -> None:
    api.script(Cut("half an ans"))
    _, raw = post(api, "/v1/responses", {"model": "m", "stream": True})
    kinds_seen = [e["type"] for e in sse_events(raw)]
    assert "response.output_text.delta" in kinds_seen
    assert "response.completed" not in kinds_seen


def test_chat_completion_writes_in_the_edit_format_the_system_prompt_asks_for(api: ModelAPI) -> None:
    api.script(Tool("write", {"path": "f.py", "content": "x = 1\n"}, usage=Usage(11, 2)))
    whole = {"model": "m", "messages": [{"role": "system", "content": "file listing format"}]}
    status, raw = post(api, "/v1/chat/completions", whole)
    answer = json.loads(raw)
    assert status == 200 and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "f.py\n```\nx = 1\n```\n"
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    diff = {"model": "m", "stream": True,
            "messages": [{"role": "system", "content": "use <<<<<<< SEARCH blocks"}]}
    _, raw = post(api, "/v1/chat/completions", diff)
    assert raw.rstrip().endswith(b"data: [DONE]")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_events(raw))
    assert text == "f.py\n```\n<<<<<<< SEARCH\n=======\nx = 1\n>>>>>>> REPLACE\n```\n"
