"""taskrunner.junit: waited-for Tasks as a JUnit XML report that any output keeps valid."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from taskrunner import junit


def _result(task_id: str, status: str, **extra: Any) -> dict[str, Any]:
    run = {"number": 1, "status": status if status in ("COMPLETED", "FAILED", "CANCELLED") else "RUNNING",
           "exit_code": 0 if status == "COMPLETED" else 3, "worker": "local", "agent": "shell", "duration": 1.25,
           "result_branch": None, "result_commit": None, "result_note": None, "summary": None,
           "output": f"runs/{task_id}/run-1/output.log"}
    result = {"task_id": task_id, "status": status, "error": None, "title": f"Title of {task_id}",
              "file": f"tasks/{task_id}.md", "timed_out": False, "run": run}
    result.update(extra)
    return result


def _parse(cases: list[junit.Case]) -> ET.Element:
    return ET.fromstring(junit.render(cases, 1_800_000_000.0))


def test_one_suite_with_a_case_per_task_and_counts_that_match() -> None:
    cases = [junit.case_for(_result("ok", "COMPLETED"), "fine"),
             junit.case_for(_result("bad", "FAILED", error="the Agent exited with code 3"), "boom")]

    root = _parse(cases)

    suites = root.findall("testsuite")
    assert root.tag == "testsuites" and len(suites) == 1
    suite = suites[0]
    assert suite.get("name") == "taskrun"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("2", "1", "0", "0")
    assert suite.get("time") == "2.500" and suite.get("timestamp") == "2027-01-15T08:00:00"
    ok, bad = suite.findall("testcase")
    assert (ok.get("name"), ok.get("classname"), ok.get("time")) == ("ok", "Title of ok", "1.250")
    assert ok.find("failure") is None and "fine" in (ok.findtext("system-out") or "")
    failure = bad.find("failure")
    assert failure is not None
    assert failure.get("type") == "FAILED" and failure.get("message") == "the Agent exited with code 3"
    assert (bad.findtext("system-out") or "").endswith("boom")


def test_the_classname_is_the_file_when_the_task_has_no_title() -> None:
    case = junit.case_for(_result("untitled", "COMPLETED", title=None))

    assert _parse([case]).find("testsuite/testcase").get("classname") == "tasks/untitled.md"  # type: ignore[union-attr]


@pytest.mark.parametrize("status", ["CANCELLED", "BLOCKED", "INVALID"])
def test_every_status_but_completed_is_a_failure_typed_by_it(status: str) -> None:
    case = junit.case_for(_result("t", status, error=f"why it is {status}", run=None))

    root = _parse([case])

    failure = root.find("testsuite/testcase/failure")
    assert failure is not None and failure.get("type") == status and failure.get("message") == f"why it is {status}"
    assert root.find("testsuite").get("failures") == "1"  # type: ignore[union-attr]
    assert root.find("testsuite/testcase").get("time") == "0.000"  # type: ignore[union-attr]


def test_a_task_unfinished_when_the_wait_ended_is_an_unfinished_failure() -> None:
    case = junit.case_for(_result("slow", "RUNNING", timed_out=True))

    failure = _parse([case]).find("testsuite/testcase/failure")

    assert failure is not None and failure.get("type") == "UNFINISHED"
    assert failure.get("message") == "still RUNNING when the wait ended"


def test_a_completed_task_still_listed_as_timed_out_is_not_a_pass() -> None:
    case = junit.case_for(_result("late", "COMPLETED", timed_out=True))

    assert case.failure == "UNFINISHED"


def test_hostile_output_and_titles_still_make_valid_xml() -> None:
    every_byte = bytes(range(256)).decode("latin-1")
    hostile = ("\x00\x01\x08\x0b\x0c\x1b[2J\x7f\x9b\ud800\udfff\ufffe\uffff\u202e]]></system-out>&<x/>"
               + every_byte)
    case = junit.case_for(_result("evil", "FAILED", error=hostile, title=hostile), tail=hostile)

    data = junit.render([case], 1_800_000_000.0)

    root = ET.fromstring(data)  # raises on any character XML 1.0 forbids
    testcase = root.find("testsuite/testcase")
    assert testcase is not None
    out = testcase.findtext("system-out") or ""
    assert "\\x00" in out and "\\x1b[2J" in out and "\\ufffe" in out and "\\u202e" in out
    assert "]]></system-out>&<x/>" in out  # markup is text, escaped by the serializer
    for text in (out, testcase.get("classname") or "", testcase.find("failure").get("message") or ""):  # type: ignore[union-attr]
        assert not any(ch in text for ch in "\x00\x1b\x9b\ufffe\uffff\u202e")
    assert "\n" not in (testcase.get("classname") or "")


def test_long_messages_are_cut_in_attributes_but_whole_in_the_failure_text() -> None:
    error = "x" * 5000

    failure = _parse([junit.case_for(_result("long", "FAILED", error=error))]).find("testsuite/testcase/failure")

    assert failure is not None
    assert len(failure.get("message") or "") == junit.MAX_ATTRIBUTE_CHARS and failure.text == error


def test_the_run_and_its_result_branch_open_the_system_out() -> None:
    result = _result("changed", "COMPLETED")
    result["run"].update(result_branch="taskrun/changed", result_commit="a" * 40,
                         summary="runs/changed/run-1/summary.md")

    out = junit.case_for(result, "done").output

    assert "run 1 on local with shell: COMPLETED, exit code 0" in out
    assert "result_branch: taskrun/changed" in out and "summary: runs/changed/run-1/summary.md" in out
