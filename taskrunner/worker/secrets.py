"""Agents' credentials: named in the configuration, resolved and redacted on the Worker.

An Agent's `env: [NAME, ...]` travels in the bundle as names only. The Worker
resolves each from its own environment (that of taskrun-worker), else from
`<home>/secrets.env` (lines `NAME=value`, `#` comments; keep it mode 0600).
A name that resolves to nothing fails the Run before the Agent starts.

Every resolved value (of at least MIN_REDACTED_CHARS characters) is masked in
the output the Worker streams, and so in the control plane's output.log: each
byte covered by an occurrence of a value becomes `*`. Masking keeps lengths, so
the byte offsets the session protocol resumes from stay the same on both
sides; a value split across two reads is still caught, because a read is
masked together with the bytes around it (`masked_range`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

from taskrunner.atomic import write_bytes
from taskrunner.errors import WorkerError

SECRETS_FILE = "secrets.env"
#: In a Run's directory on the Worker: the values masked in its output.
KEPT_FILE = "secrets.json"
#: Shorter values would mask ordinary text all over the output; they are not redacted.
MIN_REDACTED_CHARS = 4
MASK = ord("*")


def resolve(names: Sequence[str], home: Path, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """NAME -> value for each name; raises WorkerError naming what is missing and where to set it."""
    if not names:
        return {}
    found = {name: environ[name] for name in names if name in environ}
    missing = [name for name in names if name not in found]
    if missing:
        from_file = _read_file(home / SECRETS_FILE)
        found.update({name: from_file[name] for name in missing if name in from_file})
        missing = [name for name in missing if name not in found]
    if missing:
        raise WorkerError(f"the Agent needs {', '.join(missing)}, which this Worker does not have: set it in "
                          f"taskrun-worker's environment or in {home / SECRETS_FILE}")
    return found


def _read_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkerError(f"cannot read {path}: {exc}") from None
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def keep(run_dir: Path, values: Sequence[bytes]) -> None:
    """Leave the values to mask with the Run (mode 0600), for sessions that adopt it."""
    write_bytes(run_dir / KEPT_FILE, json.dumps([v.decode() for v in values]).encode(), mode=0o600, durable=False)


def kept(run_dir: Path) -> list[bytes]:
    try:
        return [v.encode() for v in json.loads((run_dir / KEPT_FILE).read_bytes())]
    except FileNotFoundError:
        return []


def redacted_values(values: Mapping[str, str]) -> list[bytes]:
    """The byte strings masked for `values`: each value, and the forms JSON gives it (see with_json_escapes)."""
    return with_json_escapes(tuple(v.encode() for v in values.values() if len(v) >= MIN_REDACTED_CHARS))


@functools.lru_cache(maxsize=64)
def with_json_escapes(values: tuple[bytes, ...]) -> list[bytes]:
    """`values` and each one as a JSON string escapes it (`"` and `\\` and control characters escaped;
    non-ASCII as is and as \\uXXXX), longest first: a tool that prints a secret inside its JSON events
    (Claude Code, codex, Gemini CLI) writes it escaped. An Agent that encodes a secret on purpose
    (base64, escapes of every character) is not caught by masking: it holds the secrets its Agent names.
    """
    forms: set[bytes] = set()
    for value in values:
        forms.add(value)
        text = value.decode("utf-8", "surrogateescape")
        for ascii_only in (True, False):
            try:
                forms.add(json.dumps(text, ensure_ascii=ascii_only)[1:-1].encode("utf-8", "surrogateescape"))
            except (UnicodeEncodeError, ValueError):
                pass
    return sorted(forms, key=len, reverse=True)


def mask(data: bytes, secrets: Sequence[bytes]) -> bytes:
    """`data` with every byte inside an occurrence of a secret replaced by `*`."""
    if not secrets:
        return data
    out: bytearray | None = None
    for secret in secrets:
        at = data.find(secret)
        while at != -1:
            if out is None:
                out = bytearray(data)
            out[at:at + len(secret)] = b"*" * len(secret)
            at = data.find(secret, at + 1)
    return data if out is None else bytes(out)


def masked_range(stream: BinaryIO, start: int, end: int, size: int, secrets: Sequence[bytes]) -> bytes:
    """Bytes [start, end) of a file of `size` bytes, masked as if the whole file were.

    A byte is masked when an occurrence covers it, and any such occurrence lies
    within the longest secret's length of it: read that much on either side.
    """
    reach = max((len(s) for s in secrets), default=1) - 1
    low = max(0, start - reach)
    stream.seek(low)
    window = stream.read(min(size, end + reach) - low)
    return mask(window, secrets)[start - low:end - low]


def safe_end(stream: BinaryIO, size: int, finished: bool, secrets: Sequence[bytes]) -> int:
    """How far output can be sent now: a running Agent may be in the middle of printing a secret.

    Only an ending of the output that could still grow into a secret (it is a
    prefix of one) is held back; everything before it is final.
    """
    if finished or not secrets:
        return size
    reach = max(len(s) for s in secrets) - 1
    start = max(0, size - reach)
    stream.seek(start)
    tail = stream.read(size - start)
    for at in range(len(tail)):
        ending = tail[at:]
        if any(s.startswith(ending) for s in secrets):
            return start + at
    return size
