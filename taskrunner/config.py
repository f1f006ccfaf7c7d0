""".taskrun.yaml -> a frozen, validated `Config`.

Every key is optional (docs/configuration.md); a missing file or an empty one gives
the embedded default: the `shell` Agent on the `local` Worker. Anything
unknown, mistyped or ambiguous is refused with a `ConfigError` naming the
file, the dotted key (`workers.build-1.port`) and what was expected, so a
daemon fails fast at start and keeps its previous configuration on a bad
reload. Only `load_config` and `read_config_file` (config_file.py) touch the filesystem.

The text is at most MAX_CONFIG_FILE_BYTES: a larger file is refused before
it is read whole (`read_config_file` reads at most one byte more), and text
that arrives some other way (`parse_config`, config_edit.py) before YAML
parses it: YAML costs seconds of CPU per megabyte, even of comments.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from taskrunner.defaults import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    CONFIG_FILE,
    DEFAULT_AGENT,
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    LOCAL_SLOTS,
    LOCAL_WORKER,
    MIN_OFFLINE_AFTER_SECONDS,
    OFFLINE_AFTER_SECONDS,
    RETRIES,
    TIMEOUT,
)
# AGENT_PRESETS and PROMPT_PLACEHOLDER are re-exported: callers know them as config's.
from taskrunner.config_agents import AGENT_PRESETS, PROMPT_PLACEHOLDER, AgentParsing  # noqa: F401
# Re-exported: callers know them as config's.
from taskrunner.config_file import check_config_size, read_config_file, too_large  # noqa: F401
from taskrunner.config_metrics import MetricsConfig, listen_address, parse_metrics
from taskrunner.config_notify import NotifyTarget, parse_notify
from taskrunner.duration import format_duration, parse_duration
from taskrunner.errors import ConfigError
from taskrunner.model import NAME_RE, AgentSpec, Prices, WorkerSpec
from taskrunner.signing import SignatureRejected, parse_public_line
from taskrunner.taskfile import describe, parse_labels
from taskrunner.yamlload import load_yaml

TRANSPORTS = ("local", "ssh")
#: `workers.<name>.sandbox`: confine Agents (bwrap), or accept them unconfined on that Worker (none).
SANDBOXES = ("bwrap", "none")
EMBEDDED_SOURCE = "<embedded default>"
#: The least `records.max_log_bytes`: room for a head, the marker line and a tail.
MIN_LOG_BYTES = 4096

_TOP_KEYS = ("default_agent", "agents", "workers", "scheduler", "git", "webhook", "security", "prices", "records",
             "notify", "metrics")
_RECORDS_KEYS = ("max_log_bytes", "keep_full_logs", "full_logs_max_bytes", "prune_after")
_SSH_ONLY_KEYS = ("host", "port", "user", "identity", "host_key", "known_hosts", "worker_key")
_WORKER_KEYS = ("transport", "slots", "agents", "labels", *_SSH_ONLY_KEYS, "home", "sandbox")
_SCHEDULER_KEYS = ("retries", "backoff", "timeout", "groups", "worker_grace", "worker_offline_after")
_BACKOFF_KEYS = ("base", "max")
_GROUP_KEYS = ("parallel",)
_GIT_KEYS = ("commit", "push", "remote", "result_branch_prefix", "author", "max_result_bytes", "poll",
             "pull_requests")
_PULL_REQUEST_KEYS = ("forge", "api_url", "repository", "token_env", "draft")
_WEBHOOK_KEYS = ("listen", "secret_env", "max_body_bytes")
_SECURITY_KEYS = ("allowed_signers", "revocation_file")
#: `git.pull_requests.forge`: whose API opens pull / merge requests.
FORGES = ("github", "gitea", "gitlab")
#: "Name <email>", as git writes an identity.
_IDENTITY_RE = re.compile(r"^([^<>\n]+?) <([^<>\s]+)>$")

_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_KEY_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9@.-]*$")
# Refs and remotes end up as git arguments: a leading '-' would read as an option.
_REF_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


@dataclass(frozen=True)
class SchedulerConfig:
    retries: int = RETRIES
    backoff_base: float = BACKOFF_BASE
    backoff_max: float = BACKOFF_MAX
    timeout: float = TIMEOUT
    groups: Mapping[str, int] = field(default_factory=dict)  # group -> parallel cap
    worker_grace: float = GRACE_SECONDS  # an offline Worker's Runs wait this long, then are retried
    worker_offline_after: float = OFFLINE_AFTER_SECONDS  # a Worker silent this long is offline


@dataclass(frozen=True)
class PullRequestConfig:
    """`git.pull_requests`: open or update a pull / merge request per new result branch."""

    forge: str  # one of FORGES
    api_url: str  # e.g. https://api.github.com, https://gitea.example/api/v1, https://gitlab.example/api/v4
    repository: str  # owner/name (GitHub, Gitea) or the project path (GitLab)
    token_env: str  # the environment variable holding the API token, read by the daemon
    draft: bool = True


@dataclass(frozen=True)
class GitConfig:
    commit: bool = True
    push: bool = False
    remote: str = "origin"
    result_branch_prefix: str = "taskrun/"
    #: Author and committer of the commits Agents' changes come back as.
    author_name: str = "taskrun"
    author_email: str = "taskrun@localhost"
    #: A Run's returned change (its git objects, packed) may be at most this many bytes.
    max_result_bytes: int = 64 * 1024 * 1024
    #: Fetch `remote` this often (seconds) and fast-forward to it; None: only on `taskrun trigger`.
    poll: float | None = None
    pull_requests: PullRequestConfig | None = None


@dataclass(frozen=True)
class WebhookConfig:
    """`webhook`: the receiver for forges' push deliveries (off when absent)."""

    host: str
    port: int
    secret_env: str  # the environment variable holding the shared secret; the receiver refuses to start without it
    max_body_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class SecurityConfig:
    #: git's allowed_signers file: when set, only Tasks whose revision a listed principal signed run.
    allowed_signers: Path | None = None
    #: gpg.ssh.revocationFile: keys (or a KRL) whose signatures are refused.
    revocation_file: Path | None = None


@dataclass(frozen=True)
class RecordsConfig:
    """`records`: how much of a Run's output is committed, and how long its full log is kept (fulllogs.py)."""

    #: A final Run's output.log over this many bytes is committed as its head and tail with a marker.
    max_log_bytes: int = 4 * 1024 * 1024
    #: Full logs (`.git/taskrun/logs/`) older than this (seconds, since their last byte) are removed.
    keep_full_logs: float = 30 * 86400.0
    #: And the oldest go first while all of them together hold more than this many bytes.
    full_logs_max_bytes: int = 10 * 1024 ** 3
    #: The daemon prunes Tasks finished longer ago than this (seconds; prune.py); None: never by itself.
    prune_after: float | None = None


@dataclass(frozen=True)
class Config:
    default_agent: str
    agents: Mapping[str, AgentSpec]
    workers: Mapping[str, WorkerSpec]
    scheduler: SchedulerConfig
    git: GitConfig
    source: str  # the file it came from, or "<embedded default>"
    webhook: WebhookConfig | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: `prices`: model name -> USD per million tokens, to estimate the cost of a Run whose tool reports none.
    prices: Mapping[str, Prices] = field(default_factory=dict)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    #: `notify`: where events are sent (config_notify.py, notify.py).
    notify: tuple[NotifyTarget, ...] = ()
    metrics: MetricsConfig | None = None  # `metrics`: the Prometheus endpoint (config_metrics.py)


def _implicit_agents() -> dict[str, AgentSpec]:
    return {DEFAULT_AGENT: AgentSpec(name=DEFAULT_AGENT, preset="shell")}


def _implicit_local_worker(agents: tuple[str, ...]) -> WorkerSpec:
    return WorkerSpec(name=LOCAL_WORKER, transport="local", slots=LOCAL_SLOTS, agents=agents)


def default_config() -> Config:
    """The embedded default: the shell Agent on the local Worker."""
    return Config(
        default_agent=DEFAULT_AGENT,
        agents=_implicit_agents(),
        workers={LOCAL_WORKER: _implicit_local_worker((DEFAULT_AGENT,))},
        scheduler=SchedulerConfig(),
        git=GitConfig(),
        source=EMBEDDED_SOURCE,
    )


def load_config(root: Path) -> Config:
    """Read root/.taskrun.yaml; a missing file is the embedded default.

    The file is committed content: it is read without following a link and
    only if it is a regular file (safefs), so a FIFO there cannot block the
    daemon and a link cannot make it read its own keys.
    """
    path = root / CONFIG_FILE
    data = read_config_file(root)
    if data is None:
        return default_config()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (invalid byte at offset {exc.start})") from exc
    return parse_config(text, str(path), root)


def parse_config(text: str, file: str, root: Path | None = None) -> Config:
    """Validate configuration text; `file` names it in errors and in `source`.

    `root` is the repository that `agents.<name>.prompt_template_file` paths
    are read from (default: the directory of `file`). Text over
    MAX_CONFIG_FILE_BYTES is refused before it is parsed.
    """
    check_config_size(text, file)
    return _Parser(file, root).config(load_yaml(text, file, ConfigError))


class _Parser(AgentParsing):
    """Validators that know the file, so every error carries file and dotted key."""

    def __init__(self, file: str, root: Path | None = None) -> None:
        self.file = file
        self.root = root

    def fail(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.file, reason, key=key)

    # ------------------------------------------------------------------ sections

    def config(self, data: object) -> Config:
        top = self.section(data, None, _TOP_KEYS)
        agents = self.agents(top.get("agents"))
        default_agent = self.default_agent(top.get("default_agent"), agents)
        workers = self.workers(top.get("workers"), agents, default_agent)
        return Config(
            default_agent=default_agent,
            agents=agents,
            workers=workers,
            scheduler=self.scheduler(top.get("scheduler")),
            git=self.git(top.get("git")),
            source=self.file,
            webhook=self.webhook(top.get("webhook")),
            security=self.security(top.get("security")),
            prices=self.prices(top.get("prices")),
            records=self.records(top.get("records")),
            notify=parse_notify(self, top.get("notify")),
            metrics=parse_metrics(top.get("metrics"), self.fail),
        )

    def agents(self, value: object) -> dict[str, AgentSpec]:
        # Omitted: the shell Agent exists implicitly. Given: exactly what it says.
        if value is None:
            return _implicit_agents()
        return {name: self.agent(name, spec) for name, spec in self.named("agents", value).items()}

    def default_agent(self, value: object, agents: Mapping[str, AgentSpec]) -> str:
        configured = ", ".join(agents) or "none"
        if value is None:
            if DEFAULT_AGENT not in agents:
                raise self.fail(
                    "default_agent",
                    f"not set, so it is '{DEFAULT_AGENT}', which is not a configured agent; "
                    f"set it to one of: {configured}",
                )
            return DEFAULT_AGENT
        name = self.name("default_agent", value, "an agent name")
        if name not in agents:
            raise self.fail("default_agent", f"'{name}' is not a configured agent; configured agents: {configured}")
        return name

    def workers(self, value: object, agents: Mapping[str, AgentSpec], default_agent: str) -> dict[str, WorkerSpec]:
        if value is None:
            # The embedded local Worker is this machine: it offers every configured Agent.
            return {LOCAL_WORKER: _implicit_local_worker(tuple(agents))}
        workers = {
            name: self.worker(name, spec, agents, default_agent) for name, spec in self.named("workers", value).items()
        }
        if not workers:
            raise self.fail("workers", "expected at least one worker, got none")
        return workers

    def worker(self, name: str, value: object, agents: Mapping[str, AgentSpec], default_agent: str) -> WorkerSpec:
        key = f"workers.{name}"
        spec = self.section(value, key, _WORKER_KEYS, required=("transport",))
        transport = spec["transport"]
        if transport not in TRANSPORTS:
            raise self.fail(f"{key}.transport", f"expected one of {', '.join(TRANSPORTS)}, got {describe(transport)}")

        offered: tuple[str, ...] = (default_agent,)
        if spec.get("agents") is not None:
            offered = self.string_list(f"{key}.agents", spec["agents"], "agent names", NAME_RE)
            if not offered:
                raise self.fail(f"{key}.agents", "expected at least one agent name, got an empty list")
        for agent in offered:
            if agent not in agents:
                raise self.fail(
                    f"{key}.agents", f"'{agent}' is not a configured agent; configured agents: {', '.join(agents)}"
                )
        try:
            labels = parse_labels(spec.get("labels"))
        except ValueError as exc:
            raise self.fail(f"{key}.labels", str(exc)) from exc
        slots = spec.get("slots")
        home = spec.get("home")
        sandbox = spec.get("sandbox")
        if sandbox is not None and sandbox not in SANDBOXES:
            raise self.fail(f"{key}.sandbox", f"expected one of {', '.join(SANDBOXES)} (none: accept unconfined "
                                              f"Agents on this Worker), got {describe(sandbox)}")
        common: dict[str, Any] = {
            "name": name,
            "transport": transport,
            "slots": 1 if slots is None else self.integer(f"{key}.slots", slots, minimum=1),
            "agents": offered,
            "labels": labels,
            "home": None if home is None else self.string(f"{key}.home", home),
            "sandbox": sandbox or "bwrap",
        }
        if transport == "local":
            for ssh_key in _SSH_ONLY_KEYS:
                if ssh_key in spec:
                    raise self.fail(f"{key}.{ssh_key}", "only for transport: ssh; this worker is transport: local")
            return WorkerSpec(**common)
        return WorkerSpec(**common, **self.ssh_fields(key, spec))

    def ssh_fields(self, key: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        if spec.get("host") is None:
            raise self.fail(f"{key}.host", "required for transport: ssh: the Worker's host name or address")
        host = self.string(f"{key}.host", spec["host"])
        if host.startswith("-") or any(c.isspace() for c in host):
            raise self.fail(f"{key}.host", f"expected a host name or address, got {describe(host)}")
        if spec.get("host_key") is None and spec.get("known_hosts") is None:
            raise self.fail(
                f"{key}.host_key",
                "an ssh Worker needs host_key or known_hosts: pin the host key: run `taskrun worker add`",
            )
        fields: dict[str, Any] = {"host": host}
        if spec.get("port") is not None:
            fields["port"] = self.integer(f"{key}.port", spec["port"], minimum=1, maximum=65535)
        for optional in ("user", "identity", "known_hosts"):
            if spec.get(optional) is not None:
                fields[optional] = self.string(f"{key}.{optional}", spec[optional])
        if spec.get("host_key") is not None:
            fields["host_key"] = self.host_key(f"{key}.host_key", spec["host_key"])
        if spec.get("worker_key") is not None:
            try:
                parse_public_line(spec["worker_key"])
            except SignatureRejected as exc:
                raise self.fail(f"{key}.worker_key", f"{exc}; `taskrun worker add` pins it") from None
            fields["worker_key"] = spec["worker_key"]
        return fields

    def host_key(self, key: str, value: object) -> str:
        """An OpenSSH public key line: type, base64 key, optional comment."""
        expected = "expected 'TYPE BASE64-KEY' like 'ssh-ed25519 AAAAC3Nza...'"
        parts = value.split() if isinstance(value, str) else []
        if len(parts) not in (2, 3) or not _KEY_TYPE_RE.fullmatch(parts[0]):
            raise self.fail(key, f"{expected}, got {describe(value)}")
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise self.fail(key, f"{expected}; the key is not valid base64") from exc
        # The key blob starts with its own type name (RFC 4253 §6.6): a pasted
        # key with a wrong or truncated type is caught here, not at connect time.
        size = int.from_bytes(blob[:4], "big")
        if len(blob) < 4 + size or blob[4 : 4 + size] != parts[0].encode():
            raise self.fail(key, f"{expected}; the key data does not hold a '{parts[0]}' key")
        return " ".join(parts[:2])

    def scheduler(self, value: object) -> SchedulerConfig:
        spec = self.section(value, "scheduler", _SCHEDULER_KEYS)
        backoff = self.section(spec.get("backoff"), "scheduler.backoff", _BACKOFF_KEYS)
        base = self.duration("scheduler.backoff.base", backoff.get("base"), BACKOFF_BASE)
        cap = self.duration("scheduler.backoff.max", backoff.get("max"), BACKOFF_MAX)
        if cap < base:
            raise self.fail(
                "scheduler.backoff.max",
                f"expected at least base ({format_duration(base)}), got {format_duration(cap)}",
            )
        retries = spec.get("retries")
        groups = {
            name: self.integer(
                f"scheduler.groups.{name}.parallel",
                self.section(group, f"scheduler.groups.{name}", _GROUP_KEYS, required=("parallel",))["parallel"],
                minimum=1,
            )
            for name, group in self.named("scheduler.groups", spec.get("groups")).items()
        }
        offline_after = self.duration("scheduler.worker_offline_after", spec.get("worker_offline_after"),
                                      OFFLINE_AFTER_SECONDS)
        if offline_after < MIN_OFFLINE_AFTER_SECONDS:
            raise self.fail(
                "scheduler.worker_offline_after",
                f"expected at least {format_duration(MIN_OFFLINE_AFTER_SECONDS)} (two of the Worker's heartbeats, "
                f"sent every {format_duration(HEARTBEAT_SECONDS)}), got {format_duration(offline_after)}",
            )
        return SchedulerConfig(
            retries=RETRIES if retries is None else self.integer("scheduler.retries", retries, minimum=0),
            backoff_base=base,
            backoff_max=cap,
            timeout=self.duration("scheduler.timeout", spec.get("timeout"), TIMEOUT),
            groups=groups,
            worker_grace=self.duration("scheduler.worker_grace", spec.get("worker_grace"), GRACE_SECONDS),
            worker_offline_after=offline_after,
        )

    def git(self, value: object) -> GitConfig:
        spec = self.section(value, "git", _GIT_KEYS)
        # A null value (`push:` with nothing after it) means the default, as everywhere.
        spec = {k: v for k, v in spec.items() if v is not None}
        defaults = GitConfig()
        remote = spec.get("remote", defaults.remote)
        if not isinstance(remote, str) or not remote or remote.startswith("-") or any(c.isspace() for c in remote):
            raise self.fail("git.remote", f"expected a remote name or URL, got {describe(remote)}")
        prefix = spec.get("result_branch_prefix", defaults.result_branch_prefix)
        if not isinstance(prefix, str) or not _REF_PREFIX_RE.fullmatch(prefix) or ".." in prefix or "//" in prefix:
            raise self.fail(
                "git.result_branch_prefix",
                f"expected a branch name prefix like 'taskrun/' (letters, digits, '.', '_', '-', '/'), "
                f"got {describe(prefix)}",
            )
        author = spec.get("author", f"{defaults.author_name} <{defaults.author_email}>")
        match = _IDENTITY_RE.fullmatch(author) if isinstance(author, str) else None
        if match is None:
            raise self.fail("git.author", f"expected 'Name <email>', got {describe(author)}")
        poll = spec.get("poll")
        return GitConfig(
            commit=self.boolean("git.commit", spec.get("commit", defaults.commit)),
            push=self.boolean("git.push", spec.get("push", defaults.push)),
            remote=remote,
            result_branch_prefix=prefix,
            author_name=match.group(1).strip(),
            author_email=match.group(2),
            max_result_bytes=self.integer("git.max_result_bytes",
                                          spec.get("max_result_bytes", defaults.max_result_bytes), 1),
            poll=None if poll is None or poll is False else self.duration("git.poll", poll, 0.0) or None,
            pull_requests=self.pull_requests(spec.get("pull_requests")),
        )

    def pull_requests(self, value: object) -> PullRequestConfig | None:
        if value is None:
            return None
        spec = self.section(value, "git.pull_requests", _PULL_REQUEST_KEYS,
                            required=("forge", "api_url", "repository", "token_env"))
        forge = spec["forge"]
        if forge not in FORGES:
            raise self.fail("git.pull_requests.forge", f"expected one of {', '.join(FORGES)}, got {describe(forge)}")
        api_url = self.string("git.pull_requests.api_url", spec["api_url"])
        if not re.fullmatch(r"https?://[^\s]+", api_url):
            raise self.fail("git.pull_requests.api_url", f"expected an http(s) URL, got {describe(api_url)}")
        return PullRequestConfig(
            forge=forge, api_url=api_url.rstrip("/"),
            repository=self.string("git.pull_requests.repository", spec["repository"]).strip("/"),
            token_env=self.env_name("git.pull_requests.token_env", spec["token_env"]),
            draft=self.boolean("git.pull_requests.draft", spec.get("draft", True)),
        )

    def webhook(self, value: object) -> WebhookConfig | None:
        if value is None:
            return None
        spec = self.section(value, "webhook", _WEBHOOK_KEYS, required=("listen", "secret_env"))
        host, port = listen_address("webhook.listen", spec["listen"], self.fail, example="127.0.0.1:8787")
        return WebhookConfig(
            host=host, port=port,
            secret_env=self.env_name("webhook.secret_env", spec["secret_env"]),
            max_body_bytes=self.integer("webhook.max_body_bytes", spec.get("max_body_bytes", 1024 * 1024), 1),
        )

    def security(self, value: object) -> SecurityConfig:
        spec = {k: v for k, v in self.section(value, "security", _SECURITY_KEYS).items() if v is not None}
        paths = {key: self.path(f"security.{key}", spec[key]) for key in spec}
        return SecurityConfig(allowed_signers=paths.get("allowed_signers"),
                              revocation_file=paths.get("revocation_file"))

    def records(self, value: object) -> RecordsConfig:
        spec, default = self.section(value, "records", _RECORDS_KEYS), RecordsConfig()
        return RecordsConfig(
            max_log_bytes=self.integer("records.max_log_bytes", spec.get("max_log_bytes", default.max_log_bytes),
                                       MIN_LOG_BYTES),
            keep_full_logs=self.duration("records.keep_full_logs", spec.get("keep_full_logs"), default.keep_full_logs),
            full_logs_max_bytes=self.integer("records.full_logs_max_bytes",
                                             spec.get("full_logs_max_bytes", default.full_logs_max_bytes), 0),
            prune_after=self.duration("records.prune_after", spec.get("prune_after"), 0.0) or None)

    def path(self, key: str, value: object) -> Path:
        """A file path; a leading `~` or `~user` is expanded (a user this machine lacks is refused)."""
        text = self.string(key, value)
        if "\0" in text:
            raise self.fail(key, f"expected a file path, got {describe(text)} (contains a NUL character)")
        try:
            return Path(text).expanduser()
        except RuntimeError as exc:  # `~nobody-here/x`: pathlib cannot find that user's home
            raise self.fail(key, f"cannot expand {describe(text)}: {exc}") from None

    def env_name(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not _ENV_NAME_RE.fullmatch(value):
            raise self.fail(key, f"expected an environment variable name such as MY_SECRET, got {describe(value)}")
        return value

    # ------------------------------------------------------------------ values

    def section(
        self, value: object, key: str | None, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """A mapping with only `allowed` keys and every `required` one (non-null).

        A null section (`scheduler:` with nothing under it) is the same as an
        omitted one.
        """
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping with keys {', '.join(allowed)}, got {describe(value)}")
        prefix = f"{key}." if key else ""
        for name in value:
            if name not in allowed:
                raise self.fail(f"{prefix}{name}", f"unknown key; allowed keys are {', '.join(allowed)}")
        for name in required:
            if value.get(name) is None:
                raise self.fail(f"{prefix}{name}", "required, but missing")
        return value

    def named(self, key: str, value: object) -> dict[str, object]:
        """A mapping of names (agents, workers, groups) to their settings."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of names to settings, got {describe(value)}")
        for name in value:
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                raise self.fail(
                    f"{key}.{name}", f"expected a name (letters, digits, '.', '_', '-'), got {describe(name)}"
                )
        return value

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {describe(value)}")
        return value

    def name(self, key: str, value: object, what: str) -> str:
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            raise self.fail(key, f"expected {what} (letters, digits, '.', '_', '-'), got {describe(value)}")
        return value

    def integer(self, key: str, value: object, minimum: int, maximum: int | None = None) -> int:
        # bool is an int subclass; `slots: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {describe(value)}")
        if value.bit_length() > 63:  # `0xfff...` converts at any length; records and JSON want int64
            raise self.fail(key, f"expected a whole number, got {describe(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise self.fail(key, f"expected a whole number {bounds}, got {value}")
        return value

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {describe(value)}")
        return value

    def duration(self, key: str, value: object, default: float) -> float:
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from exc

    def argv(self, key: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            raise self.fail(key, f"expected a list of arguments (argv), not a shell string: got {describe(value)}")
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list of arguments (argv), got {describe(value)}")
        for index, arg in enumerate(value):
            # Numbers are refused rather than stringified: YAML has lost how they were written.
            if not isinstance(arg, str) or not arg:
                raise self.fail(key, f"argument {index + 1}: expected a non-empty string (quote it), got {describe(arg)}")
        return tuple(value)

    def string_list(self, key: str, value: object, what: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        """A list of names matching `pattern` (a single name is a list of one), deduplicated."""
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.fail(key, f"expected a list of {what}, got {describe(value)}")
        names: list[str] = []
        for item in items:
            if not isinstance(item, str) or not pattern.fullmatch(item):
                raise self.fail(key, f"expected {what} matching {pattern.pattern}, got {describe(item)}")
            if item not in names:
                names.append(item)
        return tuple(names)
