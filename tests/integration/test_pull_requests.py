"""Pull requests for result branches (gitflow/pullrequests.py): the thread, and the daemon recording the URL.

The forge is the stand-in of tests/unit/test_forges.py (a forge cannot run
here); git, the daemon and its local Worker are real.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from taskrunner.config import PullRequestConfig, default_config, load_config
from taskrunner.daemon import Daemon
from taskrunner.gitflow.pullrequests import PullRequestJob, PullRequestOpened, PullRequests, problems
from taskrunner.hooks import Hooks
from tests.conftest import git, run_record, wait_status, wait_until, write_task
from tests.unit.test_forges import TOKEN, StandInForge


class Notices(Hooks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def notice(self, message: str) -> None:
        self.lines.append(message)


class Collected:
    """What the thread posts and says, as the daemon's queue and log would receive them."""

    def __init__(self) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self.notices: list[str] = []

    def opened(self, timeout: float = 10.0) -> PullRequestOpened:
        event = self.events.get(timeout=timeout)
        assert isinstance(event, PullRequestOpened)
        return event


@pytest.fixture()
def collected() -> Collected:
    return Collected()


@pytest.fixture()
def github() -> Iterator[StandInForge]:
    made = StandInForge("github")
    yield made
    made.close()


def job(body: str = "the summary") -> PullRequestJob:
    return PullRequestJob(task_id="add-login", run_id="r1", branch="taskrun/add-login", base="main",
                          title="Add login", body=body)


def thread(collected: Collected, **kwargs: object) -> PullRequests:
    made = PullRequests(collected.events.put, collected.notices.append, environ={"FORGE_TOKEN": TOKEN},
                        **kwargs)  # type: ignore[arg-type]
    made.start()
    return made


def test_the_thread_opens_then_updates_and_reports_the_url(github: StandInForge, collected: Collected) -> None:
    prs = thread(collected)
    try:
        prs.submit(github.config(), job("first"))
        first = collected.opened()
        prs.submit(github.config(), job("second"))
        second = collected.opened()
    finally:
        prs.stop()

    assert first.url == second.url == github.pulls[0]["url"] and first.job.run_id == "r1"
    assert len(github.pulls) == 1 and github.pulls[0]["body"] == "second"
    assert any("opened" in n for n in collected.notices) and any("updated" in n for n in collected.notices)


def test_a_forge_error_that_may_pass_is_retried(github: StandInForge, collected: Collected) -> None:
    github.fail_with, github.fail_times = 503, 2
    prs = thread(collected, retry_delays=(0.01, 0.01, 0.01))
    try:
        prs.submit(github.config(), job())
        opened = collected.opened()
    finally:
        prs.stop()

    assert opened.url == github.pulls[0]["url"]
    assert sum("503" in n for n in collected.notices) == 2


def test_a_refused_token_is_given_up_at_once_with_a_notice(github: StandInForge, collected: Collected) -> None:
    prs = PullRequests(collected.events.put, collected.notices.append, environ={"FORGE_TOKEN": "wrong"},
                       retry_delays=(0.01,))
    prs.start()
    try:
        prs.submit(github.config(), job())
        wait_until(lambda: collected.notices, 10, "a notice")
    finally:
        prs.stop()

    assert collected.events.empty() and len(github.seen) == 1
    assert "not opened" in collected.notices[0] and "FORGE_TOKEN" in collected.notices[0]
    assert "wrong" not in collected.notices[0]


def test_a_missing_token_variable_is_named_and_nothing_is_sent(github: StandInForge, collected: Collected) -> None:
    prs = PullRequests(collected.events.put, collected.notices.append, environ={})
    prs.start()
    try:
        prs.submit(github.config(), job())
        wait_until(lambda: collected.notices, 10, "a notice")
    finally:
        prs.stop()

    assert "FORGE_TOKEN" in collected.notices[0] and "not set" in collected.notices[0] and not github.seen


def test_pull_requests_without_push_are_reported_at_start() -> None:
    settings = PullRequestConfig("github", "https://api.github.com", "acme/widgets", "FORGE_TOKEN")
    config = default_config()
    config = replace(config, git=replace(config.git, pull_requests=settings))

    found = problems(config, {})

    assert any("git.push: true" in p for p in found) and any("FORGE_TOKEN" in p for p in found)
    assert problems(default_config(), {}) == []


@pytest.mark.slow
def test_pushing_a_result_branch_opens_its_pull_request_and_the_daemon_records_it(
        repo: Path, tmp_path: Path, github: StandInForge, monkeypatch: pytest.MonkeyPatch) -> None:
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "--quiet", "--bare", str(origin))
    git(repo, "remote", "add", "origin", str(origin))
    settings = yaml.safe_load((repo / ".taskrun.yaml").read_text())
    settings["git"] = {**(settings.get("git") or {}), "push": True, "pull_requests": {
        "forge": "github", "api_url": github.url, "repository": "acme/widgets", "token_env": "FORGE_TOKEN"}}
    (repo / ".taskrun.yaml").write_text(yaml.safe_dump(settings))
    (repo / "app.txt").write_text("version 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "app")
    branch = git(repo, "symbolic-ref", "--short", "HEAD").strip()
    git(repo, "push", "--quiet", "origin", branch)
    monkeypatch.setenv("FORGE_TOKEN", TOKEN)
    notices = Notices()
    daemon = Daemon(repo, load_config(repo), hooks=notices)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        write_task(repo, "bump", "sed -i s/1/2/ app.txt", title="Bump the version")
        wait_status(repo, "bump", "COMPLETED")
        record = wait_until(lambda: (r := run_record(repo, "bump", 1)) and r.get("result_branch") and r, 20,
                            "the result branch")
        # The push of the result branch opens the pull request (push.Pusher -> Daemon.result_branch_pushed).
        url = wait_until(lambda: (run_record(repo, "bump", 1) or {}).get("pull_request"), 20, "the URL recorded")
        committed = wait_until(lambda: _committed_run(repo, "bump", 1).get("pull_request"), 20,
                               "the URL committed")
        daemon.result_branch_pushed("", record["result_branch"])  # again, and by branch only: an update
        wait_until(lambda: sum(s.method == "PATCH" for s in github.seen) == 1, 20, "the update")
    finally:
        daemon.request_stop()
        runner.join(30)

    assert url == committed == github.pulls[0]["url"] and len(github.pulls) == 1
    pull = github.pulls[0]
    assert (pull["head"], pull["base"], pull["title"]) == ("taskrun/bump", branch, "Bump the version")
    assert pull["body"] == (repo / record["summary"]).read_text() and "Bump the version" in pull["body"]
    assert any("pull request for taskrun/bump opened" in line for line in notices.lines)
    assert not any(TOKEN in line for line in notices.lines)


def _committed_run(root: Path, task_id: str, number: int) -> dict[str, object]:
    try:
        return json.loads(git(root, "show", f"HEAD:runs/{task_id}/run-{number}/status.json"))
    except Exception:
        return {}


def test_a_request_waiting_to_be_retried_is_named_when_the_daemon_stops(github: StandInForge,
                                                                        collected: Collected) -> None:
    github.fail_with = 503
    prs = thread(collected, retry_delays=(600.0,))
    prs.submit(github.config(), job())
    wait_until(lambda: any("503" in n for n in collected.notices), 10, "the first failure")

    prs.stop()

    assert "the daemon stopped first" in collected.notices[-1] and "taskrun/add-login" in collected.notices[-1]
    assert collected.events.empty()
