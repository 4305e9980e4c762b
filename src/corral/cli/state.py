"""`corral state ...`: the redo log of a service's journaled volumes (corral.recover.journal.log).

Registered by cli.py with `main.add_command(state)`. Epoch ids are per volume (each volume has
its own schedule); a service with several journaled volumes needs --volume PATH for diff and
excise, the other commands act on every journaled volume.

`state mark` closes the epoch itself rather than asking the supervisor: it takes the journal's
lock (so it never overlaps the supervisor's scheduled close) and freezes the service's cgroups
around the scan when the service runs, exactly as the supervisor does.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from corral.cli.base import need_root, service_name
from corral.cli.common import handled, print_json, table
from corral.core.errors import EXIT_CHECK, UsageError, escape_controls


def _volumes(name: str, volume: str | None, one: bool = False) -> tuple[Any, list[Any], int]:
    """The journaled volumes of service `name` (already resolved by cli.base.service_name)."""
    from corral.recover.journal.config import journal_config

    spec, found, quiet = journal_config(name)
    if not found:
        raise UsageError(f"{name}: no volume has journal = true")
    paths = ", ".join(v.path for v in found)
    if volume is not None:
        found = [v for v in found if v.path == volume.rstrip("/") or v.store == volume]
        if not found:
            raise UsageError(f"{name}: {volume}: not a journaled volume (journaled: {paths})")
    if one and len(found) > 1:
        raise UsageError(f"{name}: {len(found)} journaled volumes ({paths}); epochs are per "
                         "volume: choose one with --volume PATH")
    return spec, found, quiet


def _journal(spec: Any, vol: Any) -> Any:
    from corral.recover.journal.journal import Journal

    return Journal(spec, vol.store)


def _running(name: str) -> dict[str, Any] | None:
    from corral.supervise.control import read_state, supervisor_alive

    state = read_state(name)
    return state if supervisor_alive(state) else None


def _text(value: Any) -> str:
    return escape_controls(str(value)) if value not in (None, "") else "-"


volume_option = click.option("--volume", metavar="PATH",
                             help="The journaled volume (path inside the service's root).")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON document for machines.")


@click.group("state")
def state() -> None:
    """The persistent-state redo log: epochs of the journaled volumes, excision, commit."""


@state.command()
@click.argument("name", metavar="NAME|FILE")
@click.option("--note", help="Recorded with the epoch.")
@volume_option
@json_option
@handled
def mark(name: str, note: str | None, volume: str | None, as_json: bool) -> None:
    """End the current epoch now; prints the new epoch's id."""
    need_root("writes the service's journal")
    name = service_name(name)
    from corral.recover.journal.config import freezer

    spec, found, _ = _volumes(name, volume)
    running = _running(name)
    out = []
    for vol in found:
        writer = None
        if running:
            pid = ((running.get("processes") or {}).get(vol.owner) or {}).get("pid")
            writer = {"process": vol.owner, "pid": pid}
        epoch = _journal(spec, vol).close_epoch(
            "mark", note=note, writer_hint=writer, freeze=freezer(spec) if running else None)
        out.append({"volume": vol.path, "epoch": epoch})
    if as_json:
        print_json({"service": name, "epochs": out})
    elif len(out) == 1:
        click.echo(out[0]["epoch"])
    else:
        for item in out:
            click.echo(f"{item['volume']}  {item['epoch']}")


@state.command()
@click.argument("name", metavar="NAME|FILE")
@volume_option
@json_option
@handled
def log(name: str, volume: str | None, as_json: bool) -> None:
    """Epochs, oldest first: id, start, end, reason, files changed, incidents."""
    name = service_name(name)
    spec, found, _ = _volumes(name, volume)
    result = []
    for vol in found:
        journal = _journal(spec, vol)
        result.append({"volume": vol.path, "store": vol.store, **journal.info(),
                       "epochs": journal.log()})
    if as_json:
        print_json({"service": name, "volumes": result})
        return
    for item in result:
        if not item["journaled"]:
            click.echo(f"{name} {item['volume']}: not journaled yet (it starts with the service)")
            continue
        base = item["baseline"]
        click.echo(f"{name} {item['volume']}: baseline at epoch {base['epoch']} "
                   f"({base['entries']} entries, {base['created']}); epoch {item['epoch'] + 1} "
                   f"open since {item['open_since']}")
        if not item["epochs"]:
            continue
        rows = []
        for e in item["epochs"]:
            note = e["note"]
            if e.get("excised"):
                note = f"{_text(note)}; {e['conflicts']} conflict(s) to review" \
                    if e["conflicts"] else note
            rows.append([e["id"], e["start"], e["end"], e["reason"], e["files_changed"],
                         _text(",".join(e["incidents"])), _text(note)])
        click.echo(table(rows, ["EPOCH", "START", "END", "REASON", "FILES", "INCIDENTS", "NOTE"],
                         right=[0, 4], indent=2))


def _writer(change: dict[str, Any]) -> str:
    writer = change.get("writer")
    if not writer:
        return ""
    pid = f" pid {writer['pid']}" if writer.get("pid") else ""
    return f"  [{_text(writer.get('process'))}{pid}]"


def _epochs(ids: list[int]) -> str:
    return f"epoch{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def _conflict_lines(conflicts: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in conflicts:
        kept = 'later' if c['kept'] == 'after' else 'pre-stretch'
        where = f"{len(c['regions'])} region(s) of lines" if c.get("regions") else \
            f"{len(c['rows'])} row(s)" if c.get("rows") else \
            f"its {', '.join(c['fields'])}" if c.get("fields") else "the whole file"
        if c.get("file_level"):
            where += f" (file level: {escape_controls(c['file_level'])})"
        out.append(f"  CONFLICT  {c['path']}: changed in {_epochs(c['inside'])} and again in "
                   f"{_epochs(c['after'])}; {where}: kept the {kept} version; review it")
        for region in c.get("regions") or ():
            out.append(f"    at line {region['line']}:")
            for side, label in (("before_stretch", "before"), ("stretch", "stretch"),
                                ("later", "later")):
                for line in region[side]["lines"]:
                    out.append(f"      {label:<7} | {escape_controls(line)}")
                if region[side].get("more_lines"):
                    out.append(f"      {label:<7} | ... {region[side]['more_lines']} more")
        for row in c.get("rows") or ():
            if "key" not in row:
                out.append(f"    {row['reason']}: {row['why']} ({row['count']} row(s))")
                continue
            out.append(f"    {_text(row['table'])} key {_values(row['key'])}: {row['why']}; "
                       f"kept the {'later' if row['kept'] == 'after' else 'pre-stretch'} row")
            for side, label in (("before_stretch", "before"), ("stretch", "stretch"),
                                ("later", "later")):
                out.append(f"      {label:<7} | {_values(row[side])}")
    return out


def _values(values: Any) -> str:
    import json

    return escape_controls(json.dumps(values, ensure_ascii=False)) if values is not None \
        else "(no row)"


def _row_lines(change: dict[str, Any]) -> list[str]:
    """`state diff`: a database's rows, a text file's lines, under its change."""
    rows = change.get("rows")
    if rows is None:
        return [f"      {escape_controls(line)}" for line in change.get("lines") or ()]
    if rows.get("file_level"):
        return [f"      file level: {escape_controls(rows['file_level'])}"]
    out = [f"      {_text(r['table'])} {r['op']:<6} key {_values(r['key'])}: "
           f"{_values(r['before'])} -> {_values(r['after'])}" for r in rows.get("rows", ())]
    if rows.get("more_rows"):
        out.append(f"      ... {rows['more_rows']} more row(s)")
    return out


def _merged_lines(merged: list[dict[str, Any]]) -> list[str]:
    out = []
    for m in merged:
        what = f"the stretch's {m['removed_bytes']} appended byte(s) cut out" \
            if m["how"] == "append" else f"{m['undone_rows']} row(s) undone" \
            if m["how"] == "rows" else f"{m['undone_regions']} region(s) of lines undone"
        out.append(f"  merged    {m['path']}: {what}; later changes kept")
    return out


@state.command()
@click.argument("name", metavar="NAME|FILE")
@click.argument("epoch", type=int)
@volume_option
@json_option
@handled
def diff(name: str, epoch: int, volume: str | None, as_json: bool) -> None:
    """What one epoch changed: per path, before and after; the rows of a database (table, key,
    before, after) and the lines of a text file."""
    name = service_name(name)
    spec, found, _ = _volumes(name, volume, one=True)
    record = _journal(spec, found[0]).diff(epoch, detail=True)
    if as_json:
        print_json({"service": name, "volume": found[0].path, **record})
        return
    incidents = f", incidents {','.join(record['incidents'])}" if record["incidents"] else ""
    click.echo(f"epoch {record['id']} ({record['reason']}{incidents}): {record['start']} .. "
               f"{record['end']}, {len(record['changes'])} change(s)"
               + (f"; note: {_text(record['note'])}" if record["note"] else ""))
    if "excised" in record:
        span = record["excised"]
        click.echo(f"  excised epochs {span['from']}..{span['to']}")
        for line in _merged_lines(record.get("merged", [])) + \
                _conflict_lines(record["conflicts"]):
            click.echo(line)
    for change in record["changes"]:
        details = f" ({', '.join(change['details'])})" if change.get("details") else ""
        click.echo(f"  {change['change']:<9} {change['path']}{details}{_writer(change)}")
        for line in _row_lines(change):
            click.echo(line)


@state.command()
@click.argument("name", metavar="NAME|FILE")
@click.option("--from", "from_", type=int, required=True, metavar="EPOCH",
              help="First epoch of the stretch to take out.")
@click.option("--to", type=int, metavar="EPOCH", help="Last epoch of it (default: the latest).")
@click.option("--prefer", type=click.Choice(["before", "after"]),
              help="For rows, lines (or a binary file) changed inside the stretch and after "
                   "it: their version before the stretch, or the later one (the default; "
                   "listed for review either way).")
@click.option("--dry-run", is_flag=True,
              help="Close the open epoch and print the plan; change nothing in the volume.")
@volume_option
@json_option
@handled
def excise(name: str, from_: int, to: int | None, prefer: str | None, dry_run: bool,
           volume: str | None, as_json: bool) -> None:
    """Take a stretch of epochs out of the volume and keep everything after it. On a running
    service its processes are frozen meanwhile, then restarted (resumed if nothing changed)."""
    need_root("writes the service's journal")
    name = service_name(name)
    from corral.recover.journal.config import freezer

    spec, found, _ = _volumes(name, volume, one=True)
    journal = _journal(spec, found[0])
    running = _running(name)
    if dry_run:
        if running:  # the plan's own close then finds little left to read
            journal.close_epoch("mark", note="closed before an excision",
                                freeze=freezer(spec))
        result = journal.excise(from_, to, prefer, dry_run=True)
    elif running:
        from corral.recover.journal.online import excise_running, through_service

        through_service(journal, spec, found[0].path, running["supervisor"])
        result = excise_running(journal, spec, from_, to, prefer)
        if result["processes"] == "restarted":
            result["back"] = _wait_restarted(name, running)
    else:
        result = journal.excise(from_, to, prefer, stopped=True)
    if as_json:
        print_json({"service": name, "volume": found[0].path, **result})
        return
    what = f"would excise epochs {result['from']}..{result['to']}" if dry_run else \
        f"excised epochs {result['from']}..{result['to']} as epoch {result['epoch']}"
    click.echo(f"{name} {found[0].path}: {what} ({len(result['changes'])} path(s) "
               f"{'to change' if dry_run else 'changed'})")
    for change in result["changes"]:
        merged = {m["path"] for m in result["merged"]}
        conflicts = {c["path"] for c in result["conflicts"]}
        if change["path"] in merged | conflicts:
            continue  # said below
        verb = {"added": "restore", "deleted": "remove", "modified": "restore"}[change["change"]]
        click.echo(f"  {verb + ('' if dry_run else 'd'):<9} {change['path']}")
    for line in _merged_lines(result["merged"]) + _conflict_lines(result["conflicts"]):
        click.echo(line)
    for forced in result["forced"]:
        click.echo(f"  KEPT      {forced['path']}: needed by {forced['needed_by']['path']}")
    for path in result["not_restored"]:
        click.echo(f"  NOT RESTORED {path}: a socket or device cannot be restored")
    if "processes" in result:
        why = "they may hold the excised data in memory or the replaced files open" \
            if result["processes"] == "restarted" else "the excision changed nothing"
        click.echo(f"  processes {result['processes']} ({why}); frozen "
                   f"{result['frozen_ms']:.0f} ms")


def _wait_restarted(name: str, before: dict[str, Any], timeout: float = 30.0) -> bool:
    """Whether every process the supervisor ran before is running again, with a new pid
    (it restarts a killed process after its back-off, 1 s the first time)."""
    import time

    old = {p: (s or {}).get("pid") for p, s in (before.get("processes") or {}).items()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = (_running(name) or {}).get("processes") or {}
        if all((now.get(p) or {}).get("state") == "running" and
               (now.get(p) or {}).get("pid") not in (None, pid) for p, pid in old.items()):
            return True
        time.sleep(0.1)
    return False


@state.command()
@click.argument("name", metavar="NAME|FILE")
@click.option("--accept", type=int, multiple=True, metavar="EPOCH",
              help="Fold this incident epoch anyway (the incident was reviewed and harmless).")
@volume_option
@json_option
@handled
def commit(name: str, accept: tuple[int, ...], volume: str | None, as_json: bool) -> None:
    """Fold epochs older than the manifest's quiet period with no incident into the baseline."""
    need_root("writes the service's journal")
    name = service_name(name)
    from corral.supervise.control import open_incidents

    spec, found, quiet = _volumes(name, volume)
    incidents = open_incidents(spec)
    result = [{"volume": vol.path, **_journal(spec, vol).commit(quiet, incidents, accept)}
              for vol in found]
    if as_json:
        print_json({"service": name, "quiet_seconds": quiet, "volumes": result})
        return
    for item in result:
        folded = item["folded"]
        what = f"committed epochs {folded[0]}..{folded[-1]} into the baseline" if folded \
            else "nothing to commit"
        click.echo(f"{name} {item['volume']}: {what} ({item['stopped']}); reclaimed "
                   f"{item['reclaimed_objects']} object(s), {item['reclaimed_bytes']} bytes")


@state.command()
@click.argument("name", metavar="NAME|FILE")
@volume_option
@json_option
@handled
def check(name: str, volume: str | None, as_json: bool) -> None:
    """Verify the journal: hash chain, objects, head (exit 3 on a problem)."""
    need_root("writes the service's journal")
    name = service_name(name)
    from corral.recover.journal.config import EXCISE_MARK
    from corral.recover.journal.online import settle, through_service

    spec, found, _ = _volumes(name, volume)
    running = _running(name)
    for vol in found:  # an online excision killed half way: finish it, restart its processes
        journal = _journal(spec, vol)
        if running and os.path.exists(os.path.join(spec.run, EXCISE_MARK)):
            through_service(journal, spec, vol.path, running["supervisor"])
        settle(journal, spec)
    result = [{**_journal(spec, vol).check(), "volume": vol.path} for vol in found]
    bad = any(item["problems"] for item in result)
    if as_json:
        print_json({"service": name, "ok": not bad, "volumes": result})
    else:
        for item in result:
            if item["problems"]:
                click.echo(f"{name} {item['volume']}: {len(item['problems'])} problem(s):")
                for problem in item["problems"]:
                    click.echo(f"  {escape_controls(problem)}")
            else:
                click.echo(f"{name} {item['volume']}: sound ({item['epochs']} epoch(s), "
                           f"{item['objects']} object(s))")
    sys.exit(EXIT_CHECK if bad else 0)
