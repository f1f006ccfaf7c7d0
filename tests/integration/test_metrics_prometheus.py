"""`metrics.listen`: a real Prometheus scrapes the real daemon's /metrics.

Real processes throughout: the daemon (`taskrun up`) running shell Tasks, and
Debian's `prometheus` server scraping it every second, asked through its HTTP
API. Without the `prometheus` binary the test is skipped on a developer's
machine and fails under CI (CI=true), where .ci/run installs it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import Daemon, need_program, wait_status, wait_until, write_task

SECRET_ENV = "TASKRUN_TEST_METRICS_WEBHOOK_SECRET"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def enable_metrics(root: Path, port: int, webhook: bool = False) -> None:
    """Switch on `metrics` (and the webhook receiver at the same address) in root's .taskrun.yaml."""
    path = root / ".taskrun.yaml"
    text = path.read_text() + f"metrics:\n  listen: 127.0.0.1:{port}\n"
    if webhook:
        text += f"webhook:\n  listen: 127.0.0.1:{port}\n  secret_env: {SECRET_ENV}\n"
    path.write_text(text)


class Prometheus:
    """Debian's prometheus server scraping one target every second, its storage and log in `where`."""

    def __init__(self, where: Path) -> None:
        self.binary = need_program("prometheus", "prometheus")
        self.where = where
        self.port = free_port()  # its HTTP API
        self.log = where / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, target: int) -> None:
        config = self.where / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: taskrun\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target}']\n")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, f"--config.file={config}",
                                          f"--storage.tsdb.path={self.where / 'tsdb'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}"],
                                         stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    made = Prometheus(tmp_path)
    yield made
    made.stop()


def query(port: int, promql: str) -> list[dict[str, object]]:
    """Prometheus' instant query API (/api/v1/query): the result vector, [] while it cannot answer."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            data = json.loads(answer.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return []
    return list(data["data"]["result"]) if data.get("status") == "success" else []


def scalar(port: int, promql: str) -> float | None:
    result = query(port, promql)
    return float(result[0]["value"][1]) if result else None  # type: ignore[index]


@pytest.mark.slow
def test_prometheus_scrapes_runs_finished_by_status(repo: Path, daemon: Daemon, prometheus: Prometheus) -> None:
    api_port = prometheus.port
    port = free_port()
    enable_metrics(repo, port)
    daemon.start()
    wait_until(lambda: f"metrics listening on http://127.0.0.1:{port}/metrics" in daemon.output(), 10,
               "the metrics listener")
    for name in ("ok-one", "ok-two"):
        write_task(repo, name, "echo fine")
    write_task(repo, "breaks", "echo broken >&2; exit 3", front="retries: 0\n")
    for name in ("ok-one", "ok-two"):
        wait_status(repo, name, "COMPLETED")
    wait_status(repo, "breaks", "FAILED")

    prometheus.start(port)

    def seen() -> bool:
        completed = scalar(api_port, 'sum(taskrun_runs_finished_total{status="COMPLETED"})')
        failed = scalar(api_port, 'sum(taskrun_runs_finished_total{status="FAILED"})')
        return completed == 2 and failed == 1

    try:
        wait_until(seen, 60, "Prometheus to scrape 2 COMPLETED and 1 FAILED Runs")
    except AssertionError:
        raise AssertionError(f"Prometheus log:\n{prometheus.log.read_text()[-4000:]}\n"
                             f"daemon log:\n{daemon.output()[-4000:]}") from None
    # Every label set Prometheus stored is bounded: an Agent, a Worker, a status; no Task id anywhere.
    series = query(api_port, '{__name__=~"taskrun_.+", job="taskrun"}')
    assert series
    for sample in series:
        labels = dict(sample["metric"])  # type: ignore[call-overload]
        assert not {"ok-one", "ok-two", "breaks"} & set(labels.values()), labels
    assert scalar(api_port, 'sum(taskrun_runs_started_total{agent="shell", worker="local"})') == 3
    assert scalar(api_port, 'taskrun_tasks{status="COMPLETED"}') == 2
    assert scalar(api_port, 'taskrun_workers{state="online"}') == 1
    assert scalar(api_port, 'taskrun_run_duration_seconds_count{agent="shell"}') == 3
    assert (scalar(api_port, "taskrun_commits_total") or 0) >= 1


@pytest.mark.slow
def test_metrics_and_the_webhook_share_one_listener_at_the_same_address(
        repo: Path, daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "metrics-test-secret")
    port = free_port()
    enable_metrics(repo, port, webhook=True)
    daemon.start()
    wait_until(lambda: f"metrics listening on http://127.0.0.1:{port}/metrics" in daemon.output(), 10,
               "the metrics route")
    assert f"webhook receiver listening on http://127.0.0.1:{port}/webhook" in daemon.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert b"# TYPE taskrun_runs_finished_total counter" in answer.read()
    # The webhook route on the same listener answers for itself: an unsigned delivery is refused, not a 404.
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    refused.value.close()
    assert refused.value.code not in (404, 405)
