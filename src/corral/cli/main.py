"""The `corral` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import sys
from typing import Any

import click

from corral.cli.base import need_root, run_foreground, service_name
from corral.cli.common import handled, print_json
from corral.core.errors import EXIT_USAGE, CorralError


_print_json = print_json


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def main() -> None:
    """corral: contain a Linux service with the kernel's own mechanisms and recover it from a
    clean base. State lives under /var/lib/corral and /run/corral (moved by CORRAL_ROOT)."""


@main.command()
@click.argument("files", nargs=-1, required=True)
@handled
def check(files: tuple[str, ...]) -> None:
    """Validate manifests or host files; print nothing but errors (exit 2 if any)."""
    from corral.manifest.check import check_files

    problems = check_files(files)
    for problem in problems:
        click.echo(str(problem), err=True)
    sys.exit(EXIT_USAGE if problems else 0)


@main.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines.")
@handled
def plan(file: str, as_json: bool) -> None:
    """Show the desired state of a service; changes nothing."""
    from corral.manifest.model import load_manifest
    from corral.plan.service import plan_service
    from corral.cli.report import plan_text

    service_plan = plan_service(file, load_manifest(file))
    if as_json:
        _print_json(service_plan.to_json())
    else:
        click.echo(plan_text(service_plan))


@main.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Report what changed as JSON.")
@handled
def install(file: str, as_json: bool) -> None:
    """Create the users, build the base image and apply the firewall table; idempotent."""
    from corral.host.install import install as do_install
    from corral.manifest.model import load_manifest
    from corral.plan.service import plan_service
    from corral.core.progress import wanted

    service_plan = plan_service(file, load_manifest(file))
    need_root()
    report = do_install(service_plan, file, show_progress=wanted(as_json))
    _report(report, as_json, f"{report.service}: installed, nothing to change")


@main.command()
@click.argument("target", metavar="FILE|NAME")
@click.option("--purge", is_flag=True, help="Also delete the volumes (all persistent state).")
@click.option("--json", "as_json", is_flag=True, help="Report what changed as JSON.")
@handled
def uninstall(target: str, purge: bool, as_json: bool) -> None:
    """Remove all that install made (users, base, table); volumes kept unless --purge."""
    from corral.host.install import uninstall as do_uninstall

    from corral.supervise.control import down as do_down
    from corral.supervise.control import read_state, supervisor_alive

    need_root()
    name = service_name(target)
    if supervisor_alive(read_state(name)):
        do_down(name)
    else:  # what a supervisor that died left (delta mount, cgroups); best effort
        try:
            do_down(name)
        except (CorralError, OSError):
            pass
    report = do_uninstall(name, purge=purge)
    _report(report, as_json, f"{report.service}: nothing to remove")


@main.command()
@click.argument("file")
@handled
def run(file: str) -> None:
    """Run the service in the foreground (Ctrl-C stops it); its output is shown here."""
    run_foreground(file)


@main.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Report the state as JSON.")
@handled
def up(file: str, as_json: bool) -> None:
    """Start the service in the background; returns when every process runs and listens."""
    from corral.supervise.control import up as do_up

    need_root()
    result = do_up(service_name(file))
    if as_json:
        _print_json(result)
    else:
        state = result["state"]
        verb = "started" if result["changed"] else "already running"
        pids = ", ".join(f"{n} pid {p['pid']}" for n, p in state["processes"].items())
        click.echo(f"{result['service']}: {verb} ({pids})")


@main.command()
@click.argument("name")
@handled
def down(name: str) -> None:
    """Stop the service: every process, its delta, mounts and cgroups go."""
    from corral.supervise.control import down as do_down

    need_root()
    result = do_down(service_name(name))
    click.echo(f"{result['service']}: {'stopped' if result['changed'] else 'was not running'}")


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines.")
@handled
def status(name: str | None, as_json: bool) -> None:
    """Processes, users, delta size, incidents and journal epochs of one or all services."""
    from corral.cli.report import status_text
    from corral.supervise.control import status as do_status

    result = do_status(service_name(name) if name else None)
    if as_json:
        _print_json(result if name is None else result[0])
    else:
        click.echo(status_text(result))


@main.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("process")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@handled
def exec_(name: str, process: str, argv: tuple[str, ...]) -> None:
    """Run CMD inside PROCESS's containment: NAME PROCESS -- CMD..."""
    from corral.supervise.control import exec_in

    need_root()
    sys.exit(exec_in(service_name(name), process, list(argv)))


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines.")
@handled
def delta(name: str, as_json: bool) -> None:
    """What the running service changed against its base (added, modified, deleted)."""
    from corral.cli.report import delta_text
    from corral.supervise.control import delta_of

    need_root()
    result = delta_of(service_name(name))
    _print_json(result) if as_json else click.echo(delta_text(result))


@main.command()
@click.argument("name")
@click.option("--reason", default="revert", help="Recorded with the archived delta.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@handled
def revert(name: str, reason: str, as_json: bool) -> None:
    """Kill, archive the delta, restart from the clean base; volumes are kept."""
    from corral.supervise.control import revert as do_revert

    need_root()
    result = do_revert(service_name(name), reason=reason)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['service']}: reverted to base {result['base_version']}; "
                   f"delta archived in {result['archive']}")


@main.group("base")
def base_group() -> None:
    """Base image versions: list, build a new one, switch to one."""


@base_group.command("list")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines.")
@handled
def base_list(name: str, as_json: bool) -> None:
    """The base versions of a service; * marks the current one."""
    from corral.host.base import list_versions
    from corral.supervise.control import spec_of

    result = list_versions(spec_of(service_name(name)))
    if as_json:
        _print_json(result)
        return
    for v in result:
        note = f"  {v['note']}" if v.get("note") else ""
        click.echo(f"{'*' if v['current'] else ' '} {v['version']:>3}  {v['entries']} entries"
                   f"{note}")


@base_group.command("build")
@click.argument("name")
@handled
def base_build(name: str) -> None:
    """Build a new base version from the installed manifest (not used until `base use`)."""
    from corral.host.install import build_next_base
    from corral.core.progress import wanted

    need_root()
    version = build_next_base(service_name(name), show_progress=wanted())
    click.echo(f"{name}: built base version {version}; corral base use {name} {version} "
               "to switch to it")


@base_group.command("use")
@click.argument("name")
@click.argument("version", type=int)
@handled
def base_use(name: str, version: int) -> None:
    """Switch to another base version; it takes effect at the next start or revert."""
    from corral.host.base import use
    from corral.supervise.control import spec_of

    need_root()
    use(spec_of(service_name(name)), version)
    click.echo(f"{name}: base version {version} is current; it takes effect at the next "
               f"start or `corral revert {name}`")


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines.")
@handled
def verify(name: str, as_json: bool) -> None:
    """Check the current base against its integrity manifest (exit 3 if it was changed)."""
    from corral.host.base import verify as do_verify
    from corral.core.errors import EXIT_CHECK
    from corral.supervise.control import spec_of

    need_root()
    spec = spec_of(service_name(name))
    result = do_verify(spec.state, spec.base_version)
    if as_json:
        _print_json(result)
    elif not result["problems"]:
        click.echo(f"{name}: base {result['version']} intact ({result['entries']} entries)")
    else:
        click.echo(f"{name}: base {result['version']} CHANGED since it was built:")
        for p in result["problems"]:
            fields = f" ({', '.join(p['fields'])})" if p.get("fields") else ""
            click.echo(f"  {p['change']:<8} {p['path']}{fields}")
    sys.exit(EXIT_CHECK if result["problems"] else 0)


@main.command()
@click.argument("name")
@click.option("--allow", multiple=True, metavar="PATH",
              help="Allow a change to an executable, library, setuid file or protected path.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@handled
def commit(name: str, allow: tuple[str, ...], as_json: bool) -> None:
    """Fold the running service's delta into a new base version, only on purpose."""
    from corral.supervise.control import commit_delta

    need_root()
    result = commit_delta(service_name(name), list(allow))
    if as_json:
        _print_json(result)
        return
    for change in result["changes"]:
        click.echo(f"  {change['change']:<8} {change['path']}")
    click.echo(f"{name}: committed {len(result['changes'])} changes as base version "
               f"{result['version']}; restarted on it with a fresh delta")


@main.command("incidents")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the records.")
@click.option("--close", "close_id", metavar="ID|all", help="Close an incident after review.")
@handled
def incidents_cmd(name: str | None, as_json: bool, close_id: str | None) -> None:
    """The incident records (what tripped, when, how fast it was contained)."""
    from corral.cli.report import incidents_text
    from corral.supervise.control import close_incidents, incidents_of

    if close_id:
        if not name:
            raise click.UsageError("--close needs the service NAME")
        need_root()
        closed = close_incidents(service_name(name), close_id)
        click.echo(f"{name}: closed {len(closed)} incident(s)")
        return
    records = incidents_of(service_name(name) if name else None)
    _print_json(records) if as_json else click.echo(incidents_text(records))


def _report(report: Any, as_json: bool, unchanged: str) -> None:
    if as_json:
        _print_json(report.to_json())
    elif report.changed:
        for line in report.changed:
            click.echo(f"{report.service}: {line}")
    else:
        click.echo(unchanged)


def _register_groups() -> None:
    """Command groups that live in their own modules (each imports only click at load)."""
    from corral.cli.audit import audit
    from corral.cli.events import events
    from corral.cli.host import host
    from corral.cli.learn import learn
    from corral.cli.state import state

    host.add_command(events)
    main.add_command(host)
    main.add_command(audit)
    main.add_command(state)
    main.add_command(learn)


_register_groups()


if __name__ == "__main__":
    main()
