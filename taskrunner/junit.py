"""Waited-for Tasks as a JUnit XML report, for CI (`taskrun submit --wait --junit FILE`).

The format is the de-facto JUnit XML that Jenkins, GitLab (`artifacts:
reports: junit`) and GitHub test-report actions read (the Ant JUnit task's
schema, as documented by the Jenkins xunit plugin and GitLab's "Unit test
reports"):

    <testsuites name="taskrun" tests="2" failures="1" errors="0" skipped="0" time="3.200">
      <testsuite name="taskrun" tests="2" failures="1" errors="0" skipped="0" time="3.200" timestamp="...">
        <testcase name="<task id>" classname="<title, or tasks/<id>.md>" time="<Run seconds>">
          <failure type="FAILED" message="<the Task's error>">...</failure>
          <system-out>the Run, then the last lines of its output.log</system-out>
        </testcase>
      </testsuite>
    </testsuites>

Every Task that is not COMPLETED is a <failure>, its `type` the reason
(FAILED, CANCELLED, BLOCKED, INVALID, or UNFINISHED for a Task still going
when the wait ended): the report agrees with `submit`'s exit code, and no
JUnit reader shows a red job as green, which `skipped` would (README "CI:
submit and wait").

Text comes from Task files and Agent output, so it can hold anything:
`xml_text` makes each string valid XML 1.0 character data (characters XML
forbids are written as visible escapes, like textsafe's) before the tree is
serialized. Pure: no I/O.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from taskrunner.model import TaskStatus
from taskrunner.textsafe import clean

#: The suite's name, and the `name` of the report's root.
SUITE = "taskrun"
#: `type` of the failure of a Task that was not final when the wait ended.
UNFINISHED = "UNFINISHED"
#: Attribute values (messages, class names) are cut to this many characters.
MAX_ATTRIBUTE_CHARS = 1000

_FINAL = frozenset(s.value for s in TaskStatus if s.final)
# What XML 1.0 does not allow in a document (section 2.2 "Char"): C0 controls
# other than tab, LF and CR, lone surrogates, and U+FFFE / U+FFFF.
_NOT_XML = re.compile("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\ud800-\\udfff\\ufffe\\uffff]")


@dataclass(frozen=True)
class Case:
    """One <testcase>: one Task."""

    name: str  # the Task id
    classname: str  # the Task's title, or its file tasks/<id>.md
    seconds: float  # the final Run's duration; 0.0 when it has none
    failure: str | None  # None: passed; else the failure's type (a status, or UNFINISHED)
    message: str  # one line: why it failed ("" when it passed)
    output: str  # <system-out>: what the Run was, then the tail of its output


def xml_text(text: str, *, multiline: bool = True) -> str:
    """`text` as valid XML 1.0 character data that is also safe on a terminal (textsafe.clean).

    Every character XML forbids becomes a visible escape (``\\x00``,
    ``\\ufffe``); markup characters are left for the serializer to escape.
    """
    text = clean(text, multiline=multiline)
    return _NOT_XML.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def case_for(result: Mapping[str, Any], tail: str = "") -> Case:
    """The <testcase> of one waited-for Task.

    `result` is one entry of `taskrun submit --wait --json`'s "tasks" (keys
    task_id, status, error, title, file, timed_out, run; see the README);
    `tail` the last lines of its final Run's output.log, as text.
    """
    status = str(result.get("status") or "PENDING")
    run = result.get("run") or {}
    unfinished = bool(result.get("timed_out")) or status not in _FINAL
    failure = None if status == "COMPLETED" and not unfinished else (UNFINISHED if unfinished else status)
    if failure is None:
        message = ""
    elif unfinished:
        message = f"still {status} when the wait ended"
    else:
        message = str(result.get("error") or f"the Task is {status}")
    classname = str(result.get("title") or result.get("file") or result.get("task_id") or "")
    lines = [f"{result.get('task_id')}: {status}"]
    if run:
        code = run.get("exit_code")
        lines.append(f"run {run.get('number')} on {run.get('worker')} with {run.get('agent')}: {run.get('status')}"
                     + ("" if code is None else f", exit code {code}"))
        for key in ("result_branch", "result_commit", "result_note", "summary", "output"):
            if run.get(key):
                lines.append(f"{key}: {run[key]}")
    if tail:
        lines += ["", f"--- the last lines of {run.get('output') or 'output.log'} ---", tail]
    duration = run.get("duration")
    return Case(name=str(result.get("task_id")), classname=classname,
                seconds=float(duration) if isinstance(duration, (int, float)) else 0.0,
                failure=failure, message=message, output="\n".join(lines))


def render(cases: Sequence[Case], timestamp: float) -> bytes:
    """The report for `cases`, as UTF-8 bytes with an XML declaration; `timestamp` in Unix seconds."""
    failures = sum(1 for case in cases if case.failure)
    total = sum(case.seconds for case in cases)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": "0",
              "time": f"{total:.3f}"}
    root = ET.Element("testsuites", {"name": SUITE, **counts})
    when = datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    suite = ET.SubElement(root, "testsuite", {"name": SUITE, **counts, "timestamp": when})
    for case in cases:
        element = ET.SubElement(suite, "testcase", {"name": _attribute(case.name),
                                                    "classname": _attribute(case.classname),
                                                    "time": f"{case.seconds:.3f}"})
        if case.failure:
            failure = ET.SubElement(element, "failure", {"type": _attribute(case.failure),
                                                         "message": _attribute(case.message)})
            failure.text = xml_text(case.message)
        if case.output:
            ET.SubElement(element, "system-out").text = xml_text(case.output)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _attribute(text: str) -> str:
    """One line for an attribute value: no line break, nothing XML forbids, at most MAX_ATTRIBUTE_CHARS."""
    text = xml_text(text, multiline=False)
    return text if len(text) <= MAX_ATTRIBUTE_CHARS else text[:MAX_ATTRIBUTE_CHARS - 3] + "..."

