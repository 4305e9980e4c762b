"""Progress for work a person waits for: drawn on a terminal only, silent in --json and pipes."""

from __future__ import annotations

import sys
from typing import Any


def wanted(json_output: bool = False) -> bool:
    return not json_output and sys.stderr.isatty()


class Progress:
    """`with Progress("building", total, enabled) as bar: bar.advance()`; rich is imported only
    when a bar is really drawn, so the quiet path costs nothing."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress("{task.description}", BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True),
                                     transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
