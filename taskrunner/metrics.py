"""Prometheus metrics: the daemon's events counted, and a `/metrics` route on its HTTP server.

`metrics: {listen: HOST:PORT}` turns it on (config_metrics.py; docs/metrics.md
lists every metric). The exposition format, the metric types and the
histogram arithmetic are `prometheus_client`'s (the only module importing it):
nothing of the format is written here. The registry is private to each
`Metrics`, never the library's global one, so nothing else in the process
(and no second daemon in a test) mixes into it.

    Metrics (a Hooks)  <- engine, fleet, recorder and pusher events, on their threads
      counters, histograms   prometheus_client objects (thread-safe)
      snapshot               Task statuses, Workers, open Runs: dicts under one short lock;
                             its Workers re-seeded from the fleet at each reload (reseed_workers)
    MetricsRoute       GET /metrics on an HTTP connection's thread: renders the registry;
                       gauges come from the snapshot (_Gauges), never from the engine or disk

Labels are bounded: Agent and Worker names come from the configuration,
statuses from their enums, a rejection's reason is a short fixed word, a
model name is what a tool reports (cut to MAX_LABEL_CHARS, at most
MAX_MODELS distinct, the rest "other"). No Task id or Run id is ever a label.
Counters start at zero when the daemon starts (Prometheus' `rate()` and
`increase()` take resets in their stride).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from taskrunner.hooks import Hooks
from taskrunner.http import Request, Response
from taskrunner.model import RunStatus, TaskStatus

if TYPE_CHECKING:
    from taskrunner.config_metrics import MetricsConfig
    from taskrunner.http import Route
    from taskrunner.state import RunState, TaskState

#: The route's path.
PATH = "/metrics"
#: Run durations, seconds: from a few seconds of a shell Task to hours of an Agent.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)
#: Queue waits, seconds: a free slot answers in well under a second; a busy fleet takes minutes or more.
QUEUE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
#: Worker states counted by taskrun_workers.
WORKER_STATES = ("online", "offline", "untrusted")
#: Longest label value taken from outside (a model name a tool reports).
MAX_LABEL_CHARS = 100
#: Distinct model names labelled; later ones are counted as "other".
MAX_MODELS = 50
#: Final Runs remembered so that a Run saved again (its pull request URL, say) is not counted twice.
REMEMBERED_RUNS = 4096
#: usage keys (agents/stream.py USAGE_KEYS) -> the `kind` label.
TOKEN_KINDS = {"input_tokens": "input", "output_tokens": "output",
               "cache_read_tokens": "cache_read", "cache_write_tokens": "cache_write"}
_WORD_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_REJECTED_WHAT = ("bundle", "result")

# The `_created` series (each counter's creation time) are noise here: a counter's reset is its daemon's start.
disable_created_metrics()


class Metrics(Hooks):
    """The daemon's metrics, fed by its hooks; `render()` is the exposition text.

    `clock` gives epoch seconds (the engine's wall clock; Run times are on it).
    Every method may be called from any thread.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._born = clock()
        self._lock = threading.Lock()
        self._tasks: dict[str, str] = {}  # Task id -> status (only counted, never a label)
        self._workers: dict[str, tuple[str, int, int]] = {}  # Worker name -> (state, slots, used)
        self._removed: set[str] = set()  # Workers a reload removed (until one configures them again)
        self._open: dict[str, bool] = {}  # Run id -> counted as started; Runs not final yet
        self._done: OrderedDict[str, None] = OrderedDict()  # final Runs counted, oldest first
        self._pending_since: dict[str, float] = {}  # Task id -> since when it could run (epoch s)
        self._models: set[str] = set()
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.runs_started = Counter("taskrun_runs_started", "Runs handed to a Worker.",
                                    ("agent", "worker"), registry=registry)
        self.runs_finished = Counter("taskrun_runs_finished", "Runs that reached a final status.",
                                     ("status", "agent", "worker"), registry=registry)
        self.run_duration = Histogram("taskrun_run_duration_seconds", "From a Run's start on its Worker to its end.",
                                      ("agent",), buckets=DURATION_BUCKETS, registry=registry)
        self.queue_wait = Histogram("taskrun_run_queue_wait_seconds",
                                    "From a Task being ready to run (PENDING, past any retry backoff) to its Run "
                                    "being handed to a Worker.", ("agent",), buckets=QUEUE_BUCKETS, registry=registry)
        self.commits = Counter("taskrun_commits", "Record commits made.", registry=registry)
        self.pushes = Counter("taskrun_pushes", "Push rounds to the remote (git.push).", registry=registry)
        self.push_failures = Counter("taskrun_push_failures", "Push rounds that failed (retried later).",
                                     registry=registry)
        self.rejections = Counter("taskrun_rejections", "Bundles a Worker refused, results the control plane "
                                  "refused.", ("what", "reason"), registry=registry)
        self.cost = Counter("taskrun_agent_cost_usd", "What Agents' tools reported (or prices estimated) their "
                            "Runs cost, USD.", ("agent", "model"), registry=registry)
        self.tokens = Counter("taskrun_agent_tokens", "Tokens Agents' tools reported.", ("agent", "model", "kind"),
                              registry=registry)
        self.usage_limit_pauses = Counter("taskrun_usage_limit_pauses", "Agents paused until a usage limit resets.",
                                          ("agent",), registry=registry)
        registry.register(_Gauges(self))

    # -- the snapshot the gauges read ------------------------------------------

    def seed(self, tasks: Iterable[TaskState], workers: Iterable[Mapping[str, Any]]) -> None:
        """Take the state as it is (after the engine restored it, after a reload): Task statuses, Workers'
        views (fleet.WorkerState.view()), Runs still open (their ends are counted; their starts were)."""
        tasks = list(tasks)
        now = self._clock()
        with self._lock:
            self._tasks = {task.id: task.status.value for task in tasks}
            self._workers = {str(view.get("name")): _worker_row(view) for view in workers}
            for task in tasks:
                if task.status is TaskStatus.PENDING:
                    self._pending_since.setdefault(task.id, max(now, task.not_before or 0.0))
                run = task.active_run
                if run is not None:
                    self._open.setdefault(run.run_id, run.status is not RunStatus.PENDING)

    def reseed_workers(self, workers: Iterable[Mapping[str, Any]]) -> list[str]:
        """After a reload: the Workers' part of the snapshot becomes exactly `workers` (the fleet's
        views), and the counters' series labelled with a Worker no longer configured are removed, so a
        removed Worker leaves every metric. Returns the removed Workers' names, sorted."""
        rows = {str(view.get("name")): _worker_row(view) for view in workers}
        with self._lock:
            gone = sorted(set(self._workers) - set(rows))
            self._workers = rows
            self._removed = (self._removed | set(gone)) - set(rows)
        for name in gone:
            _remove_series(self.runs_started, ("agent", "worker"), name)
            _remove_series(self.runs_finished, ("status", "agent", "worker"), name)
        return gone

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], dict[str, tuple[int, int]]]:
        """(Tasks per status, Workers per state, {Worker: (slots, used)}): every status and state present."""
        with self._lock:
            statuses = list(self._tasks.values())
            workers = dict(self._workers)
        tasks = {status.value: 0 for status in TaskStatus}
        for status in statuses:
            tasks[status] = tasks.get(status, 0) + 1
        states = dict.fromkeys(WORKER_STATES, 0)
        for state, _, _ in workers.values():
            states[state] += 1
        return tasks, states, {name: (slots, used) for name, (_, slots, used) in workers.items()}

    def render(self) -> str:
        """The exposition text (Prometheus text format 0.0.4, prometheus_client's generate_latest)."""
        return generate_latest(self.registry).decode()

    # -- hooks -------------------------------------------------------------------

    def task_changed(self, task: TaskState) -> None:
        with self._lock:
            self._tasks[task.id] = task.status.value
            if task.status is TaskStatus.PENDING:
                ready = max(self._pending_since.get(task.id, self._clock()), task.not_before or 0.0)
                self._pending_since[task.id] = ready
            elif task.status is not TaskStatus.RUNNING:
                self._pending_since.pop(task.id, None)

    def task_removed(self, task: TaskState) -> None:
        with self._lock:  # pruned: no longer counted by taskrun_tasks
            self._tasks.pop(task.id, None)
            self._pending_since.pop(task.id, None)

    def run_changed(self, run: RunState) -> None:
        with self._lock:
            started, ready_at, finished = self._count(run)
        if started:
            self.runs_started.labels(run.agent, run.worker).inc()
            if run.assigned_at is not None and ready_at is not None:
                self.queue_wait.labels(run.agent).observe(max(0.0, run.assigned_at - ready_at))
        if finished:
            self._finished(run)

    def worker_changed(self, worker: dict[str, Any]) -> None:
        with self._lock:
            name = str(worker.get("name"))
            if name not in self._removed:  # late news of a Worker a reload removed does not bring it back
                self._workers[name] = _worker_row(worker)

    def committed(self, commit: str, summary: str) -> None:
        self.commits.inc()

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "push":
            self.pushes.inc()
            if not fields.get("ok"):
                self.push_failures.inc()
        elif kind == "rejected":
            what = fields.get("what")
            self.rejections.labels(what if what in _REJECTED_WHAT else "other", word(fields.get("reason"))).inc()
        elif kind == "usage_limited":
            self.usage_limit_pauses.labels(label(fields.get("agent"))).inc()
        elif kind == "worker_untrusted":  # a Worker refused while offline gets no worker_changed
            with self._lock:
                name = str(fields.get("worker"))
                if name in self._workers:
                    self._workers[name] = ("untrusted", *self._workers[name][1:])

    # -- Runs --------------------------------------------------------------------

    def _count(self, run: RunState) -> tuple[bool, float | None, bool]:
        """Under the lock: (started now, since when its Task was ready to run if known, finished now).
        Each Run starts and finishes once here, however often it is saved."""
        if not run.status.final:
            if run.status is RunStatus.PENDING or self._open.get(run.run_id, False):
                self._open.setdefault(run.run_id, False)
                return False, None, False
            self._open[run.run_id] = True
            return True, self._pending_since.pop(run.task_id, None), False
        if run.run_id in self._done:
            return False, None, False
        was_open = run.run_id in self._open
        counted = self._open.pop(run.run_id, False)
        # A final Run never seen open: one that failed before it was handed out, or (finished before this
        # daemon started) one saved again for its pull request's URL; only the first is counted.
        if not was_open and (run.finished_at or 0.0) < self._born:
            return False, None, False
        self._done[run.run_id] = None
        while len(self._done) > REMEMBERED_RUNS:
            self._done.popitem(last=False)
        if not counted and run.assigned_at is not None:  # so short its first news was its end
            return True, self._pending_since.pop(run.task_id, None), True
        return False, None, True

    def _finished(self, run: RunState) -> None:
        self.runs_finished.labels(run.status.value, run.agent, run.worker).inc()
        begun = run.started_at if run.started_at is not None else run.assigned_at
        if begun is not None and run.finished_at is not None:
            self.run_duration.labels(run.agent).observe(max(0.0, run.finished_at - begun))
        model = self._model((run.backend_used or {}).get("model"))
        if isinstance(run.cost_usd, (int, float)) and not isinstance(run.cost_usd, bool) and run.cost_usd > 0:
            self.cost.labels(run.agent, model).inc(float(run.cost_usd))
        for key, kind in TOKEN_KINDS.items():
            count = (run.usage or {}).get(key)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                self.tokens.labels(run.agent, model, kind).inc(count)

    def _model(self, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            return "unknown"
        name = label(value)
        with self._lock:
            if name not in self._models:
                if len(self._models) >= MAX_MODELS:
                    return "other"
                self._models.add(name)
        return name


class _Gauges(Collector):
    """taskrun_tasks, taskrun_workers, taskrun_worker_slots(_used), read from the snapshot at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        tasks, states, slots = self._metrics.snapshot()
        task_gauge = GaugeMetricFamily("taskrun_tasks", "Tasks by status.", labels=("status",))
        for status, count in sorted(tasks.items()):
            task_gauge.add_metric((status,), count)
        worker_gauge = GaugeMetricFamily("taskrun_workers", "Workers by state.", labels=("state",))
        for state, count in states.items():
            worker_gauge.add_metric((state,), count)
        slot_gauge = GaugeMetricFamily("taskrun_worker_slots", "Runs a Worker takes at once.", labels=("worker",))
        used_gauge = GaugeMetricFamily("taskrun_worker_slots_used", "Runs a Worker holds now.", labels=("worker",))
        for name, (total, used) in sorted(slots.items()):
            slot_gauge.add_metric((name,), total)
            used_gauge.add_metric((name,), used)
        yield from (task_gauge, worker_gauge, slot_gauge, used_gauge)


class MetricsRoute:
    """GET /metrics: the exposition text of `metrics` (runs on an HTTP connection's thread; reads only)."""

    methods = frozenset({"GET"})
    max_body_bytes = 0

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, request: Request) -> Response:
        # The text ends in a newline and the server adds one: an empty line, which the format ignores.
        return Response(200, self._metrics.render().rstrip("\n"), content_type=CONTENT_TYPE_PLAIN_0_0_4)


def listeners(webhook: tuple[str, int] | None, webhook_routes: Mapping[str, Route],
              metrics: MetricsConfig | None, metrics_route: Route | None
              ) -> list[tuple[str, int, dict[str, Route], str]]:
    """The HTTP listeners to start: [(host, port, routes, config key)]. The metrics route joins the
    webhook's listener when `metrics.listen` is the same address, else it gets its own."""
    plan: list[tuple[str, int, dict[str, Route], str]] = []
    if webhook is not None and webhook_routes:
        plan.append((webhook[0], webhook[1], dict(webhook_routes), "webhook.listen"))
    if metrics is not None and metrics_route is not None:
        if plan and (plan[0][0], plan[0][1]) == (metrics.host, metrics.port):
            plan[0][2][PATH] = metrics_route
        else:
            plan.append((metrics.host, metrics.port, {PATH: metrics_route}, "metrics.listen"))
    return plan


def word(value: object) -> str:
    """A rejection's reason as a label: a short lower-case word, or "other"."""
    return value if isinstance(value, str) and _WORD_RE.fullmatch(value) else "other"


def label(value: object) -> str:
    """A name from outside as a label value: printable, at most MAX_LABEL_CHARS."""
    text = "".join(c for c in str(value) if c.isprintable())[:MAX_LABEL_CHARS]
    return text or "unknown"


def _remove_series(counter: Counter, names: tuple[str, ...], worker: str) -> None:
    """Remove every series of `counter` (labelled `names`, in its order) whose `worker` label is `worker`:
    prometheus_client's `remove` takes whole label tuples, so the present ones are read from its samples."""
    present = {tuple(sample.labels.get(n, "") for n in names)
               for family in counter.collect() for sample in family.samples if sample.labels.get("worker") == worker}
    for values in present:
        try:
            counter.remove(*values)
        except KeyError:  # removed meanwhile
            pass


def _worker_row(view: Mapping[str, Any]) -> tuple[str, int, int]:
    """A Worker's view -> (state, slots, used)."""
    if view.get("trusted") is False:
        state = "untrusted"
    else:
        state = "online" if view.get("online") else "offline"
    slots, used = view.get("slots"), view.get("used")
    return state, slots if isinstance(slots, int) else 0, used if isinstance(used, int) else 0
