"""How the testbed talks to whoever runs it: a live display for people, JSON lines for tools.

Apart from the orchestrators because the ramp and every scenario report through the same
object, and how a figure is shown has nothing to do with how it is measured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from testbed import report
from testbed.options import Options


class Ui:
    """A rich progress bar and tables for people; JSON lines for tests and scripts."""

    def __init__(self, kind: str) -> None:
        from rich.console import Console

        self.kind = kind
        # a pipe or a file gets 120 columns: the tables must not wrap mid-phrase in a log
        width = None if sys.stdout.isatty() else 120
        self.console = Console(highlight=False, soft_wrap=False, width=width)
        self._progress: Any = None
        self._task: Any = None

    def event(self, event: str, **fields: Any) -> None:
        if self.kind == "json":
            sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
            sys.stdout.flush()

    def say(self, text: str) -> None:
        if self.kind == "json":
            self.event("message", text=text)
        else:
            self.console.print(text)

    def ramp_start(self, mode: str, total: int) -> None:
        if self.kind != "rich":
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("held {task.fields[held]:>7,}  failed {task.fields[failed]:>7,}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(mode, total=total, held=0, failed=0)

    def ramp_update(self, mode: str, attempted: int, held: int, failed: int) -> None:
        self.event("progress", mode=mode, attempted=attempted, held=held, failed=failed)
        if self._progress is not None:
            self._progress.update(self._task, completed=attempted, held=held, failed=failed)

    def ramp_end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def run_done(self, run: dict[str, Any]) -> None:
        if self.kind == "json":
            self.event("run", **{k: v for k, v in run.items() if k not in ("curve", "timeline")})
        else:
            self.console.print(report.render_table(run))

    def summary(self, runs: Sequence[dict[str, Any]]) -> None:
        if self.kind != "json" and len(runs) > 1:
            self.console.print(report.render_summary(runs))

    # -- scenarios: one timeline row a second -------------------------------------------------

    _live: Any = None
    _last_line = -1e9

    def scenario_start(self, options: Options) -> None:
        if self.kind == "rich" and self.console.is_terminal:
            from rich.live import Live
            from rich.text import Text

            self._live = Live(Text("starting"), console=self.console, refresh_per_second=4)
            self._live.start()

    def scenario_sample(self, row: dict[str, Any], kernel: Any, limit: int, step: str) -> None:
        fails = sum(row["failures"].values())
        self.event("sample", step=step, **row, origin_time_wait=kernel.origin_time_wait)
        if self.kind != "rich":
            return
        text = (
            f"{row['t']:6.0f} s  {step:<8} live {row['live']:>7,} "
            f"({100 * row['live'] / limit:5.1f}% of {limit:,})  failures/s {fails:>5,}  "
            f"TIME_WAIT {row['time_wait']:>6,} (origin side {kernel.origin_time_wait:,})  "
            f"other {row['other_states']:>5,}"
        )
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(text))
        elif row["t"] - self._last_line >= 5:  # a pipe or a log file: a line every 5 s
            self._last_line = row["t"]
            self.console.print(text)

    def scenario_step(self, name: str, t: float, live: int) -> None:
        self.event("step", name=name, t=t, live=live)
        if self.kind == "rich":
            self.console.print(f"[bold]step {name}[/bold] at {t:.1f} s, {live:,} sessions live")

    def scenario_end(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def scenario_done(
        self,
        figures: dict[str, Any],
        rows: Sequence[tuple[str, str]] = (),
        reconnects: bool = True,
    ) -> None:
        """The figures at the end: tables for people, one ``scenario`` line for tools."""
        from testbed import scenario_report

        if self.kind == "json":
            self.event("scenario", **figures)
            return
        for table in scenario_report.render(
            figures["doc"],
            figures["detail"],
            rows,
            reconnects,
        ):
            self.console.print(table)
