"""Edit the `workers:` section of .taskrun.yaml as text, keeping the rest as written.

A YAML round trip would drop the user's comments and layout, so a Worker is
written as one flow-style line under a block-style `workers:` key, replacing
that Worker's previous entry if any. The result is parsed again before it is
returned: an edit that would not load is refused. Text over
MAX_CONFIG_FILE_BYTES is refused before it is looked at (config.check_config_size).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import yaml

from taskrunner.config import Config, check_config_size, parse_config
from taskrunner.errors import ConfigError
from taskrunner.model import WorkerSpec

_WORKERS = re.compile(r"^workers:\s*(#.*)?$")


def worker_line(fields: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(fields), default_flow_style=True, sort_keys=False, width=1 << 16).strip()


def set_worker(text: str, file: str, name: str, fields: Mapping[str, Any], current: Config) -> str:
    """`text` with Worker `name` set to `fields`; implicit Workers are spelled out if needed."""
    check_config_size(text, file)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _WORKERS.match(line)), None)
    entry = f"{name}: {worker_line(fields)}"
    if start is None:
        if any(line.startswith("workers:") for line in lines):
            raise ConfigError(file, "is written in flow style; edit it by hand or make it a block", key="workers")
        # No workers key yet: the embedded Workers were implicit; keep them, explicitly.
        block = ["workers:"] + [f"  {w.name}: {worker_line(_fields_of(w))}" for w in current.workers.values()
                                if w.name != name] + [f"  {entry}"]
        new = lines + ([""] if lines and lines[-1].strip() else []) + block
    else:
        end, indent, found = _block(lines, start, name)
        if found is not None:
            first, last = found
            new = lines[:first] + [f"{indent}{entry}"] + lines[last:]
        else:
            new = lines[:end] + [f"{indent}{entry}"] + lines[end:]
    result = "\n".join(new) + "\n"
    parse_config(result, file)
    return result


def remove_worker(text: str, file: str, name: str) -> str:
    check_config_size(text, file)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _WORKERS.match(line)), None)
    found = _block(lines, start, name)[2] if start is not None else None
    if found is None:
        raise ConfigError(file, f"there is no Worker '{name}' to remove", key=f"workers.{name}")
    first, last = found
    result = "\n".join(lines[:first] + lines[last:]) + "\n"
    parse_config(result, file)
    return result


def _block(lines: list[str], start: int, name: str) -> tuple[int, str, tuple[int, int] | None]:
    """(end of the workers block, its entries' indent, the line range of `name`'s entry)."""
    indent = "  "
    end = start + 1
    entries: list[tuple[int, str]] = []
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            break
        end = i + 1
        current = line[: len(line) - len(line.lstrip())]
        if not entries:
            indent = current
        if current == indent:
            entries.append((i, line.strip().split(":", 1)[0].strip("'\"")))
    for position, (i, key) in enumerate(entries):
        if key == name:
            last = entries[position + 1][0] if position + 1 < len(entries) else end
            while last > i + 1 and not lines[last - 1].strip():
                last -= 1
            return end, indent, (i, last)
    return end, indent, None


def _fields_of(worker: WorkerSpec) -> dict[str, Any]:
    fields: dict[str, Any] = {"transport": worker.transport, "slots": worker.slots, "agents": list(worker.agents)}
    if worker.labels:
        fields["labels"] = dict(worker.labels)
    return fields
