"""The Tasks table as plain aligned lines, for pipes and logs: what rich writes there, without rich.

Written to a stream that is not a terminal, rich's table of `render.tasks_table`
(no box, no edge padding, as wide as its content: main.PIPE_WIDTH) is its cells
padded to each column's widest, two spaces apart, with no colour. These
functions write exactly that, line by line: `taskrun status` into a pipe never
imports rich's console (a tenth of a second), and a table of 10,000 rows takes
milliseconds instead of rich's seconds. On a terminal the table is rich's
(colours, fitted to the width).

Every cell goes through `textsafe.clean`, as render's `literal` does.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Callable, TextIO

from rich.cells import cell_len  # the width rich gives a cell (wide characters take two columns)

from taskrunner.textsafe import clean

#: The Tasks table's columns.
TASK_COLUMNS = ("TASK", "STATUS", "RUNS", "WORKER", "UPDATED", "NOTE")


def is_plain(stream: TextIO) -> bool:
    """Whether the CLI's console writes `stream` as plain text: not a terminal (main.stdout_console then
    lays tables out as wide as their content), and rich sees none either (TTY_COMPATIBLE=1 or a
    non-empty FORCE_COLOR make it write colours into a pipe; see rich's Console.is_terminal)."""
    try:
        if stream.isatty():
            return False
    except (AttributeError, ValueError):
        pass
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "0"
    return not os.environ.get("FORCE_COLOR")


def when(timestamp: float | None) -> str:
    """A time of day as the tables show it (local time, "HH:MM:SS"), "-" for none."""
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")


def task_row(record: dict[str, Any]) -> list[str]:
    """The cells of a Task record's row: TASK, STATUS, RUNS, WORKER (its last Run's), UPDATED, NOTE."""
    runs = record.get("runs") or []
    last = runs[-1] if runs and isinstance(runs[-1], dict) else {}
    note = record.get("error") or record.get("waiting") or record.get("title") or ""
    return [_cell(record["task_id"]), clean(str(record["status"])), str(len(runs)), _cell(last.get("worker", "-")),
            when(record.get("updated_at")), _cell(note)]


def _cell(value: object) -> str:
    return clean("" if value is None else str(value))


def write_rows(write: Callable[[str], Any], rows: list[list[str]]) -> None:
    """Rows of cleaned cells as aligned columns: every column padded to its widest cell, two spaces apart."""
    widths = [max(cell_len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        write("  ".join(cell + " " * (width - cell_len(cell)) for cell, width in zip(row, widths)) + "\n")


def write_tasks(write: Callable[[str], Any], records: list[dict[str, Any]]) -> None:
    """The Tasks table (a header line, a line per record) as rich writes `render.tasks_table` into a pipe."""
    write_rows(write, [list(TASK_COLUMNS), *(task_row(r) for r in records)])


def summary_line(shown: int, total: int, counts: dict[str, int], limit: int | None) -> str:
    """What a summarised listing left out: "20 of 10,000 Tasks shown (9,990 COMPLETED, 10 FAILED): …"."""
    listed = ", ".join(f"{n:,} {status}" for status, n in counts.items())
    latest = f"the latest {limit} finished and every other one" if limit is not None else "the ones asked for"
    return clean(f"{shown:,} of {total:,} Tasks shown ({listed}): {latest}. "
                 "More: --all, --limit N, --status S, or a glob on the id ('auth/*').")
