"""`corral host events`: follow the packets corral's tables deny, one line per event.

Attach with `host_group.add_command(events)`. It imports corral.watch.nflog only when run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import click

from corral.cli.common import handled
from corral.core.errors import escape_controls

# Minimum column widths of the plain output; a longer value widens its column from then on.
_COLUMNS = (("TIME (UTC)", 27), ("SERVICE", 10), ("PROCESS", 10), ("REASON", 9), ("PROTO", 6),
            ("SOURCE", 21), ("DESTINATION", 21), ("USER", 0))


def _endpoint(addr: str | None, port: int | None) -> str:
    if addr is None:
        return "?"
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _cells(event: dict) -> list[str]:
    if event["service"] is None:   # not one of corral's prefixes: show it whole
        service, process, reason = "-", "-", json.dumps(event["prefix"])
    else:
        service, process, reason = event["service"], event["process"] or "-", event["reason"] or "-"
    user = "-" if event["uid"] is None else (
        f'{event["user"]} ({event["uid"]})' if event["user"] else str(event["uid"]))
    return [escape_controls(str(c)) for c in (
        event["time"], service, process, reason, event["proto"],
        _endpoint(event["src"], event["sport"]), _endpoint(event["dst"], event["dport"]), user)]


class _Table:
    def __init__(self) -> None:
        self.widths = [w for _, w in _COLUMNS]

    def line(self, cells: list[str]) -> str:
        for i, cell in enumerate(cells[:-1]):
            self.widths[i] = max(self.widths[i], len(cell))
        padded = (c.ljust(w) for c, w in zip(cells[:-1], self.widths, strict=False))
        return "  ".join(padded) + "  " + cells[-1]


def _groups(services: tuple[str, ...]) -> list[int]:
    """The NFLOG groups to read: the host table's, and each service's own (all installed ones
    when none is named). A running service's group is its watcher's: busy while it runs."""
    from corral.core.paths import RUNTIME, lib_root
    from corral.plan import nft_rules as nftables

    if not services:
        root = Path(lib_root())
        services = tuple(["host"] + sorted(p.name for p in root.iterdir()
                                           if (p / RUNTIME).exists())
                         if root.is_dir() else ["host"])
    return sorted({nftables.NFLOG_GROUP if s == "host" else nftables.nflog_group(s)
                   for s in services})


class _Merged:
    """Several readers read as one (a short poll on each)."""

    def __init__(self, readers: list) -> None:
        self.readers = readers

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.readers)

    def read(self, timeout: float | None) -> list[dict]:
        import select

        ready, _, _ = select.select(self.readers, [], [], timeout)
        out: list[dict] = []
        for reader in ready:
            out.extend(reader.read(0))
        return out


@click.command("events")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for machines.")
@click.option("--service", "services", multiple=True, metavar="NAME",
              help="Only events of this service (repeatable; 'host' for the host table).")
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="Stop after N events.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="S",
              help="Stop after S seconds (default: follow until interrupted).")
@handled
def events(as_json: bool, services: tuple[str, ...], count: int | None,
           timeout: float | None) -> None:
    """Follow the packets that corral's nftables tables drop (sampled: at most a few per second
    and per process and reason; the drop counters in `nft list table` count them all).

    Needs root. Only one program can read the log group at a time.
    """
    from corral.watch.nflog import EventReader

    groups = _groups(services)
    table = _Table()
    shown = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(EventReader(group)) for group in groups]
            reader = _Merged(readers)
            if not as_json:
                click.echo(table.line([name for name, _ in _COLUMNS]))
            lost = 0
            while count is None or shown < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                for event in reader.read(left):
                    if services and event["service"] not in services:
                        continue
                    click.echo(json.dumps(event) if as_json else table.line(_cells(event)))
                    shown += 1
                    if count is not None and shown >= count:
                        break
                if reader.lost > lost:
                    click.echo(f"corral: events lost: the receive buffer overflowed "
                               f"{reader.lost - lost} time(s)", err=True)
                    lost = reader.lost
    except KeyboardInterrupt:
        pass                       # the normal way to stop following
    except BrokenPipeError:        # `corral host events | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        sys.exit(0)
