"""summary.md: a Run in a page, the body of its pull request.

Written at `runs/<task-id>/run-<n>/summary.md` when the Run reaches its final
status (records.py writes it like the other records and it is committed with
them). It holds the Task's title, the Agent's final message (as its tool
reported it; for an Agent that reports none, the last SUMMARY_OUTPUT_LINES
lines of its output, secrets already masked by the Worker), the Run's status
and error, Worker, Agent, the model, turns and cost its tool reported,
duration, the result (commit, branch, or why there is no branch), the
diffstat (`git diff --stat <base> <commit>` on the control plane) and the
paths of the Run's records.

Every text from outside (the title, the error, the result note, Worker and
Agent names, the model, the final message, the output's tail, the diffstat's
file names, the records' paths) goes through textsafe.clean: a terminal
escape, a bell, a carriage return or a bidi control shows as its escape
(``\\x1b``) and nothing acts on a terminal or a page. Values on a list line
are one line each; the final message and the output keep their newlines.
"""

from __future__ import annotations

from typing import Sequence

from taskrunner.state import RunState
from taskrunner.textsafe import clean

#: How many lines of output stand for the Agent's final message.
SUMMARY_OUTPUT_LINES = 20
#: Bytes of output read from the end of output.log to find those lines.
SUMMARY_TAIL_BYTES = 16 * 1024


def render(run: RunState, title: str, output_tail: bytes, diffstat: str | None, records: Sequence[str]) -> str:
    """The summary's markdown text."""
    lines = [f"# {_one_line(title)}", ""]
    lines += [f"- **Status:** {run.status.value}" + (f" ({_one_line(run.error)})" if run.error else ""),
              (f"- **Task:** `{_one_line(run.task_id)}`, Run {run.number} (`{_one_line(run.run_id)}`), "
               f"attempt {run.attempt}"),
              f"- **Worker:** {_one_line(run.worker)}", f"- **Agent:** {_one_line(run.agent)}",
              f"- **Duration:** {_duration(run)}"]
    lines += _report(run)
    if run.base_commit:
        lines.append(f"- **Base commit:** `{_one_line(run.base_commit)}`")
    if run.result_commit:
        lines.append(f"- **Commit:** `{_one_line(run.result_commit)}`")
        lines.append(f"- **Branch:** `{_one_line(run.result_branch)}`" if run.result_branch else
                     f"- **Branch:** none: {_one_line(run.result_note or 'not moved')}")
    elif run.result_note:
        lines.append(f"- **Change:** {_one_line(run.result_note)}")
    else:
        lines.append("- **Change:** none (the workspace did not differ from the base commit)")
    if run.final_message:
        lines += ["", "## Final message", "", *_quoted(run.final_message), ""]
    else:
        lines += ["", "## Final message", "", "_The last lines of the Agent's output:_", "", "```text",
                  *_tail(output_tail), "```", ""]
    if diffstat:
        lines += ["## Changes", "", "```text", clean(diffstat, multiline=True).replace("```", "'''"), "```", ""]
    lines += ["## Records", "", *(f"- `{_one_line(path)}`" for path in records), ""]
    return "\n".join(lines)


def _report(run: RunState) -> list[str]:
    """The lines for what the Agent's tool reported: model, turns, cost, tokens."""
    lines = []
    backend = run.backend_used or {}
    if backend.get("model"):
        used = f"{backend.get('provider')} / {backend['model']}" if backend.get("provider") else backend["model"]
        version = f" (CLI {_one_line(backend['cli_version'])})" if backend.get("cli_version") else ""
        lines.append(f"- **Model:** {_one_line(used)}{version}")
    if run.turns is not None:
        lines.append(f"- **Turns:** {run.turns}")
    if run.cost_usd is not None:
        lines.append(f"- **Cost:** ${run.cost_usd:.4f}" + (" (estimated from tokens)" if run.cost_estimated else ""))
    if run.usage:
        lines.append("- **Tokens:** " + ", ".join(f"{_one_line(k)} {v}" for k, v in sorted(run.usage.items())))
    return lines


def _quoted(message: str) -> list[str]:
    """The Agent's final message as a block quote (markdown it wrote stays readable; nothing escapes the quote)."""
    text = clean(message, multiline=True).rstrip("\n")
    return [f"> {line}".rstrip() for line in text.split("\n")] if text else ["> (empty)"]


def _tail(data: bytes) -> list[str]:
    """The last SUMMARY_OUTPUT_LINES lines of the output, inert, its code fences defused."""
    text = clean(data.decode("utf-8", errors="replace"), multiline=True).replace("```", "'''")
    text = text.rstrip("\n")
    return text.split("\n")[-SUMMARY_OUTPUT_LINES:] if text else ["(no output)"]


def _one_line(text: object) -> str:
    """`text` as one inert line: textsafe.clean, runs of white space made one space."""
    return " ".join(clean(str(text)).split())


def _duration(run: RunState) -> str:
    start = run.started_at or run.assigned_at
    if start is None or run.finished_at is None:
        return "unknown"
    seconds = max(0.0, run.finished_at - start)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
