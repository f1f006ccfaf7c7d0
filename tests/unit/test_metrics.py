"""Prometheus metrics (metrics.py, config_metrics.py): what is counted, how it is named, how it is served."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskrunner.config import parse_config
from taskrunner.config_metrics import MetricsConfig
from taskrunner.config_template import INIT_TEMPLATE
from taskrunner.errors import ConfigError
from taskrunner.fleet import Fleet
from taskrunner.gitflow.gitstate import GitState
from taskrunner.gitflow.push import Pusher
from taskrunner.gitops import Git
from taskrunner.hooks import Hooks, HookSet, emit
from taskrunner.http import HttpServer
from taskrunner.keys import Keyring
from taskrunner.metrics import PATH, Metrics, MetricsRoute, listeners, word
from taskrunner.model import RunStatus, TaskStatus
from taskrunner.results import ResultRejected, more_output_owed, verified_result
from taskrunner.state import RunState, TaskState
from tests.conftest import Daemon, git, wait_until
from tests.unit.test_fleet import OTHER, PINNED, _hello, _ssh_workers

TASK_IDS = ("release-notes-2026", "fix-login")
#: Label names a metric may carry; a Task id or Run id must never be one's value.
ALLOWED_LABELS = {"agent", "worker", "status", "state", "what", "reason", "model", "kind", "le"}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def values(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(metrics.render()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return values(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def task(task_id: str, status: TaskStatus, not_before: float = 0.0) -> TaskState:
    return TaskState(task_id, f"tasks/{task_id}.md", 1, status=status, not_before=not_before)


def run(task_id: str, run_id: str, clock: Clock, **fields: object) -> RunState:
    return RunState(run_id=run_id, task_id=task_id, number=1, revision="r" * 64, attempt=1, worker="local",
                    agent="claude", created_at=clock.now, **fields)  # type: ignore[arg-type]


def play_run(metrics: Metrics, clock: Clock, task_id: str, run_id: str, final: RunStatus, wait: float = 2.0,
             took: float = 40.0, **report: object) -> RunState:
    """A Task becomes PENDING, waits `wait` s, its Run is assigned, starts, and ends `final` after `took` s,
    each change saved (and so announced) more than once, as the engine does."""
    metrics.task_changed(task(task_id, TaskStatus.PENDING))
    clock.now += wait
    r = run(task_id, run_id, clock, status=RunStatus.ASSIGNED, assigned_at=clock.now)
    metrics.run_changed(r)
    metrics.task_changed(task(task_id, TaskStatus.RUNNING))
    r.status, r.started_at = RunStatus.RUNNING, clock.now
    metrics.run_changed(r)
    metrics.run_changed(r)  # output, a heartbeat: saved again, not started again
    clock.now += took
    r.status, r.finished_at = final, clock.now
    for name, item in report.items():
        setattr(r, name, item)
    metrics.run_changed(r)
    metrics.run_changed(r)  # a pull request's URL recorded on it later: not finished again
    metrics.task_changed(task(task_id, TaskStatus(final.value)))
    return r


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> Metrics:
    return Metrics(clock)


# -- configuration -----------------------------------------------------------------------


def test_metrics_listen_is_parsed_and_off_by_default() -> None:
    assert parse_config("", ".taskrun.yaml").metrics is None
    config = parse_config("metrics:\n  listen: 127.0.0.1:9464\n", ".taskrun.yaml")
    assert config.metrics == MetricsConfig("127.0.0.1", 9464)
    assert parse_config("metrics: {listen: '[::1]:9100'}\n", ".taskrun.yaml").metrics == MetricsConfig("::1", 9100)


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "host:port", ":9464",
                                    "127.0.0.1:９４６４", "[]:9464", 9464, ["127.0.0.1:9464"],
                                    "[::1:9464", "::1]:9464", "::1:9464", "127.0.0.1 :9464", "a b:9464",
                                    "-host:9464", "a..b:9464", "[not-v6]:9464", "x" * 64 + ":9464"])
def test_a_bad_metrics_listen_is_a_config_error_naming_the_key(listen: object) -> None:
    text = f"metrics:\n  listen: {listen!r}\n" if isinstance(listen, str) else f"metrics:\n  listen: {listen}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "/repo/.taskrun.yaml")
    assert caught.value.key == "metrics.listen"
    assert "/repo/.taskrun.yaml" in str(caught.value) and "metrics.listen" in str(caught.value)
    assert "HOST:PORT" in str(caught.value)


@pytest.mark.parametrize(("text", "key"), [("metrics: {port: 9464}\n", "metrics.port"),
                                           ("metrics: {}\n", "metrics.listen"),
                                           ("metrics: 9464\n", "metrics")])
def test_a_malformed_metrics_section_names_its_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, ".taskrun.yaml")
    assert caught.value.key == key


def test_the_config_template_shows_the_metrics_key_and_still_parses() -> None:
    text = INIT_TEMPLATE
    assert "# metrics:\n#   listen: 127.0.0.1:9464\n" in text
    uncommented = text.replace("# metrics:\n#   listen:", "metrics:\n  listen:")
    assert parse_config(uncommented, ".taskrun.yaml").metrics == MetricsConfig("127.0.0.1", 9464)


# -- names and labels ----------------------------------------------------------------------


def test_names_and_labels_follow_prometheus_conventions_and_no_label_is_a_task_or_run_id(
        metrics: Metrics, clock: Clock) -> None:
    play_run(metrics, clock, TASK_IDS[0], "a1b2c3d4e5f60718", RunStatus.COMPLETED, cost_usd=0.5,
             usage={"input_tokens": 10, "output_tokens": 5, "cache_read_tokens": 0, "cache_write_tokens": 0},
             backend_used={"model": "claude-sonnet-4-5"})
    play_run(metrics, clock, TASK_IDS[1], "0f1e2d3c4b5a6978", RunStatus.FAILED)
    metrics.worker_changed({"name": "local", "online": True, "trusted": True, "slots": 2, "used": 0})
    metrics.committed("f" * 40, "2 record(s)")
    for kind, fields in (("push", {"ok": False, "error": "unreachable"}),
                         ("rejected", {"what": "result", "reason": "signature", "worker": "local"}),
                         ("usage_limited", {"agent": "claude", "worker": None, "until": clock.now + 60})):
        metrics.event(kind, fields)
    families = list(text_string_to_metric_families(metrics.render()))
    names = {f.name: f.type for f in families}
    assert {"taskrun_runs_started", "taskrun_runs_finished", "taskrun_run_duration_seconds",
            "taskrun_run_queue_wait_seconds", "taskrun_tasks", "taskrun_workers", "taskrun_worker_slots",
            "taskrun_worker_slots_used", "taskrun_commits", "taskrun_pushes", "taskrun_push_failures",
            "taskrun_rejections", "taskrun_agent_cost_usd", "taskrun_agent_tokens",
            "taskrun_usage_limit_pauses"} <= set(names)
    for family in families:
        assert re.fullmatch(r"taskrun_[a-z][a-z0-9_]*", family.name), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name == family.name + "_total", sample.name
            if family.type == "histogram":
                assert family.name.endswith("_seconds")
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            for label_value in sample.labels.values():
                assert label_value not in TASK_IDS + ("a1b2c3d4e5f60718", "0f1e2d3c4b5a6978"), sample
    assert "_created" not in metrics.render()


# -- what is counted -----------------------------------------------------------------------


def test_each_run_is_started_and_finished_once_however_often_it_is_saved(metrics: Metrics, clock: Clock) -> None:
    play_run(metrics, clock, "a", "run-a", RunStatus.COMPLETED)
    play_run(metrics, clock, "b", "run-b", RunStatus.FAILED)
    play_run(metrics, clock, "c", "run-c", RunStatus.COMPLETED)
    assert value(metrics, "taskrun_runs_started_total", agent="claude", worker="local") == 3
    assert value(metrics, "taskrun_runs_finished_total", status="COMPLETED", agent="claude", worker="local") == 2
    assert value(metrics, "taskrun_runs_finished_total", status="FAILED", agent="claude", worker="local") == 1
    assert value(metrics, "taskrun_tasks", status="COMPLETED") == 2
    assert value(metrics, "taskrun_tasks", status="FAILED") == 1
    assert value(metrics, "taskrun_tasks", status="PENDING") == 0


def test_run_duration_and_queue_wait_are_observed_in_seconds(metrics: Metrics, clock: Clock) -> None:
    play_run(metrics, clock, "a", "run-a", RunStatus.COMPLETED, wait=3.0, took=42.0)
    assert value(metrics, "taskrun_run_duration_seconds_count", agent="claude") == 1
    assert value(metrics, "taskrun_run_duration_seconds_sum", agent="claude") == pytest.approx(42.0)
    assert value(metrics, "taskrun_run_duration_seconds_bucket", agent="claude", le="30.0") == 0
    assert value(metrics, "taskrun_run_duration_seconds_bucket", agent="claude", le="60.0") == 1
    assert value(metrics, "taskrun_run_queue_wait_seconds_sum", agent="claude") == pytest.approx(3.0)


def test_queue_wait_starts_when_a_retry_backoff_ends(metrics: Metrics, clock: Clock) -> None:
    metrics.task_changed(task("a", TaskStatus.PENDING, not_before=clock.now + 30))
    clock.now += 31
    metrics.run_changed(run("a", "run-a", clock, status=RunStatus.ASSIGNED, assigned_at=clock.now))
    assert value(metrics, "taskrun_run_queue_wait_seconds_sum", agent="claude") == pytest.approx(1.0)


def test_a_run_so_short_its_end_is_its_first_news_counts_as_started(metrics: Metrics, clock: Clock) -> None:
    metrics.task_changed(task("a", TaskStatus.PENDING))
    r = run("a", "run-a", clock, status=RunStatus.COMPLETED, assigned_at=clock.now, finished_at=clock.now + 1)
    metrics.run_changed(r)
    assert value(metrics, "taskrun_runs_started_total", agent="claude", worker="local") == 1
    assert value(metrics, "taskrun_runs_finished_total", status="COMPLETED", agent="claude", worker="local") == 1


def test_a_run_finished_before_the_daemon_started_is_not_counted_when_saved_again(
        metrics: Metrics, clock: Clock) -> None:
    old = run("a", "run-a", clock, status=RunStatus.COMPLETED, assigned_at=clock.now - 100,
              finished_at=clock.now - 50)
    metrics.run_changed(old)  # its pull request's URL recorded after a restart
    assert value(metrics, "taskrun_runs_finished_total", status="COMPLETED", agent="claude", worker="local") == 0


def test_a_restored_open_run_is_counted_when_it_ends_but_not_started_again(clock: Clock) -> None:
    metrics = Metrics(clock)
    restored = task("a", TaskStatus.RUNNING)
    r = run("a", "run-a", clock, status=RunStatus.RUNNING, assigned_at=clock.now - 500, started_at=clock.now - 500,
            finished_at=None)
    restored.runs.append(r)
    metrics.seed([restored, task("b", TaskStatus.PENDING)],
                 [{"name": "local", "online": False, "trusted": True, "slots": 4, "used": 1}])
    assert value(metrics, "taskrun_tasks", status="RUNNING") == 1
    assert value(metrics, "taskrun_tasks", status="PENDING") == 1
    r.status, r.finished_at = RunStatus.COMPLETED, clock.now - 1  # ended while the daemon was away
    metrics.run_changed(r)
    assert value(metrics, "taskrun_runs_finished_total", status="COMPLETED", agent="claude", worker="local") == 1
    assert value(metrics, "taskrun_runs_started_total", agent="claude", worker="local") == 0


def test_cost_and_tokens_are_counted_per_agent_and_model(metrics: Metrics, clock: Clock) -> None:
    usage = {"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 5000, "cache_write_tokens": 0}
    for n in range(2):
        play_run(metrics, clock, f"t{n}", f"run-{n}", RunStatus.COMPLETED, cost_usd=0.25, usage=usage,
                 backend_used={"provider": "anthropic", "model": "claude-sonnet-4-5"})
    play_run(metrics, clock, "t3", "run-3", RunStatus.COMPLETED)  # reported nothing
    model = {"agent": "claude", "model": "claude-sonnet-4-5"}
    assert value(metrics, "taskrun_agent_cost_usd_total", **model) == pytest.approx(0.5)
    assert value(metrics, "taskrun_agent_tokens_total", kind="input", **model) == 2400
    assert value(metrics, "taskrun_agent_tokens_total", kind="output", **model) == 600
    assert value(metrics, "taskrun_agent_tokens_total", kind="cache_read", **model) == 10000
    unreported = ("taskrun_agent_tokens_total", tuple(sorted({"kind": "cache_write", **model}.items())))
    assert unreported not in values(metrics)


def test_model_names_from_tools_are_bounded(metrics: Metrics, clock: Clock) -> None:
    for n in range(60):
        play_run(metrics, clock, f"t{n}", f"run-{n}", RunStatus.COMPLETED, cost_usd=1.0,
                 backend_used={"model": f"model-{n}-" + "x" * 200})
    models = {labels for (name, labels) in values(metrics) if name == "taskrun_agent_cost_usd_total"}
    assert len(models) == 51  # MAX_MODELS, and "other"
    assert value(metrics, "taskrun_agent_cost_usd_total", agent="claude", model="other") == 10
    assert all(len(dict(labels)["model"]) <= 100 for labels in models)


def test_events_count_commits_pushes_rejections_and_pauses(metrics: Metrics) -> None:
    hooks = HookSet(metrics)
    emit(hooks, "committed", "a" * 40, "1 record(s)")
    emit(hooks, "event", "push", {"ok": True, "error": None})
    emit(hooks, "event", "push", {"ok": False, "error": "remote unreachable"})
    emit(hooks, "event", "rejected", {"what": "bundle", "reason": "disk_full", "worker": "w1"})
    emit(hooks, "event", "rejected", {"what": "result", "reason": "signature", "worker": "w1"})
    emit(hooks, "event", "rejected", {"what": "result", "reason": "Signature by key SHA256:abc is bad",
                                      "worker": "w1"})
    emit(hooks, "event", "usage_limited", {"agent": "claude", "worker": None, "until": 0.0})
    assert value(metrics, "taskrun_commits_total") == 1
    assert value(metrics, "taskrun_pushes_total") == 2
    assert value(metrics, "taskrun_push_failures_total") == 1
    assert value(metrics, "taskrun_rejections_total", what="bundle", reason="disk_full") == 1
    assert value(metrics, "taskrun_rejections_total", what="result", reason="signature") == 1
    assert value(metrics, "taskrun_rejections_total", what="result", reason="other") == 1  # not a fixed word
    assert value(metrics, "taskrun_usage_limit_pauses_total", agent="claude") == 1


def test_workers_are_counted_by_state_with_their_slots(metrics: Metrics) -> None:
    metrics.worker_changed({"name": "local", "online": True, "trusted": True, "slots": 2, "used": 1})
    metrics.worker_changed({"name": "build-1", "online": False, "trusted": None, "slots": 8, "used": 0})
    metrics.worker_changed({"name": "build-2", "online": True, "trusted": True, "slots": 4, "used": 4})
    metrics.event("worker_untrusted", {"worker": "build-2", "reason": "its result key changed"})
    assert value(metrics, "taskrun_workers", state="online") == 1
    assert value(metrics, "taskrun_workers", state="offline") == 1
    assert value(metrics, "taskrun_workers", state="untrusted") == 1
    assert value(metrics, "taskrun_worker_slots", worker="build-1") == 8
    assert value(metrics, "taskrun_worker_slots_used", worker="local") == 1
    assert value(metrics, "taskrun_worker_slots_used", worker="build-2") == 4


# -- the route and its listener ------------------------------------------------------------


@pytest.fixture
def server(metrics: Metrics) -> Iterator[HttpServer]:
    made = HttpServer("127.0.0.1", 0, {PATH: MetricsRoute(metrics)}, notice=lambda message: None,
                      where="metrics.listen")
    made.start()
    yield made
    made.stop()


def test_the_route_serves_the_text_format_over_http(server: HttpServer, metrics: Metrics, clock: Clock) -> None:
    play_run(metrics, clock, "a", "run-a", RunStatus.FAILED)
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = answer.read().decode()
    parsed = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "taskrun_runs_finished_total"}
    assert parsed["taskrun_runs_finished_total"].labels["status"] == "FAILED"
    assert parsed["taskrun_runs_finished_total"].value == 1
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/metrics", data=b"", method="POST"),
                               timeout=10)
    refused.value.close()
    assert refused.value.code == 405


@pytest.mark.parametrize("listen", ["[::1:8787", "a b:8787", "::1:8787", "h\u00e9:8787"])
def test_a_bad_webhook_listen_is_refused_the_same_way(listen: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"webhook:\n  listen: {listen!r}\n  secret_env: HOOK_SECRET\n", "/repo/.taskrun.yaml")
    assert caught.value.key == "webhook.listen" and "HOST:PORT such as 127.0.0.1:8787" in str(caught.value)


def test_metrics_share_the_webhook_listener_on_the_same_address_else_get_their_own() -> None:
    route = MetricsRoute(Metrics())
    webhook_routes: dict[str, Any] = {"/webhook": object(), "/": object()}
    shared = listeners(("127.0.0.1", 8787), webhook_routes, MetricsConfig("127.0.0.1", 8787), route)
    assert [(h, p, sorted(r), w) for h, p, r, w in shared] == [("127.0.0.1", 8787, ["/", "/metrics", "/webhook"],
                                                                "webhook.listen")]
    apart = listeners(("127.0.0.1", 8787), webhook_routes, MetricsConfig("127.0.0.1", 9464), route)
    assert [(p, sorted(r), w) for _, p, r, w in apart] == [(8787, ["/", "/webhook"], "webhook.listen"),
                                                          (9464, ["/metrics"], "metrics.listen")]
    alone = listeners(None, {}, MetricsConfig("::1", 9464), route)
    assert [(h, p, sorted(r), w) for h, p, r, w in alone] == [("::1", 9464, ["/metrics"], "metrics.listen")]
    assert listeners(None, {}, None, None) == []


# -- the sites that emit the events --------------------------------------------------------


def test_push_rounds_reach_the_metrics_as_push_events(tmp_path: Path, isolated_git: Path, metrics: Metrics) -> None:
    git(tmp_path, "init", "--quiet", "--bare", str(tmp_path / "origin.git"))
    git(tmp_path, "clone", "--quiet", str(tmp_path / "origin.git"), str(tmp_path / "clone"))
    clone = tmp_path / "clone"
    events: list[tuple[str, dict[str, object]]] = []

    def on_event(kind: str, fields: dict[str, object]) -> None:
        events.append((kind, fields))
        metrics.event(kind, fields)

    pusher = Pusher(Git(clone), "origin", "taskrun/", GitState(tmp_path / "state"), lambda message: None,
                    on_event=on_event)
    pusher.run()  # nothing committed yet: the round fails
    assert events[-1][0] == "push" and events[-1][1]["ok"] is False and events[-1][1]["error"]
    git(clone, "-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "--quiet", "--allow-empty", "-m", "x")
    pusher.run()
    assert events[-1] == ("push", {"ok": True, "error": None})
    assert value(metrics, "taskrun_pushes_total") == 2
    assert value(metrics, "taskrun_push_failures_total") == 1


def test_a_rejected_result_carries_a_fixed_word_for_its_reason() -> None:
    with pytest.raises(ResultRejected) as caught:
        verified_result({}, None, "run-1", (0, ""))
    assert caught.value.reason == "no_key"
    with pytest.raises(ResultRejected) as caught:
        more_output_owed(10, 5, 0)
    assert caught.value.reason == "output_size"
    assert word(caught.value.reason) == "output_size" and word(str(caught.value)) == "other"


def test_a_worker_found_untrusted_is_one_event_and_counted_untrusted(tmp_path: Path, metrics: Metrics) -> None:
    class Heard(Hooks):
        def __init__(self) -> None:
            self.events: list[tuple[str, dict[str, object]]] = []

        def event(self, kind: str, fields: dict[str, object]) -> None:
            self.events.append((kind, fields))

    heard = Heard()
    keyring, _ = Keyring.ensure(tmp_path / "cp", 0.0)
    fleet = Fleet(parse_config(_ssh_workers(PINNED.public_line), ".taskrun.yaml"), tmp_path, lambda event: None,
                  keyring, HookSet(heard, metrics))
    worker = next(iter(fleet))
    worker.reconnect_at = None
    metrics.seed([], [worker.view()])
    assert fleet.hello(worker, _hello(OTHER), 5.0) is None  # its result key is not the pinned one
    assert fleet.hello(worker, _hello(OTHER), 9.0) is None  # and again at the next reconnect: no second event
    assert [kind for kind, _ in heard.events] == ["worker_untrusted"]
    assert heard.events[0][1]["worker"] == "build" and "result key changed" in str(heard.events[0][1]["reason"])
    assert value(metrics, "taskrun_workers", state="untrusted") == 1
    assert value(metrics, "taskrun_workers", state="offline") == 0


# -- a reload ------------------------------------------------------------------------------

OLD_WORKER = "  old:\n    transport: local\n    slots: 3\n    agents: [shell]\n    sandbox: bwrap\n"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{PATH}", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.slow
def test_a_worker_removed_by_a_reload_leaves_the_metrics(repo: Path) -> None:
    config = repo / ".taskrun.yaml"
    before = config.read_text()
    assert "\n  local:\n" in before
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with_old = before.replace("\n  local:\n", "\n" + OLD_WORKER + "  local:\n", 1)
    config.write_text(with_old + f"metrics:\n  listen: 127.0.0.1:{port}\n")
    daemon = Daemon(repo).start()
    try:
        def workers() -> dict[str, float]:
            found = scrape(port)
            return {dict(labels)["worker"]: count for (name, labels), count in found.items()
                    if name == "taskrun_worker_slots"}

        assert wait_until(lambda: workers() == {"local": 2.0, "old": 3.0} and workers(), 20,
                          "both Workers in the metrics") == {"local": 2.0, "old": 3.0}
        online = scrape(port)[("taskrun_workers", (("state", "online"),))]
        config.write_text(before + f"metrics:\n  listen: 127.0.0.1:{port}\n")  # `old` taken out
        wait_until(lambda: set(workers()) == {"local"}, 20, "the removed Worker to leave taskrun_worker_slots")
        found = scrape(port)
        assert ("taskrun_worker_slots_used", (("worker", "old"),)) not in found
        assert sum(found[("taskrun_workers", (("state", s),))] for s in ("online", "offline", "untrusted")) == 1
        assert found[("taskrun_workers", (("state", "online"),))] == online - 1
    finally:
        daemon.stop()


def test_a_reload_reseeds_the_workers_and_drops_the_removed_ones_series(metrics: Metrics, clock: Clock) -> None:
    metrics.seed([], [{"name": "local", "online": True, "slots": 2, "used": 0},
                      {"name": "old", "online": True, "slots": 3, "used": 1}])
    play_run(metrics, clock, TASK_IDS[0], "a1b2c3d4e5f60718", RunStatus.COMPLETED)  # on `local`
    old = run(TASK_IDS[1], "0f1e2d3c4b5a6978", clock, status=RunStatus.RUNNING, assigned_at=clock.now,
              started_at=clock.now)
    old.worker = "old"
    metrics.run_changed(old)
    old.status, old.finished_at = RunStatus.FAILED, clock.now + 1  # lost when `old` was removed
    metrics.run_changed(old)
    assert value(metrics, "taskrun_runs_finished_total", status="FAILED", agent="claude", worker="old") == 1
    assert metrics.reseed_workers([{"name": "local", "online": True, "slots": 2, "used": 0}]) == ["old"]
    metrics.worker_changed({"name": "old", "online": False, "slots": 3, "used": 0})  # late news: ignored
    found = values(metrics)
    assert not [key for key in found if ("worker", "old") in key[1]]
    assert value(metrics, "taskrun_runs_started_total", agent="claude", worker="local") == 1
    assert value(metrics, "taskrun_runs_finished_total", status="COMPLETED", agent="claude", worker="local") == 1
    assert value(metrics, "taskrun_workers", state="online") == 1
    assert value(metrics, "taskrun_workers", state="offline") == 0
    metrics.reseed_workers([{"name": "old", "online": False, "slots": 3, "used": 0}])  # configured again
    assert value(metrics, "taskrun_worker_slots", worker="old") == 3
