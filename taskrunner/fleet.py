"""The fleet: every configured Worker, its session, its health and its load.

Sessions are opened and re-opened here (with backoff), heartbeats are watched
here, and `views()` gives the scheduler what it needs to place Runs. A session
counts only once it is authenticated: its `hello` must present the pinned
result key and a believable trust store, the fleet answers the challenge with
an `auth` record (sessionauth.py), and the Worker's `ready` makes it online.
Its trust store must then hold exactly the keyring's live keys: otherwise a
trust statement goes out and the Worker gets no Runs until it is taken; a
Worker that refuses it (its store was changed behind the control plane's
back) is untrusted, with the reason and the fix, until it is enrolled again.
How long
a silent Worker stays online (`scheduler.worker_offline_after`) and how long
an offline Worker's Runs wait for it (`scheduler.worker_grace`) come from the
configuration, and a reload applies them. Like the engine, a Fleet is used
from one thread only.

**Clocks.** Every `now` handed to a Fleet is the wall clock's, read just
then: it is what `last_seen` and the signatures carry. Silence, grace and
reconnect delays are measured on the monotonic clock (clock.py): each
moment is also kept where it falls there (`clock.as_monotonic`), so a
wall-clock jump neither takes a Worker offline nor ends or extends its
Runs' grace.

**Reconnects.** A dropped session is opened again after a delay drawn at
random (`reconnect_delay`): its ceiling doubles with each failed attempt, from
RECONNECT_BASE to RECONNECT_MAX, and the draw is never under half of it, so
Workers that dropped at the same instant (the network blinked, every sshd
restarted) come back one after another, not in one burst. With many Workers
the window is at least SPREAD_PER_WORKER per Worker, and the sessions a
configuration adds at once (the daemon's start) are spread over the same
window (`startup_delay`); a single Worker connects at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from taskrunner import scheduler
from taskrunner.clock import as_monotonic, wall
from taskrunner.config import AGENT_PRESETS, Config
from taskrunner.defaults import CLOCK_SKEW_SECONDS, READ_MARGIN_SECONDS
from taskrunner.enroll import enroll_local, trust_request, wanted_keys
from taskrunner.errors import WorkerError
from taskrunner.hooks import Hooks, emit
from taskrunner.keys import Keyring
from taskrunner.links import LinkEvent, WorkerLink, make_link
from taskrunner.links.local import LocalLink
from taskrunner.model import AgentSpec, WorkerSpec
from taskrunner.pauses import Pauses
from taskrunner.protocol import Message
from taskrunner.sessionauth import auth_envelope
from taskrunner.signing import SignatureRejected, key_id, parse_public_line
from taskrunner.sshkeys import HostKeyError

#: A Worker's reason for having no sandbox is shown at most this long.
MAX_REASON_CHARS = 300
#: A CLI version or path from a Worker's `ready` is kept at most this long.
MAX_AGENT_FIELD_CHARS = 200
#: Reconnect delays grow from this, doubling, up to RECONNECT_MAX (seconds; each drawn with jitter).
RECONNECT_BASE = 0.5
RECONNECT_MAX = 30.0
#: Sessions due together are spread over at least this many seconds per Worker in the fleet (100: 2 s).
SPREAD_PER_WORKER = 0.02


def reconnect_delay(failures: int, workers: int, rng: random.Random) -> float:
    """Seconds until a dropped session is opened again, after `failures` failed attempts in a row.

    Drawn uniformly from [ceiling / 2, max(ceiling, spread)], where the ceiling is
    RECONNECT_BASE * 2**failures capped at RECONNECT_MAX and the spread is
    SPREAD_PER_WORKER * `workers` (the fleet's size), also capped: always in
    [RECONNECT_BASE / 2, RECONNECT_MAX]. `rng` draws (seed it for tests).
    """
    ceiling = min(RECONNECT_MAX, RECONNECT_BASE * 2.0 ** min(max(failures, 0), 16))
    upper = max(ceiling, min(RECONNECT_MAX, SPREAD_PER_WORKER * workers))
    return rng.uniform(ceiling / 2, upper)


def startup_delay(opening: int, rng: random.Random) -> float:
    """Seconds to wait before a first session, when `opening` sessions are due at once (a start).

    Uniform in [0, SPREAD_PER_WORKER * (opening - 1)], capped at RECONNECT_MAX: 0 for one
    Worker, at most 60 ms for four, 2 s for a hundred.
    """
    return rng.uniform(0.0, min(RECONNECT_MAX, SPREAD_PER_WORKER * max(opening - 1, 0)))


@dataclass(frozen=True)
class Moment:
    """A moment as the wall clock told it (seconds since the epoch, for people) and where it falls on the
    monotonic clock (for durations)."""

    wall: float
    mono: float

    @classmethod
    def at(cls, now: float | None) -> Moment | None:
        """The moment `now` (a wall time read just now), or None."""
        return None if now is None else cls(now, as_monotonic(now))


@dataclass
class WorkerState:
    spec: WorkerSpec
    link: WorkerLink | None = None
    generation: int = 0
    online: bool = False
    tried: bool = False  # a session has said hello or failed at least once
    trusted: bool | None = None  # host key, result key and trust store as expected (None: not checked yet)
    trust_pending: bool = False  # a trust statement is out: no Runs until the Worker takes it
    home_full: str | None = None  # why the Worker's home takes no new Run (its heartbeat says), or None
    result_key: bytes | None = None  # the Worker's result key, once its hello matched the pin
    hello: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # last_seen, offline_since and reconnect_at (properties below) are these moments' wall times.
    seen: Moment | None = None
    down: Moment | None = None
    reconnect: Moment | None = field(default_factory=lambda: Moment.at(0.0))  # at once
    failures: int = 0
    running: int = 0
    runs: set[str] = field(default_factory=set)
    #: `ready`'s `agents`: preset -> {"version": str|None, "path": str|None}; None: its ready listed none.
    presets: dict[str, dict[str, str | None]] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def last_seen(self) -> float | None:
        """When the Worker last said anything (wall clock)."""
        return self.seen.wall if self.seen else None

    @last_seen.setter
    def last_seen(self, now: float | None) -> None:
        self.seen = Moment.at(now)

    @property
    def offline_since(self) -> float | None:
        """When its session went down (wall clock); None while online."""
        return self.down.wall if self.down else None

    @offline_since.setter
    def offline_since(self, now: float | None) -> None:
        self.down = Moment.at(now)

    @property
    def reconnect_at(self) -> float | None:
        """When a session is opened again (wall clock); None: not until asked."""
        return self.reconnect.wall if self.reconnect else None

    @reconnect_at.setter
    def reconnect_at(self, when: float | None) -> None:
        self.reconnect = Moment.at(when)

    def offered_presets(self) -> dict[str, dict[str, str | None]] | None:
        """The presets whose CLI this Worker has, with version and path; None while it never said.

        A Worker whose `ready` carries no `agents` (an older taskrun-worker) offers every preset its
        hello lists, version unknown.
        """
        if self.presets is not None:
            return self.presets
        listed = self.hello.get("agents") if self.hello else None
        if not isinstance(listed, list):
            return None
        return {p: {"version": None, "path": None} for p in listed if isinstance(p, str) and p in AGENT_PRESETS}

    def lacking(self, agents: Mapping[str, AgentSpec]) -> dict[str, str]:
        """Agent -> preset, for the Agents it offers whose CLI it does not have (DESIGN "Placement")."""
        presets = self.offered_presets()
        if presets is None:
            return {}
        missing: dict[str, str] = {}
        for name in self.spec.agents:
            agent = agents.get(name)
            if agent is not None and not agent.always_available and agent.preset not in presets:
                missing[name] = agent.preset
        return missing

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name, "transport": self.spec.transport, "host": self.spec.host,
            "online": self.online, "reachable": self.online,
            # The local Worker is enrolled by the daemon itself: trusted unless it refused us.
            "trusted": True if self.spec.transport == "local" and self.trusted is not False else self.trusted,
            "slots": self.spec.slots, "used": len(self.runs), "agents": list(self.spec.agents),
            "labels": dict(self.spec.labels), "last_seen": self.last_seen,
            "error": self.error or (sandbox_refusal(self.spec, self.hello) if self.online else None),
            "version": self.hello.get("version"),
            "sandbox": self.hello.get("sandbox") if self.hello else None, "sandbox_accepted": self.spec.sandbox,
            "presets": self.offered_presets(),
        }


def ready_presets(value: Any) -> dict[str, dict[str, str | None]] | None:
    """`ready`'s `agents` ({preset: {version, path}}) as far as it is well-formed; None when absent.

    Input from a Worker: unknown presets and malformed entries are dropped, texts are cut.
    """
    if not isinstance(value, dict):
        return None
    presets: dict[str, dict[str, str | None]] = {}
    for preset, entry in value.items():
        if preset not in AGENT_PRESETS:
            continue
        if not isinstance(entry, dict):
            continue
        version, path = entry.get("version"), entry.get("path")
        presets[preset] = {
            "version": version[:MAX_AGENT_FIELD_CHARS] if isinstance(version, str) else None,
            "path": path[:MAX_AGENT_FIELD_CHARS] if isinstance(path, str) else None,
        }
    return presets


def sandbox_refusal(spec: WorkerSpec, hello: Mapping[str, Any]) -> str | None:
    """Why a Worker gets no Runs for want of a sandbox, or None (DESIGN.md §5.10).

    Its hello says it cannot confine Agents (or, from an older taskrun-worker,
    says nothing), and `workers.<name>.sandbox` does not accept that.
    """
    if spec.sandbox == "none" or not hello:
        return None
    sandbox = hello.get("sandbox")
    if isinstance(sandbox, dict) and sandbox.get("kind") == "bwrap":
        return None
    reason = sandbox.get("reason") if isinstance(sandbox, dict) else None
    said = str(reason)[:MAX_REASON_CHARS] if reason else "its taskrun-worker does not confine Agents (upgrade it)"
    return (f"cannot confine Agents ({said}); no Runs go to it until it can, or until "
            f"`workers.{spec.name}.sandbox: none` in .taskrun.yaml accepts unconfined Agents on it")


#: What a Worker's session is made with: a change to any of them (a fixed identity, a re-pinned host or
#: result key) ends the session, and the next is made with the new values. Labels, Agents, slots and the
#: sandbox setting apply to the next assignment without one.
SESSION_FIELDS = ("transport", "host", "port", "user", "identity", "host_key", "known_hosts", "home", "worker_key")


def session_fields(spec: WorkerSpec) -> tuple[object, ...]:
    return tuple(getattr(spec, name) for name in SESSION_FIELDS)


class Fleet:
    def __init__(self, config: Config, state_dir: Path, post: Callable[[LinkEvent], None],
                 keyring: Keyring, hooks: Hooks | None = None, rng: random.Random | None = None) -> None:
        self._state_dir = state_dir
        #: Draws the reconnect and start-up jitter (`reconnect_delay`, `startup_delay`).
        self.random = rng or random.Random()
        self.keyring = keyring
        self._post = post
        self.hooks = hooks or Hooks()
        self.workers: dict[str, WorkerState] = {}
        self.agents: Mapping[str, AgentSpec] = {}
        self.configure(config)

    def configure(self, config: Config) -> list[WorkerState]:
        """Apply a (re)loaded configuration; returns Workers that were removed."""
        self.grace = config.scheduler.worker_grace
        self.offline_after = config.scheduler.worker_offline_after
        self.agents = config.agents
        removed = [w for name, w in self.workers.items() if name not in config.workers]
        for worker in removed:
            if worker.link:
                worker.link.close()
            del self.workers[worker.name]
        added = [name for name in config.workers if name not in self.workers]
        for name, spec in config.workers.items():
            current = self.workers.get(name)
            if current is None:
                self.workers[name] = WorkerState(spec)
                if len(added) > 1:  # many sessions due at once (a start): spread over a short window
                    self.workers[name].reconnect_at = wall() + startup_delay(len(added), self.random)
            elif current.spec != spec:
                if session_fields(current.spec) != session_fields(spec):
                    if current.link:
                        current.link.close()
                    current.link = None
                    current.online = False
                    current.reconnect_at = 0.0
                current.spec = spec
            if current is not None and current.trusted is False and not current.online:
                # `taskrun worker add` after a reset rewrites the file even when nothing in it
                # changes: look at such a Worker again now, not at the end of its backoff.
                current.reconnect_at = 0.0
        return removed

    def __getitem__(self, name: str) -> WorkerState:
        return self.workers[name]

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(self.workers.values())

    def get(self, name: str) -> WorkerState | None:
        return self.workers.get(name)

    def current(self, event: LinkEvent) -> WorkerState | None:
        """The Worker an event belongs to, or None if it is from an older session."""
        worker = self.workers.get(event.worker)
        if worker is None or event.generation != worker.generation:
            return None
        return worker

    def views(self, pauses: Pauses | None = None, now: float = 0.0) -> list[scheduler.WorkerView]:
        """The scheduler's view of every Worker; `pauses` gives each its per-Worker Agent pauses."""
        views = []
        for w in self.workers.values():
            presets = w.hello.get("agents")
            agents = frozenset(w.spec.agents)
            refusal = sandbox_refusal(w.spec, w.hello) if w.online else None
            views.append(scheduler.WorkerView(
                name=w.name, slots=w.spec.slots, used=len(w.runs), agents=agents,
                labels=w.spec.labels, online=w.online and presets is not None and not w.trust_pending
                and w.trusted is not False and refusal is None and w.home_full is None, note=refusal or w.home_full,
                lacking=w.lacking(self.agents), paused=pauses.on_worker(w.name, now) if pauses else {},
            ))
        return views

    def all_tried(self) -> bool:
        return all(w.tried for w in self.workers.values())

    def next_wakeup(self) -> float | None:
        """When (monotonic clock) the next session is due to be opened; None when none is."""
        times = [w.reconnect.mono for w in self.workers.values() if w.reconnect is not None]
        return min(times) if times else None

    # -- sessions --------------------------------------------------------------

    def tick(self, now: float) -> list[WorkerState]:
        """Reconnect what is due, notice silent Workers; returns Workers whose grace ran out.

        `now`: the wall clock, read just now; the silence and the grace are measured on the monotonic clock.
        """
        mono = as_monotonic(now)
        expired = []
        for worker in self.workers.values():
            if worker.online and worker.seen is not None and mono - worker.seen.mono > self.offline_after:
                self.link_down(worker, f"no heartbeat for {mono - worker.seen.mono:.0f}s", now)
            if not worker.online and worker.reconnect is not None and mono >= worker.reconnect.mono:
                self._connect(worker, now)
            if not worker.online and worker.runs and worker.down is not None and mono - worker.down.mono > self.grace:
                expired.append(worker)
        return expired

    def _connect(self, worker: WorkerState, now: float) -> None:
        worker.reconnect_at = None
        try:
            if worker.link is None:
                worker.link = make_link(worker.spec, self._state_dir, self._post)
            # Set at every connect, so a reloaded offline_after holds from the next session on.
            worker.link.read_timeout = self.offline_after + READ_MARGIN_SECONDS
            if isinstance(worker.link, LocalLink):
                # The daemon's own Worker home: enrolled directly, its key known from the file.
                worker.result_key = enroll_local(worker.link.home, self.keyring, now)
            # Returns at once: the session says hello, or ends with why it could not open.
            worker.generation = worker.link.open()
        except (WorkerError, OSError) as exc:
            self.link_down(worker, str(exc), now)

    def hello(self, worker: WorkerState, fields: dict[str, Any], now: float) -> Message | None:
        """Take a session's hello (not yet authenticated): the `auth` record answering its challenge,
        or None (the Worker marked untrusted, the session closed) if its result key is not the pinned
        one or its trust store cannot be believed."""
        try:
            worker.result_key = self._result_key(worker, fields.get("worker_key"))
        except WorkerError as exc:
            self.untrusted(worker, str(exc), now, fix=False)  # the message says how to re-pin
            return None
        try:
            self._believable_trust(worker, fields.get("trust"), now)
        except WorkerError as exc:
            self.untrusted(worker, str(exc), now)
            return None
        challenge = fields.get("challenge")
        if not isinstance(challenge, str):
            self.link_down(worker, f"Worker '{worker.name}' sent a hello without a challenge: upgrade its "
                           "taskrun-worker", now)
            return None
        worker.hello = fields
        worker.last_seen = now
        envelope = auth_envelope(self.keyring.signers(now), challenge, key_id(worker.result_key), now)
        return Message("auth", {"envelope": envelope})

    def ready(self, worker: WorkerState, now: float, agents: Any = None) -> None:
        """The session is authenticated: the Worker is online. `agents`: its ready's presets (ready_presets)."""
        worker.presets = ready_presets(agents)
        if worker.down is not None:
            emit(self.hooks, "notice", f"Worker '{worker.name}' back online after "
                                       f"{as_monotonic(now) - worker.down.mono:.1f}s")
        worker.online = True
        worker.tried = True
        worker.error = None
        worker.failures = 0
        worker.offline_since = None
        worker.last_seen = now
        emit(self.hooks, "worker_changed", worker.view())

    def trust_correction(self, worker: WorkerState, held: Any, now: float) -> Message | None:
        """None if the Worker trusts exactly the keyring's live keys (it is trusted); else the trust
        statement that would make it so, and no Runs for it until it is taken."""
        keys = sorted(held) if isinstance(held, list) else []
        if keys == wanted_keys(self.keyring, now) or worker.result_key is None:
            worker.trust_pending = False
            if worker.result_key is not None and worker.trusted is not True:
                worker.trusted = True
                emit(self.hooks, "worker_changed", worker.view())
            return None
        worker.trust_pending = True
        return Message("trust", {"request": trust_request(self.keyring, key_id(worker.result_key), now)})

    def refused(self, worker: WorkerState, request: str, message: str, now: float) -> None:
        """The Worker refused the session's proof (`auth`) or a trust statement: untrusted until it is
        enrolled again."""
        if request == "auth":
            reason = f"Worker '{worker.name}' refused this control plane's session ({message})"
        else:
            held = ", ".join(sorted((worker.hello.get("trust") or {}).get("keys") or [])) or "no key"
            reason = (f"Worker '{worker.name}' trusts {held}, not what this control plane gave it "
                      f"({', '.join(wanted_keys(self.keyring, now))}), and refused the correction ({message}): "
                      "its trust store was changed behind the control plane's back")
        self.untrusted(worker, reason, now)

    def lost_trust(self, worker: WorkerState, message: str, now: float) -> None:
        """An authenticated Worker refused a bundle because it no longer trusts this control plane's
        keys: no new Runs for it; the session stays, so Runs it already holds go on streaming."""
        if worker.trusted is False:
            return
        worker.trusted = False
        worker.error = f"Worker '{worker.name}' no longer trusts this control plane ({message}); {self._reenroll(worker)}"
        emit(self.hooks, "notice", worker.error)
        emit(self.hooks, "event", "worker_untrusted", {"worker": worker.name, "reason": worker.error})
        emit(self.hooks, "worker_changed", worker.view())

    def untrusted(self, worker: WorkerState, reason: str, now: float, fix: bool = True) -> None:
        """No Runs for this Worker, with the reason and how to fix it, until it proves trustworthy again."""
        if worker.trusted is not False:  # once per loss of trust, not at each reconnect it refuses
            emit(self.hooks, "event", "worker_untrusted", {"worker": worker.name, "reason": reason})
        worker.trusted = False
        worker.trust_pending = False
        self.link_down(worker, f"{reason}; {self._reenroll(worker)}" if fix else reason, now)

    def _reenroll(self, worker: WorkerState) -> str:
        if worker.spec.transport == "local":
            return "the daemon enrolls its own local Worker again when it reconnects"
        return (f"it gets no Runs until it is enrolled again: on the Worker run `taskrun-worker trust --reset` (it "
                f"prints a one-time token), then `taskrun worker add {worker.name} --host {worker.spec.host} "
                "--token TOKEN`")

    def _believable_trust(self, worker: WorkerState, trust: Any, now: float) -> None:
        """WorkerError if hello's trust summary shows a store no trust statement could have made."""
        issued_at = trust.get("issued_at") if isinstance(trust, dict) else None
        if isinstance(issued_at, (int, float)) and issued_at > now + CLOCK_SKEW_SECONDS:
            # Every statement is checked against the Worker's clock when taken: only a write
            # behind the statements' back dates the store in the future, and it would refuse
            # every later statement as "not newer".
            raise WorkerError(f"Worker '{worker.name}' has a trust store dated {issued_at - now:.0f}s in the "
                              "future: it was changed behind the control plane's back")

    def _result_key(self, worker: WorkerState, seen: Any) -> bytes:
        try:
            presented = parse_public_line(seen)
        except SignatureRejected as exc:
            raise WorkerError(f"Worker '{worker.name}' presents no valid result key ({exc}): upgrade its "
                              "taskrun-worker") from None
        if worker.spec.transport == "local":
            pinned = worker.result_key or b""
            hint = ""
        elif worker.spec.worker_key is None:
            raise WorkerError(f"Worker '{worker.name}' has no pinned result key (worker_key): enroll it with "
                              f"`taskrun worker add {worker.name} --host {worker.spec.host}`")
        else:
            pinned = parse_public_line(worker.spec.worker_key)
            hint = (f"; if the Worker was reinstalled, enroll it again with "
                    f"`taskrun worker add {worker.name} --host {worker.spec.host}`")
        if presented != pinned:
            raise WorkerError(f"Worker '{worker.name}' result key changed: pinned {key_id(pinned)}, "
                              f"seen {key_id(presented)}; refusing it{hint}")
        return presented

    def link_down(self, worker: WorkerState, reason: str, now: float) -> None:
        was_online = worker.online
        if worker.link is not None and isinstance(worker.link.failure, HostKeyError):
            worker.trusted = False
        worker.online = False
        worker.tried = True
        worker.error = reason
        if worker.offline_since is None:
            worker.offline_since = now
        if worker.link is not None:
            worker.link.close()
        delay = reconnect_delay(worker.failures, len(self.workers), self.random)
        worker.failures += 1
        worker.reconnect_at = now + delay
        if was_online or worker.failures == 1:
            emit(self.hooks, "notice", f"Worker '{worker.name}' offline: {reason} (retrying in {delay:.1f}s)")
            emit(self.hooks, "worker_changed", worker.view())

    def send(self, worker: WorkerState, *messages: Message) -> None:
        if worker.link is None:
            return
        try:
            worker.link.send(*messages)
        except WorkerError as exc:
            # The reader sees the same end and reports it; marking offline now
            # keeps further Runs off this Worker in the meantime.
            worker.online = False
            worker.error = str(exc)

    def close(self) -> None:
        for worker in self.workers.values():
            if worker.link is not None:
                worker.link.close()
