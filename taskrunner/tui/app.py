"""The `taskrun top` app (Textual): Workers, Tasks, the selected Task's Runs and live output.

Keys: c cancel the selected Task, r retry it, f follow the output (toggle
auto-scroll), / filter, s sort by the next column, q quit. Clicking a column
header sorts on it; clicking it again reverses the order.

Once a second (REFRESH_SECONDS) a thread worker asks the Source (source.py)
for a Snapshot; the app's own thread only draws it. A poll is never started
while one is going on: a slow daemon delays the picture, never the keys.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Input, Log

from taskrunner.cli.render import STYLES
from taskrunner.status_query import StatusQuery
from taskrunner.textsafe import clean
from taskrunner.tui import view
from taskrunner.tui.source import Output, Snapshot, Source

#: How often the dashboard asks the daemon, in seconds.
REFRESH_SECONDS = 1.0
#: Lines of output the output panel keeps.
OUTPUT_LINES = 5000


def _cells(cells: tuple[str, ...], status_at: int | None = None) -> list[Text]:
    """Cells as Text (shown as written, never read as markup); the status cell in its colour."""
    return [Text(cell, style=STYLES.get(cell, "") if n == status_at else "") for n, cell in enumerate(cells)]


class TopApp(App[int]):
    """The dashboard over `source`; `run()` returns the exit code (0)."""

    TITLE = "taskrun top"
    CSS = """
    #workers { height: auto; max-height: 10; border: round $primary; }
    #main { height: 1fr; }
    #tasks { width: 3fr; height: 1fr; border: round $primary; }
    #side { width: 2fr; }
    #runs { height: auto; max-height: 9; border: round $primary; }
    #output { height: 1fr; border: round $primary; }
    #filter { dock: bottom; }
    DataTable:focus, Log:focus { border: round $accent; }
    """
    BINDINGS = [
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
        Binding("f", "follow", "follow"),
        Binding("slash", "filter", "filter"),
        Binding("s", "sort", "sort"),
        Binding("q", "quit", "quit"),
        Binding("escape", "leave_filter", "leave filter", show=False),
    ]

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self.filter_query: StatusQuery = view.parse_filter("")
        self.selected: str | None = None
        self.sort_column: str | None = None
        self.sort_reverse = False
        self.snapshot = Snapshot()
        self._rows: list[view.TaskRow] = []
        self._shown_rows: tuple[tuple[str, ...], ...] | None = None
        self._polling = False
        self._again = False
        self._output_of: tuple[str | None, int | None] = (None, None)

    def compose(self) -> ComposeResult:
        yield Header()  # its subtitle: the repository, or why the daemon gave nothing
        yield DataTable(id="workers", cursor_type="none", zebra_stripes=True)
        with Horizontal(id="main"):
            yield DataTable(id="tasks", cursor_type="row", zebra_stripes=True)
            with Vertical(id="side"):
                yield DataTable(id="runs", cursor_type="none")
                yield Log(id="output", max_lines=OUTPUT_LINES, auto_scroll=True)
        yield Input(id="filter", placeholder="/ filter: status names and Task id globs, e.g. `running auth/*`")
        yield Footer()

    def on_mount(self) -> None:
        for table_id, columns in (("workers", view.WORKER_COLUMNS), ("tasks", view.TASK_COLUMNS),
                                  ("runs", view.RUN_COLUMNS)):
            table = self.query_one(f"#{table_id}", DataTable)
            for column in columns:
                table.add_column(column, key=column)
        self.query_one("#workers", DataTable).border_title = "Workers"
        self.query_one("#runs", DataTable).border_title = "Runs"
        self._output_title()
        self.query_one("#tasks", DataTable).border_title = "Tasks"
        self.query_one("#tasks", DataTable).focus()
        self.set_interval(REFRESH_SECONDS, self.poll)
        self.poll()

    def on_unmount(self) -> None:
        self.source.close()

    # -- polling: I/O on a thread worker, drawing here ------------------------------

    def poll(self) -> None:
        """Ask for a new Snapshot unless one is on its way (then once more when it arrives)."""
        if self._polling:
            self._again = True
            return
        self._polling = True
        self._fetch(self.filter_query, self.selected)

    @work(thread=True, group="poll", exit_on_error=False)
    def _fetch(self, query: StatusQuery, selected: str | None) -> None:
        try:
            snapshot = self.source.snapshot(query, selected)
        except Exception as exc:  # a reply or record we did not foresee: said on screen, tried again next second
            snapshot = Snapshot(error=f"cannot read the daemon's state: {exc}")
        try:
            self.call_from_thread(self._show, snapshot)
        except RuntimeError:
            pass  # the app has ended meanwhile

    def _show(self, snapshot: Snapshot) -> None:
        self._polling = False
        if snapshot.error is not None:
            self.sub_title = clean(snapshot.error)
        else:
            self.sub_title = str(self.source.root)
            self.snapshot = snapshot
            self._draw_workers(snapshot.workers)
            self._draw_tasks()
            self._draw_runs(snapshot.runs)
            if snapshot.output is not None:
                self._draw_output(snapshot.output)
        if self._again:
            self._again = False
            self.poll()

    def _draw_workers(self, workers: list[dict[str, Any]]) -> None:
        table = self.query_one("#workers", DataTable)
        table.clear()
        for worker in workers:
            table.add_row(*_cells(view.worker_cells(worker)))
        table.border_title = f"Workers {len(workers)}"

    def _draw_tasks(self) -> None:
        snapshot = self.snapshot
        table = self.query_one("#tasks", DataTable)
        self._rows = view.task_rows(snapshot.tasks, self.sort_column, self.sort_reverse)
        order = f" · sorted by {self.sort_column}{' (descending)' if self.sort_reverse else ''}" \
            if self.sort_column else ""
        table.border_title = view.tasks_title(len(self._rows), snapshot.total, snapshot.counts,
                                              self.filter_query) + order
        shown = tuple(row.cells() for row in self._rows)
        if shown == self._shown_rows:
            return
        self._shown_rows = shown
        selected = self.selected
        table.clear()
        for row in self._rows:
            table.add_row(*_cells(row.cells(), status_at=1), key=row.task_id)
        ids = [row.task_id for row in self._rows]
        if selected in ids:
            table.move_cursor(row=ids.index(selected), animate=False)
        elif ids:
            table.move_cursor(row=min(table.cursor_row, len(ids) - 1), animate=False)
        self._select(ids[table.cursor_row] if ids else None)

    def _draw_runs(self, runs: list[dict[str, Any]]) -> None:
        table = self.query_one("#runs", DataTable)
        table.clear()
        for run in runs:
            table.add_row(*_cells(view.run_cells(run), status_at=1))
        table.border_title = f"Runs of {self.selected}" if self.selected else "Runs"

    def _draw_output(self, output: Output) -> None:
        log = self.query_one("#output", Log)
        if output.reset:
            log.clear()
            self._output_of = (output.task_id, output.run)
            self._output_title()
        if output.text:
            log.write(output.text)

    def _output_title(self) -> None:
        log = self.query_one("#output", Log)
        task_id, run = self._output_of
        where = f"output of {task_id}, Run {run}" if task_id else "output"
        log.border_title = f"{where} · {'following' if log.auto_scroll else 'paused (f: follow)'}"

    def _select(self, task_id: str | None) -> None:
        if task_id != self.selected:
            self.selected = task_id
            self.poll()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # Only where the cursor is now: a table redrawn by _draw_tasks posts a highlight of its first row
        # before the cursor goes back to the selected Task, which would flash another Task's output.
        if (event.data_table.id == "tasks" and event.row_key.value is not None
                and event.cursor_row == event.data_table.cursor_row):
            self._select(event.row_key.value)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        if event.data_table.id != "tasks":
            return
        column = str(event.column_key.value)
        self.sort_reverse = not self.sort_reverse if column == self.sort_column else False
        self.sort_column = column
        self._draw_tasks()

    # -- keys ----------------------------------------------------------------------

    def action_cancel(self) -> None:
        self._ask("cancel")

    def action_retry(self) -> None:
        self._ask("retry")

    def _ask(self, command: str) -> None:
        if self.selected is None:
            self.notify("no Task is selected", severity="warning")
            return
        self._send(command, self.selected)

    @work(thread=True, group="ask", exit_on_error=False)
    def _send(self, command: str, task_id: str) -> None:
        ok, message = self.source.ask(command, task_id)
        try:
            self.call_from_thread(self.notify, message, severity="information" if ok else "error")
            self.call_from_thread(self.poll)
        except RuntimeError:
            pass  # the app has ended meanwhile

    def action_follow(self) -> None:
        log = self.query_one("#output", Log)
        log.auto_scroll = not log.auto_scroll
        if log.auto_scroll:
            log.scroll_end(animate=False)
        self._output_title()

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_leave_filter(self) -> None:
        self.query_one("#tasks", DataTable).focus()

    def action_sort(self) -> None:
        self.sort_column = view.next_column(self.sort_column)
        self.sort_reverse = False
        self._draw_tasks()

    def action_quit(self) -> None:  # type: ignore[override]
        self.exit(0)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_query = view.parse_filter(event.value)
        self.poll()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#tasks", DataTable).focus()
