"""The `corral` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from corral.cli.base import need_root, run_foreground, service_name
from corral.cli.common import handled, print_json, table
from corral.core.errors import EXIT_EXEC_FAILED, EXIT_USAGE, CorralError

json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON object for machines (docs/cli.md).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def main() -> None:
    """corral: contain a Linux service with the kernel's own mechanisms and recover it from a
    clean base. State lives under /var/lib/corral and /run/corral (moved by CORRAL_ROOT)."""


@main.command()
@click.argument("files", nargs=-1, required=True)
@json_option
@handled
def check(files: tuple[str, ...], as_json: bool) -> None:
    """Validate manifests or host files; print nothing but errors (exit 2 if any)."""
    from corral.core.errors import key_path
    from corral.manifest.check import check_files

    problems = check_files(files)
    if as_json:
        print_json({"ok": not problems, "files": list(files),
                    "problems": [{"file": p.file, "where": key_path(p.loc), "message": p.message}
                                 for p in problems]})
    else:
        for problem in problems:
            click.echo(str(problem), err=True)
    sys.exit(EXIT_USAGE if problems else 0)


@main.command()
@click.argument("file")
@json_option
@handled
def plan(file: str, as_json: bool) -> None:
    """Show the desired state of a service; changes nothing."""
    from corral.cli.report import plan_text
    from corral.manifest.model import load_manifest
    from corral.plan.service import plan_service

    service_plan = plan_service(file, load_manifest(file))
    if as_json:
        data = {"service": service_plan.service, "file": file, **service_plan.to_json()}
        delta = data["delta"]  # a size is `bytes` in every --json (status says bytes too)
        data["delta"] = {"kind": delta["kind"], "bytes": delta.get("size", delta.get("bytes"))}
        print_json(data)
    else:
        click.echo(plan_text(service_plan))


@main.command()
@click.argument("file")
@json_option
@handled
def install(file: str, as_json: bool) -> None:
    """Create the users, build the base image and apply the firewall table; idempotent."""
    from corral.core.progress import wanted
    from corral.host.install import install as do_install
    from corral.manifest.model import load_manifest
    from corral.plan.service import plan_service

    service_plan = plan_service(file, load_manifest(file))
    need_root()
    report = do_install(service_plan, file, show_progress=wanted(as_json))
    _report(report, as_json, f"{report.service}: installed, nothing to change")


@main.command()
@click.argument("target", metavar="FILE|NAME")
@click.option("--purge", is_flag=True, help="Also delete the volumes (all persistent state).")
@json_option
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
@json_option
@handled
def up(file: str, as_json: bool) -> None:
    """Start the service in the background; returns when every process runs and listens."""
    from corral.supervise.control import up as do_up

    need_root()
    result = do_up(service_name(file))
    if as_json:
        print_json(result)
    else:
        state = result["state"]
        verb = "started" if result["changed"] else "already running"
        pids = ", ".join(f"{n} pid {p['pid']}" for n, p in state["processes"].items())
        click.echo(f"{result['service']}: {verb} ({pids})")


@main.command()
@click.argument("name", metavar="NAME|FILE")
@json_option
@handled
def down(name: str, as_json: bool) -> None:
    """Stop the service: every process, its delta, mounts and cgroups go."""
    from corral.supervise.control import down as do_down

    need_root()
    result = do_down(service_name(name))
    if as_json:
        print_json(result)
    else:
        click.echo(f"{result['service']}: {'stopped' if result['changed'] else 'was not running'}")


@main.command()
@click.argument("name", required=False, metavar="[NAME|FILE]")
@json_option
@handled
def status(name: str | None, as_json: bool) -> None:
    """Processes, users, delta size, incidents and journal epochs of one or all services."""
    from corral.cli.report import status_text
    from corral.supervise.control import status as do_status

    result = do_status(service_name(name) if name else None)
    if as_json:  # one shape with or without NAME: {"services": [...]}
        print_json({"services": result})
    else:
        click.echo(status_text(result))


class _ExecCommand(click.Command):
    """`corral exec` passes CMD's exit code through, so a usage error of its own must not look
    like CMD's 2: it takes 125, as every other failure of corral's in `exec` does."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            # click declares exit_code a ClassVar, but its main() reads it from the instance
            # (sys.exit(e.exit_code)); rewrapping would lose the subclass's message format.
            exc.exit_code = EXIT_EXEC_FAILED  # type: ignore[misc]
            raise


@main.command("exec", cls=_ExecCommand, context_settings={"ignore_unknown_options": True})
@click.argument("name", metavar="NAME|FILE")
@click.argument("process")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD...")
@handled
def exec_(name: str, process: str, argv: tuple[str, ...]) -> None:
    """Run CMD inside PROCESS's containment: NAME PROCESS -- CMD...

    \b
    Exit codes (as docker and podman exec):
      CMD's own   CMD ran; its exit code (128+N if a signal N killed it)
      125         corral failed: not root, not installed or running, no such PROCESS, usage
      126         CMD was found but could not be executed
      127         CMD was not found
    """
    from corral.supervise.control import exec_in

    need_root(exit_code=EXIT_EXEC_FAILED)
    try:
        code = exec_in(service_name(name), process, list(argv))
    except CorralError as exc:  # corral's own 1, 2 or 3 would read as CMD's
        if exc.exit_code not in (126, 127):
            exc.exit_code = EXIT_EXEC_FAILED
        raise
    sys.exit(code)


@main.command()
@click.argument("name", metavar="NAME|FILE")
@json_option
@handled
def delta(name: str, as_json: bool) -> None:
    """What the running service changed against its base (added, modified, deleted)."""
    from corral.cli.report import delta_text
    from corral.supervise.control import delta_of

    need_root()
    result = delta_of(service_name(name))
    print_json(result) if as_json else click.echo(delta_text(result))


@main.command()
@click.argument("name", metavar="NAME|FILE")
@click.option("--reason", default="revert", help="Recorded with the archived delta.")
@json_option
@handled
def revert(name: str, reason: str, as_json: bool) -> None:
    """Kill, archive the delta, restart from the clean base; volumes are kept."""
    from corral.supervise.control import revert as do_revert

    need_root()
    result = do_revert(service_name(name), reason=reason)
    if as_json:
        print_json(result)
    else:
        click.echo(f"{result['service']}: reverted to base {result['base_version']}; "
                   f"delta archived in {result['archive']}")


@main.group("base")
def base_group() -> None:
    """Base image versions: list, build a new one, switch to one."""


@base_group.command("list")
@click.argument("name", metavar="NAME|FILE")
@json_option
@handled
def base_list(name: str, as_json: bool) -> None:
    """The base versions of a service; * marks the current one."""
    from corral.host.base import list_versions
    from corral.supervise.control import spec_of

    service = service_name(name)
    # `base_version` is the name of a base version in every --json (status, delta, revert).
    versions = [{"base_version": v["version"], **{k: x for k, x in v.items() if k != "version"}}
                for v in list_versions(spec_of(service))]
    if as_json:
        print_json({"service": service, "versions": versions})
        return
    click.echo(table([["*" if v["current"] else "", v["base_version"], f"{v['entries']} entries",
                       v.get("note") or ""] for v in versions], right=[1]))


@base_group.command("build")
@click.argument("name", metavar="NAME|FILE")
@json_option
@handled
def base_build(name: str, as_json: bool) -> None:
    """Build a new base version from the installed manifest (not used until `base use`)."""
    from corral.core.progress import wanted
    from corral.host.install import build_next_base

    need_root()
    service = service_name(name)
    version = build_next_base(service, show_progress=wanted(as_json))
    if as_json:
        print_json({"service": service, "base_version": version, "current": False})
        return
    click.echo(f"{service}: built base version {version}; corral base use {service} {version} "
               "to switch to it")


@base_group.command("use")
@click.argument("name", metavar="NAME|FILE")
@click.argument("version", type=int)
@json_option
@handled
def base_use(name: str, version: int, as_json: bool) -> None:
    """Switch to another base version; it takes effect at the next start or revert."""
    from corral.host.base import use
    from corral.supervise.control import spec_of

    need_root()
    spec = spec_of(service_name(name))
    use(spec, version)
    if as_json:
        print_json({"service": spec.service, "base_version": version,
                    "previous_base_version": spec.base_version,
                    "changed": version != spec.base_version})
        return
    click.echo(f"{spec.service}: base version {version} is current; it takes effect at the next "
               f"start or `corral revert {spec.service}`")


@main.command()
@click.argument("name", metavar="NAME|FILE")
@json_option
@handled
def verify(name: str, as_json: bool) -> None:
    """Check the current base against its integrity manifest (exit 3 if it was changed)."""
    from corral.core.errors import EXIT_CHECK
    from corral.host.base import verify as do_verify
    from corral.supervise.control import spec_of

    need_root()
    spec = spec_of(service_name(name))
    found = do_verify(Path(spec.state), spec.base_version)
    result = {"service": spec.service, "base_version": found["version"],
              "ok": not found["problems"], "entries": found["entries"],
              "problems": found["problems"]}
    if as_json:
        print_json(result)
    elif not result["problems"]:
        click.echo(f"{spec.service}: base {result['base_version']} intact "
                   f"({result['entries']} entries)")
    else:
        click.echo(f"{spec.service}: base {result['base_version']} CHANGED since it was built:")
        click.echo(table([[p["change"], p["path"] + (f" ({', '.join(p['fields'])})"
                                                     if p.get("fields") else "")]
                          for p in result["problems"]], indent=2))
    sys.exit(EXIT_CHECK if result["problems"] else 0)


@main.command()
@click.argument("name", metavar="NAME|FILE")
@click.option("--allow", multiple=True, metavar="PATH",
              help="Allow a change to an executable, library, setuid file or protected path.")
@json_option
@handled
def commit(name: str, allow: tuple[str, ...], as_json: bool) -> None:
    """Fold the running service's delta into a new base version, only on purpose.

    Exit 3 when refused (a change to an executable without --allow, or an open incident)."""
    from corral.supervise.control import commit_delta

    need_root()
    result = commit_delta(service_name(name), list(allow))
    if as_json:
        print_json(result)
        return
    if result["changes"]:
        click.echo(table([[c["change"], c["path"]] for c in result["changes"]], indent=2))
    click.echo(f"{result['service']}: committed {len(result['changes'])} changes as base version "
               f"{result['base_version']}; restarted on it with a fresh delta")


@main.command("incidents")
@click.argument("name", required=False, metavar="[NAME|FILE]")
@json_option
@click.option("--close", "close_id", metavar="ID|all", help="Close an incident after review.")
@handled
def incidents_cmd(name: str | None, as_json: bool, close_id: str | None) -> None:
    """The incident records (what tripped, when, how fast it was contained)."""
    from corral.cli.report import incidents_text
    from corral.supervise.control import close_incidents, incidents_of

    service = service_name(name) if name else None
    if close_id:
        if not service:
            raise click.UsageError("--close needs the service NAME")
        need_root()
        closed = close_incidents(service, close_id)
        if as_json:
            print_json({"service": service, "changed": bool(closed), "closed": closed})
        else:
            click.echo(f"{service}: closed {len(closed)} incident(s)")
        return
    records = incidents_of(service)
    if as_json:  # SPEC: {"incidents": [...]}; `service` is null for all services
        print_json({"service": service, "incidents": records})
    else:
        click.echo(incidents_text(records))


def _report(report: Any, as_json: bool, unchanged: str) -> None:
    if as_json:
        print_json(report.to_json())
    elif report.changes:
        for line in report.changes:
            click.echo(f"{report.service}: {line}")
    else:
        click.echo(unchanged)


def _register_groups() -> None:
    """Command groups that live in their own modules (each imports only click at load)."""
    from corral.cli.audit import audit
    from corral.cli.events import events
    from corral.cli.export import export, graph
    from corral.cli.host import host
    from corral.cli.hostimage import delta, image
    from corral.cli.learn import learn
    from corral.cli.life import disable, enable, logs, reload
    from corral.cli.state import state

    host.add_command(events)
    host.add_command(image)
    host.add_command(delta)
    main.add_command(host)
    main.add_command(audit)
    main.add_command(state)
    main.add_command(learn)
    main.add_command(export)
    for command in (reload, enable, disable, logs):
        main.add_command(command)
    main.add_command(graph)


_register_groups()


if __name__ == "__main__":
    main()
