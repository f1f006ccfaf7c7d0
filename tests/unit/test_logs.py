"""logs.py: engine events and the package's `logging` calls as JSON lines or text, never with a secret."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from taskrunner import logs
from taskrunner.cli.render import LiveView
from taskrunner.hooks import Hooks, HookSet, emit
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.state import RunState, TaskState

# Token-shaped strings, built here so no whole token sits in the source.
GITHUB = "ghp_" + "Ab1" * 12
GITLAB = "glpat-" + "x9Y" * 7
ANTHROPIC = "sk-ant-api03-" + "Zz7" * 10
SLACK = "xoxb-" + "1234-" * 3 + "abcdefgh"
AWS = "AKIA" + "ABCDEFGH23456789"
FINE = "github_pat_" + "11A" * 10


@pytest.mark.parametrize("text, secret", [
    (f"push failed: {GITHUB} refused", GITHUB),
    (f"GITLAB_TOKEN {GITLAB}", GITLAB),
    (f"key {ANTHROPIC} is over its limit", ANTHROPIC),
    (f"slack said {SLACK}", SLACK),
    (f"aws {AWS}", AWS),
    (f"pat {FINE}", FINE),
    ("Authorization: Bearer eyJhbGciOi.payload.signature", "eyJhbGciOi.payload.signature"),
    ("git push https://oauth2:hunter2hunter2@gitlab.example.com/x.git", "hunter2hunter2"),
    ("token=0123456789abcdef and more", "0123456789abcdef"),
    ('{"password": "correct horse"}', "correct"),
    ("WEBHOOK_SECRET: s3cr3t-value-here", "s3cr3t-value-here"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
     "b3BlbnNzaC1rZXktdjEAAAAA"),
])
def test_a_token_shaped_string_is_masked(text: str, secret: str) -> None:
    shown = logs.redact(text, multiline=True)
    assert secret not in shown
    assert logs.MASK in shown


@pytest.mark.parametrize("text", [
    "committed 0123456789abcdef0123456789abcdef01234567 (2 record(s))",
    "https://build-1.example.com:8080/path and http://[::1]:22",
    "the Agent exited with code 3",
    "max_tokens: 4096, --token - reads it from stdin",
    ".taskrun.yaml: webhook.secret_env: expected an environment variable name, got 3",
    "Worker build-1 offline: unreachable for longer than the grace period",
])
def test_text_without_a_secret_is_kept(text: str) -> None:
    assert logs.redact(text) == text


def test_control_characters_are_escaped_as_everywhere_else() -> None:
    assert logs.redact("a\x1b[2Jb\nc") == "a\\x1b[2Jb c"


@pytest.fixture
def json_log(capsys: pytest.CaptureFixture[str]) -> Iterator[logging.Handler]:
    handler = logs.configure("json", "DEBUG")
    yield handler
    logs.unconfigure(handler)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def task(task_id: str, status: TaskStatus, error: str | None = None) -> TaskState:
    state = TaskState(id=task_id, file=f"tasks/{task_id}.md", seq=1, status=status, error=error)
    state.runs.append(RunState(run_id="r-1", task_id=task_id, number=1, revision="abc", attempt=1,
                               worker="build-1", agent="claude", status=RunStatus.FAILED))
    return state


def test_a_notice_with_a_token_is_logged_without_it(json_log: logging.Handler,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    hooks = HookSet(logs.LogHooks())
    hooks.notice(f"could not push to https://x:{GITHUB}@github.com/o/r.git: denied")
    hooks.notice(f"error: webhook secret {GITHUB} refused")
    out = capsys.readouterr().out
    assert GITHUB not in out
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["event"] == "notice" and first["level"] == "WARNING"
    assert first["message"] == f"could not push to https://x:{logs.MASK}@github.com/o/r.git: denied"
    assert second["level"] == "ERROR"


def test_each_line_has_time_level_event_message_and_the_fields_that_apply(
        json_log: logging.Handler, capsys: pytest.CaptureFixture[str]) -> None:
    hooks = logs.LogHooks()
    hooks.task_changed(task("auth/login", TaskStatus.FAILED, error="the Agent exited with code 3"))
    hooks.committed("0123456789abcdef0123456789abcdef01234567", "1 record(s)")
    failed, committed = lines(capsys)
    assert set(failed) >= {"time", "level", "event", "message", "task_id", "run_id", "worker", "agent", "status"}
    assert (failed["level"], failed["event"], failed["status"]) == ("ERROR", "task_status", "FAILED")
    assert (failed["task_id"], failed["run_id"], failed["worker"], failed["agent"]) == (
        "auth/login", "r-1", "build-1", "claude")
    assert failed["message"] == "auth/login FAILED: the Agent exited with code 3"
    assert "waiting" not in failed  # a key that does not apply is left out, not null
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(failed["time"]))
    stamp = datetime.fromisoformat(str(failed["time"]).replace("Z", "+00:00"))
    assert stamp.utcoffset() == timezone.utc.utcoffset(None)
    assert abs(stamp.timestamp() - datetime.now(timezone.utc).timestamp()) < 60
    assert (committed["event"], committed["level"]) == ("committed", "INFO")
    assert committed["message"] == "committed 0123456789 (1 record(s))"


def test_a_task_is_logged_when_its_status_changes_not_at_every_save(
        json_log: logging.Handler, capsys: pytest.CaptureFixture[str]) -> None:
    hooks = logs.LogHooks()
    pending = task("a", TaskStatus.PENDING)
    hooks.task_changed(pending)
    hooks.task_changed(pending)
    pending.waiting = "waiting for a Worker with gpu=true"
    hooks.task_changed(pending)
    events = [(line["event"], line["level"]) for line in lines(capsys)]
    assert events == [("task_status", "INFO"), ("task_waiting", "DEBUG")]


def test_runs_workers_and_operational_events_are_logged(json_log: logging.Handler,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    hooks = logs.LogHooks()
    run = task("a", TaskStatus.RUNNING).runs[0]
    run.status = RunStatus.RUNNING
    hooks.run_changed(run)
    hooks.run_changed(run)
    run.status, run.exit_code, run.error = RunStatus.FAILED, 3, "the Agent exited with code 3"
    hooks.run_changed(run)
    hooks.worker_changed({"name": "build-1", "reachable": True, "trusted": True, "used": 0, "slots": 2})
    hooks.worker_changed({"name": "build-1", "reachable": True, "trusted": True, "used": 1, "slots": 2})
    hooks.event("push", {"ok": False, "error": f"remote said {GITHUB}"})
    hooks.event("rejected", {"what": "bundle", "reason": "signature", "worker": "build-1"})
    got = lines(capsys)
    assert [(g["event"], g["level"], g.get("status")) for g in got] == [
        ("run_status", "INFO", "RUNNING"), ("run_status", "WARNING", "FAILED"),
        ("worker_status", "INFO", "online"), ("worker_status", "DEBUG", "online"),
        ("push", "WARNING", None), ("rejected", "WARNING", None)]
    assert got[1]["exit_code"] == 3 and got[1]["run_id"] == "r-1"
    assert got[5]["worker"] == "build-1" and got[5]["reason"] == "signature"
    assert GITHUB not in json.dumps(got)


def test_run_output_is_logged_only_when_asked_for(json_log: logging.Handler,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = task("a", TaskStatus.RUNNING).runs[0]
    logs.LogHooks().run_output(run, b"hello\n")
    assert capsys.readouterr().out == ""
    logs.LogHooks(output=True).run_output(run, f"one\n\ntoken={GITHUB}\n".encode())
    assert [(g["event"], g["message"]) for g in lines(capsys)] == [
        ("run_output", "one"), ("run_output", f"token={logs.MASK}")]


def test_the_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    handler = logs.configure("json", "WARNING")
    try:
        hooks = logs.LogHooks()
        hooks.task_changed(task("ok", TaskStatus.COMPLETED))
        hooks.committed("0" * 40, "1 record(s)")
        hooks.task_changed(task("bad", TaskStatus.FAILED))
        hooks.notice("warning: git.push is off")
    finally:
        logs.unconfigure(handler)
    assert [(g["event"], g["level"]) for g in lines(capsys)] == [("task_status", "ERROR"), ("notice", "WARNING")]


def test_the_packages_own_logging_calls_go_through_the_same_handler(
        json_log: logging.Handler, capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(Hooks):
        def notice(self, message: str) -> None:
            raise RuntimeError(f"could not send with {GITHUB}")

    emit(Broken(), "notice", "x")
    (line,) = lines(capsys)
    assert (line["event"], line["level"]) == ("log", "ERROR")
    assert line["message"] == "hook notice failed"
    assert "RuntimeError" in str(line["exception"]) and GITHUB not in str(line["exception"])


def test_text_format_writes_the_packages_records_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    handler = logs.configure("text", "INFO")
    try:
        logging.getLogger("taskrun").warning("a notice with %s", GITHUB)
    finally:
        logs.unconfigure(handler)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(rf"\d\d:\d\d:\d\d WARNING a notice with {re.escape(logs.MASK)}\n", captured.err)


def test_a_closed_stream_loses_the_line_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = io.StringIO()
    closed.close()
    handler = logs.configure("json", "INFO")
    monkeypatch.setattr("sys.stdout", closed)
    try:
        logs.LogHooks().notice("nobody reads this")  # must not raise
    finally:
        logs.unconfigure(handler)


def test_bad_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError):
        logs.configure("yaml", "INFO")
    with pytest.raises(ValueError):
        logs.configure("json", "LOUD")


def plain_view() -> tuple[LiveView, io.StringIO]:
    stream = io.StringIO()
    return LiveView(Console(file=stream, force_terminal=False, width=200)), stream


def test_the_text_view_at_info_prints_todays_lines_unchanged() -> None:
    view, stream = plain_view()
    filtered = logs.FilteredView(view, "INFO")
    done = task("first", TaskStatus.COMPLETED)
    filtered.task_changed(done)
    filtered.committed("0123456789abcdef0123456789abcdef01234567", "1 record(s)")
    first, committed = stream.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d first COMPLETED", first)
    assert re.fullmatch(r"\d\d:\d\d:\d\d committed 0123456789 \(1 record\(s\)\)", committed)


def test_the_text_view_hides_what_is_below_the_level_and_masks_secrets() -> None:
    view, stream = plain_view()
    filtered = logs.FilteredView(view, "WARNING")
    filtered.task_changed(task("ok", TaskStatus.COMPLETED))
    failed = task("bad", TaskStatus.FAILED, error=f"push refused for {GITHUB}")
    filtered.task_changed(failed)
    filtered.committed("0" * 40, "1 record(s)")
    filtered.notice(f"could not push with {GITHUB}")
    shown = stream.getvalue()
    assert "ok COMPLETED" not in shown and "committed" not in shown
    assert f"bad FAILED: push refused for {logs.MASK}" in shown
    assert f"could not push with {logs.MASK}" in shown
    assert GITHUB not in shown
    assert failed.error == f"push refused for {GITHUB}"  # the engine's own state is untouched


# -- the redaction runs in linear time -------------------------------------------------------------

#: Text with no secret in it, the baseline a redaction's cost is measured against.
INNOCUOUS = "the Agent wrote 3 files, ran the tests (41 passed) and pushed the branch; "
#: How many times the CPU time of redacting innocuous text of the same length a hostile text may take.
SLOWER_AT_MOST = 50


class TooSlow(Exception):
    """Raised (from the SIGPROF handler) when a redaction used up its CPU budget."""


def cpu_seconds(text: str, budget: float) -> float:
    """The least CPU time of three `logs.redact` calls on `text`; TooSlow once one uses `budget` seconds
    (an interval timer on the process's CPU time stops a redaction that would run for hours)."""
    def stop(signum: int, frame: object) -> None:
        raise TooSlow
    before = signal.signal(signal.SIGPROF, stop)
    try:
        best = budget
        for _ in range(3):
            signal.setitimer(signal.ITIMER_PROF, budget)
            start = time.process_time()
            logs.redact(text)
            best = min(best, time.process_time() - start)
            signal.setitimer(signal.ITIMER_PROF, 0)
        return best
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, before)


# One hostile text per pattern of the redaction: its keyword or prefix repeated, with separators.
@pytest.mark.parametrize("unit", [
    "token-", "token_", "my-secret-", "password=", "api_key: ", "token:", '"password": "', '"secret": "x',
    "sk-", "ghp_", "github_pat_", "glpat-", "xoxb-", "AKIA", "AIza",
    "Bearer ", "basic ", "Authorization: Bearer ",
    "https://a:", "://a:b", "://" + "a:" * 40,
    "-----BEGIN ", "-----BEGIN A ", "-----BEGIN RSA PRIVATE KEY-----\n-----END A",
    "PuTTY-User-Key-File-2: -----END ",
])
def test_every_pattern_of_the_redaction_runs_in_linear_time(unit: str) -> None:
    hostile = (unit * (30000 // len(unit) + 1))[:30000]
    innocuous = (INNOCUOUS * (len(hostile) // len(INNOCUOUS) + 1))[:len(hostile)]
    baseline = cpu_seconds(innocuous, budget=60)
    # Generous on purpose (a loaded machine must not fail it): super-linear backtracking on 30,000
    # characters costs minutes, far past either bound.
    budget = max(SLOWER_AT_MOST * baseline, 1.0)
    try:
        spent = cpu_seconds(hostile, budget)
    except TooSlow:
        pytest.fail(f"redacting {unit!r} * n took over {SLOWER_AT_MOST} times as long as innocuous text")
    assert spent <= budget


def test_a_tasks_agent_value_of_repeated_keywords_does_not_stall_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    handler = logs.configure("json", "INFO")
    try:
        hooks = logs.LogHooks()
        hooks.task_changed(task("bad", TaskStatus.INVALID, error=f"agent: unknown Agent {'token-' * 5000!r}"))
    finally:
        logs.unconfigure(handler)
    (line,) = lines(capsys)
    assert line["level"] == "ERROR" and line["error"].startswith("agent: unknown Agent 'token-token-")


def test_a_long_message_is_cut_and_a_secret_across_the_cut_is_masked() -> None:
    text = "x" * (logs.MAX_REDACT_CHARS - 40) + f" token={'s3cr3t' * 20} " + "y" * 100_000
    shown = logs.redact_secrets(text)
    assert "s3cr3ts3cr3t" not in shown and "token=" + logs.MASK in shown
    assert shown.endswith(" characters cut]")
    assert len(shown) < logs.MAX_REDACT_CHARS + 100


def test_long_run_output_is_redacted_whole_in_the_text_view() -> None:
    stream = io.StringIO()
    filtered = logs.FilteredView(LiveView(Console(file=stream, force_terminal=False), show_output=True), "INFO")
    lines_ = [f"line {n}" for n in range(30_000)] + [f"pushing with {GITHUB}", "done"]
    output = ("\n".join(lines_) + "\n").encode()
    assert len(output) > 2 * logs.MAX_REDACT_CHARS
    filtered.run_output(task("t", TaskStatus.RUNNING).runs[0], output)
    shown = stream.getvalue()
    assert GITHUB not in shown and f"pushing with {logs.MASK}" in shown
    assert "line 29999" in shown and "done" in shown and "characters cut" not in shown


# -- routine notices are INFO ----------------------------------------------------------------------

ROUTINE = ["configuration reloaded from .taskrun.yaml", "sync requested (webhook push to main)",
           "webhook receiver listening on http://127.0.0.1:8080/webhook",
           "metrics listening on http://127.0.0.1:9100/metrics"]


@pytest.mark.parametrize("message", ROUTINE)
def test_a_routine_notice_is_info(message: str) -> None:
    assert logs.notice_level(message) == logging.INFO


def test_at_warning_routine_notices_are_hidden_and_the_rest_shown(capsys: pytest.CaptureFixture[str]) -> None:
    handler = logs.configure("json", "WARNING")
    try:
        hooks = logs.LogHooks()
        for message in ROUTINE:
            hooks.notice(message)
        hooks.notice("configuration not reloaded, the previous one stays in force: bad key")
    finally:
        logs.unconfigure(handler)
    assert [(g["level"], g["message"]) for g in lines(capsys)] == [
        ("WARNING", "configuration not reloaded, the previous one stays in force: bad key")]
    view, stream = plain_view()
    filtered = logs.FilteredView(view, "WARNING")
    for message in ROUTINE:
        filtered.notice(message)
    assert stream.getvalue() == ""


@given(st.binary(max_size=64) | st.lists(st.sampled_from([b"a", b" ", b"\n", b"\r", b"\t", b"\x0b", b"x y"]),
                                          max_size=20).map(b"".join))
def test_last_line_is_the_last_line_holding_more_than_whitespace(data: bytes) -> None:
    lines = [line for line in data.splitlines() if line.strip()]
    assert logs.last_line(data) == (lines[-1] if lines else None)


@pytest.mark.parametrize("data", [b"x" * 5000 + b"\n" + b" \n" * 3000, b"\n" * 70000 + b"last", b"a\rb\n" * 300000,
                                  b"first\n" + b"\t" * 100000, b" " * 1025])
def test_last_line_of_a_big_chunk_with_long_whitespace_around_it(data: bytes) -> None:
    lines = [line for line in data.splitlines() if line.strip()]
    assert logs.last_line(data) == (lines[-1] if lines else None)
