"""`metrics:` in .taskrun.yaml -> a frozen `MetricsConfig` (docs/metrics.md).

    metrics:
      listen: 127.0.0.1:9464     # HOST:PORT of the Prometheus /metrics endpoint

Absent (the default): no endpoint. The parser is config.py's: it hands in
its `fail(key, reason) -> ConfigError`, so a malformed value names the file
and the dotted key (`metrics.listen`) like every other key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from taskrunner.errors import ConfigError
from taskrunner.taskfile import describe

_METRICS_KEYS = ("listen",)


@dataclass(frozen=True)
class MetricsConfig:
    """`metrics`: the Prometheus endpoint, served at http://HOST:PORT/metrics (off when absent)."""

    host: str  # an IPv6 address without its brackets
    port: int  # 1-65535


def listen_address(key: str, value: object, fail: Callable[[str, str], ConfigError]) -> tuple[str, int]:
    """HOST:PORT (`[::1]:9464` for IPv6) -> (host without brackets, port); `fail(key, reason)` raised otherwise."""
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    # isascii: str.isdigit takes '²' and other digits int() refuses; five digits at most.
    if not host.strip("[]") or not (port.isascii() and port.isdigit() and len(port) <= 5) \
            or not 0 < int(port) < 65536:
        raise fail(key, f"expected HOST:PORT such as 127.0.0.1:9464, got {describe(value)}")
    return host.strip("[]"), int(port)


def parse_metrics(value: object, fail: Callable[[str | None, str], ConfigError]) -> MetricsConfig | None:
    """The `metrics` section (None when absent or null); ConfigError through `fail` for anything malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise fail("metrics", f"expected a mapping with the key listen, got {describe(value)}")
    for name in value:
        if name not in _METRICS_KEYS:
            raise fail(f"metrics.{name}", f"unknown key; allowed keys are {', '.join(_METRICS_KEYS)}")
    if value.get("listen") is None:
        raise fail("metrics.listen", "required, but missing")
    host, port = listen_address("metrics.listen", value["listen"], fail)
    return MetricsConfig(host=host, port=port)
