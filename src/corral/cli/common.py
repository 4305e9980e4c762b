"""What every `corral` click subcommand shares: the error contract (cli_base) as a decorator,
JSON output and tables for people. Imports only click at load, so command modules can use it;
rich is imported when a table is drawn, never on the launch path (`corral run FILE`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any

import click

from corral.cli.base import call_handled


def handled(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn corral's errors into their exit codes (cli_base.call_handled)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return call_handled(func, *args, **kwargs)

    return wrapper


def print_json(data: dict[str, Any]) -> None:
    """The one `--json` writer: every command prints one object (docs/cli.md), so a machine
    reads a key by name and a later key added breaks no reader."""
    if not isinstance(data, dict):  # the contract; a list here is a bug, not output
        raise TypeError(f"--json output must be an object, not {type(data).__name__}")
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def colour_wanted() -> bool:
    return sys.stdout.isatty()


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, *,
          right: Sequence[int] = (), styles: Sequence[Sequence[str | None]] | None = None,
          indent: int = 0) -> str:
    """Aligned columns for people, two spaces apart, no box; the last column is free.

    `right`: indices of right-aligned columns (numbers). `styles[r][c]`: a rich style for a cell
    (only drawn on a terminal). Cells are plain text: no rich markup is interpreted, and control
    characters a service may have put in a path are escaped, so one row is one line."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from corral.core.errors import escape_controls

    colour = colour_wanted()
    grid = Table(box=None, show_header=header is not None, header_style="bold" if colour else "",
                 pad_edge=False, padding=(0, 2, 0, 0), show_edge=False, expand=False)
    width = len(header) if header is not None else max((len(r) for r in rows), default=0)
    for i in range(width):
        grid.add_column(header[i] if header is not None else "",
                        justify="right" if i in right else "left")
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            style = styles[r][c] if styles and c < len(styles[r]) and colour else None
            cells.append(Text(escape_controls("" if cell is None else str(cell)),
                              style=style or ""))
        grid.add_row(*cells)
    out = StringIO()
    # A width no row reaches: a table piped to a file or a test is never wrapped or cut.
    Console(file=out, width=100_000, force_terminal=colour, no_color=not colour,
            highlight=False, emoji=False, soft_wrap=True).print(grid)
    pad = " " * indent
    return "\n".join(pad + line.rstrip() for line in out.getvalue().rstrip("\n").split("\n"))
