"""`metrics:` in .taskrun.yaml -> a frozen `MetricsConfig` (docs/metrics.md).

    metrics:
      listen: 127.0.0.1:9464     # HOST:PORT of the Prometheus /metrics endpoint

Absent (the default): no endpoint. The parser is config.py's: it hands in
its `fail(key, reason) -> ConfigError`, so a malformed value names the file
and the dotted key (`metrics.listen`) like every other key.
"""

from __future__ import annotations

import ipaddress
import re
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


def listen_address(key: str, value: object, fail: Callable[[str, str], ConfigError],
                   example: str = "127.0.0.1:9464") -> tuple[str, int]:
    """HOST:PORT -> (host without brackets, port); `fail(key, reason)` raised otherwise.

    HOST is an IPv4 address, an IPv6 address in brackets (`[::1]:9464`), or a host name
    (labels of letters, digits, underscores and inner hyphens, at most 63 characters each and
    253 in all); PORT is 1-65535. Anything else (spaces, unbalanced brackets, an IPv6
    address without brackets) is refused here rather than when the listener binds.
    """
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    # isascii: str.isdigit takes '²' and other digits int() refuses; five digits at most.
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 < int(port) < 65536:
        why = ": its port is not a number from 1 to 65535" if isinstance(value, str) and ":" in value else ""
    elif _host(host) is None:
        why = (": an IPv6 address goes in brackets, [::1]:PORT" if host.count(":") > 1 and "[" not in host
               else ": its host is not an IP address or a name of letters, digits, '-' and '_'")
    else:
        why = None
    if why is not None:
        raise fail(key, f"expected HOST:PORT such as {example}, got {describe(value)}{why}")
    return _host(host) or "", int(port)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _host(text: str) -> str | None:
    """The host of a listen address without brackets, or None when it is not one."""
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            return None
    if text.isascii() and len(text) <= 253 and all(_LABEL.fullmatch(label) for label in text.split(".")):
        return text
    return None


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
